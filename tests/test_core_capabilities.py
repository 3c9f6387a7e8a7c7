"""Capability adverts: wire format, deterministic merge (convergence property), the psutil probe."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kowalski_node.capabilities import (
    CapabilityTable,
    DeviceProfile,
    ServedModel,
    estimate_cost_per_op,
    newer,
)
from kowalski_node.capabilities.gossip import CapabilityGossip, GossipSend
from kowalski_node.capabilities.probe import collect_profile, guess_device_class
from kowalski_node.election import leader_weight
from kowalski_node.glue import perform_gossip_effects
from kowalski_node.testing import CoreHarness, FakeNetwork, LinkProfile
from kowalski_node.wire import WireError

GIB = 1024**3

profiles = st.builds(
    DeviceProfile,
    peer=st.sampled_from(["a", "b", "c", "d"]),
    version=st.integers(0, 5),
    device_class=st.sampled_from(["desktop", "laptop", "constrained"]),
    cores=st.integers(1, 64),
    ram_total=st.integers(0, 256 * GIB),
    ram_free=st.integers(0, 256 * GIB),
    cpu_load=st.floats(0, 1),
    battery_percent=st.none() | st.floats(0, 100),
    power_plugged=st.none() | st.booleans(),
    temperature_c=st.none() | st.floats(-20, 110),
    repl_languages=st.lists(st.sampled_from(["python", "js", "bash"]), max_size=3).map(tuple),
    tokens_per_s=st.floats(0, 500),
)


@given(st.lists(profiles, max_size=25), st.randoms(use_true_random=False))
@settings(max_examples=300, deadline=None)
def test_merge_converges_regardless_of_order_and_duplication(
    adverts: list[DeviceProfile], rnd: random.Random
) -> None:
    tables = []
    for _ in range(3):
        deliveries = adverts + [rnd.choice(adverts) for _ in range(len(adverts))] if adverts else []
        rnd.shuffle(deliveries)
        t = CapabilityTable()
        t.merge_all(deliveries)
        tables.append(t)
    assert tables[0].profiles() == tables[1].profiles() == tables[2].profiles()
    assert tables[0].digest() == tables[1].digest() == tables[2].digest()
    # each peer holds its highest version
    for peer, prof in tables[0].profiles().items():
        assert prof.version == max(a.version for a in adverts if a.peer == peer)


@given(profiles, profiles)
@settings(max_examples=200, deadline=None)
def test_newer_is_commutative(a: DeviceProfile, b: DeviceProfile) -> None:
    b = DeviceProfile(**{**{f: getattr(b, f) for f in b.__dataclass_fields__}, "peer": a.peer})
    assert newer(a, b) == newer(b, a)


def test_stale_adverts_are_ignored_and_forget_keeps_a_floor() -> None:
    t = CapabilityTable()
    assert t.merge(DeviceProfile("a", 3, cores=4))
    assert not t.merge(DeviceProfile("a", 2, cores=8))
    assert t.stale_ignored == 1 and t.get("a") == DeviceProfile("a", 3, cores=4)
    t.forget("a")
    assert "a" not in t
    assert not t.merge(DeviceProfile("a", 3, cores=4))  # an old advert cannot resurrect it
    assert t.merge(DeviceProfile("a", 4, cores=4))


@given(profiles)
@settings(max_examples=200, deadline=None)
def test_profile_roundtrips_through_msgpack(p: DeviceProfile) -> None:
    raw = msgpack.unpackb(msgpack.packb(p.to_wire(), use_bin_type=True), raw=False)
    assert DeviceProfile.from_wire(raw) == p


def test_models_and_bad_adverts() -> None:
    p = DeviceProfile("a", 1, models=(ServedModel("smollm2", 30, 0, 15), ServedModel("big", 61)))
    assert DeviceProfile.from_wire(p.to_wire()) == DeviceProfile(
        "a", 1, models=(ServedModel("smollm2", 30, 0, 15), ServedModel("big", 61, 0, 61))
    )
    assert not p.models[0].full and ServedModel("big", 61).full
    with pytest.raises(ValueError, match="does not fit"):
        ServedModel("x", 10, 5, 11)
    wire = p.to_wire()
    with pytest.raises(WireError, match="unknown device class"):
        DeviceProfile.from_wire({**wire, "cls": "toaster"})
    with pytest.raises(WireError, match="does not fit"):
        DeviceProfile.from_wire({**wire, "models": [{"name": "m", "n": 4, "a": 3, "b": 9}]})
    with pytest.raises(WireError, match="load"):
        DeviceProfile.from_wire({**wire, "load": 1.5})
    with pytest.raises(WireError, match="expected type tag"):
        DeviceProfile.from_wire({**wire, "t": "ping"})


def test_cost_and_leader_weight_prefer_plugged_in_roomy_devices() -> None:
    assert estimate_cost_per_op("desktop", None, None) == 0.0
    assert estimate_cost_per_op("laptop", False, 10.0) > estimate_cost_per_op("laptop", True, 10.0)
    desk = DeviceProfile(
        "d", 1, "desktop", cores=16, ram_total=64 * GIB, ram_free=48 * GIB, cpu_load=0.1
    )
    phone = DeviceProfile(
        "p", 1, "constrained", cores=8, ram_total=6 * GIB, ram_free=1 * GIB, power_plugged=False
    )
    assert leader_weight(desk) > 10 * leader_weight(phone) > 0
    assert leader_weight(DeviceProfile("x", 1, extra={"lead": "no"})) == 0.0


def test_probe_reads_this_machine() -> None:
    p = collect_profile("me", 7, repl_languages=["python"], tokens_per_s=30.0)
    assert p.peer == "me" and p.version == 7 and p.cores >= 1
    assert p.ram_total > 0 and 0 <= p.ram_free <= p.ram_total
    assert 0.0 <= p.cpu_load <= 1.0
    assert p.repl_languages == ("python",)
    assert DeviceProfile.from_wire(p.to_wire()) == p
    assert guess_device_class(2 * GIB, False) == "constrained"
    assert guess_device_class(16 * GIB, True) == "laptop"
    assert guess_device_class(16 * GIB, False) == "desktop"


# --------------------------------------------------------------------------- dissemination


def _gossip_cluster(
    n: int, seed: int, loss: float = 0.0
) -> tuple[CoreHarness, list[str], dict[str, CapabilityGossip], list[tuple[float, str, str]]]:
    rng = random.Random(seed)
    net = FakeNetwork(random.Random(rng.getrandbits(64)), LinkProfile(loss=loss))
    changes: list[tuple[float, str, str]] = []
    h = CoreHarness(
        net,
        perform=perform_gossip_effects,  # the node's glue for this core
        on_event=lambda node, t, e: changes.append((t, node, e.peer)),
    )
    ids = [f"g{i:02d}" for i in range(n)]
    cores: dict[str, CapabilityGossip] = {}
    for i in ids:
        core = CapabilityGossip(i, rng=random.Random(rng.getrandbits(64)), now=0.0)
        core.set_peers(ids)
        cores[i] = core
        h.add(i, core)
    return h, ids, cores, changes


def test_gossip_spreads_every_advert_to_everyone_despite_loss() -> None:
    h, ids, cores, changes = _gossip_cluster(30, seed=1, loss=0.05)
    for i in ids:
        h.inject(i, cores[i].publish(0.0, DeviceProfile(i, 1, cores=4)))
    sync = cores[ids[0]].config.sync_interval
    h.run_until(1.0)
    # push alone reaches almost every (node, advert) pair; anti-entropy sync mops up the rest
    assert sum(len(cores[i].table) for i in ids) >= 0.98 * 30 * 30
    h.run_until(1.0 + 2 * sync)
    digests = {cores[i].table.digest() for i in ids}
    assert len(digests) == 1 and len(cores[ids[0]].table) == 30
    # a new version from one peer reaches everyone, most of them within a few push rounds
    t0 = h.clock.now()
    h.inject(ids[3], cores[ids[3]].publish(t0, DeviceProfile(ids[3], 2, cores=4, cpu_load=0.9)))
    h.run_until(t0 + 2 * sync)
    assert all(cores[i].table.get(ids[3]).version == 2 for i in ids)  # type: ignore[union-attr]
    lat = sorted(t - t0 for t, node, peer in changes if peer == ids[3] and t >= t0)
    assert len(lat) == 30 and lat[int(0.9 * len(lat))] < 0.3


def test_partitioned_node_catches_up_through_version_vector_sync() -> None:
    h, ids, cores, _ = _gossip_cluster(10, seed=2)
    h.network.partition([ids[:9], ids[9:]])
    for i in ids:
        h.inject(i, cores[i].publish(0.0, DeviceProfile(i, 1)))
    h.run_until(3.0)  # pushes are exhausted long before the heal
    assert len(cores[ids[9]].table) == 1
    h.network.heal()
    h.run_until(3.0 + 3 * cores[ids[0]].config.sync_interval)
    assert len({cores[i].table.digest() for i in ids}) == 1 and len(cores[ids[9]].table) == 10


def test_gossip_messages_roundtrip_and_reject_garbage() -> None:
    from kowalski_node.capabilities.gossip import AdvertDigest, AdvertPush, decode_gossip

    for msg in (AdvertPush([DeviceProfile("a", 3)]), AdvertDigest({"a": 3, "b": 0}, True)):
        raw = msgpack.unpackb(msgpack.packb(msg.to_wire(), use_bin_type=True), raw=False)
        assert decode_gossip(raw) == msg
    with pytest.raises(WireError, match="peer id, version"):
        decode_gossip({"t": "caps_digest", "v": [["a", -1]], "r": True})
    with pytest.raises(WireError, match="unknown type tag"):
        decode_gossip({"t": "nope"})


# --------------------------------------------------------------------------- push queue


class _SortedModel:
    """The push order by definition: sort (times sent, peer id) at every take."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}

    def take(self, n: int, limit: int) -> list[str]:
        picked = sorted(self.sent.items(), key=lambda kv: (kv[1], kv[0]))[:n]
        for peer, sent in picked:
            if sent + 1 >= limit:
                del self.sent[peer]
            else:
                self.sent[peer] = sent + 1
        return [peer for peer, _ in picked]


_push_ops = st.lists(
    st.one_of(
        st.tuples(st.just("reset"), st.sampled_from([f"p{i:02d}" for i in range(40)])),
        st.tuples(st.just("discard"), st.sampled_from([f"p{i:02d}" for i in range(40)])),
        st.tuples(st.just("take"), st.integers(1, 20), st.integers(1, 6)),
    ),
    max_size=200,
)


@given(_push_ops)
@settings(max_examples=300, deadline=None)
def test_push_queue_matches_a_full_sort_at_every_take(ops: list[tuple]) -> None:
    from kowalski_node.capabilities.push_queue import PushQueue

    queue, model = PushQueue(), _SortedModel()
    for op in ops:
        if op[0] == "reset":
            queue.reset(op[1])
            model.sent[op[1]] = 0
        elif op[0] == "discard":
            assert queue.discard(op[1]) == (model.sent.pop(op[1], None) is not None)
        else:
            assert queue.take(op[1], op[2]) == model.take(op[1], op[2])
        assert len(queue) == len(model.sent)
        assert all(queue.sent(p) == s for p, s in model.sent.items())


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("publish"), st.integers(0, 10)),
            st.tuples(st.just("up"), st.sampled_from(["a", "b", "c"])),
            st.tuples(st.just("push"), st.integers(0, 10)),
        ),
        max_size=20,
    )
)
def test_peer_up_pushes_exactly_our_latest_advert(steps: list[tuple[str, Any]]) -> None:
    """Whatever came before, a member that comes up gets one push holding the newest
    advert of ours the table has (never another peer's, never one to ourselves), or
    nothing before we published."""
    from kowalski_node.capabilities.gossip import AdvertPush

    gossip = CapabilityGossip("a", rng=random.Random(0), now=0.0)
    latest: DeviceProfile | None = None
    for i, (kind, arg) in enumerate(steps):
        now = float(i)
        if kind == "publish":
            prof = DeviceProfile("a", arg, cores=1 + i)
            gossip.publish(now, prof)
            if latest is None or newer(latest, prof) is prof:
                latest = prof
        elif kind == "push":  # a relayed advert of ours, maybe newer (e.g. from before a restart)
            prof = DeviceProfile("a", arg, cores=100 + i)
            gossip.handle(now, "b", AdvertPush([prof]))
            if latest is None or newer(latest, prof) is prof:
                latest = prof
        else:
            sent = gossip.peer_up(now, arg)
            if arg == "a" or latest is None:
                assert sent == []
            else:
                assert sent == [GossipSend(arg, AdvertPush([latest]))]
