"""Task contexts as verified blobs: stored once, copied to replicas, fetched by leaders.

A context above `ContextConfig.inline_max_bytes` never rides inside a coordination
message (an offer or a replicated record carries the whole task payload, and the RPC
frame limit is 4 MiB). Instead:

* **Submission** (`prepare`, `replicate`): the receiving node encodes the context into a
  content-addressed file in its blob directory (in a worker thread, see `context_blob`),
  and the task payload carries only `ContextRef(sha256, size)`. Before the submission is
  acknowledged, the file is streamed (`/kowalski/blob/1.0.0`: chunked, every chunk and the
  whole file sha256-checked) to up to `replicas` live peers, so the task survives the death
  of the node that received it.
* **Running** (`resolve`): the leader reads the file if it holds it; otherwise it asks the
  task's owner, then every other live peer, with `context.pull` on
  `/kowalski/context/1.0.0`. A holder answers by streaming the blob back and replies once
  the requester verified it; a peer without it answers `not_found` and the next one is
  tried. Rounds repeat with backoff until `fetch_deadline_s`, then the run fails with a
  message naming the context and the peers tried.

Blobs are files named by their sha256, so a retry or a second copy is free: the blob
layer answers "already held" and sends nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from kowalski_node.adapters.libp2p import protocol_ids
from kowalski_node.adapters.libp2p.api import Request, TransportPort
from kowalski_node.adapters.libp2p.blob import BlobOffer
from kowalski_node.adapters.libp2p.errors import RequestRejected
from kowalski_node.errors import ContextNotReplicated, TaskError
from kowalski_node.runtime.context_blob import (
    SlicedText,
    decode_base64,
    read_context_file,
    submission_fingerprint,
    write_context_file,
)
from kowalski_node.runtime.payload import ContextRef, TaskPayload
from kowalski_node.runtime.service import TaskSubmission

log = logging.getLogger("kowalski_node.runtime.contexts")

PULL = "context.pull"
BLOB_KIND = "task-context"  # blob.offer meta {"kind": ...} of a pushed or pulled context
_SIZE_WALK_ITEMS = 50_000


@dataclass(frozen=True)
class ContextConfig:
    inline_max_bytes: int = 256 * 1024  # contexts up to this stay inside the task payload
    replicas: int = 2  # peers that get a copy before a submission is acknowledged
    push_timeout_s: float = 30.0  # connect / per-answer bound of one blob transfer
    fetch_deadline_s: float = 90.0  # a leader gives up finding the context after this
    min_rate_bytes_s: float = 2e6  # a pull may take 30 s + size / this
    # A push still running after hedge_after_s + size / hedge_rate_bytes_s gets a second
    # candidate started beside it. Loopback copies of 4 MiB took 40-900 ms here (a paused
    # peer held one for 15 s); on a home LAN 20 MB/s is a slow link.
    hedge_after_s: float = 2.0
    hedge_rate_bytes_s: float = 20e6


Prepared = tuple[TaskSubmission, TaskPayload, str | None]


def approx_size(value: Any, limit: int) -> int:
    """A cheap size estimate (bytes of text/binary, 9 per scalar) that stops once it
    passes `limit`, so deciding whether a context is small costs little on the loop."""
    total = 0
    stack = [value]
    visited = 0
    while stack and total <= limit and visited < _SIZE_WALK_ITEMS:
        item = stack.pop()
        visited += 1
        if isinstance(item, str | bytes | bytearray | SlicedText):
            total += len(item)
        elif isinstance(item, dict):
            total += 2
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            total += 1
            stack.extend(item)
        else:
            total += 9
    return total if not stack else max(total, limit + 1)


def rank_peers(key: str, peers: Sequence[str]) -> list[str]:
    """Rendezvous order of `peers` for `key`: the same on every node, spread across keys."""
    return sorted(peers, key=lambda p: hashlib.sha256(f"{key}\x00{p}".encode()).digest())


class ContextStore:
    """One node's context blobs: local files, pushes at submission, pulls when leading."""

    def __init__(
        self,
        me: str,
        transport: TransportPort,
        directory: Path,
        live_peers: Callable[[], list[str]],
        config: ContextConfig | None = None,
    ) -> None:
        self.me = me
        self.transport = transport
        self.directory = Path(directory)
        self.live_peers = live_peers
        self.config = config or ContextConfig()
        self.counters: dict[str, int] = {
            "contexts_stored": 0,
            "contexts_pushed": 0,
            "context_push_failures": 0,
            "contexts_fetched": 0,
            "context_fetch_failures": 0,
            "contexts_served": 0,
            "context_bytes_pushed": 0,
            "context_bytes_fetched": 0,
        }

    def install(self) -> None:
        self.transport.register_handler(protocol_ids.CONTEXT, self._on_request, types={PULL})
        self.transport.on_blob(self._on_blob)

    async def _on_blob(self, peer: str, offer: BlobOffer, path: Path) -> None:
        """A verified context arrived in the transport's blob dir: link it into ours.

        The blob dir is shared with the remote REPL service, which deletes a blob when the
        REPL session that used it closes; a task context (same bytes, same name) must
        outlive that, so it gets its own name in `directory`."""
        meta = offer.meta
        if isinstance(meta, dict) and meta.get("kind") == BLOB_KIND:
            await trio.to_thread.run_sync(self._adopt, offer.blob_id, path)

    def _adopt(self, blob_id: str, path: Path) -> None:
        target = self.directory / blob_id
        if target.exists() or not path.exists():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".adopt-{blob_id}-{os.getpid()}.tmp"
        try:
            os.link(path, tmp)
        except OSError:  # another filesystem: copy
            shutil.copyfile(path, tmp)
        os.replace(tmp, target)

    # ------------------------------------------------------------ local files

    def path(self, sha256: str) -> Path | None:
        """The verified local file of a context, if this node holds it."""
        own = self.directory / sha256
        if own.is_file():
            return own
        return self.transport.blob_path(sha256)

    # ------------------------------------------------------------ submission

    async def prepare(self, subs: Sequence[TaskSubmission]) -> list[Prepared]:
        """Task payloads for `subs`; large contexts are written to files (off the loop)
        and replaced by a `ContextRef`. Nothing is sent yet (see `replicate`)."""
        out: list[Prepared] = []
        for sub in subs:
            if self._small(sub):
                out.append((sub, TaskPayload.from_submission(sub), sub.dedup_key))
            else:
                payload = await trio.to_thread.run_sync(self._prepare_large, sub)
                if payload.context_ref is not None:
                    self.counters["contexts_stored"] += 1
                out.append((sub, payload, sub.dedup_key))
        return out

    def needs_blob(self, sub: TaskSubmission) -> bool:
        """Whether `sub`'s context is too large to ride inline (it becomes a `ContextRef`)."""
        return not self._small(sub)

    def transfer_timeout(self, ref: ContextRef) -> float:
        """How long one copy of `ref` may take (connect bound + size at the minimum rate)."""
        return self._pull_timeout(ref)

    async def ensure(self, ref: ContextRef, holder: str) -> Path:
        """The verified local file of `ref`, fetched (from `holder` first) if missing: a
        node that takes a forwarded submission gets its context this way, never inline."""
        return self.path(ref.sha256) or await self.fetch(ref, [holder])

    def _small(self, sub: TaskSubmission) -> bool:
        limit = self.config.inline_max_bytes
        if sub.context is None or isinstance(sub.context, bool | int | float):
            return True
        size = approx_size(sub.context, limit)
        if sub.context_encoding == "base64":
            size = size * 3 // 4
        return size <= limit

    def _prepare_large(self, sub: TaskSubmission) -> TaskPayload:
        """Blocking (worker thread): fingerprint, decode, encode to a file, in slices."""
        fingerprint = submission_fingerprint(
            sub.prompt, sub.context, sub.context_encoding, sub.model, sub.sub_model, sub.rlm
        )
        if sub.context_encoding == "base64" and isinstance(sub.context, str | SlicedText):
            value: Any = decode_base64(sub.context)
        else:
            value = sub.context
        sha, size, path = write_context_file(value, self.directory)
        ref: ContextRef | None = ContextRef(sha, size)
        if size <= self.config.inline_max_bytes:
            ref = None  # many small pieces: it fits inline after all
            path.unlink(missing_ok=True)
            if isinstance(value, SlicedText):
                value = value.join()
        return TaskPayload(
            prompt=sub.prompt,
            context=value if ref is None else None,
            model=sub.model,
            sub_model=sub.sub_model,
            rlm=sub.rlm,
            priority=sub.priority,
            fingerprint=fingerprint,
            alias=sub.task_id,
            context_ref=ref,
        )

    async def replicate(self, prepared: Sequence[Prepared]) -> None:
        """Copy every referenced context to up to `replicas` live peers before the
        submission is acknowledged. Raises `ContextNotReplicated` when other peers are
        live but none took a copy (the task would not survive this node's death)."""
        seen: set[str] = set()
        for _sub, payload, _key in prepared:
            ref = payload.context_ref
            if ref is not None and ref.sha256 not in seen:
                seen.add(ref.sha256)
                await self.push(ref)

    async def push(self, ref: ContextRef) -> list[str]:
        """Copy `ref` to `replicas` live peers (in rendezvous order); the peers that took it.

        Hedged: a copy that has not finished after `hedge_delay` (a paused or overloaded
        peer accepts the stream, then stalls until the blob layer's idle timeouts, tens of
        seconds) does not hold up the acknowledgement: the next candidate is started
        beside it, and the first `replicas` copies to finish win; the others are
        cancelled (the receiver keeps its partial file and can resume later)."""
        path = self.path(ref.sha256)
        if path is None:
            raise ContextNotReplicated(f"context {ref.sha256[:12]} is not stored on {self.me}")
        others = rank_peers(ref.sha256, [p for p in self.live_peers() if p != self.me])
        want = min(self.config.replicas, len(others))
        if want == 0:
            return []
        candidates = iter(others)
        done: list[str] = []
        errors: list[str] = []
        running = 0
        started = trio.current_time()

        async with trio.open_nursery() as nursery:

            def start_next() -> bool:
                nonlocal running
                peer = next(candidates, None)
                if peer is None:
                    return False
                running += 1
                nursery.start_soon(copy_to, peer)
                return True

            async def copy_to(peer: str) -> None:
                nonlocal running
                try:
                    receipt = await self.transport.send_blob(
                        peer,
                        path,
                        blob_id=ref.sha256,
                        meta={"kind": BLOB_KIND},
                        timeout=self.config.push_timeout_s,
                    )
                except Exception as exc:  # noqa: BLE001 - the peer died or refused: try the next one
                    self.counters["context_push_failures"] += 1
                    errors.append(f"{peer[-8:]}: {exc}")
                    running -= 1
                    if len(done) + running < want and not start_next() and running == 0:
                        nursery.cancel_scope.cancel()  # nobody left to try
                    return
                running -= 1
                done.append(peer)
                self.counters["contexts_pushed"] += 1
                self.counters["context_bytes_pushed"] += receipt.sent_bytes
                if len(done) >= want:
                    nursery.cancel_scope.cancel()  # enough copies: stop stragglers, hedger

            async def hedge() -> None:
                for _ in range(want):  # at most `want` extra copies at once
                    await trio.sleep(self.hedge_delay(ref))
                    if len(done) >= want or not start_next():
                        return  # enough, or every candidate is being tried already

            for _ in range(want):
                start_next()
            nursery.start_soon(hedge)
        log.info(
            "event=context_replicated context=%s bytes=%d peers=%s took_ms=%.0f",
            ref.sha256[:12],
            ref.size,
            ",".join(p[-8:] for p in done) or "-",
            (trio.current_time() - started) * 1000,
        )
        if not done:
            raise ContextNotReplicated(
                f"the context ({ref.size} bytes) could not be copied to any of {len(others)} "
                f"live peers ({'; '.join(errors)[:300]}); nothing was accepted, retry"
            )
        if len(done) < want:
            log.warning(
                "event=context_under_replicated context=%s copies=%d wanted=%d errors=%r",
                ref.sha256[:12],
                len(done),
                want,
                errors[:3],
            )
        return done

    def hedge_delay(self, ref: ContextRef) -> float:
        """How long a copy may run before the next candidate is started beside it."""
        return self.config.hedge_after_s + ref.size / self.config.hedge_rate_bytes_s

    # ------------------------------------------------------------ running

    async def resolve(self, payload: TaskPayload, owner: str = "") -> Any:
        """The context value of a payload: inline, from the local file, or fetched."""
        ref = payload.context_ref
        if ref is None:
            return payload.context
        path = self.path(ref.sha256) or await self.fetch(ref, [owner] if owner else [])
        return await trio.to_thread.run_sync(read_context_file, path)

    def _pull_timeout(self, ref: ContextRef) -> float:
        return self.config.push_timeout_s + ref.size / self.config.min_rate_bytes_s

    async def fetch(self, ref: ContextRef, prefer: Sequence[str] = ()) -> Path:
        """Get the verified file from some holder: `prefer` first, then every live peer."""
        deadline = trio.current_time() + self.config.fetch_deadline_s
        delay = 0.25
        tried: dict[str, str] = {}
        rounds = 0
        while True:
            rounds += 1
            ranked = rank_peers(ref.sha256, self.live_peers())
            candidates = [p for p in dict.fromkeys([*prefer, *ranked]) if p and p != self.me]
            for peer in candidates:
                started = trio.current_time()
                try:
                    await self.transport.request(
                        peer,
                        protocol_ids.CONTEXT,
                        PULL,
                        ref.to_wire(),
                        timeout=self._pull_timeout(ref),
                    )
                except Exception as exc:  # noqa: BLE001 - not held there, peer gone, timeout: next one
                    tried[peer] = str(exc)[:120] or type(exc).__name__
                    continue
                path = self.path(ref.sha256)
                if path is not None:
                    self.counters["contexts_fetched"] += 1
                    self.counters["context_bytes_fetched"] += ref.size
                    log.info(
                        "event=context_fetched context=%s bytes=%d from=%s took_ms=%.0f round=%d",
                        ref.sha256[:12],
                        ref.size,
                        peer[-8:],
                        (trio.current_time() - started) * 1000,
                        rounds,
                    )
                    return path
                tried[peer] = "answered, but the blob did not arrive"
            if trio.current_time() + delay > deadline:
                self.counters["context_fetch_failures"] += 1
                detail = "; ".join(f"{p[-8:]}: {why}" for p, why in tried.items()) or "no peers"
                raise TaskError(
                    f"the task's context {ref.sha256[:12]} ({ref.size} bytes) is not held by "
                    f"any reachable peer after {rounds} rounds ({detail[:400]})"
                )
            await trio.sleep(delay)
            delay = min(delay * 2, 4.0)

    async def _on_request(self, req: Request) -> Any:
        try:
            ref = ContextRef.from_wire(req.payload)
        except ValueError as exc:
            raise RequestRejected("bad_request", str(exc)) from None
        path = self.path(ref.sha256)
        if path is None:
            raise RequestRejected("not_found", f"{self.me} does not hold context {ref.sha256}")
        receipt = await self.transport.send_blob(
            req.peer_id,
            path,
            blob_id=ref.sha256,
            meta={"kind": BLOB_KIND},
            timeout=self.config.push_timeout_s,
        )
        self.counters["contexts_served"] += 1
        return {"h": ref.sha256, "n": receipt.size}

    def stats(self) -> dict[str, int]:
        return dict(self.counters)
