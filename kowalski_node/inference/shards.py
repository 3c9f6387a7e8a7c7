"""The encrypted shard cache: layer ranges fetched from peers, stored encrypted at rest.

A peer without a model's GGUF keeps the float32 tensors of its layer range here, under
`<data-dir>/shards/<model sha256>/`:

    manifest.json        the model's LlamaConfig and {name: {sha256, size}} of fetched tensors
    tensors/<name>.kws   one encrypted tensor (the `.npy` bytes the source peer cached)

Encryption (docs/inference.md): a master key is derived from the 32-byte cluster key with
HKDF-SHA256 (salt `kowalski/shard-cache/v1`); each file has a random 16-byte salt from
which HKDF derives the file's AES-256-GCM key (info = model sha256 + tensor name). The file
is a header then 1 MiB chunks, each sealed with nonce = chunk index and associated data =
header + index + a last-chunk flag, so a flipped bit, a swapped chunk or a cut file fails
authentication. The plaintext must also hash to the sha256 the source announced. A file
that fails either check is deleted and `ShardCorrupt` is raised; the stage fetches again.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kowalski_node.inference.errors import ShardCorrupt
from kowalski_node.llm.builtin.config import LlamaConfig
from kowalski_node.llm.builtin.npy import npy_from_bytes
from kowalski_node.llm.builtin.weights import WeightStore, expected_shape

MAGIC = b"KWS1"
CHUNK = 1 << 20
TAG = 16
HEADER = struct.Struct(">4s16sIQI")  # magic, salt, chunk size, plaintext size, chunk count
MASTER_SALT = b"kowalski/shard-cache/v1"


def _hkdf(key: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


def derive_master_key(cluster_key: bytes) -> bytes:
    """The cache's master key: HKDF-SHA256 of the cluster key (never the key itself)."""
    if len(cluster_key) != 32:
        raise ValueError("the cluster key must be 32 bytes")
    return _hkdf(cluster_key, MASTER_SALT, b"aes-256-gcm master")


def _chunk_aad(header: bytes, index: int, last: bool) -> bytes:
    return header + struct.pack(">IB", index, 1 if last else 0)


def encrypt_stream(
    master: bytes,
    model: str,
    name: str,
    chunks: Iterable[bytes],
    size: int,
    out: io.BufferedWriter | io.BytesIO,
    *,
    salt: bytes | None = None,
) -> None:
    """Seal `size` plaintext bytes (given as pieces) into `out`, chunk by chunk.

    `salt` is random unless given (only the golden vectors fix it)."""
    salt = os.urandom(16) if salt is None else salt
    n_chunks = max(1, -(-size // CHUNK))
    header = HEADER.pack(MAGIC, salt, CHUNK, size, n_chunks)
    aead = AESGCM(_hkdf(master, salt, f"tensor\0{model}\0{name}".encode()))
    out.write(header)
    buf = bytearray()
    index = 0
    for piece in chunks:
        buf += piece
        while len(buf) >= CHUNK and index < n_chunks - 1:
            block = bytes(buf[:CHUNK])
            del buf[:CHUNK]
            out.write(
                aead.encrypt(index.to_bytes(12, "big"), block, _chunk_aad(header, index, False))
            )
            index += 1
    if len(buf) + index * CHUNK != size or index != n_chunks - 1:
        raise ValueError(f"plaintext for {name} is not {size} bytes")
    out.write(aead.encrypt(index.to_bytes(12, "big"), bytes(buf), _chunk_aad(header, index, True)))


def decrypt_file(master: bytes, model: str, name: str, path: Path) -> bytes:
    """The plaintext of one sealed file; ShardCorrupt on any tampering or truncation."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ShardCorrupt(f"shard tensor {name} cannot be read at {path}: {exc}") from None
    return decrypt_bytes(master, model, name, data, str(path))


def decrypt_bytes(master: bytes, model: str, name: str, data: bytes, path: str = "-") -> bytes:
    """`decrypt_file` over bytes already read."""
    if len(data) < HEADER.size:
        raise ShardCorrupt(f"shard tensor {name} at {path} is truncated (no header)")
    header = data[: HEADER.size]
    magic, salt, chunk, size, n_chunks = HEADER.unpack(header)
    expected = HEADER.size + size + n_chunks * TAG
    if magic != MAGIC or chunk != CHUNK or n_chunks != max(1, -(-size // CHUNK)):
        raise ShardCorrupt(f"shard tensor {name} at {path} has a bad header")
    if len(data) != expected:
        raise ShardCorrupt(
            f"shard tensor {name} at {path} is {len(data)} bytes, expected {expected} "
            "(truncated or padded)"
        )
    aead = AESGCM(_hkdf(master, salt, f"tensor\0{model}\0{name}".encode()))
    out = bytearray()
    offset = HEADER.size
    for index in range(n_chunks):
        plain_len = min(CHUNK, size - index * CHUNK)
        sealed = data[offset : offset + plain_len + TAG]
        offset += plain_len + TAG
        try:
            out += aead.decrypt(
                index.to_bytes(12, "big"), sealed, _chunk_aad(header, index, index == n_chunks - 1)
            )
        except InvalidTag:
            raise ShardCorrupt(
                f"shard tensor {name} at {path} failed authentication in chunk {index} "
                "(tampered, or sealed under another cluster key)"
            ) from None
    return bytes(out)


class ShardCache:
    """Encrypted per-model tensor files for the layer ranges this node fetched."""

    def __init__(self, root: Path, cluster_key: bytes) -> None:
        self.root = root
        self._master = derive_master_key(cluster_key)

    def model_dir(self, model: str) -> Path:
        return self.root / model

    def _manifest_path(self, model: str) -> Path:
        return self.model_dir(model) / "manifest.json"

    def manifest(self, model: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._manifest_path(model).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and "config" in data else None

    def config(self, model: str) -> LlamaConfig | None:
        manifest = self.manifest(model)
        if manifest is None:
            return None
        try:
            return LlamaConfig.from_json(manifest["config"])
        except (KeyError, TypeError, ValueError):
            return None

    def _write_manifest(self, model: str, manifest: dict[str, Any]) -> None:
        path = self._manifest_path(model)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest-")
        with os.fdopen(fd, "w") as fh:
            json.dump(manifest, fh)
        os.replace(tmp, path)

    def set_config(self, model: str, config: LlamaConfig) -> None:
        manifest = self.manifest(model) or {"tensors": {}}
        manifest["config"] = config.to_json()
        self._write_manifest(model, manifest)

    def tensor_path(self, model: str, name: str) -> Path:
        return self.model_dir(model) / "tensors" / f"{name}.kws"

    def has(self, model: str, names: Iterable[str]) -> bool:
        manifest = self.manifest(model)
        if manifest is None:
            return False
        known = manifest.get("tensors", {})
        return all(n in known and self.tensor_path(model, n).is_file() for n in names)

    def store_file(self, model: str, name: str, plaintext: Path, sha256: str) -> None:
        """Encrypt a received tensor file after checking it hashes to `sha256`."""
        size = plaintext.stat().st_size
        digest = hashlib.sha256()

        def pieces() -> Iterable[bytes]:
            with plaintext.open("rb") as fh:
                while block := fh.read(CHUNK):
                    digest.update(block)
                    yield block

        target = self.tensor_path(model, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{name}-")
        try:
            with os.fdopen(fd, "wb") as out:
                encrypt_stream(self._master, model, name, pieces(), size, out)
            if digest.hexdigest() != sha256:
                raise ShardCorrupt(
                    f"tensor {name} of model {model[:12]} hashes to {digest.hexdigest()[:12]}…, "
                    f"the source announced {sha256[:12]}…"
                )
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        manifest = self.manifest(model) or {"tensors": {}}
        manifest.setdefault("tensors", {})[name] = {"sha256": sha256, "size": size}
        self._write_manifest(model, manifest)

    def load(self, model: str, name: str) -> np.ndarray:
        """Decrypt, verify and parse one tensor; a bad file is deleted, then ShardCorrupt."""
        manifest = self.manifest(model) or {}
        entry = manifest.get("tensors", {}).get(name)
        path = self.tensor_path(model, name)
        try:
            if entry is None:
                raise ShardCorrupt(f"shard tensor {name} of model {model[:12]} is not cached")
            plain = decrypt_file(self._master, model, name, path)
            if hashlib.sha256(plain).hexdigest() != entry["sha256"]:
                raise ShardCorrupt(f"shard tensor {name} at {path} does not match its sha256")
            try:
                array = npy_from_bytes(plain)
            except ValueError as exc:
                raise ShardCorrupt(
                    f"shard tensor {name} at {path} is not an array: {exc}"
                ) from None
        except ShardCorrupt:
            self.forget(model, name)
            raise
        return array

    def forget(self, model: str, name: str) -> None:
        with contextlib.suppress(OSError):
            self.tensor_path(model, name).unlink()
        manifest = self.manifest(model)
        if manifest is not None and name in manifest.get("tensors", {}):
            del manifest["tensors"][name]
            self._write_manifest(model, manifest)


class ShardWeightStore(WeightStore):
    """A WeightStore whose tensors come from the encrypted shard cache (no GGUF here).

    Only `config`, `path` and `get()` are used by `LlamaModel`; tensors are decrypted into
    memory once, when the stage loads.
    """

    def __init__(
        self, config: LlamaConfig, fetch: Callable[[str], np.ndarray], label: Path
    ) -> None:
        # The GGUF-backed constructor is skipped on purpose: there is no GGUF on this peer.
        self.path = label
        self.config = config
        self.cache_dir = None
        self.cache_hits = 0
        self.cache_misses = 0
        self._source = None
        self._fetch = fetch

    def get(self, name: str) -> np.ndarray:
        array = self._fetch(name)
        shape = expected_shape(self.config, name)
        if array.dtype != np.float32 or array.shape != shape:
            raise ShardCorrupt(
                f"shard tensor {name} has {array.dtype}{array.shape}, expected float32{shape}"
            )
        return array
