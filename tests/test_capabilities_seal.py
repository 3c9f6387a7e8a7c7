"""Signed capability adverts, and the node's driver of the one advert core.

The seal (`capabilities/seal.py`): only the key inside an advert's own peer ID can make
an advert for it that a peer accepts, whoever relays it. The driver
(`runtime/capabilities_driver.py`): what it lets through to `CapabilityGossip`, and three
drivers over in-process transports converging on signed adverts relayed by each other.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from kowalski_node.adapters.libp2p.api import Request
from kowalski_node.adapters.libp2p.errors import RequestRejected
from kowalski_node.capabilities import AdvertPush, DeviceProfile, GossipConfig
from kowalski_node.capabilities.seal import (
    DOMAIN,
    SIGNATURE_BYTES,
    open_seal,
    peek_seal,
    seal_advert,
)
from kowalski_node.identity import NodeIdentity, public_key_from_peer_id
from kowalski_node.membership import MemberUp
from kowalski_node.runtime.capabilities_driver import CapabilityDriver, encode_push
from kowalski_node.testing import FakeNetwork, LinkProfile
from kowalski_node.testing.fake_transport import FakeHub
from kowalski_node.wire import WireError

ALICE = NodeIdentity.from_seed(bytes(range(32)))
BOB = NodeIdentity.from_seed(bytes(range(1, 33)))
CAROL = NodeIdentity.from_seed(bytes(range(2, 34)))


def advert(identity: NodeIdentity, version: int, **kw: Any) -> DeviceProfile:
    return seal_advert(DeviceProfile(identity.peer_id, version, cores=4, **kw), identity.sign)


# ---------------------------------------------------------------- the seal


def test_peer_id_gives_back_its_ed25519_key() -> None:
    assert public_key_from_peer_id(ALICE.peer_id) == ALICE.public_key
    assert public_key_from_peer_id("a") is None  # a test name, not a peer ID
    assert public_key_from_peer_id("0OIl") is None  # not base58


def test_a_sealed_advert_opens_to_the_same_advert() -> None:
    sealed = advert(ALICE, 7, repl_languages=("python",))
    opened = open_seal(sealed.seal)
    assert opened == sealed
    assert opened.seal == sealed.seal
    assert len(sealed.seal) > SIGNATURE_BYTES


def test_a_tampered_body_is_refused() -> None:
    sealed = advert(ALICE, 7)
    body = msgpack.unpackb(sealed.seal[SIGNATURE_BYTES:])
    body["cores"] = 64
    forged = sealed.seal[:SIGNATURE_BYTES] + msgpack.packb(body)
    with pytest.raises(WireError, match="bad signature"):
        open_seal(forged)


def test_an_advert_signed_by_another_key_is_refused() -> None:
    """Bob cannot write Alice's advert: the key must be the one in the advert's peer ID."""
    forged = seal_advert(DeviceProfile(ALICE.peer_id, 9, cores=64), BOB.sign)
    with pytest.raises(WireError, match="bad signature"):
        open_seal(forged.seal)


def test_the_signature_covers_the_domain_prefix() -> None:
    """A signature Alice made over the bare body (for another purpose) is no seal."""
    body = msgpack.packb(DeviceProfile(ALICE.peer_id, 3).to_wire(), use_bin_type=True)
    with pytest.raises(WireError, match="bad signature"):
        open_seal(ALICE.sign(body) + body)
    assert open_seal(ALICE.sign(DOMAIN + body) + body).version == 3


def test_a_peer_id_without_a_key_cannot_be_sealed_for() -> None:
    sealed = seal_advert(DeviceProfile("a", 1), ALICE.sign)
    with pytest.raises(WireError, match="no inline ed25519 key"):
        open_seal(sealed.seal)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_seals_fail_with_a_wire_error(blob: bytes) -> None:
    with pytest.raises(WireError):
        open_seal(blob)


@settings(max_examples=40, deadline=None)
@given(
    version=st.integers(0, 2**62),
    cores=st.integers(1, 1024),
    load=st.floats(0, 1),
    flip=st.integers(0, 10_000),
)
def test_any_advert_round_trips_and_any_flipped_byte_is_refused(
    version: int, cores: int, load: float, flip: int
) -> None:
    sealed = advert(ALICE, version, cpu_load=load)
    sealed = seal_advert(replace(sealed, cores=cores), ALICE.sign)
    assert open_seal(sealed.seal) == sealed
    raw = bytearray(sealed.seal)
    raw[flip % len(raw)] ^= 0x01
    with pytest.raises(WireError):
        open_seal(bytes(raw))


# ---------------------------------------------------------------- the driver's checks


def driver(identity: NodeIdentity, hub: FakeHub, live: list[str] | None = None) -> CapabilityDriver:
    me = identity.peer_id
    return CapabilityDriver(
        me,
        hub.transport(me),
        lambda v: DeviceProfile(me, v, cores=2),
        live_peers=lambda: sorted(hub.transports) if live is None else live,
        rng=random.Random(me),
        config=GossipConfig.lan(),
        sign=identity.sign,
    )


def fresh_hub() -> FakeHub:
    return FakeHub(FakeNetwork(random.Random(1), LinkProfile(latency=0.001, jitter=0.0005)))


def test_the_driver_lets_through_signed_relays_and_first_hand_unsigned_adverts() -> None:
    hub = fresh_hub()
    d = driver(CAROL, hub)
    relayed = advert(ALICE, 5)
    first_hand = DeviceProfile("b-unsigned", 2)
    relayed_unsigned = DeviceProfile("x-unsigned", 2)
    forged = seal_advert(DeviceProfile(BOB.peer_id, 9), ALICE.sign)
    payload = {
        "t": AdvertPush.TAG,
        "a": [relayed.seal, first_hand.to_wire(), relayed_unsigned.to_wire(), forged.seal],
    }
    accepted = d._accept_adverts("b-unsigned", payload)
    assert [p.peer for p in accepted] == [ALICE.peer_id, "b-unsigned"]
    assert accepted[0].seal == relayed.seal  # relayed on as the origin signed it
    assert d.rejected == 2


def test_a_stale_copy_is_not_verified_again() -> None:
    """A copy no newer than the table's is skipped before the signature check (the core
    would drop it anyway), so relays of old adverts cost no ed25519 work and no rejection."""
    hub = fresh_hub()
    d = driver(CAROL, hub)
    current = advert(ALICE, 5)
    d.table.merge(current)
    broken_old = current.seal[:-1] + bytes([current.seal[-1] ^ 1])  # any bad byte
    newer_broken = advert(ALICE, 6).seal[:10] + b"\x00" + advert(ALICE, 6).seal[11:]
    got = d._accept_adverts("x", {"t": AdvertPush.TAG, "a": [current.seal]})
    assert got == [] and d.rejected == 0
    peek_seal(broken_old)  # still decodes: only the signature is wrong
    d._accept_adverts("x", {"t": AdvertPush.TAG, "a": [newer_broken]})
    assert d.rejected == 1


def test_unsigned_adverts_of_others_are_not_sent() -> None:
    own = DeviceProfile("me", 3)
    other = DeviceProfile("other", 4)
    signed = advert(ALICE, 2)
    assert encode_push(AdvertPush([own, other, signed]), "me") == {
        "t": AdvertPush.TAG,
        "a": [own.to_wire(), signed.seal],
    }
    assert encode_push(AdvertPush([other]), "me") is None


async def test_a_malformed_message_is_refused_with_a_clear_error() -> None:
    hub = fresh_hub()
    d = driver(CAROL, hub)
    await d.start()
    with pytest.raises(RequestRejected):
        await d.handle_message(Request("x", "p", AdvertPush.TAG, {"t": "nope"}, 1, one_way=True))
    with pytest.raises(RequestRejected):
        await d.handle_message(Request("x", "p", "caps_digest", {"t": "caps_digest"}, 1, True))
    assert d.rejected == 2


# ---------------------------------------------------------------- drivers over a transport


async def test_signed_adverts_reach_every_peer_through_relays(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A line of three signed drivers (Alice and Carol each see only Bob): each knows
    every peer's current advert within a second of the membership events, so Bob relayed
    Alice's and Carol's, signatures intact; a re-published advert replaces the old one."""
    hub = fresh_hub()
    a, b, c = ALICE.peer_id, BOB.peer_id, CAROL.peer_id
    sees = {a: [a, b], b: [a, b, c], c: [b, c]}
    drivers = [driver(i, hub, sees[i.peer_id]) for i in (ALICE, BOB, CAROL)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run)
        for d in drivers:
            await nursery.start(_serve, d)
        for d in drivers:
            for peer in sees[d.me]:
                if peer != d.me:
                    d.member_event(MemberUp(peer, "", 1))
        await trio.sleep(1.0)
        want = {d.me: d.own for d in drivers}
        for d in drivers:
            assert d.table.profiles() == want, d.me
        newest = drivers[0].refresh()
        await trio.sleep(1.0)
        for d in drivers:
            assert d.profile_of(a) == newest
            assert d.profile_of(a).seal == newest.seal  # type: ignore[union-attr]
            assert d.rejected == 0
        nursery.cancel_scope.cancel()


async def _serve(d: CapabilityDriver, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    transport: Any = d.transport
    transport.register_handler("/kowalski/membership/1.0.0", d.handle_message)
    async with transport.running():
        await d.start()
        task_status.started()
        await d.run()


def test_golden_sealed_advert_decodes_and_is_reproduced_byte_for_byte() -> None:
    """protocols/vectors/advert_seal.json: the committed bytes of a sealed advert (what a
    `caps_push` carries) open to the same profile, and the same key and profile seal to
    the same bytes. A change of the advert's wire form fails here, not in the field."""
    import json
    from pathlib import Path

    vector = json.loads(
        (Path(__file__).resolve().parents[1] / "protocols/vectors/advert_seal.json").read_text()
    )
    opened = open_seal(bytes.fromhex(vector["seal_hex"]))
    assert opened.peer == vector["peer_id"] and opened.version == vector["version"]
    assert (opened.cores, opened.ram_total, opened.ram_free, opened.tokens_per_s) == (
        vector["cores"],
        vector["ram_total"],
        vector["ram_free"],
        vector["tokens_per_s"],
    )
    identity = NodeIdentity.from_seed(bytes.fromhex(vector["seed_hex"]))
    assert identity.peer_id == vector["peer_id"]
    again = seal_advert(replace(opened, seal=b""), identity.sign)
    assert again.seal is not None and again.seal.hex() == vector["seal_hex"]
