"""Exactly-once under loss, duplication, reordering, kills, restarts and pauses (FakeNetwork)."""

from __future__ import annotations

import functools
import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kowalski_node.errors import NoQuorum
from kowalski_node.tasks import TaskState
from kowalski_node.testing import LinkProfile
from kowalski_node.testing.coord_cluster import CoordCluster, scripted_result


def _check_exactly_once(
    c: CoordCluster, submitted: dict[str, tuple[str, bytes]], dead: str = ""
) -> None:
    """lost = 0, one committed result per task, and every committing owner stores it.

    With takeovers, an owner that died right after committing (before its copies got
    out) and the survivor that took over can both commit the one chosen result, at two
    epochs: that is the same decision learned twice, not a second value. Two different
    results would be a duplicate.
    """
    for task_id, (owner, payload) in submitted.items():
        commits = c.commits_for(task_id)
        assert commits, f"task {task_id} (submitted at {owner}) was lost\n" + "\n".join(c.log)
        results = {cm.result for cm in commits}
        assert results == {scripted_result(payload)}, (
            f"task {task_id} (submitted at {owner}): results {results}\n" + "\n".join(c.log)
        )
        assert len({cm.owner for cm in commits}) == len(commits), "one owner committed twice"
        at_survivors = [
            name
            for name, n in c.nodes.items()
            if n.up
            and (rec := n.core.ledger.get(task_id)) is not None
            and rec.state is TaskState.COMMITTED
            and rec.result == scripted_result(payload)
        ]
        assert at_survivors, f"task {task_id} is finished only at the dead node {dead}"
        for cm in commits:
            rec = c.nodes[cm.owner].core.ledger.get(task_id)
            assert rec is not None and rec.state is TaskState.COMMITTED
            assert rec.result == scripted_result(payload)
    for n in c.nodes.values():
        assert n.core.ledger.stats.conflicting_commits_seen == 0, n.name


def _heal_all(c: CoordCluster) -> None:
    for name, n in c.nodes.items():
        if not n.up:
            c.restart(name)
        elif n.paused:
            c.resume(name)


def test_lossy_duplicating_reordering_network_still_commits_once() -> None:
    link = LinkProfile(
        latency=0.001, jitter=0.002, loss=0.1, duplicate=0.1, reorder=0.2, reorder_delay=0.02
    )
    c = CoordCluster(6, seed=11, link=link)
    submitted: dict[str, tuple[str, bytes]] = {}
    rng = random.Random(3)
    for i in range(30):
        owner = f"n0{rng.randrange(6)}"
        payload = f"steps={rng.randint(1, 6)}".encode()
        out = c.submit(owner, payload, key=f"lossy{i}")
        submitted[out.task_id] = (owner, payload)
        c.run_for(0.05)
    c.run_for(20.0)
    _check_exactly_once(c, submitted)
    total_exec = sum(c.executions_for(t) for t in submitted)
    assert total_exec >= len(submitted)


def test_leader_kills_under_loss_commit_once() -> None:
    link = LinkProfile(latency=0.001, jitter=0.001, loss=0.05, duplicate=0.05, reorder=0.1)
    c = CoordCluster(8, seed=12, link=link)
    submitted: dict[str, tuple[str, bytes]] = {}
    for i in range(12):
        out = c.submit("n00", b"steps=12", key=f"kill{i}")
        submitted[out.task_id] = ("n00", b"steps=12")
    c.run_for(0.3)
    leaders = sorted({lc.leader for _, lc in c.leader_changes} - {"n00"})
    for name in leaders[:3]:
        c.kill(name)
    c.run_for(1.0)
    for name in leaders[:3]:
        c.restart(name)
    c.run_for(15.0)
    _check_exactly_once(c, submitted)
    assert c.nodes["n00"].core.stats.failovers >= 1


def test_same_seed_same_history() -> None:
    def history(seed: int) -> list[tuple[float, str, int, str]]:
        link = LinkProfile(loss=0.05, duplicate=0.05, reorder=0.1)
        c = CoordCluster(5, seed=seed, link=link)
        for i in range(6):
            c.submit(f"n0{i % 5}", b"steps=5", key=f"h{i}")
        c.at(0.3, lambda: c.kill("n01"))
        c.at(1.0, lambda: c.restart("n01"))
        c.run_for(8.0)
        return [(round(x.at, 9), x.task_id, x.epoch, x.leader) for x in c.commits]

    first = history(5)
    assert first == history(5)
    assert len(first) == 6  # every task committed once
    # The seed drives loss, duplication and reordering: another seed gives other commit
    # times (checked for seeds 5 and 6; a seed the harness ignored would fail here).
    assert history(6) != first


fault = st.tuples(
    st.floats(min_value=0.0, max_value=4.0),
    st.sampled_from(["kill", "restart", "pause", "resume"]),
    st.integers(min_value=0, max_value=4),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    loss=st.floats(min_value=0.0, max_value=0.1),
    dup=st.floats(min_value=0.0, max_value=0.1),
    reorder=st.floats(min_value=0.0, max_value=0.3),
    faults=st.lists(fault, max_size=8),
    tasks=st.lists(
        st.tuples(st.integers(0, 4), st.integers(1, 8), st.floats(0.0, 3.0)), min_size=1, max_size=6
    ),
    dead_for_good=st.one_of(st.none(), st.integers(0, 4)),
)
def test_random_fault_schedules_lose_nothing_and_commit_once(
    seed: int,
    loss: float,
    dup: float,
    reorder: float,
    faults: list[tuple[float, str, int]],
    tasks: list[tuple[int, int, float]],
    dead_for_good: int | None,
) -> None:
    """Random kill/restart/pause/resume and loss; at 5 s everything heals except, maybe, one
    node that is killed for good (whatever its roles: owner, leader, acceptor)."""
    link = LinkProfile(latency=0.001, jitter=0.001, loss=loss, duplicate=dup, reorder=reorder)
    c = CoordCluster(5, seed=seed, link=link, detect_delay=0.4)
    submitted: dict[str, tuple[str, bytes]] = {}

    def do_fault(action: str, name: str) -> None:
        n = c.nodes[name]
        if action == "kill" and n.up:
            c.kill(name)
        elif action == "restart" and not n.up:
            c.restart(name)
        elif action == "pause" and n.up and not n.paused:
            c.pause(name)
        elif action == "resume" and n.up and n.paused:
            c.resume(name)

    def do_submit(i: int, node: int, steps: int, attempt: int = 0) -> None:
        name = f"n0{node}"
        n = c.nodes[name]
        if not n.up or n.paused:
            return
        payload = f"steps={steps}".encode()
        try:
            out = c.submit(name, payload, key=f"prop{i}")
        except NoQuorum:
            # refused before anything was stored: the client retries the key at another node
            if attempt < 20:
                c.at(
                    c.now + 0.5,
                    lambda: do_submit(i, (node + 1) % 5, steps, attempt + 1),
                )
            return
        c.at(c.now + 0.5, lambda: acknowledged(i, node, steps, attempt, name, out.task_id, payload))

    def acknowledged(
        i: int, node: int, steps: int, attempt: int, name: str, task_id: str, payload: bytes
    ) -> None:
        """The client counts a task as accepted once the node answered, which it does when
        the task is on a majority of its acceptors; otherwise it retries elsewhere."""
        n = c.nodes[name]
        if n.up and not n.paused and n.core.stored_on_majority(task_id):
            submitted[task_id] = (name, payload)
        elif attempt < 20:
            do_submit(i, (node + 1) % 5, steps, attempt + 1)

    for t, action, node in faults:
        c.at(t, functools.partial(do_fault, action, f"n0{node}"))
    for i, (node, steps, t) in enumerate(tasks):
        c.at(t, functools.partial(do_submit, i, node, steps))
    c.run_until(5.0)
    _heal_all(c)
    if dead_for_good is not None:
        c.kill(f"n0{dead_for_good}")
    c.run_for(40.0)
    _check_exactly_once(c, submitted, dead=f"n0{dead_for_good}")
