"""Signed adverts: a peer signs its own advert once, and every relay forwards those bytes.

Capability gossip relays adverts (a push or a pull answer carries other peers' adverts), so
the transport's authenticated sender says nothing about who wrote a relayed advert. The
origin therefore signs it: ``seal = signature (64 bytes) || body``, where ``body`` is the
msgpack encoding of ``DeviceProfile.to_wire()`` and the signature is ed25519 over
``DOMAIN || body`` with the key inlined in the origin's peer ID (libp2p identity
multihash). ``open_seal`` checks exactly that, so an advert for peer P is accepted only if
P's key signed it, whoever relays it. The seal rides on the profile (``DeviceProfile.seal``)
through the pure gossip core, which never looks at it.

Pure functions: no I/O, no clock; the signing function comes from the node's identity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from kowalski_node.capabilities.profile import DeviceProfile
from kowalski_node.identity import public_key_from_peer_id
from kowalski_node.wire import WireError

DOMAIN = b"kowalski/advert/1\0"
SIGNATURE_BYTES = 64
MAX_SEAL_BYTES = 64 * 1024

Signer = Callable[[bytes], bytes]


def seal_advert(profile: DeviceProfile, sign: Signer) -> DeviceProfile:
    """``profile`` with its seal: signed by ``sign`` (the key of ``profile.peer``)."""
    body = msgpack.packb(profile.to_wire(), use_bin_type=True)
    signature = sign(DOMAIN + body)
    if len(signature) != SIGNATURE_BYTES:
        raise ValueError(f"seal_advert: expected a 64-byte ed25519 signature, got {len(signature)}")
    seal = signature + body
    if len(seal) > MAX_SEAL_BYTES:
        raise ValueError(f"seal_advert: advert of {len(seal)} bytes exceeds {MAX_SEAL_BYTES}")
    return replace(profile, seal=seal)


def peek_seal(seal: object) -> DeviceProfile:
    """The advert inside a seal, decoded but NOT verified (to skip verifying stale copies)."""
    if not isinstance(seal, bytes):
        raise WireError("sealed advert: expected bytes")
    if not SIGNATURE_BYTES < len(seal) <= MAX_SEAL_BYTES:
        raise WireError(f"sealed advert: {len(seal)} bytes, expected 65..{MAX_SEAL_BYTES}")
    try:
        obj = msgpack.unpackb(seal[SIGNATURE_BYTES:], raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types for garbage
        raise WireError(f"sealed advert: body is not msgpack ({type(exc).__name__})") from None
    return replace(DeviceProfile.from_wire(obj), seal=seal)


def verify_seal(profile: DeviceProfile) -> None:
    """Raise WireError unless ``profile.seal`` is signed by the key in ``profile.peer``."""
    key = public_key_from_peer_id(profile.peer)
    if key is None:
        raise WireError(f"sealed advert: peer {profile.peer[:64]!r} has no inline ed25519 key")
    seal = profile.seal
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(
            seal[:SIGNATURE_BYTES], DOMAIN + seal[SIGNATURE_BYTES:]
        )
    except InvalidSignature:
        raise WireError(f"sealed advert: bad signature for {profile.peer[:64]!r}") from None


def open_seal(seal: object) -> DeviceProfile:
    """Decode and verify a sealed advert; WireError if it is malformed or not its peer's."""
    profile = peek_seal(seal)
    verify_seal(profile)
    return profile
