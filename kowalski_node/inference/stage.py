"""The stage side of the SHARD protocol: load layer ranges, run activations, serve shards.

One `StageService` per node, registered on `/kowalski/shard/1.0.0`. It holds the loaded
layer ranges (`LlamaModel` parts), one KV cache per session, and the pure
`StageSessions` core that drops stale and duplicated activations. An activation runs in
a worker thread (never on the trio loop, which answers membership probes) and is then
forwarded to the next stage; the reply (a token id, or a logits row when the leader
samples) travels back along the same chain of requests.

A stage without the model's GGUF fetches its tensors from the `source` peer named in
`shard.load` (`shard.manifest`, then `shard.push` over the blob layer) into the
encrypted `ShardCache`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import trio

from kowalski_node.adapters.libp2p import protocol_ids
from kowalski_node.adapters.libp2p.api import TransportPort
from kowalski_node.adapters.libp2p.errors import RemoteError, RequestRejected, TransportError
from kowalski_node.adapters.libp2p.rpc import Request
from kowalski_node.inference import wire
from kowalski_node.inference.core import StageSessions, VerdictKind
from kowalski_node.inference.errors import BadActivation, InferenceError, ShardCorrupt
from kowalski_node.inference.modelinfo import range_bytes, range_tensor_names
from kowalski_node.inference.shards import ShardCache, ShardWeightStore
from kowalski_node.llm.builtin.config import LlamaConfig
from kowalski_node.llm.builtin.model import LayerRangeCache, LlamaModel
from kowalski_node.llm.builtin.weights import WeightStore
from kowalski_node.llm.models import file_sha256, models_home, resolve_model_path

log = logging.getLogger("kowalski_node.inference.stage")

CODE_STAGE_LOST = "stage_lost"
CODE_STALE = "stale"
CODE_BAD_SEQUENCE = "bad_sequence"
CODE_NOT_LOADED = "not_loaded"
CODE_NO_MODEL = "no_model"
_LOST_PEER = re.compile(r"peer=(\S+)")


def lost_peer(message: str) -> str | None:
    """The peer a `stage_lost` error names."""
    match = _LOST_PEER.search(message)
    return match.group(1) if match else None


@dataclass
class StageConfig:
    models_dir: Path | None = None
    memory_cap_bytes: int | None = None
    session_idle_s: float = 300.0
    max_sessions: int = 16
    stage_timeout_s: float = 60.0
    load_timeout_s: float = 600.0


@dataclass
class LoadedPart:
    model: LlamaModel
    bytes: int
    last_used: float = 0.0


@dataclass
class StageStats:
    forwards: int = 0
    rows: int = 0
    duplicates: int = 0
    stale: int = 0
    evicted_sessions: int = 0
    loads: int = 0
    fetched_tensors: int = 0
    corrupt_refetches: int = 0
    compute_s: float = 0.0
    extra: dict[str, int] = field(default_factory=dict)


class StageService:
    """Serves SHARD requests for this node (see module docstring)."""

    def __init__(
        self,
        transport: TransportPort,
        me: str,
        config: StageConfig,
        shard_cache: ShardCache | None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.transport = transport
        self.me = me
        self.config = config
        self.shards = shard_cache
        self.clock = clock
        self.core = StageSessions(idle_s=config.session_idle_s, max_sessions=config.max_sessions)
        self.parts: OrderedDict[tuple[str, int, int], LoadedPart] = OrderedDict()
        self.caches: dict[str, LayerRangeCache] = {}
        self.local_models: dict[str, Path] = {}  # GGUF sha256 -> path on this node
        self.stats = StageStats()
        self._compute = trio.CapacityLimiter(1)
        self._load_locks: dict[tuple[str, int, int], trio.Lock] = {}
        self._tensor_sha: dict[tuple[str, float, int], str] = {}

    # ----------------------------------------------------------------------- plumbing

    def register(self) -> None:
        self.transport.register_handler(protocol_ids.SHARD, self.handle, types=wire.ALL_TYPES)

    async def call(
        self, peer: str, type_: str, payload: Any, *, timeout: float | None = None
    ) -> Any:
        """A SHARD request to `peer`, answered in-process when the peer is this node."""
        if peer == self.me:
            try:
                return await self.handle(
                    Request(self.me, protocol_ids.SHARD, type_, payload, 0, one_way=False)
                )
            except RequestRejected as exc:
                raise RemoteError(exc.code, exc.message, self.me, protocol_ids.SHARD) from None
        return await self.transport.request(
            peer, protocol_ids.SHARD, type_, payload, timeout=timeout
        )

    async def handle(self, req: Request) -> Any:
        try:
            if req.type == wire.T_FORWARD:
                return await self._forward(req)
            if req.type == wire.T_OFFER:
                return await self._offer(req)
            if req.type == wire.T_LOAD:
                return await self._load(req)
            if req.type == wire.T_END:
                return self._end(req)
            if req.type == wire.T_MANIFEST:
                return await self._manifest(req)
            if req.type == wire.T_PUSH:
                return await self._push(req)
        except BadActivation as exc:
            raise RequestRejected("bad_request", str(exc)) from None
        except InferenceError as exc:
            raise RequestRejected(CODE_NO_MODEL, str(exc)) from None
        raise RequestRejected("unknown_type", f"no SHARD message type {req.type!r}")

    async def run(self) -> None:
        """Evict idle sessions (their KV caches) every few seconds."""
        period = max(0.5, min(10.0, self.config.session_idle_s / 4))
        while True:
            await trio.sleep(period)
            for session in self.core.expire(self.clock()):
                self._drop_session(session)

    def _drop_session(self, session: str) -> None:
        if self.caches.pop(session, None) is not None:
            self.stats.evicted_sessions += 1

    # ----------------------------------------------------------------------- models

    def _local_gguf(self, model: str, name: str | None, hint: str | None = None) -> Path | None:
        """This node's GGUF for a model sha256, when it has one (by registry name, or at the
        path the leader uses when that lies under this node's models dir; the sha256 decides)."""
        known = self.local_models.get(model)
        if known is not None and known.is_file():
            return known
        root = models_home(self.config.models_dir).resolve()
        if hint and not Path(hint).resolve().is_relative_to(root):
            hint = None  # only files under this node's own models dir
        for candidate in (name, hint):
            if not candidate:
                continue
            try:
                path = resolve_model_path(candidate, self.config.models_dir)
                if file_sha256(path) == model:
                    self.local_models[model] = path
                    return path
            except Exception:  # noqa: BLE001, S112 - an unreadable candidate model file is skipped; the next one is tried
                continue
        return None

    def free_bytes(self) -> int:
        """Memory this node gives to layers: free RAM (plus what parts hold), within the cap."""
        held = sum(p.bytes for p in self.parts.values())
        free = int(psutil.virtual_memory().available) + held
        cap = self.config.memory_cap_bytes
        return free if cap is None else min(free, cap)

    async def _offer(self, req: Request) -> dict[str, Any]:
        body = wire._map(req.payload)
        model = wire.model_id(body)
        name = body.get("name") if isinstance(body.get("name"), str) else None
        hint = body.get("path") if isinstance(body.get("path"), str) else None
        has = await trio.to_thread.run_sync(self._local_gguf, model, name, hint)
        return {
            "v": wire.WIRE_VERSION,
            "free_bytes": self.free_bytes(),
            "cap_bytes": self.config.memory_cap_bytes,
            "has_model": has is not None,
            "loaded": [[k[1], k[2]] for k in self.parts if k[0] == model],
        }

    async def _load(self, req: Request) -> dict[str, Any]:
        body = wire._map(req.payload)
        model = wire.model_id(body)
        start = wire._int(body, "start")
        end = wire._int(body, "end", start + 1)
        name = body.get("name") if isinstance(body.get("name"), str) else None
        source = body.get("source") if isinstance(body.get("source"), str) else None
        key = (model, start, end)
        lock = self._load_locks.setdefault(key, trio.Lock())
        started = time.perf_counter()
        fetched = False
        async with lock:
            part = self.parts.get(key)
            if part is None:
                path = await trio.to_thread.run_sync(self._local_gguf, model, name)
                if path is not None:
                    llama = await trio.to_thread.run_sync(self._load_local, path, start, end)
                else:
                    llama, fetched = await self._load_shard(model, start, end, source, name)
                size = range_bytes(llama.config, start, end)
                self._make_room(size, keep=key)
                part = self.parts[key] = LoadedPart(llama, size)
                self.stats.loads += 1
            part.last_used = self.clock()
            self.parts.move_to_end(key)
        took = time.perf_counter() - started
        log.info(
            "event=stage_loaded model=%s layers=%d-%d fetched=%s took_ms=%.0f",
            model[:12],
            start,
            end,
            fetched,
            took * 1000,
        )
        return {"v": wire.WIRE_VERSION, "loaded": True, "fetched": fetched, "load_s": took}

    def _load_local(self, path: Path, start: int, end: int) -> LlamaModel:
        return LlamaModel.load(path, layers=(start, end), models_dir=self.config.models_dir)

    def _make_room(self, size: int, keep: tuple[str, int, int]) -> None:
        """Unload least recently used parts until `size` more bytes fit in the cap."""
        cap = self.config.memory_cap_bytes
        if cap is None:
            return
        while self.parts and sum(p.bytes for p in self.parts.values()) + size > cap:
            oldest = next(iter(self.parts))
            if oldest == keep:
                break
            del self.parts[oldest]
            log.info("event=stage_unloaded model=%s layers=%d-%d", oldest[0][:12], *oldest[1:])

    async def _load_shard(
        self, model: str, start: int, end: int, source: str | None, name: str | None
    ) -> tuple[LlamaModel, bool]:
        """Load [start, end) from the encrypted shard cache, fetching what is missing."""
        if self.shards is None:
            raise InferenceError("this node has no shard cache (no data dir) and not the model")
        fetched = False
        for attempt in range(3):
            config = self.shards.config(model)
            names = range_tensor_names(config, start, end) if config is not None else []
            if config is None or not self.shards.has(model, names):
                if source is None or source == self.me:
                    raise InferenceError(
                        f"model {model[:12]} is not on this node and no source peer was named"
                    )
                await self._fetch(model, start, end, source, name)
                fetched = True
                continue
            try:
                store = ShardWeightStore(
                    config,
                    lambda n: self.shards.load(model, n) if self.shards else np.zeros(0),
                    Path(f"shard:{model}"),
                )
                llama = await trio.to_thread.run_sync(LlamaModel, store, (start, end))
                return llama, fetched
            except ShardCorrupt as exc:
                self.stats.corrupt_refetches += 1
                log.warning(
                    "event=shard_corrupt attempt=%d reason=%r action=refetch", attempt, str(exc)
                )
        raise ShardCorrupt(
            f"layers {start}-{end} of model {model[:12]} stayed corrupt after refetching"
        )

    async def _fetch(self, model: str, start: int, end: int, source: str, name: str | None) -> None:
        """Fetch the missing tensors of [start, end) from `source` over the blob layer."""
        assert self.shards is not None
        manifest = await self.call(
            source,
            wire.T_MANIFEST,
            {"v": wire.WIRE_VERSION, "model": model, "name": name, "start": start, "end": end},
            timeout=self.config.load_timeout_s,
        )
        config = LlamaConfig.from_json(manifest["config"])
        self.shards.set_config(model, config)
        expected = {t["name"]: t for t in manifest["tensors"]}
        missing = [n for n in expected if not self.shards.has(model, [n])]
        if not missing:
            return
        reply = await self.call(
            source,
            wire.T_PUSH,
            {"v": wire.WIRE_VERSION, "model": model, "name": name, "names": missing},
            timeout=self.config.load_timeout_s,
        )
        for item in reply["blobs"]:
            name = item["name"]
            path = self.transport.blob_path(item["blob"])
            if path is None or name not in expected:
                raise ShardCorrupt(f"tensor {name} of model {model[:12]} did not arrive")
            try:
                await trio.to_thread.run_sync(
                    self.shards.store_file, model, name, path, expected[name]["sha256"]
                )
                self.stats.fetched_tensors += 1
            finally:
                with contextlib.suppress(OSError):
                    path.unlink()  # the plaintext copy: only the encrypted one stays

    # ----------------------------------------------------------------------- source side

    def _source_store(self, model: str, name: str | None) -> WeightStore:
        path = self._local_gguf(model, name)
        if path is None:
            raise InferenceError(f"this node does not hold model {model[:12]}")
        return WeightStore(path, models_dir=self.config.models_dir)

    def _tensor_file(self, store: WeightStore, name: str) -> tuple[Path, str, int]:
        store.get(name)  # builds the float32 cache entry when missing
        if store.cache_dir is None:
            raise InferenceError("the float32 weight cache is not writable; cannot serve shards")
        path = store.cache_dir / "tensors" / f"{name}.npy"
        st = path.stat()
        key = (str(path), st.st_mtime, st.st_size)
        sha = self._tensor_sha.get(key)
        if sha is None:
            digest = hashlib.sha256()
            with path.open("rb") as fh:
                while block := fh.read(1 << 20):
                    digest.update(block)
            sha = self._tensor_sha[key] = digest.hexdigest()
        return path, sha, st.st_size

    async def _manifest(self, req: Request) -> dict[str, Any]:
        body = wire._map(req.payload)
        model = wire.model_id(body)
        start = wire._int(body, "start")
        end = wire._int(body, "end", start + 1)

        name = body.get("name") if isinstance(body.get("name"), str) else None

        def build() -> dict[str, Any]:
            store = self._source_store(model, name)
            names = range_tensor_names(store.config, start, end)
            tensors = []
            for tensor in names:
                _path, sha, size = self._tensor_file(store, tensor)
                tensors.append({"name": tensor, "sha256": sha, "size": size})
            return {"v": wire.WIRE_VERSION, "config": store.config.to_json(), "tensors": tensors}

        return await trio.to_thread.run_sync(build)

    async def _push(self, req: Request) -> dict[str, Any]:
        body = wire._map(req.payload)
        model = wire.model_id(body)
        names = body.get("names")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise BadActivation("names must be a list of tensor names")
        label = body.get("name") if isinstance(body.get("name"), str) else None
        store = await trio.to_thread.run_sync(self._source_store, model, label)
        blobs = []
        for name in names:
            path, sha, size = await trio.to_thread.run_sync(self._tensor_file, store, name)
            receipt = await self.transport.send_blob(
                req.peer_id,
                path,
                meta={"shard": model, "tensor": name},
                blob_id=sha,
                timeout=self.config.load_timeout_s,
            )
            blobs.append({"name": name, "blob": receipt.blob_id, "sha256": sha, "size": size})
        return {"v": wire.WIRE_VERSION, "blobs": blobs}

    # ----------------------------------------------------------------------- activations

    def _end(self, req: Request) -> dict[str, Any]:
        body = wire._map(req.payload)
        session = wire._str(body, "session")
        epoch = body.get("epoch") if isinstance(body.get("epoch"), int) else None
        evicted = self.core.end(session, epoch)
        if evicted:
            self.caches.pop(session, None)
        return {"v": wire.WIRE_VERSION, "evicted": evicted}

    async def _forward(self, req: Request) -> Any:
        msg = wire.decode_forward(req.payload)
        stage = msg.stage
        if stage.peer != self.me:
            raise RequestRejected(
                CODE_BAD_SEQUENCE, f"hop {msg.hop} is {stage.peer}, not this node"
            )
        key = (msg.model, stage.start, stage.end)
        part = self.parts.get(key)
        if part is None:
            raise RequestRejected(
                CODE_NOT_LOADED,
                f"layers {stage.start}-{stage.end} of {msg.model[:12]} are not loaded",
            )
        now = self.clock()
        part.last_used = now
        verdict = self.core.admit(msg.session, msg.epoch, msg.step, msg.pos, msg.rows, now)
        for gone in verdict.evicted:
            self._drop_session(gone)
        if verdict.kind is VerdictKind.STALE:
            self.stats.stale += 1
            raise RequestRejected(CODE_STALE, verdict.reason)
        if verdict.kind is VerdictKind.DUPLICATE:
            self.stats.duplicates += 1
            return verdict.reply
        if verdict.kind is VerdictKind.REJECT:
            raise RequestRejected(CODE_BAD_SEQUENCE, verdict.reason)
        if verdict.reset or msg.session not in self.caches:
            self.caches[msg.session] = part.model.new_cache(
                stage.start, stage.end, capacity=max(256, msg.pos + msg.rows)
            )
        cache = self.caches[msg.session]
        try:
            if not cache.covers(stage.start, stage.end):
                raise RequestRejected(CODE_BAD_SEQUENCE, "route changed within an epoch")
            started = time.perf_counter()
            async with self._compute:
                out = await trio.to_thread.run_sync(self._run, part.model, msg, cache)
            compute_s = time.perf_counter() - started
            self.stats.compute_s += compute_s
            self.stats.forwards += 1
            self.stats.rows += msg.rows
            if msg.last:
                reply: Any = wire.encode_reply(
                    wire.ForwardReply(
                        msg.session,
                        msg.epoch,
                        msg.step,
                        token=None if msg.want == wire.WANT_LOGITS else int(np.argmax(out)),
                        logits=out if msg.want == wire.WANT_LOGITS else None,
                    )
                )
                reply["stage_ms"] = [round(compute_s * 1000, 3)]
            else:
                reply = await self._send_next(msg.next_hop(out))
                if isinstance(reply, dict):  # each stage prepends its own compute time
                    downstream = reply.get("stage_ms")
                    rest = downstream if isinstance(downstream, list) else []
                    reply = {**reply, "stage_ms": [round(compute_s * 1000, 3), *rest]}
        except BaseException:
            self.core.fail(msg.session, msg.epoch, msg.step)
            raise
        self.core.complete(
            msg.session, msg.epoch, msg.step, msg.pos + msg.rows, reply, self.clock()
        )
        return reply

    @staticmethod
    def _run(model: LlamaModel, msg: wire.ForwardMsg, cache: LayerRangeCache) -> np.ndarray:
        """The stage's layers over the rows, chunk by chunk as the leader split them.

        Returns the hidden rows for the next stage, or (last stage) the logits of the last row.
        """
        start, end = msg.stage.start, msg.stage.end
        pos = msg.pos
        row = 0
        outs: list[np.ndarray] = []
        for n in msg.splits:
            if msg.hop == 0:
                hidden = model.embed(msg.tokens[row : row + n])
            else:
                assert msg.hidden is not None
                hidden = msg.hidden[row : row + n]
            outs.append(model.run_layers(hidden, start, end, cache, pos))
            pos += n
            row += n
        if msg.last:
            logits: np.ndarray = model.head(outs[-1][-1:])[0]
            return logits
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    async def _send_next(self, nxt: wire.ForwardMsg) -> Any:
        peer = nxt.stage.peer
        try:
            return await self.call(
                peer, wire.T_FORWARD, wire.encode_forward(nxt), timeout=self.config.stage_timeout_s
            )
        except RemoteError as exc:
            if exc.code in (CODE_STAGE_LOST, "bad_request"):
                raise RequestRejected(exc.code, exc.remote_message) from None
            # the next stage cannot go on (restarted, range unloaded, model gone): for this
            # route it is lost, and the leader re-plans without it
            raise RequestRejected(
                CODE_STAGE_LOST, f"peer={peer} reason={exc.code}: {exc.remote_message[:200]}"
            ) from None
        except TransportError as exc:
            raise RequestRejected(
                CODE_STAGE_LOST, f"peer={peer} reason={type(exc).__name__}: {str(exc)[:200]}"
            ) from None
