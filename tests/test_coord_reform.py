"""Acceptor sets re-formed after a death (issue 8, ownership that survives a second death).

A task's acceptor set is its key's 3 home nodes. When one of them is declared dead, the
owner replaces it through a ballot (staged on a majority of the old and of the new set,
then installed), so a second death later still leaves the task a majority. Driven by
:class:`CoordCluster` (oracle membership, seeded network); the Hypothesis property adds
loss, duplication, reordering and earlier kills/pauses.
"""

from __future__ import annotations

import functools
import random

from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from kowalski_node.coordination import Coordinator
from kowalski_node.election import home_acceptors
from kowalski_node.errors import NoQuorum
from kowalski_node.tasks import LedgerState, TaskLedger, TaskRecord, TaskState, merge_records
from kowalski_node.testing import LinkProfile
from kowalski_node.testing.coord_cluster import CoordCluster, scripted_result
from tests.test_coord_faults import _check_exactly_once

FAULT_SCHEDULES = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # shrinking takes minutes
)
"""The Hypothesis settings of this file's fault-schedule properties."""


def _key(c: CoordCluster, prefix: str) -> tuple[str, tuple[str, ...]]:
    for i in range(200):
        key = f"{prefix}{i}"
        home = home_acceptors(key, c.nodes)
        if home:
            return key, home
    raise AssertionError("no key")


def test_dead_acceptor_is_replaced_and_a_second_death_is_survived() -> None:
    c = CoordCluster(6, seed=31, detect_delay=0.3)
    key, home = _key(c, "reform")
    owner, _other, victim = home
    payload = b"steps=200"  # 10 s of steps: still running after both deaths
    out = c.submit(owner, payload, key=key)
    c.run_for(0.5)
    c.kill(victim)  # first death, for good: an acceptor that is not the owner
    c.run_for(4.0)  # detection + grace + the re-forming ballot
    rec = c.nodes[owner].core.ledger.get(out.task_id)
    assert rec is not None and not rec.terminal
    assert victim not in rec.acceptors and len(rec.acceptors) == 3, rec.acceptors
    assert rec.config_epoch > 0
    assert c.nodes[owner].core.stats.reformations >= 1
    newcomer = next(a for a in rec.acceptors if a not in home)
    new_copy = c.nodes[newcomer].core.ledger.get(out.task_id)
    assert new_copy is not None and new_copy.acceptors == rec.acceptors
    c.kill(owner)  # second death, for good: without the re-formation 1 of 3 is left
    c.run_for(30.0)
    commits = c.commits_for(out.task_id)
    assert commits, "the task stalled after the second death\n" + "\n".join(c.log[-60:])
    assert {cm.result for cm in commits} == {scripted_result(payload)}
    assert all(cm.owner not in (owner, victim) for cm in commits)
    for n in c.nodes.values():
        assert n.core.ledger.stats.conflicting_commits_seen == 0


def test_owner_down_when_an_acceptor_dies_re_forms_after_its_restart() -> None:
    """The owner is restarting when an acceptor dies for good, so it never sees that
    death. After its restart it must still replace the dead seat; then a second acceptor
    dying for good leaves the task a majority (before the fix it stalled forever; found
    by `bench/sim_sweep.py --nodes 16 --duration 40`, large-context seed 8)."""
    c = CoordCluster(6, seed=33, detect_delay=0.3)
    key, home = _key(c, "absent")
    owner, other, victim = home
    payload = b"steps=300"  # 15 s of steps
    out = c.submit(owner, payload, key=key)
    c.run_for(0.5)
    c.kill(victim)  # dies for good; declared dead 0.3 s later, while ...
    c.run_for(0.05)
    c.kill(owner)  # ... the owner is down (back before a takeover: grace 1 s)
    c.run_for(0.5)
    c.restart(owner)
    c.run_for(6.0)  # two leases until the first scan, the grace, the re-forming ballot
    rec = c.nodes[owner].core.ledger.get(out.task_id)
    assert rec is not None and not rec.terminal, rec
    assert victim not in rec.acceptors and len(rec.acceptors) == 3, rec.acceptors
    c.kill(other)  # second acceptor dead for good: the owner and the newcomer remain
    c.run_for(40.0)
    commits = c.commits_for(out.task_id)
    assert commits, "the task stalled\n" + "\n".join(c.log[-60:])
    assert {cm.result for cm in commits} == {scripted_result(payload)}
    for n in c.nodes.values():
        assert n.core.ledger.stats.conflicting_commits_seen == 0


def test_a_peer_back_in_time_keeps_its_seat() -> None:
    """An acceptor that restarts while the owner restarts, and is back before the owner's
    first scan, is reported up and keeps its seat: no needless re-formation."""
    c = CoordCluster(6, seed=34, detect_delay=0.3)
    key, home = _key(c, "back")
    owner, _other, victim = home
    payload = b"steps=200"
    out = c.submit(owner, payload, key=key)
    c.run_for(0.5)
    c.kill(owner)
    c.kill(victim)
    c.run_for(0.5)
    c.restart(victim)
    c.restart(owner)
    c.run_for(6.0)
    rec = c.nodes[owner].core.ledger.get(out.task_id)
    assert rec is not None and rec.acceptors == home, rec
    assert c.nodes[owner].core.stats.reformations == 0
    c.run_for(30.0)
    assert {cm.result for cm in c.commits_for(out.task_id)} == {scripted_result(payload)}


def test_a_restarted_node_that_has_joined_nobody_marks_nobody_absent() -> None:
    """Alone after a restart (its network not up yet), a node does not count every peer
    as dead: the check waits until membership has reported someone."""
    core = Coordinator(
        "n00", TaskLedger(LedgerState(), "n00", random.Random(1)), rng=random.Random(2)
    )
    core.remember_peers(["n01", "n02", "n03"])  # persisted before the restart
    core.recover(0.0)
    core.tick(2 * core.config.lease_ttl + 0.1)
    assert core._down == {}
    core.peer_up(5.0, "n01")
    core.tick(5.0 + 15 * core.config.lease_ttl)  # the next scan
    assert set(core._down) == {"n02", "n03"}


def test_without_a_spare_node_the_set_stays_and_the_task_finishes() -> None:
    c = CoordCluster(3, seed=32, detect_delay=0.3)
    key, home = _key(c, "nospare")
    payload = b"steps=40"
    out = c.submit(home[0], payload, key=key)
    c.run_for(0.3)
    c.kill(home[2])
    c.run_for(20.0)
    assert {cm.result for cm in c.commits_for(out.task_id)} == {scripted_result(payload)}
    rec = c.nodes[home[0]].core.ledger.get(out.task_id)
    assert rec is not None and rec.acceptors == home  # nobody to replace it with


def test_merge_keeps_the_newest_installed_and_staged_sets() -> None:
    base = TaskRecord("t1", "k", "a", b"p", 1.0, acceptors=("a", "b", "c"))
    staged = TaskRecord(
        "t1", "k", "a", b"p", 1.0, acceptors=("a", "b", "c"), staged=("a", "b", "d"), staged_epoch=4
    )
    installed = TaskRecord(
        "t1",
        "k",
        "a",
        b"p",
        1.0,
        acceptors=("a", "b", "d"),
        config_epoch=4,
        staged=("a", "b", "d"),
        staged_epoch=4,
    )
    for x, y in ((base, staged), (staged, installed), (base, installed)):
        assert merge_records(x, y) == merge_records(y, x)
    assert merge_records(base, staged).pending_acceptors == ("a", "b", "d")
    assert merge_records(base, staged).acceptors == ("a", "b", "c")
    both = merge_records(merge_records(base, staged), installed)
    assert both.acceptors == ("a", "b", "d") and both.pending_acceptors == ()
    assert TaskRecord.from_wire(installed.to_wire()) == installed
    assert "ace" not in base.to_wire() and "stg" not in base.to_wire()  # old vectors unchanged


@FAULT_SCHEDULES
@given(
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    loss=st.floats(min_value=0.0, max_value=0.1),
    dup=st.floats(min_value=0.0, max_value=0.1),
    reorder=st.floats(min_value=0.0, max_value=0.3),
    faults=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=3.0),
            st.sampled_from(["kill", "restart", "pause", "resume"]),
            st.integers(min_value=0, max_value=5),
        ),
        max_size=6,
    ),
    tasks=st.lists(
        st.tuples(st.integers(0, 5), st.integers(40, 240), st.floats(0.0, 2.0)),
        min_size=1,
        max_size=5,
    ),
    first=st.integers(0, 5),
    second=st.integers(0, 5),
    gap=st.floats(min_value=2.5, max_value=6.0),
)
def test_two_deaths_for_good_one_after_the_other_lose_nothing(
    seed: int,
    loss: float,
    dup: float,
    reorder: float,
    faults: list[tuple[float, str, int]],
    tasks: list[tuple[int, int, float]],
    first: int,
    second: int,
    gap: float,
) -> None:
    """6 nodes. Random faults until 3 s, then everything heals; at 4 s one node dies for
    good, and `gap` seconds later (after detection and the re-forming ballot) another
    one. Every accepted task commits once with its result at a survivor."""
    if first == second:
        second = (second + 1) % 6
    link = LinkProfile(latency=0.001, jitter=0.001, loss=loss, duplicate=dup, reorder=reorder)
    c = CoordCluster(6, seed=seed, link=link, detect_delay=0.4)
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
            if attempt < 20:
                c.at(c.now + 0.5, lambda: do_submit(i, (node + 1) % 6, steps, attempt + 1))
            return
        payload = f"steps={steps}".encode()
        try:
            out = c.submit(name, payload, key=f"two{i}")
        except NoQuorum:
            if attempt < 20:
                c.at(c.now + 0.5, lambda: do_submit(i, (node + 1) % 6, steps, attempt + 1))
            return
        c.at(c.now + 0.5, lambda: acknowledged(i, node, steps, attempt, name, out.task_id, payload))

    def acknowledged(
        i: int, node: int, steps: int, attempt: int, name: str, task_id: str, payload: bytes
    ) -> None:
        n = c.nodes[name]
        if n.up and not n.paused and n.core.stored_on_majority(task_id):
            submitted[task_id] = (name, payload)
        elif attempt < 20:
            do_submit(i, (node + 1) % 6, steps, attempt + 1)

    for t, action, node in faults:
        c.at(t, functools.partial(do_fault, action, f"n0{node}"))
    for i, (node, steps, t) in enumerate(tasks):
        c.at(t, functools.partial(do_submit, i, node, steps))
    c.run_until(3.0)
    for name, n in c.nodes.items():
        if not n.up:
            c.restart(name)
        elif n.paused:
            c.resume(name)
    c.run_until(4.0)
    c.kill(f"n0{first}")
    c.run_for(gap)
    c.kill(f"n0{second}")
    c.run_for(60.0)
    _check_exactly_once(c, submitted, dead=f"n0{first},n0{second}")
    for task_id in submitted:  # the live members of its final acceptor set hold the result
        final = c.nodes[c.commits_for(task_id)[-1].owner].core.ledger.get(task_id)
        assert final is not None
        for name in final.acceptors:
            rec = c.nodes[name].core.ledger.get(task_id)
            if c.nodes[name].up:
                assert rec is not None and rec.state is TaskState.COMMITTED, (name, task_id, rec)


@FAULT_SCHEDULES
@given(
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    loss=st.floats(min_value=0.0, max_value=0.05),
    at=st.integers(0, 4),
    victims=st.sampled_from([(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)]),
    gap=st.floats(min_value=0.0, max_value=4.0),
    steps=st.integers(40, 160),
    late=st.lists(
        st.tuples(st.floats(0.0, 6.0), st.integers(0, 4), st.integers(20, 120)), max_size=6
    ),
)
@example(  # both at once; two owners then refused each other's ballot at one epoch forever
    seed=551,
    loss=0.0005,
    at=2,
    victims=(1, 0),
    gap=0.0,
    steps=151,
    late=[(4.835, 3, 103), (4.835, 4, 53), (0.0, 1, 103), (3.242, 1, 67), (0.0, 0, 115)],
)
def test_two_acceptors_of_one_key_dying_close_together(
    seed: int,
    loss: float,
    at: int,
    victims: tuple[int, int],
    gap: float,
    steps: int,
    late: list[tuple[float, int, int]],
) -> None:
    """5 nodes. A keyed task runs; two of its 3 acceptors (whatever their roles: owner,
    leader, replica) die for good `gap` seconds apart (0-4 s), while clients submit other
    keys around the deaths, each retried at another node when refused (`NoQuorum`) or
    sent to a dead node. Every acknowledged task commits once with its result. A task
    acknowledged at least 2 s before the second death (detection 0.4 s, then re-forming
    or a takeover, `reform_grace`/`takeover_grace`, and its ballot) commits at the
    survivors alone; one whose set still held both victims waits, and commits once the
    second victim comes back (its ledger is durable). Never two results."""
    link = LinkProfile(latency=0.001, jitter=0.001, loss=loss)
    c = CoordCluster(5, seed=seed, link=link, detect_delay=0.4)
    key, home = _key(c, "pair")
    first, second = home[victims[0]], home[victims[1]]
    submitted: dict[str, tuple[str, bytes]] = {}
    acked_at: dict[str, float] = {}
    refused = [0]

    def do_submit(k: str, node: int, n_steps: int, attempt: int = 0) -> None:
        name = f"n0{node}"
        n = c.nodes[name]
        retry = functools.partial(do_submit, k, (node + 1) % 5, n_steps, attempt + 1)
        if not n.up or n.paused:
            if attempt < 30:
                c.at(c.now + 0.5, retry)
            return
        payload = f"steps={n_steps}".encode()
        try:
            out = c.submit(name, payload, key=k)
        except NoQuorum:
            refused[0] += 1
            if attempt < 30:
                c.at(c.now + 0.5, retry)
            return

        def acknowledged() -> None:
            if n.up and not n.paused and n.core.stored_on_majority(out.task_id):
                submitted[out.task_id] = (name, payload)
                acked_at.setdefault(out.task_id, c.now)
            elif attempt < 30:
                retry()

        c.at(c.now + 0.5, acknowledged)

    do_submit(key, at, steps)
    t1 = 1.0
    for i, (t, node, n_steps) in enumerate(late):
        c.at(t1 - 1.0 + t, functools.partial(do_submit, f"late{i}", node, n_steps))
    c.run_until(t1)
    c.kill(first)
    c.run_for(gap)
    c.kill(second)
    second_death = c.now
    c.run_for(25.0)
    early = {t: v for t, v in submitted.items() if acked_at[t] <= second_death - 2.0}
    _check_exactly_once(c, early, dead=f"{first},{second}")
    c.restart(second)  # the tasks that lost both victims from their set wait for it
    c.run_for(30.0)
    _check_exactly_once(c, submitted, dead=first)
    for n in c.nodes.values():
        if n.up:
            assert n.core.ledger.stats.conflicting_commits_seen == 0
