"""Election core: rendezvous ranking, leases and takeover rules, fencing monotonicity."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kowalski_node.election import (
    Await,
    ElectionConfig,
    FenceVerdict,
    FencingGuard,
    Follow,
    Lead,
    LeaderElection,
    Lease,
    NoCandidate,
    StaleEpochError,
    choose_leader,
    rank_candidates,
    stable_unit,
    successors,
)
from kowalski_node.errors import ConfigError
from kowalski_node.membership import WireError

PEERS = {f"peer-{i}": 1.0 for i in range(10)}


def test_stable_hash_is_pinned() -> None:
    # blake2b-based, so the same on every machine and process; pinned to catch accidental changes.
    assert stable_unit("task-1", "peer-a") == pytest.approx(0.7697204606, abs=1e-9)
    assert 0.0 < stable_unit("", "") < 1.0


def test_ranking_is_deterministic_and_total() -> None:
    order = rank_candidates("task-x", PEERS)
    assert sorted(order) == sorted(PEERS)
    assert rank_candidates("task-x", dict(reversed(list(PEERS.items())))) == order
    assert choose_leader("task-x", PEERS) == order[0]
    assert successors("task-x", PEERS, 2) == order[1:3]
    assert successors("task-x", PEERS, 2, leader=order[1]) == [order[0], order[2]]


def test_incapable_peers_never_lead() -> None:
    weights = {"a": 0.0, "b": -1.0, "c": 2.0}
    assert rank_candidates("t", weights) == ["c"]
    assert choose_leader("t", {"a": 0.0}) is None


def test_weights_bias_leadership_proportionally() -> None:
    weights = {"small": 1.0, "big": 3.0}
    wins = sum(choose_leader(f"task-{i}", weights) == "big" for i in range(4000))
    assert 0.72 < wins / 4000 < 0.78  # expected 3 / (1 + 3)


def test_removing_a_peer_only_moves_its_own_tasks() -> None:
    tasks = [f"task-{i}" for i in range(500)]
    before = {t: choose_leader(t, PEERS) for t in tasks}
    gone = "peer-3"
    after = {t: choose_leader(t, {p: w for p, w in PEERS.items() if p != gone}) for t in tasks}
    moved = [t for t in tasks if before[t] != after[t]]
    assert moved and all(before[t] == gone for t in moved)
    # ... and the new leader is the old first successor (replicas already hold the task)
    assert all(after[t] == successors(t, PEERS, 1)[0] for t in moved)


# --------------------------------------------------------------------------- leases


def _ranked(task: str) -> list[str]:
    return rank_candidates(task, PEERS)


def test_top_candidate_claims_epoch_1_and_others_follow() -> None:
    task = "task-a"
    top, second = _ranked(task)[:2]
    leader = LeaderElection(top)
    d = leader.decide(0.0, task, PEERS)
    assert isinstance(d, Lead) and d.claimed and d.epoch == 1
    follower = LeaderElection(second)
    follower.observe(0.01, Lease(task, top, 1, 0.01 + 0.5))
    assert follower.decide(0.02, task, PEERS) == Follow(task, top, 1)
    # the holder's next decision is a renewal-free Lead (not a new claim)
    d2 = leader.decide(0.1, task, PEERS)
    assert isinstance(d2, Lead) and not d2.claimed


def test_takeover_after_lapse_uses_next_epoch_with_stagger() -> None:
    cfg = ElectionConfig(lease_ttl=0.5, renew_interval=0.15, claim_stagger=0.2)
    task = "task-b"
    top, second, third = _ranked(task)[:3]
    e2 = LeaderElection(second, cfg)
    e2.observe(0.0, Lease(task, top, 1, 0.5))
    assert isinstance(e2.decide(0.3, task, PEERS), Follow)
    # expired, holder not suspected: rank 1 waits one stagger, expecting the old holder to re-claim
    d = e2.decide(0.55, task, PEERS)
    assert isinstance(d, Await) and d.expected == top and d.until == pytest.approx(0.7)
    d = e2.decide(0.7, task, PEERS)
    assert isinstance(d, Lead) and d.claimed and d.epoch == 2
    # rank 2 would have waited two staggers
    e3 = LeaderElection(third, cfg)
    e3.observe(0.0, Lease(task, top, 1, 0.5))
    d3 = e3.decide(0.75, task, PEERS)
    assert isinstance(d3, Await) and d3.until == pytest.approx(0.9)


def test_suspected_holder_is_skipped_and_down_holder_lapses_at_once() -> None:
    cfg = ElectionConfig(lease_ttl=0.5, renew_interval=0.15, claim_stagger=0.2)
    task = "task-c"
    top, second = _ranked(task)[:2]
    e = LeaderElection(second, cfg)
    e.observe(0.0, Lease(task, top, 3, 0.5))
    # suspected holder keeps its valid lease ...
    assert isinstance(e.decide(0.2, task, PEERS, suspected={top}), Follow)
    # ... but after expiry the next candidate claims without waiting a stagger
    d = e.decide(0.5, task, PEERS, suspected={top})
    assert isinstance(d, Lead) and d.epoch == 4
    # a holder declared down loses its lease immediately
    e2 = LeaderElection(second, cfg)
    e2.observe(0.0, Lease(task, top, 7, 10.0))
    d2 = e2.decide(0.1, task, {p: w for p, w in PEERS.items() if p != top}, down={top})
    assert isinstance(d2, Lead) and d2.epoch == 8


def test_no_candidate_explains_why() -> None:
    e = LeaderElection("x")
    d = e.decide(0.0, "t", {})
    assert isinstance(d, NoCandidate) and "no live peer is capable" in d.reason
    d = e.decide(0.0, "t", {"a": 1.0}, suspected={"a"})
    assert isinstance(d, NoCandidate) and "suspected or down" in d.reason


def test_observe_rejects_stale_and_conflicting_claims() -> None:
    e = LeaderElection("me")
    assert e.observe(0.0, Lease("t", "a", 2, 1.0))
    assert not e.observe(0.0, Lease("t", "b", 1, 5.0))  # older epoch
    assert not e.observe(0.0, Lease("t", "b", 2, 5.0))  # same epoch, other holder: first claim wins
    assert e.observe(0.0, Lease("t", "a", 2, 2.0))  # renewal by the holder
    assert e.observe(0.0, Lease("t", "b", 3, 0.5))  # newer epoch always wins
    assert e.current("t") == Lease("t", "b", 3, 0.5)


def test_renew_and_release() -> None:
    cfg = ElectionConfig()
    task = "task-d"
    top = _ranked(task)[0]
    e = LeaderElection(top, cfg)
    e.decide(0.0, task, PEERS)
    assert not e.needs_renewal(0.05, task)
    assert e.needs_renewal(0.2, task)
    renewed = e.renew(0.2, task)
    assert renewed is not None and renewed.expires_at == pytest.approx(0.7) and renewed.epoch == 1
    assert e.led_by_me(0.3) == [task]
    released = e.release(0.3, task)
    assert released is not None and released.expires_at == 0.3
    assert e.renew(0.31, task) is None
    assert e.led_by_me(0.31) == []


def test_lease_wire_uses_remaining_ttl_so_skew_does_not_matter() -> None:
    lease = Lease("t", "a", 4, 100.5)
    wire = lease.to_wire(now=100.0)
    # the receiver's clock is 2 s ahead: it still sees 0.5 s remaining
    got = Lease.from_wire(wire, now=102.0)
    assert got.expires_at == pytest.approx(102.5) and got.epoch == 4
    with pytest.raises(WireError, match=r"Lease\.e: 0 is below the minimum 1"):
        Lease.from_wire({**wire, "e": 0}, now=0.0)


def test_election_config_validation() -> None:
    with pytest.raises(ConfigError, match="renew_interval"):
        ElectionConfig(lease_ttl=0.5, renew_interval=0.5)


# --------------------------------------------------------------------------- fencing

writes = st.lists(st.tuples(st.integers(0, 6), st.sampled_from(["a", "b", "c"])), max_size=60)


@given(writes)
@settings(max_examples=300, deadline=None)
def test_fencing_is_monotonic(seq: list[tuple[int, str]]) -> None:
    g = FencingGuard()
    highest: tuple[int, str] | None = None
    for epoch, holder in seq:
        verdict = g.admit("t", epoch, holder)
        if highest is None or epoch > highest[0]:
            assert verdict is FenceVerdict.OK
            highest = (epoch, holder)
        elif epoch == highest[0]:
            assert verdict is (FenceVerdict.OK if holder == highest[1] else FenceVerdict.CONFLICT)
        else:
            assert verdict is FenceVerdict.STALE
        claim = g.highest("t")
        assert claim is not None and (claim.epoch, claim.holder) == highest


def test_require_raises_a_clear_error() -> None:
    g = FencingGuard()
    g.require("t", 5, "new-leader")
    with pytest.raises(
        StaleEpochError, match="epoch 4 refused; this replica follows new-leader at epoch 5"
    ):
        g.require("t", 4, "old-leader")
    assert g.rejected == 1
