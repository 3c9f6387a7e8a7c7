"""Ownership that survives: owner deaths, paused owners, one key at several nodes, no quorum.

Driven by :class:`CoordCluster` (oracle membership, seeded network). Each task's acceptor
set is the key's home (3 of the cluster's nodes); leases and results need a majority.
"""

from __future__ import annotations

import random

import pytest

from kowalski_node.coordination import Prepare, Promise, decode_coord_message
from kowalski_node.coordination.core import Coordinator
from kowalski_node.election import home_acceptors
from kowalski_node.errors import NoQuorum
from kowalski_node.tasks import LedgerState, TaskLedger, TaskRecord, TaskState
from kowalski_node.testing import LinkProfile
from kowalski_node.testing.coord_cluster import CoordCluster, scripted_result


def _one_result(c: CoordCluster, task_id: str) -> bytes:
    results = {cm.result for cm in c.commits_for(task_id)}
    assert len(results) == 1, results
    return results.pop()


def _committed_at_survivors(c: CoordCluster, task_id: str, payload: bytes) -> None:
    for name, n in c.nodes.items():
        if not n.up:
            continue
        rec = n.core.ledger.get(task_id)
        if rec is not None and rec.state is TaskState.COMMITTED:
            assert rec.result == scripted_result(payload), name


def _key_owned_by(
    c: CoordCluster, want_owner_in_home: bool, prefix: str
) -> tuple[str, tuple[str, ...]]:
    for i in range(200):
        key = f"{prefix}{i}"
        home = home_acceptors(key, c.nodes)
        if home:
            return key, home
    raise AssertionError("no key")


def test_owner_killed_for_good_completes_at_a_survivor() -> None:
    c = CoordCluster(5, seed=21, detect_delay=0.3)
    key, home = _key_owned_by(c, True, "own-kill")
    owner = home[0]
    payload = b"steps=20"
    out = c.submit(owner, payload, key=key)
    c.run_for(0.4)  # a few steps in
    assert not c.commits_for(out.task_id)
    c.kill(owner)  # never restarted
    killed_at = c.now
    c.run_for(8.0)
    commits = c.commits_for(out.task_id)
    assert commits, "the task stalled with its owner dead\n" + "\n".join(c.log)
    assert _one_result(c, out.task_id) == scripted_result(payload)
    assert all(cm.owner != owner for cm in commits)
    # it resumed from a checkpoint rather than from scratch, and quickly
    detected = killed_at + c.detect_delay
    assert commits[0].at - detected < 20 * c.step_time + 1.0
    takeovers = sum(n.core.stats.takeovers for n in c.nodes.values() if n.up)
    assert takeovers == 1
    _committed_at_survivors(c, out.task_id, payload)
    # every survivor that knows the key answers it with the stored result
    for name in home[1:]:
        again = c.submit(name, payload, key=key)
        assert not again.created and again.result == scripted_result(payload)


def test_owner_and_leader_killed_together() -> None:
    c = CoordCluster(6, seed=22, detect_delay=0.3)
    for i in range(30):
        key = f"both{i}"
        home = home_acceptors(key, c.nodes)
        out = c.submit(home[0], b"steps=15", key=key)
        c.run_for(0.2)
        leader = c.nodes[home[0]].core.owned(out.task_id)
        # two deaths at once are survivable when only one of them is an acceptor
        if leader is not None and leader.leader not in (*home, ""):
            break
    else:
        raise AssertionError("no task led away from its owner")
    c.kill(home[0])
    c.kill(leader.leader)
    c.run_for(10.0)
    assert _one_result(c, out.task_id) == scripted_result(b"steps=15")


def test_paused_owner_returns_and_yields() -> None:
    c = CoordCluster(5, seed=23, detect_delay=0.3)
    key, home = _key_owned_by(c, True, "pause-own")
    owner = home[0]
    out = c.submit(owner, b"steps=30", key=key)
    c.run_for(0.3)
    c.pause(owner)
    c.run_for(2.0)  # a survivor takes the task over while the owner is frozen
    c.resume(owner)
    c.run_for(6.0)
    assert _one_result(c, out.task_id) == scripted_result(b"steps=30")
    assert c.nodes[owner].core.stats.yields >= 1
    assert c.nodes[owner].core.owned(out.task_id) is None
    for n in c.nodes.values():
        assert n.core.ledger.stats.conflicting_commits_seen == 0


def test_same_key_at_a_paused_node_and_elsewhere_is_one_task() -> None:
    """The client's first node freezes with the request in flight; the retry goes elsewhere;
    the frozen node then handles the request too. One task, one result."""
    c = CoordCluster(5, seed=24, detect_delay=0.3)
    key, home = _key_owned_by(c, True, "retry")
    first = home[0]
    c.pause(first)
    c.run_for(0.5)
    retry_at = home[1]
    out = c.submit(retry_at, b"steps=6", key=key)
    c.run_for(0.2)
    # the frozen node comes back and processes the buffered submission
    c.resume(first)
    late = c.submit(first, b"steps=6", key=key)
    assert late.task_id == out.task_id
    c.run_for(6.0)
    assert _one_result(c, out.task_id) == scripted_result(b"steps=6")
    owners = {cm.owner for cm in c.commits_for(out.task_id)}
    assert len(owners) == 1
    for name in home:
        rec = c.nodes[name].core.ledger.get(out.task_id)
        assert rec is not None and rec.state is TaskState.COMMITTED


@pytest.mark.parametrize("seed", range(6))
def test_two_owners_racing_for_one_key_commit_one_result(seed: int) -> None:
    c = CoordCluster(5, seed=30 + seed, detect_delay=0.3)
    key, home = _key_owned_by(c, True, f"race{seed}-")
    a = c.submit(home[0], b"steps=4", key=key)
    b = c.submit(home[1], b"steps=4", key=key)
    assert a.task_id == b.task_id
    c.run_for(6.0)
    assert _one_result(c, a.task_id) == scripted_result(b"steps=4")
    assert sum(n.core.stats.yields for n in c.nodes.values()) >= 1


def test_no_quorum_refuses_before_storing() -> None:
    me = Coordinator("a", TaskLedger(LedgerState(), "a", random.Random(1)), rng=random.Random(2))
    for p in ("b", "c", "d", "e"):
        me.peer_up(0.0, p)
    for p in ("b", "c", "d", "e"):
        me.peer_down(0.1, p)
    key = next(k for k in (f"nq{i}" for i in range(100)) if "a" in me.home_of(k))
    with pytest.raises(NoQuorum, match="retry"):
        me.submit(0.2, b"x", idempotency_key=key)
    assert me.ledger.find(key) is None
    assert me.stats.no_quorum_refusals == 1


def test_prepare_and_promise_round_trip() -> None:
    rec = TaskRecord("t1", "k", "a", b"p", 1.0, acceptors=("a", "b", "c"))
    for msg in (
        Prepare("t1", 3, "b", rec),
        Promise("t1", 3, True, None),
        Promise("t1", 3, False, rec),
    ):
        assert decode_coord_message(msg.to_wire()) == msg
    with pytest.raises(ValueError, match="refusal"):
        decode_coord_message({"t": "co_promise", "k": "t1", "e": 3, "ok": False})


def _task_led_away_from_its_owner(
    c: CoordCluster, prefix: str, steps: int
) -> tuple[str, str, tuple[str, ...], str]:
    """A keyed task whose owner is ``home[0]`` and whose leader is another node."""
    for i in range(60):
        key = f"{prefix}{i}"
        home = home_acceptors(key, c.nodes)
        out = c.submit(home[0], f"steps={steps}".encode(), key=key)
        c.run_for(0.3)
        owned = c.nodes[home[0]].core.owned(out.task_id)
        if owned is not None and owned.leader not in ("", home[0]):
            return out.task_id, key, home, owned.leader
    raise AssertionError("no task led away from its owner")


def test_a_takeover_keeps_the_surviving_leaders_run() -> None:
    """The owner dies for good while another node leads: the acceptor that takes the task
    over offers it to the same leader at a newer ballot, and the run goes on (no restart
    of the step in progress); the commit follows the takeover at once."""
    c = CoordCluster(5, seed=25, detect_delay=0.3)
    task_id, _, home, leader = _task_led_away_from_its_owner(c, "keep", 100)
    starts_before = c.executions_for(task_id)
    c.kill(home[0])
    c.run_for(10.0)
    commits = c.commits_for(task_id)
    assert commits and _one_result(c, task_id) == scripted_result(b"steps=100")
    assert c.executions_for(task_id) == starts_before  # the run was never restarted
    assert c.nodes[leader].core.stats.runs_kept >= 1
    assert all(cm.leader == leader for cm in commits)
    for n in c.nodes.values():
        if n.up:
            assert n.core.ledger.stats.conflicting_commits_seen == 0


def test_a_re_formed_acceptor_set_keeps_the_run() -> None:
    """An acceptor that neither owns nor leads the task dies: the owner re-forms the set
    through a ballot that names the same leader, which keeps its run."""
    c = CoordCluster(6, seed=26, detect_delay=0.3)
    for i in range(60):
        task_id, _, home, leader = _task_led_away_from_its_owner(c, f"reform{i}-", 120)
        victims = [a for a in home if a not in (home[0], leader)]
        if victims:
            break
    else:
        raise AssertionError("no acceptor outside owner and leader")
    starts_before = c.executions_for(task_id)
    c.kill(victims[0])
    c.run_for(12.0)
    assert _one_result(c, task_id) == scripted_result(b"steps=120")
    assert sum(n.core.stats.reformations for n in c.nodes.values()) >= 1
    assert c.executions_for(task_id) == starts_before
    assert c.nodes[leader].core.stats.runs_kept >= 1


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_a_checkpoint_fenced_between_the_takeovers_prepare_and_offer_keeps_the_run(
    seed: int,
) -> None:
    """With 20 ms links the takeover's prepare and its offer are 40-80 ms apart, and a
    step of 50 ms ends in between: that checkpoint, still at the old epoch, is fenced by
    the acceptors that promised the new ballot. The leader waits for the offer (which
    names it again) instead of aborting, and the run goes on."""
    link = LinkProfile(latency=0.02, jitter=0.0)
    c = CoordCluster(5, seed=seed, link=link, detect_delay=0.3)
    task_id, _, home, leader = _task_led_away_from_its_owner(c, f"race{seed}-", 100)
    starts_before = c.executions_for(task_id)
    c.kill(home[0])
    c.run_for(15.0)
    assert _one_result(c, task_id) == scripted_result(b"steps=100")
    assert c.executions_for(task_id) == starts_before
    assert c.nodes[leader].core.stats.runs_kept >= 1
