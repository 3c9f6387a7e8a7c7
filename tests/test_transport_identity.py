"""Identity, cluster key (swarm.key), join strings, allow-list files and `kowalski-node init`."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from kowalski_node.cli import main as cli_main
from kowalski_node.errors import ConfigError
from kowalski_node.identity import (
    ClusterKey,
    JoinInfo,
    NodeIdentity,
    b58decode,
    b58encode,
    decode_join,
    encode_join,
    load_allow_list,
    load_bootstrap,
    load_cluster_key,
    load_identity,
    save_allow_list,
    save_cluster_key,
    save_identity,
    validate_peer_id,
)


def test_identity_roundtrip_and_file_mode(tmp_path: Path) -> None:
    ident = NodeIdentity.generate()
    path = save_identity(tmp_path, ident)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_identity(tmp_path) == ident
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        save_identity(tmp_path, NodeIdentity.generate())


def test_peer_id_matches_libp2p() -> None:
    from libp2p.peer.id import ID

    ident = NodeIdentity.from_seed(bytes(range(32)))
    keypair = ident.to_libp2p_keypair()
    assert ident.peer_id == ID.from_pubkey(keypair.public_key).to_base58()
    assert ident.peer_id.startswith("12D3KooW")
    # libp2p's own serialisation (32-byte data) loads too
    assert NodeIdentity.from_bytes(keypair.private_key.serialize()) == ident


def test_secret_readable_by_others_is_refused(tmp_path: Path) -> None:
    save_cluster_key(tmp_path, ClusterKey.generate())
    os.chmod(tmp_path / "swarm.key", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_cluster_key(tmp_path)


def test_corrupt_identity_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "identity.key").write_bytes(b"garbage")
    os.chmod(tmp_path / "identity.key", 0o600)
    with pytest.raises(ConfigError, match="corrupt"):
        load_identity(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        load_identity(tmp_path / "missing")


def test_swarm_key_format_roundtrip() -> None:
    key = ClusterKey.generate()
    text = key.to_swarm_key()
    assert text.splitlines() == ["/key/swarm/psk/1.0.0/", "/base16/", key.key.hex()]
    assert ClusterKey.from_swarm_key(text) == key
    assert ClusterKey.from_swarm_key(text.replace("\n", "\r\n")) == key


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("/key/swarm/psk/1.0.0/\n/base16/\nabcd\n", "64 hex digits, got 4"),
        ("/key/swarm/psk/1.0.0/\n/base16/\n" + "zz" * 32 + "\n", "non-hex"),
        ("/key/swarm/psk/1.0.0/\n/base16/\n" + "ab" * 33 + "\n", "64 hex digits, got 66"),
        ("/key/swarm/psk/1.0.0/\n/bin/\nxx\n", "unsupported key encoding"),
        ("/key/swarm/psk/2.0.0/\n/base16/\n" + "ab" * 32, "expected 3 lines"),
        ("ab" * 32, "expected 3 lines"),
        ("/key/swarm/psk/1.0.0/\n/base64/\nAAAA\n", "32 bytes, got 3"),
    ],
)
def test_bad_swarm_keys_are_rejected_clearly(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ClusterKey.from_swarm_key(text)


def test_base64_swarm_key_accepted_for_go_compat() -> None:
    import base64

    raw = os.urandom(32)
    text = f"/key/swarm/psk/1.0.0/\n/base64/\n{base64.b64encode(raw).decode()}\n"
    assert ClusterKey.from_swarm_key(text).key == raw


def test_cluster_key_size_enforced() -> None:
    with pytest.raises(ConfigError, match="exactly 32 bytes"):
        ClusterKey(b"\x00" * 31)
    with pytest.raises(ConfigError, match="non-hex"):
        ClusterKey.from_hex("g" * 64)


def test_join_string_roundtrip_and_errors() -> None:
    key = ClusterKey.generate()
    ident = NodeIdentity.generate()
    info = JoinInfo(key, (f"/ip4/127.0.0.1/tcp/7470/p2p/{ident.peer_id}",), ident.peer_id)
    text = encode_join(info)
    assert text.startswith("kowalski2:")
    assert key.key.hex() not in text  # not plainly visible (it is still a secret!)
    assert decode_join(text) == info
    for bad in (
        "",
        "  ",
        "nope",
        "kowalski2:",
        "kowalski2:%%%",
        text[:-10],
        "kowalski2:" + "A" * 40,
    ):
        with pytest.raises(ConfigError):
            decode_join(bad)
    with pytest.raises(ConfigError, match="re-generate"):
        decode_join("kowalski1:" + text[len("kowalski2:") :])


def test_join_string_checksum_catches_every_single_character_typo() -> None:
    """Changing any one character of the payload to any other base64url character fails."""
    key = ClusterKey.generate()
    ident = NodeIdentity.generate()
    text = encode_join(JoinInfo(key, (f"/ip4/10.0.0.2/tcp/7470/p2p/{ident.peer_id}",)))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    start = len("kowalski2:")
    tried = 0
    for i in range(start, len(text)):
        for c in alphabet:
            if c == text[i]:
                continue
            mutated = text[:i] + c + text[i + 1 :]
            with pytest.raises(ConfigError):
                decode_join(mutated)
            tried += 1
    assert tried == (len(text) - start) * 63


def test_base58_and_peer_id_validation() -> None:
    for data in (b"", b"\0\0abc", os.urandom(40)):
        assert b58decode(b58encode(data)) == data
    ident = NodeIdentity.generate()
    assert validate_peer_id(f"  {ident.peer_id} ") == ident.peer_id
    for bad in ("", "0OIl", "12D3KooWshort", "Qm" + "1" * 10):
        with pytest.raises(ConfigError):
            validate_peer_id(bad)


def test_allow_list_file(tmp_path: Path) -> None:
    assert load_allow_list(tmp_path) is None
    peers = [NodeIdentity.generate().peer_id for _ in range(2)]
    save_allow_list(tmp_path, peers)
    assert load_allow_list(tmp_path) == frozenset(peers)
    (tmp_path / "allowed_peers").write_text(f"{peers[0]}  # laptop\n\nnot-a-peer\n")
    with pytest.raises(ConfigError, match="allowed_peers:3"):
        load_allow_list(tmp_path)


def test_init_then_join_gives_same_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    assert (
        cli_main(["init", "--data-dir", str(a), "--advertise", "/ip4/127.0.0.1/tcp/7470", "--json"])
        == 0
    )
    first = json.loads(capsys.readouterr().out)
    assert first["identity"] == "created" and first["cluster_key"] == "created"
    assert stat.S_IMODE(a.stat().st_mode) == 0o700
    # idempotent: a second init keeps identity and key
    assert (
        cli_main(["init", "--data-dir", str(a), "--json", "--advertise", "/ip4/127.0.0.1/tcp/7470"])
        == 0
    )
    again = json.loads(capsys.readouterr().out)
    assert again["peer_id"] == first["peer_id"] and again["cluster_key"] == "existing"

    assert cli_main(["init", "--data-dir", str(b), "--join", first["join"], "--json"]) == 0
    joined = json.loads(capsys.readouterr().out)
    assert joined["cluster_key"] == "joined"
    assert joined["peer_id"] != first["peer_id"]
    assert load_cluster_key(b) == load_cluster_key(a)
    assert load_bootstrap(b) == [f"/ip4/127.0.0.1/tcp/7470/p2p/{first['peer_id']}"]


def test_init_rejects_bad_inputs_without_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "c"
    assert cli_main(["init", "--data-dir", str(target), "--join", "kowalski2:AAAA"]) == 1
    assert "join string is corrupt" in capsys.readouterr().err
    assert not target.exists()
    assert cli_main(["init", "--data-dir", str(target), "--join", ""]) == 1
    assert "join string is empty" in capsys.readouterr().err
    assert not target.exists()
    keyfile = tmp_path / "short.key"
    keyfile.write_text("/key/swarm/psk/1.0.0/\n/base16/\nabcd\n")
    os.chmod(keyfile, 0o600)
    assert cli_main(["init", "--data-dir", str(target), "--cluster-key-file", str(keyfile)]) == 1
    assert "64 hex digits" in capsys.readouterr().err
    assert not target.exists()


def test_init_imports_key_file_and_refuses_silent_replacement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = ClusterKey.generate()
    keyfile = tmp_path / "swarm.key"
    save_cluster_key(tmp_path, key)
    target = tmp_path / "node"
    assert cli_main(["init", "--data-dir", str(target), "--cluster-key-file", str(keyfile)]) == 0
    assert load_cluster_key(target) == key
    other = tmp_path / "other"
    save_cluster_key(other, ClusterKey.generate())
    capsys.readouterr()
    args = ["init", "--data-dir", str(target), "--cluster-key-file", str(other / "swarm.key")]
    assert cli_main(args) == 1
    assert "another key" in capsys.readouterr().err
    peer = load_identity(target).peer_id
    assert cli_main([*args, "--force"]) == 0
    assert load_cluster_key(target) != key
    assert load_identity(target).peer_id == peer  # --force replaces the key, not the identity
    assert cli_main(["init", "--data-dir", str(target), "--new-identity"]) == 0
    assert load_identity(target).peer_id != peer
