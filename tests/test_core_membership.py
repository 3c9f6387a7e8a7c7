"""Membership core: unit rules, and whole clusters over the seeded FakeNetwork."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from collections.abc import Sequence

import pytest

from kowalski_node.membership import (
    Ack,
    Gossip,
    MemberAlive,
    MemberDown,
    Membership,
    MemberSuspect,
    MemberUp,
    MemberUpdate,
    Ping,
    PingReq,
    Send,
    Status,
    SwimConfig,
)
from kowalski_node.testing import LinkProfile
from kowalski_node.testing.membership_cluster import MembershipCluster

LAN_DETECTION_BOUND = 1.0  # seconds: every other member marks a killed peer dead within this


def _core(me: str, peers: list[str], seed: int = 0) -> Membership:
    return Membership(
        me,
        config=SwimConfig.lan(),
        rng=random.Random(seed),
        now=0.0,
        members=[(p, p) for p in peers],
    )


def _sends(effects: Sequence[object]) -> list[Send]:
    return [e for e in effects if isinstance(e, Send)]


# --------------------------------------------------------------------------- unit rules


def test_ping_is_acked_with_own_incarnation() -> None:
    a = _core("a", ["b"])
    out = a.handle(0.0, "b", Ping(7, "a", []))
    (send,) = _sends(out)
    assert send.to == "b" and isinstance(send.message, Ack)
    assert send.message.seq == 7 and send.message.inc == 0


def test_misrouted_ping_is_ignored() -> None:
    a = _core("a", ["b"])
    assert _sends(a.handle(0.0, "b", Ping(7, "someone-else", []))) == []


def test_suspicion_about_self_is_refuted_with_higher_incarnation() -> None:
    a = _core("a", ["b", "c"])
    out = a.handle(1.0, "b", Ping(1, "a", [MemberUpdate("a", Status.SUSPECT, 0, by="b")]))
    assert a.incarnation == 1
    (ack,) = _sends(out)
    assert isinstance(ack.message, Ack) and ack.message.inc == 1
    assert any(
        u.peer == "a" and u.status is Status.ALIVE and u.incarnation == 1
        for u in ack.message.updates
    )
    assert a.stats.refutations == 1


def test_incarnation_precedence_rules() -> None:
    a = _core("a", ["b", "c", "d"])
    ev = a.handle(0.0, "c", Gossip([MemberUpdate("b", Status.SUSPECT, 0, by="c")]))
    assert any(isinstance(e, MemberSuspect) for e in ev)
    # alive at the same incarnation does not clear a suspicion ...
    ev = a.handle(0.0, "c", Gossip([MemberUpdate("b", Status.ALIVE, 0)]))
    assert a.status("b") is Status.SUSPECT and not any(isinstance(e, MemberAlive) for e in ev)
    # ... a higher one does
    ev = a.handle(0.0, "c", Gossip([MemberUpdate("b", Status.ALIVE, 1)]))
    assert a.status("b") is Status.ALIVE and any(isinstance(e, MemberAlive) for e in ev)
    # dead at an older incarnation is ignored; at the current one it wins
    a.handle(0.0, "c", Gossip([MemberUpdate("b", Status.DEAD, 0)]))
    assert a.status("b") is Status.ALIVE
    ev = a.handle(0.0, "c", Gossip([MemberUpdate("b", Status.DEAD, 1)]))
    assert a.status("b") is Status.DEAD
    assert [e for e in ev if isinstance(e, MemberDown)] == [MemberDown("b", 1, False)]
    # left at the same incarnation refines dead without a second down event
    ev = a.handle(0.0, "c", Gossip([MemberUpdate("b", Status.LEFT, 1)]))
    assert a.status("b") is Status.LEFT and not any(isinstance(e, MemberDown) for e in ev)
    # a new life (higher incarnation) brings it back
    ev = a.handle(0.0, "c", Gossip([MemberUpdate("b", Status.ALIVE, 2, addr="b2")]))
    assert a.status("b") is Status.ALIVE and MemberUp("b", "b2", 2) in ev


def test_probe_timeout_leads_to_indirect_probe_then_suspicion_then_dead() -> None:
    cfg = SwimConfig.lan()
    a = Membership(
        "a", config=cfg, rng=random.Random(1), now=0.0, members=[("b", "b"), ("c", "c"), ("d", "d")]
    )
    t = a.next_deadline()
    out = a.tick(t)
    (ping,) = _sends(out)
    target = ping.to
    assert isinstance(ping.message, Ping)
    out = a.tick(t + cfg.probe_timeout)
    reqs = [s.message for s in _sends(out) if isinstance(s.message, PingReq)]
    assert len(reqs) == 2 and all(r.target == target for r in reqs)
    out = a.tick(t + cfg.probe_timeout + cfg.indirect_timeout)
    assert MemberSuspect(target, 0) in out
    assert a.status(target) is Status.SUSPECT
    # no confirmations: the suspicion lasts the (unconfirmed) maximum, then becomes dead
    deadline = a.next_deadline()
    now = t + cfg.probe_timeout + cfg.indirect_timeout
    down = None
    while down is None and now < 10:
        now = max(now, a.next_deadline())
        down = next((e for e in a.tick(now) if isinstance(e, MemberDown)), None)
    assert down == MemberDown(target, 0, False)
    assert deadline <= now
    assert now - (t + cfg.probe_timeout + cfg.indirect_timeout) == pytest.approx(
        cfg.suspicion_max, abs=0.2
    )


def test_confirmations_shorten_suspicion() -> None:
    cfg = SwimConfig.lan()
    peers = [f"p{i}" for i in range(8)]
    a = Membership("a", config=cfg, rng=random.Random(2), now=0.0, members=[(p, p) for p in peers])
    a.handle(0.0, "p1", Gossip([MemberUpdate("p0", Status.SUSPECT, 0, by="p1")]))
    lone = a.next_deadline()
    for by in ("p2", "p3", "p4"):
        a.handle(0.01, by, Gossip([MemberUpdate("p0", Status.SUSPECT, 0, by=by)]))
    # K=3 confirmations: the timeout is the minimum, counted from the first suspicion
    ev: Sequence[object] = []
    now = 0.0
    while not any(isinstance(e, MemberDown) for e in ev) and now < 5:
        now = a.next_deadline()
        ev = a.tick(now)
    assert now == pytest.approx(cfg.suspicion_min, abs=1e-6)
    assert lone < 5


def test_ack_with_higher_incarnation_refutes_a_suspicion() -> None:
    a = _core("a", ["b", "c", "d"])
    out = a.handle(0.0, "c", Gossip([MemberUpdate("b", Status.SUSPECT, 0, by="c")]))
    ping = next(s for s in _sends(out) if isinstance(s.message, Ping) and s.to == "b")
    assert isinstance(ping.message, Ping)
    # the buddy system: the probe carries the suspicion to the suspect itself
    assert any(u.peer == "b" and u.status is Status.SUSPECT for u in ping.message.updates)
    ev = a.handle(0.001, "b", Ack(ping.message.seq, 1, []))
    assert MemberAlive("b", 1) in ev and a.status("b") is Status.ALIVE


def test_bad_config_is_rejected_with_the_key_name() -> None:
    from kowalski_node.errors import ConfigError

    with pytest.raises(ConfigError, match="probe_interval"):
        SwimConfig(probe_interval=0)
    with pytest.raises(ConfigError, match="suspicion_max"):
        SwimConfig(suspicion_min=2.0, suspicion_max=1.0)
    with pytest.raises(ConfigError, match="unknown membership profile"):
        SwimConfig.profile("moon")
    assert SwimConfig.profile("constrained") == SwimConfig.wan()


def test_backwards_clock_is_clamped() -> None:
    a = _core("a", ["b"])
    a.tick(5.0)
    a.tick(1.0)  # a clock jump back must not re-run or corrupt timers
    assert a.next_deadline() >= 5.0


# --------------------------------------------------------------------------- clusters


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_killed_node_is_marked_dead_by_all_within_lan_bound(seed: int) -> None:
    c = MembershipCluster(20, seed=seed)
    c.run_until(3.0)
    assert c.suspicion_count() == 0
    victim = c.ids[seed]
    t0 = c.now
    c.kill(victim)
    c.run_until(t0 + 3.0)
    downs = {r.node: r.t - t0 for r in c.events_of(MemberDown, victim, since=t0)}
    assert set(downs) == set(c.ids) - {victim}
    assert max(downs.values()) < LAN_DETECTION_BOUND, downs
    # nobody else was declared dead on the way
    assert all(r.event.peer == victim for r in c.events_of(MemberDown))


def test_no_false_dead_verdicts_at_5pct_loss() -> None:
    # 20 nodes x 300 s = 1.7 node-hours at 5 % loss (the simulator runs the long version).
    c = MembershipCluster(20, seed=11, link=LinkProfile(latency=0.0005, jitter=0.0003, loss=0.05))
    c.run_until(300.0)
    assert c.network.stats.lost > 5_000
    assert c.suspicion_count() > 0  # loss does cause suspicions ...
    assert c.events_of(MemberDown) == []  # ... but every one of them is refuted in time
    assert c.views_agree(set(c.ids))


def test_loss_duplication_and_reordering_still_detect_and_stay_truthful() -> None:
    link = LinkProfile(
        latency=0.001, jitter=0.002, loss=0.05, duplicate=0.05, reorder=0.1, reorder_delay=0.01
    )
    c = MembershipCluster(15, seed=5, link=link)
    c.run_until(30.0)
    assert c.events_of(MemberDown) == []
    victim = c.ids[3]
    t0 = c.now
    c.kill(victim)
    c.run_until(t0 + 5.0)
    downs = {r.node: r.t - t0 for r in c.events_of(MemberDown, victim)}
    assert set(downs) == set(c.ids) - {victim}
    assert max(downs.values()) < 2 * LAN_DETECTION_BOUND
    assert all(r.event.peer == victim for r in c.events_of(MemberDown))


def test_join_through_a_seed_converges() -> None:
    c = MembershipCluster(12, seed=4, prepopulate=False)
    c.join_all([c.ids[0]])
    c.run_until(3.0)
    assert c.views_agree(set(c.ids))
    assert c.events_of(MemberDown) == []


def test_partition_then_heal_refutes_and_rejoins() -> None:
    c = MembershipCluster(20, seed=8)
    c.run_until(2.0)
    left, right = c.ids[:10], c.ids[10:]
    c.network.partition([left, right])
    c.run_until(10.0)
    # each side declared the other side dead, and kept its own side alive
    for node in left:
        assert all(c.core(node).status(p) is Status.DEAD for p in right)
        assert all(c.core(node).status(p) is Status.ALIVE for p in left if p != node)
    t_heal = c.now
    c.network.heal()
    c.run_until(t_heal + 10.0)
    assert c.views_agree(set(c.ids))
    # rejoin happened through refutation: incarnations went up
    assert all(c.core(n).incarnation >= 1 for n in c.ids)
    assert len(c.events_of(MemberUp, since=t_heal)) >= 2 * 10 * 10


def test_graceful_leave_is_not_a_failure() -> None:
    c = MembershipCluster(10, seed=6)
    c.run_until(2.0)
    c.leave(c.ids[4])
    c.run_until(4.0)
    downs = c.events_of(MemberDown)
    assert {r.node for r in downs} == set(c.ids) - {c.ids[4]}
    assert all(r.event.left and r.event.peer == c.ids[4] for r in downs)
    assert c.core(c.ids[4]).stopped


def test_restarted_node_rejoins_above_its_old_incarnation() -> None:
    c = MembershipCluster(10, seed=9)
    c.run_until(2.0)
    victim = c.ids[2]
    c.kill(victim)
    c.run_until(5.0)
    assert all(c.core(n).status(victim) is Status.DEAD for n in c.ids if n != victim)
    c.restart(victim, [c.ids[0]])
    c.run_until(8.0)
    assert c.views_agree(set(c.ids))
    assert c.core(victim).incarnation >= 1


def test_paused_node_is_declared_dead_and_refutes_after_resume() -> None:
    c = MembershipCluster(10, seed=12)
    c.run_until(2.0)
    victim = c.ids[5]
    c.harness.pause(victim)
    c.run_until(5.0)
    assert all(c.core(n).status(victim) is Status.DEAD for n in c.ids if n != victim)
    c.harness.resume(victim)
    c.run_until(10.0)
    assert c.views_agree(set(c.ids))


def test_skewed_drifting_clocks_and_a_clock_jump() -> None:
    c = MembershipCluster(15, seed=13, clock_skew=2.0, link=LinkProfile(loss=0.02))
    c.run_until(20.0)
    # one node's clock jumps forward 2 s (an NTP step): at worst a refuted suspicion
    c.harness.node_clock(c.ids[4]).jump(2.0)
    c.run_until(30.0)
    assert c.events_of(MemberDown) == []
    victim = c.ids[7]
    t0 = c.now
    c.kill(victim)
    c.run_until(t0 + 3.0)
    downs = {r.node: r.t - t0 for r in c.events_of(MemberDown, victim)}
    assert set(downs) == set(c.ids) - {victim} and max(downs.values()) < 1.5


def test_messages_survive_the_msgpack_wire_roundtrip() -> None:
    c = MembershipCluster(8, seed=3, wire=True, link=LinkProfile(loss=0.02))
    c.run_until(3.0)
    victim = c.ids[1]
    c.kill(victim)
    c.run_until(6.0)
    assert {r.node for r in c.events_of(MemberDown, victim)} == set(c.ids) - {victim}


def _history(seed: int) -> list[tuple[float, str, str]]:
    c = MembershipCluster(10, seed=seed, link=LinkProfile(loss=0.05, duplicate=0.02, reorder=0.05))
    c.run_until(5.0)
    c.kill(c.ids[0])
    c.run_until(10.0)
    return [(round(r.t, 9), r.node, repr(r.event)) for r in c.events]


def test_same_seed_same_history() -> None:
    assert _history(21) == _history(21)
    assert _history(21) != _history(22)


def test_history_does_not_depend_on_string_hashing() -> None:
    code = textwrap.dedent(
        """
        import hashlib
        from tests.test_core_membership import _history
        print(hashlib.sha256(repr(_history(5)).encode()).hexdigest())
        """
    )
    digests = set()
    for hash_seed in ("1", "2"):
        env = {"PYTHONHASHSEED": hash_seed, "PATH": ""}
        res = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            cwd=_repo_root(),
        )
        assert res.returncode == 0, res.stderr
        digests.add(res.stdout.strip())
    assert len(digests) == 1


def _repo_root() -> str:
    import pathlib

    return str(pathlib.Path(__file__).resolve().parent.parent)
