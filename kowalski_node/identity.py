"""Node identity, cluster key, join strings and the peer allow-list, as files in the data dir.

Layout of a data dir (every secret file is created with mode 0600, and loading
refuses a secret that other users can read):

    identity.key    ed25519 private key, libp2p protobuf encoding (go-libp2p compatible)
    swarm.key       cluster key, standard pnet format: /key/swarm/psk/1.0.0/ /base16/ <64 hex>
    allowed_peers   optional allow-list: one peer ID per line, `#` comments
    bootstrap       optional bootstrap multiaddrs (one per line), written by `init --join`
    known_peers     members' addresses learned while running, rewritten every 30 s by
                    `start` and tried at the next start (stale bootstrap addresses recover)
    node.lock       flock'd by a running `start` (holds its PID)

This module does not import libp2p (that costs ~1 s); the peer ID is computed
here the same way libp2p does (identity multihash of the protobuf public key,
base58btc), and `to_libp2p_keypair()` imports libp2p only when a host is built.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kowalski_node.errors import ConfigError

if TYPE_CHECKING:
    from libp2p.crypto.keys import KeyPair

IDENTITY_FILE = "identity.key"
SWARM_KEY_FILE = "swarm.key"
ALLOW_LIST_FILE = "allowed_peers"
BOOTSTRAP_FILE = "bootstrap"

CLUSTER_KEY_SIZE = 32
SWARM_KEY_HEADER = "/key/swarm/psk/1.0.0/"
JOIN_PREFIX = "kowalski2:"
OLD_JOIN_PREFIX = "kowalski1:"  # no checksum: refused with a "re-generate" message
JOIN_VERSION = 2
JOIN_CHECKSUM_BYTES = 4
KNOWN_PEERS_FILE = "known_peers"
KNOWN_PEERS_MAX = 64

_ED25519_KEY_TYPE = 1  # libp2p crypto.pb KeyType.Ed25519


# ---------------------------------------------------------------- base58 (peer IDs)

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


def b58encode(data: bytes) -> str:
    """Bitcoin-alphabet base58, as libp2p uses for peer IDs."""
    number = int.from_bytes(data, "big")
    out = []
    while number:
        number, rem = divmod(number, 58)
        out.append(_B58_ALPHABET[rem])
    leading_zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * leading_zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    number = 0
    for char in text:
        if char not in _B58_INDEX:
            raise ValueError(f"invalid base58 character {char!r}")
        number = number * 58 + _B58_INDEX[char]
    leading = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * leading + body


# ---------------------------------------------------------------- protobuf helpers


def _pb_key(key_type: int, data: bytes) -> bytes:
    """libp2p crypto.pb {Type: key_type, Data: data} (both fields required)."""
    if len(data) > 127:
        raise ValueError("key data too long for the one-byte length used here")
    return bytes([0x08, key_type, 0x12, len(data)]) + data


def _pb_key_parse(blob: bytes) -> tuple[int, bytes]:
    if len(blob) < 4 or blob[0] != 0x08 or blob[2] != 0x12 or blob[3] != len(blob) - 4:
        raise ValueError("not a libp2p protobuf key")
    return blob[1], blob[4:]


def peer_id_from_public_key(public_key: bytes) -> str:
    """Peer ID of an ed25519 public key: base58(identity multihash(protobuf key))."""
    encoded = _pb_key(_ED25519_KEY_TYPE, public_key)
    return b58encode(bytes([0x00, len(encoded)]) + encoded)


def public_key_from_peer_id(peer_id: str) -> bytes | None:
    """The ed25519 public key inlined in an identity-multihash peer ID (None if it has none)."""
    try:
        raw = b58decode(peer_id)
    except ValueError:
        return None
    if len(raw) < 2 or raw[0] != 0x00 or raw[1] != len(raw) - 2:
        return None
    try:
        key_type, data = _pb_key_parse(raw[2:])
    except ValueError:
        return None
    return data if key_type == _ED25519_KEY_TYPE and len(data) == 32 else None


def validate_peer_id(text: str) -> str:
    """Return `text` stripped if it is a well-formed base58 peer ID, else raise ConfigError."""
    value = text.strip()
    try:
        raw = b58decode(value)
    except ValueError as exc:
        raise ConfigError(f"invalid peer ID {value!r}: {exc}") from None
    ok = (len(raw) >= 2 and raw[0] == 0x00 and raw[1] == len(raw) - 2 and raw[1] <= 42) or (
        len(raw) == 34 and raw[0] == 0x12 and raw[1] == 0x20
    )
    if not ok:
        raise ConfigError(
            f"invalid peer ID {value!r}: not an identity or sha2-256 multihash "
            "(peer IDs look like 12D3KooW...)"
        )
    return value


# ---------------------------------------------------------------- secret files


def _write_secret(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write atomically with mode 0600 from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists; refusing to overwrite a secret")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_secret(path: Path, what: str) -> bytes:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ConfigError(f"{what} not found at {path}; run `kowalski-node init`") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"{what} {path} is accessible by other users (mode {stat.S_IMODE(mode):04o}); "
            f"run `chmod 600 {path}`"
        )
    return path.read_bytes()


# ---------------------------------------------------------------- identity


@dataclass(frozen=True)
class NodeIdentity:
    """A node's ed25519 identity; the peer ID is derived from the public key."""

    seed: bytes
    public_key: bytes

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls.from_seed(secrets.token_bytes(32))

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeIdentity:
        if len(seed) != 32:
            raise ConfigError(f"ed25519 seed must be 32 bytes, got {len(seed)}")
        public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
        return cls(seed=seed, public_key=public)

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    def sign(self, data: bytes) -> bytes:
        """An ed25519 signature of ``data`` by this node (64 bytes)."""
        return Ed25519PrivateKey.from_private_bytes(self.seed).sign(data)

    def to_bytes(self) -> bytes:
        """libp2p protobuf private key with go-libp2p's 64-byte (seed || public) data."""
        return _pb_key(_ED25519_KEY_TYPE, self.seed + self.public_key)

    @classmethod
    def from_bytes(cls, blob: bytes) -> NodeIdentity:
        try:
            key_type, data = _pb_key_parse(blob)
        except ValueError as exc:
            raise ConfigError(f"identity key is corrupt: {exc}") from None
        if key_type != _ED25519_KEY_TYPE:
            raise ConfigError(f"identity key has type {key_type}; only ed25519 (1) is supported")
        if len(data) not in (32, 64):
            raise ConfigError(f"ed25519 identity key data must be 32 or 64 bytes, got {len(data)}")
        identity = cls.from_seed(data[:32])
        if len(data) == 64 and data[32:] != identity.public_key:
            raise ConfigError("identity key is corrupt: public half does not match the seed")
        return identity

    def to_libp2p_keypair(self) -> KeyPair:
        """The same key as py-libp2p objects (imports libp2p)."""
        from libp2p.crypto.ed25519 import Ed25519PrivateKey as Libp2pPrivateKey
        from libp2p.crypto.keys import KeyPair

        private = Libp2pPrivateKey.new(self.seed)
        return KeyPair(private, private.get_public_key())


def save_identity(data_dir: Path, identity: NodeIdentity, *, overwrite: bool = False) -> Path:
    path = Path(data_dir) / IDENTITY_FILE
    _write_secret(path, identity.to_bytes(), overwrite=overwrite)
    return path


def load_identity(data_dir: Path) -> NodeIdentity:
    path = Path(data_dir) / IDENTITY_FILE
    return NodeIdentity.from_bytes(_read_secret(path, "identity key"))


# ---------------------------------------------------------------- cluster key


@dataclass(frozen=True)
class ClusterKey:
    """The 32-byte pnet pre-shared key every cluster member holds."""

    key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != CLUSTER_KEY_SIZE:
            size = len(self.key) if isinstance(self.key, bytes | bytearray) else "non-bytes"
            raise ConfigError(f"cluster key must be exactly {CLUSTER_KEY_SIZE} bytes, got {size}")

    @classmethod
    def generate(cls) -> ClusterKey:
        return cls(secrets.token_bytes(CLUSTER_KEY_SIZE))

    def fingerprint(self) -> str:
        """A short non-secret tag to compare keys by eye (first 8 hex of sha256)."""
        import hashlib

        return hashlib.sha256(b"kowalski-cluster-key\0" + self.key).hexdigest()[:8]

    def to_swarm_key(self) -> str:
        return f"{SWARM_KEY_HEADER}\n/base16/\n{self.key.hex()}\n"

    @classmethod
    def from_swarm_key(cls, text: str | bytes, source: str = "swarm key") -> ClusterKey:
        """Parse the standard swarm.key format strictly (base16; base64 read for go compat)."""
        if isinstance(text, bytes):
            try:
                text = text.decode("ascii")
            except UnicodeDecodeError:
                raise ConfigError(f"{source}: not ASCII text") from None
        lines = [line.strip() for line in text.strip().splitlines()]
        if len(lines) != 3 or lines[0] != SWARM_KEY_HEADER:
            raise ConfigError(
                f"{source}: expected 3 lines '{SWARM_KEY_HEADER}', '/base16/', "
                f"<{CLUSTER_KEY_SIZE * 2} hex digits>"
            )
        encoding, body = lines[1], lines[2]
        if encoding == "/base16/":
            if len(body) != CLUSTER_KEY_SIZE * 2:
                raise ConfigError(
                    f"{source}: key must be {CLUSTER_KEY_SIZE * 2} hex digits, got {len(body)}"
                )
            try:
                raw = bytes.fromhex(body)
            except ValueError:
                raise ConfigError(f"{source}: key contains non-hex characters") from None
        elif encoding == "/base64/":
            try:
                raw = base64.b64decode(body, validate=True)
            except binascii.Error:
                raise ConfigError(f"{source}: key is not valid base64") from None
            if len(raw) != CLUSTER_KEY_SIZE:
                raise ConfigError(
                    f"{source}: key must decode to {CLUSTER_KEY_SIZE} bytes, got {len(raw)}"
                )
        else:
            raise ConfigError(f"{source}: unsupported key encoding {encoding!r} (use /base16/)")
        return cls(raw)

    @classmethod
    def from_hex(cls, text: str) -> ClusterKey:
        value = text.strip()
        if len(value) != CLUSTER_KEY_SIZE * 2:
            raise ConfigError(
                f"cluster key must be {CLUSTER_KEY_SIZE * 2} hex digits, got {len(value)}"
            )
        try:
            return cls(bytes.fromhex(value))
        except ValueError:
            raise ConfigError("cluster key contains non-hex characters") from None


def save_cluster_key(data_dir: Path, key: ClusterKey, *, overwrite: bool = False) -> Path:
    path = Path(data_dir) / SWARM_KEY_FILE
    _write_secret(path, key.to_swarm_key().encode("ascii"), overwrite=overwrite)
    return path


def load_cluster_key_file(path: Path) -> ClusterKey:
    return ClusterKey.from_swarm_key(_read_secret(Path(path), "cluster key"), source=str(path))


def load_cluster_key(data_dir: Path) -> ClusterKey:
    return load_cluster_key_file(Path(data_dir) / SWARM_KEY_FILE)


# ---------------------------------------------------------------- join strings


@dataclass(frozen=True)
class JoinInfo:
    """What a second device needs to join: the cluster key and where to find members."""

    cluster_key: ClusterKey
    bootstrap: tuple[str, ...]
    issuer: str | None = None


def _join_checksum(packed: bytes) -> bytes:
    import hashlib

    return hashlib.sha256(b"kowalski-join\0" + packed).digest()[:JOIN_CHECKSUM_BYTES]


def encode_join(info: JoinInfo) -> str:
    """`kowalski2:` + base64url(msgpack body + 4-byte checksum).

    It CONTAINS THE CLUSTER KEY: treat it as a secret. The checksum (truncated
    sha256) makes a mistyped or truncated string fail at `init`, instead of silently
    creating a node with a wrong cluster key.
    """
    body: dict[str, Any] = {
        "v": JOIN_VERSION,
        "key": info.cluster_key.key,
        "addrs": list(info.bootstrap),
    }
    if info.issuer is not None:
        body["peer"] = info.issuer
    packed = msgpack.packb(body, use_bin_type=True)
    raw = packed + _join_checksum(packed)
    return JOIN_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_join(text: str) -> JoinInfo:
    """Parse and verify a join string; every mistake is a one-line ConfigError."""
    value = text.strip()
    if not value:
        raise ConfigError(
            "the join string is empty; copy the whole `kowalski2:...` string that "
            "`kowalski-node init` printed on a cluster member"
        )
    if value.startswith(OLD_JOIN_PREFIX):
        raise ConfigError(
            "this join string is in the old kowalski1: format, which has no checksum and so "
            "cannot catch a typo in the key; re-generate it: run `kowalski-node init "
            "--data-dir DIR` on a cluster member and copy the kowalski2: string it prints"
        )
    if not value.startswith(JOIN_PREFIX):
        raise ConfigError(
            f"a join string starts with {JOIN_PREFIX!r}; got {value[:12]!r}... "
            "(copy the whole string `kowalski-node init` printed)"
        )
    payload = value[len(JOIN_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    canonical = base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")
    if len(raw) <= JOIN_CHECKSUM_BYTES or canonical != payload:
        raise ConfigError(
            "the join string is corrupt (a character is wrong, missing or extra); "
            "copy it again, whole"
        )
    packed, checksum = raw[:-JOIN_CHECKSUM_BYTES], raw[-JOIN_CHECKSUM_BYTES:]
    if not secrets.compare_digest(checksum, _join_checksum(packed)):
        raise ConfigError(
            "the join string's checksum does not match: it was mistyped or truncated; "
            "copy it again, whole"
        )
    try:
        body = msgpack.unpackb(packed, raw=False, strict_map_key=True)
    except Exception as exc:  # noqa: BLE001 - checksummed but undecodable: written by another program
        raise ConfigError(f"join string is not a kowalski join string: {exc}") from None
    if not isinstance(body, dict):
        raise ConfigError("join string is corrupt: not a map")
    if body.get("v") != JOIN_VERSION:
        raise ConfigError(
            f"join string version {body.get('v')!r} is not supported by this kowalski-node "
            f"(supports {JOIN_VERSION}); upgrade, or re-generate the string"
        )
    key, addrs, issuer = body.get("key"), body.get("addrs", []), body.get("peer")
    if not isinstance(key, bytes):
        raise ConfigError("join string has no cluster key")
    if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
        raise ConfigError("join string bootstrap addresses must be a list of strings")
    if issuer is not None and not isinstance(issuer, str):
        raise ConfigError("join string issuer must be a peer ID string")
    return JoinInfo(ClusterKey(key), tuple(addrs), None if issuer is None else issuer)


# ---------------------------------------------------------------- allow-list and bootstrap


def _read_lines(path: Path) -> list[tuple[int, str]]:
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        value = line.split("#", 1)[0].strip()
        if value:
            out.append((number, value))
    return out


def load_allow_list(data_dir: Path) -> frozenset[str] | None:
    """Peer IDs allowed to connect, or None when there is no allow-list (any key holder)."""
    path = Path(data_dir) / ALLOW_LIST_FILE
    if not path.exists():
        return None
    allowed = set()
    for number, value in _read_lines(path):
        try:
            allowed.add(validate_peer_id(value))
        except ConfigError as exc:
            raise ConfigError(f"{path}:{number}: {exc}") from None
    return frozenset(allowed)


def save_allow_list(data_dir: Path, peers: list[str]) -> Path:
    path = Path(data_dir) / ALLOW_LIST_FILE
    checked = [validate_peer_id(p) for p in peers]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# peer IDs allowed in this cluster, one per line\n" + "".join(f"{p}\n" for p in checked),
        encoding="utf-8",
    )
    return path


def load_bootstrap(data_dir: Path) -> list[str]:
    path = Path(data_dir) / BOOTSTRAP_FILE
    if not path.exists():
        return []
    return [value for _, value in _read_lines(path)]


def save_bootstrap(data_dir: Path, addrs: list[str]) -> Path:
    path = Path(data_dir) / BOOTSTRAP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{a}\n" for a in addrs), encoding="utf-8")
    return path


def load_known_peers(data_dir: Path) -> list[str]:
    """Addresses of members seen on earlier runs (empty when none or unreadable)."""
    path = Path(data_dir) / KNOWN_PEERS_FILE
    try:
        return [value for _, value in _read_lines(path) if "/p2p/" in value][:KNOWN_PEERS_MAX]
    except (OSError, UnicodeDecodeError):
        return []


def save_known_peers(data_dir: Path, addrs: list[str]) -> Path:
    """Replace the learned-addresses file atomically (at most KNOWN_PEERS_MAX, newest first)."""
    path = Path(data_dir) / KNOWN_PEERS_FILE
    keep = list(dict.fromkeys(a for a in addrs if "/p2p/" in a))[:KNOWN_PEERS_MAX]
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(
        "# members' addresses learned while running; tried at start (safe to delete)\n"
        + "".join(f"{a}\n" for a in keep),
        encoding="utf-8",
    )
    os.replace(tmp, path)
    return path
