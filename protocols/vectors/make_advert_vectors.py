"""Regenerate the sealed-advert golden vector (deterministic; run from the repo root).

    python protocols/vectors/make_advert_vectors.py

A capability advert travels in `caps_push` as a seal: a 64-byte ed25519 signature over
`kowalski/advert/1\\0` + body, then the body (msgpack of `DeviceProfile.to_wire()`), signed
by the key inlined in the advert's peer ID (protocols/README.md, section 3). ed25519
signatures are deterministic, so a fixed key and profile give fixed bytes. Tests decode
the committed file and never call this script; regenerate only on an intentional wire
change (and bump the advert domain's version).
"""

from __future__ import annotations

import json
from pathlib import Path

from kowalski_node.capabilities.profile import DeviceProfile
from kowalski_node.capabilities.seal import seal_advert
from kowalski_node.identity import NodeIdentity

HERE = Path(__file__).resolve().parent
SEED = bytes(range(32))  # the identity's ed25519 private key (a test key, never a real one)


def main() -> None:
    identity = NodeIdentity.from_seed(SEED)
    profile = DeviceProfile(
        identity.peer_id, 7, cores=4, ram_total=8 << 30, ram_free=5 << 30, tokens_per_s=12.5
    )
    sealed = seal_advert(profile, identity.sign)
    assert sealed.seal is not None
    vector = {
        "seed_hex": SEED.hex(),
        "peer_id": identity.peer_id,
        "version": 7,
        "cores": 4,
        "ram_total": 8 << 30,
        "ram_free": 5 << 30,
        "tokens_per_s": 12.5,
        "seal_hex": sealed.seal.hex(),
    }
    (HERE / "advert_seal.json").write_text(json.dumps(vector, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
