"""Election core: rendezvous ranking (leases and fencing are tested with the coordination core)."""

from __future__ import annotations

import pytest

from kowalski_node.election import choose_leader, rank_candidates, stable_unit, successors

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
