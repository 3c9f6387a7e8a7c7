"""The simulator's failover metric keeps the one-death promise apart from waits that
two deaths cause: a leader death while a majority of the task's acceptors is down too
cannot be taken over before they return (simulations/metrics.py)."""

from __future__ import annotations

from simulations.metrics import Recorder

ACCEPTORS = ("n1", "n2", "n3")


def test_a_one_death_failover_counts_against_the_promise() -> None:
    rec = Recorder()
    rec.leader_lost(10.0, "n9", "t1", 1, "n1", ACCEPTORS)
    rec.note_acceptors_down(lambda name: name in {"n9", "n2"})  # one acceptor of three
    rec.run_started(11.4, "n3", "t1", 2, 0)
    assert len(rec.failovers) == 1 and abs(rec.failovers[0] - 1.4) < 1e-9
    assert rec.failovers_quorum_lost == []


def test_a_wait_for_a_downed_acceptor_majority_is_measured_apart() -> None:
    rec = Recorder()
    rec.leader_lost(10.0, "n1", "t1", 1, "", ACCEPTORS)
    rec.note_acceptors_down(lambda name: name in {"n1"})
    assert rec.failovers_quorum_lost == []
    # A second acceptor dies before anyone took the task over: two of three are down.
    rec.note_acceptors_down(lambda name: name in {"n1", "n2"})
    # Both come back later; the mark stays (the wait was caused by the double death).
    rec.note_acceptors_down(lambda name: False)
    rec.run_started(16.2, "n2", "t1", 2, 0)
    assert rec.failovers == []
    assert len(rec.failovers_quorum_lost) == 1
    assert abs(rec.failovers_quorum_lost[0] - 6.2) < 1e-9


def test_an_older_epoch_does_not_end_the_wait() -> None:
    rec = Recorder()
    rec.leader_lost(10.0, "n1", "t1", 3, "n2", ACCEPTORS)
    rec.run_started(10.5, "n3", "t1", 3, 0)  # the same epoch: not a takeover
    assert rec.failovers == [] and rec.failovers_quorum_lost == []


def test_a_commit_below_a_leased_epoch_is_a_violation_unless_chosen_there() -> None:
    """Fencing failed when an old epoch commits after a newer ballot was leased, unless a
    majority had stored that epoch's result first (then every newer ballot carries it)."""
    rec = Recorder()
    rec.submitted(1.0, "n1", "t1", b"42", key="k1")
    rec.leader_changed(1.1, "n1", "t1", 1, "n2", 0, failover=False)
    rec.leader_changed(5.0, "n3", "t1", 2, "n2", 6, failover=True)
    rec.committed(5.1, "n1", "t1", 1, "n2", b"42")
    assert rec.tasks["t1"].stale_commit and rec.first_violation is not None

    rec = Recorder()
    rec.submitted(1.0, "n1", "t1", b"42", key="k1")
    rec.leader_changed(1.1, "n1", "t1", 1, "n2", 0, failover=False)
    rec.value_chosen("t1", 1)
    rec.leader_changed(5.0, "n3", "t1", 2, "n2", 6, failover=True)
    rec.committed(5.1, "n1", "t1", 1, "n2", b"42")
    assert not rec.tasks["t1"].stale_commit and rec.first_violation is None
