"""`RemoteReplExecutor`: the leader's `ReplExecutor` that runs code blocks on other peers.

Placement. A session is placed when it opens: the `PeerChooser` ranks live peers that
can run the language (SmartScheduler score: load, latency, cost, specialisation; this
node is one of the candidates, at zero network latency) and the session is opened on
the best one that accepts it. Its namespace lives there, so later blocks follow it
(sticky sessions: moving a namespace costs a replay). When no peer qualifies the session
runs on the local executor.

Failure. When the session's peer dies, stops answering (membership says it is not
alive, or the block overran `timeout + margin`), or refuses, the block is run again on
the next peer in the ranking (or locally): the session is rebuilt there by replaying
the leader's own record of the earlier blocks (with the sub-call answers they got), and
sub-calls the failed attempt had already made are answered again from that record, in
order, so the RLM machine's sub-call sequence numbers are not spent twice. Executions
may repeat; each repeat is reported in the block's notes, in `runs()` and in `stats`.

Sub-calls. Code on a peer calls `llm_query`; the peer forwards it to this leader
(`repl.sub`), which answers through the `SubCallHandler` the runner gave for the block.
Time spent answering does not count against the block's deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import secrets
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack
import trio

from kowalski_node.adapters.libp2p import envelope as env
from kowalski_node.adapters.libp2p import protocol_ids
from kowalski_node.adapters.libp2p.api import TransportPort
from kowalski_node.adapters.libp2p.errors import RemoteError, RequestRejected, TransportError
from kowalski_node.errors import SandboxError
from kowalski_node.placement import Requirement
from kowalski_node.remote import wire
from kowalski_node.remote.endpoint import ReplEndpoint
from kowalski_node.remote.history import open_with_history, record_batch
from kowalski_node.remote.placement import PeerChooser
from kowalski_node.remote.watched import watched_request
from kowalski_node.repl.base import (
    ExecRequest,
    ExecResult,
    ReplExecutor,
    SubCallHandler,
    SubCallResult,
)
from kowalski_node.repl.history import HistoryBlock, RecordedBatch, history_to_plain
from kowalski_node.repl.protocol import prompt_digest
from kowalski_node.rlm.languages import normalize_language
from kowalski_node.runtime.context_blob import pack_sliced

log = logging.getLogger("kowalski_node.remote.repl")

# Blocks whose effects a replay reproduces (they ran to their end, or raised).
_REPLAYABLE = frozenset({None, "exception"})


@dataclass(frozen=True)
class RemoteReplConfig:
    inline_limit_bytes: int = 1024 * 1024
    """Contexts/histories larger than this (msgpack) travel as a blob, not inline."""
    open_timeout_s: float = 30.0
    """Opening a session on a peer (blob transfer and history replay included)."""
    exec_margin_s: float = 5.0
    """A block's deadline is its timeout + this + an allowance for rebuilding its namespace."""
    max_attempts: int = 3
    """Peers tried for one block before giving up."""
    live_poll_s: float = 0.1
    keepalive_s: float = 15.0
    """While a block runs, the leader pings the stream so the peer's idle timer stays quiet."""
    close_timeout_s: float = 2.0
    default_language: str = "python"
    min_memory_bytes: int = 0
    spool_dir: Path | None = None
    """Where contexts are written before being sent as blobs (default: a temp dir)."""


@dataclass(frozen=True)
class BlockRun:
    """One attempt at one block: who ran it and how it ended ("which peer did what")."""

    session_id: str
    block: int
    peer: str
    ok: bool
    ms: float
    reason: str = ""
    replayed: int = 0


@dataclass
class _Session:
    session_id: str
    context: Any
    packed_context: bytes
    language: str
    lock: trio.Lock = field(default_factory=trio.Lock)
    peer: str | None = None
    remote_name: str = ""
    placements: int = 0
    history: list[HistoryBlock] = field(default_factory=list)
    history_ms: list[float] = field(default_factory=list)
    blocks: int = 0
    runs: list[BlockRun] = field(default_factory=list)
    spooled: dict[str, Path] = field(default_factory=dict)
    pending_notes: list[str] = field(default_factory=list)
    rebuilt: bool = False
    replayed_on_open: int = 0


class _PeerFailure(Exception):
    """The peer could not run (or finish) the job; the caller tries elsewhere."""

    def __init__(self, reason: str, *, penalise: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.penalise = penalise


class _AnswerBook:
    """Sub-call answers of one block, shared by all its attempts.

    The n-th sub-call of a retried block gets the answer the n-th call of an earlier
    attempt got (the same prompts were asked), so the RLM machine is asked, and numbers
    sub-calls, once per call however often the block runs. Calls to the runner's handler
    run in the block's own nursery: if the peer that asked dies, the stream serving its
    request is torn down, but the call finishes and its answer is kept for the retry.
    """

    def __init__(self, handler: SubCallHandler, nursery: trio.Nursery) -> None:
        self._handler = handler
        self._nursery = nursery
        self._entries: list[_Entry] = []
        self.asked_s = 0.0
        self.diverged = 0

    async def answer(
        self, index: int, prompts: list[str], model: str | None
    ) -> list[SubCallResult]:
        digests = tuple(prompt_digest(p, model) for p in prompts)
        if index < len(self._entries) and self._entries[index].digests == digests:
            entry = self._entries[index]
            if entry.results is None:
                await entry.done.wait()
            if entry.results is not None:
                return list(entry.results)
        elif index < len(self._entries):
            self.diverged += 1  # this attempt asked something else: a fresh call
        entry = _Entry(digests)
        if index < len(self._entries):
            self._entries[index] = entry
        else:
            self._entries.append(entry)
        self._nursery.start_soon(self._ask, entry, prompts, model)
        await entry.done.wait()
        if entry.results is None:
            return [SubCallResult(error="sub-call aborted")] * len(prompts)
        return list(entry.results)

    async def _ask(self, entry: _Entry, prompts: list[str], model: str | None) -> None:
        started = trio.current_time()
        try:
            entry.results = list(await self._handler(prompts, model))
        except Exception as exc:  # noqa: BLE001 - the handler broke: every slot of this batch fails
            entry.results = [SubCallResult(error=f"{type(exc).__name__}: {exc}")] * len(prompts)
        finally:
            self.asked_s += trio.current_time() - started
            entry.done.set()


@dataclass
class _Entry:
    digests: tuple[str, ...]
    results: list[SubCallResult] | None = None
    done: trio.Event = field(default_factory=trio.Event)


class RemoteReplExecutor:
    """A `ReplExecutor` whose sessions live on the best-placed peer (see module doc)."""

    def __init__(
        self,
        transport: TransportPort,
        choose_peer: PeerChooser,
        local_executor: ReplExecutor,
        config: RemoteReplConfig | None = None,
        *,
        on_usage: Callable[[str, str], None] | None = None,
        owns_local: bool = False,
    ) -> None:
        self.transport = transport
        self.chooser = choose_peer
        self.local = local_executor
        self.config = config or RemoteReplConfig()
        self.me = choose_peer.me
        self.languages: tuple[str, ...] = tuple(getattr(local_executor, "languages", ("python",)))
        self._on_usage = on_usage
        self._owns_local = owns_local
        self._endpoint = ReplEndpoint.of(transport)
        self._sessions: dict[str, _Session] = {}
        self._spool_root: Path | None = None
        self.stats: dict[str, int] = {
            "sessions_opened": 0,
            "blocks_remote": 0,
            "blocks_local": 0,
            "block_retries": 0,
            "sessions_moved": 0,
            "blocks_replayed": 0,
            "blobs_sent": 0,
            "peer_failures": 0,
        }

    # ------------------------------------------------------------------ ReplExecutor

    async def open_session(self, session_id: str, context: Any) -> None:
        """Remember the context and place the session (raises SandboxError if nobody can)."""
        if session_id in self._sessions:
            return
        try:
            # off the loop and in slices: a 50 MB context must not stall membership
            packed = await trio.to_thread.run_sync(pack_sliced, context)
        except (TypeError, ValueError, OverflowError) as exc:
            raise SandboxError(
                f"context cannot be sent to a peer (allowed: str, bytes, int, float, bool, "
                f"None, list, dict): {exc}"
            ) from None
        session = _Session(session_id, context, packed, self.config.default_language)
        self._sessions[session_id] = session
        async with session.lock:
            try:
                await self._place(session, set())
            except BaseException:
                self._sessions.pop(session_id, None)
                self._forget_spool(session)
                raise
        self.stats["sessions_opened"] += 1

    async def execute(self, request: ExecRequest, sub_calls: SubCallHandler) -> ExecResult:
        session = self._sessions.get(request.session_id)
        if session is None:
            raise SandboxError(f"no REPL session {request.session_id!r} (call open_session first)")
        async with session.lock, trio.open_nursery() as nursery:
            book = _AnswerBook(sub_calls, nursery)
            try:
                return await self._execute_locked(session, request, book)
            finally:
                nursery.cancel_scope.cancel()  # a sub-call no attempt waits for any more

    async def close_session(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return
        await self._release(session)
        self._forget_spool(session)

    async def aclose(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        with trio.CancelScope(shield=True):
            for session in sessions:
                with trio.move_on_after(self.config.close_timeout_s):
                    await self._release(session)
                self._forget_spool(session)
            if self._owns_local:
                await self.local.aclose()
        if self._spool_root is not None:
            shutil.rmtree(self._spool_root, ignore_errors=True)
            self._spool_root = None

    # ------------------------------------------------------------------ reporting

    def runs(self, session_id: str) -> list[BlockRun]:
        """Every block attempt of an open session, in order."""
        session = self._sessions.get(session_id)
        return list(session.runs) if session is not None else []

    def session_peer(self, session_id: str) -> str | None:
        session = self._sessions.get(session_id)
        return session.peer if session is not None else None

    def session_history(self, session_id: str) -> dict[str, Any]:
        """The leader's record of the session (plain `kowalski-repl-history/1`)."""
        session = self._sessions.get(session_id)
        if session is None:
            raise SandboxError(f"no REPL session {session_id!r}")
        return history_to_plain(session.history)

    # ------------------------------------------------------------------ placement

    async def _place(self, session: _Session, exclude: set[str]) -> str:
        requirement = Requirement(
            language=normalize_language(session.language),
            min_memory=self.config.min_memory_bytes,
            exclude=frozenset(exclude),
        )
        placement = self.chooser.rank(requirement)
        candidates = [s.peer for s in placement.ranked]
        if self.me not in candidates and self.me not in exclude:
            candidates.append(self.me)  # nobody (else) qualifies: run it here
        failures: list[str] = []
        for peer in candidates:
            try:
                await self._open_on(peer, session)
            except _PeerFailure as failure:
                self.stats["peer_failures"] += 1
                if failure.penalise:
                    self.chooser.record_failure(peer)
                exclude.add(peer)
                failures.append(f"{_short(peer)}: {failure.reason}")
                log.info(
                    "event=remote_open_failed session=%s peer=%s reason=%r",
                    session.session_id, peer, failure.reason,
                )  # fmt: skip
                continue
            if session.placements > 1:
                self.stats["sessions_moved"] += 1
            log.info(
                "event=remote_session_placed session=%s peer=%s local=%s replayed=%d why=%r",
                session.session_id, peer, peer == self.me, session.replayed_on_open,
                placement.explain(),
            )  # fmt: skip
            return peer
        detail = "; ".join(failures) if failures else placement.explain()
        raise SandboxError(f"no peer could hold the REPL session: {detail}")

    async def _open_on(self, peer: str, session: _Session) -> None:
        history = history_to_plain(session.history) if session.history else None
        session.placements += 1
        if peer == self.me:
            with contextlib.suppress(Exception):
                await self.local.close_session(session.session_id)  # a stale earlier copy
            try:
                replayed = await open_with_history(
                    self.local, session.session_id, session.context, history
                )
            except SandboxError as exc:
                raise _PeerFailure(f"the local sandbox failed: {exc}") from None
            session.remote_name = session.session_id
        else:
            name = f"{session.session_id}#{session.placements}"
            payload: dict[str, Any] = {"session": name}
            try:
                with trio.fail_after(self.config.open_timeout_s):
                    await self._attach(peer, session, payload, "context", session.packed_context,
                                       session.context)  # fmt: skip
                    if history is not None:
                        packed = msgpack.packb(history, use_bin_type=True)
                        await self._attach(peer, session, payload, "history", packed, history)
                    reply = await self.transport.request(
                        peer, protocol_ids.REPL, wire.REPL_OPEN, payload,
                        timeout=self.config.open_timeout_s,
                    )  # fmt: skip
            except trio.TooSlowError:
                raise _PeerFailure(
                    f"did not open the session within {self.config.open_timeout_s:g} s"
                ) from None
            except RemoteError as exc:
                raise _PeerFailure(f"refused: {exc.code}: {exc.remote_message}") from None
            except (TransportError, OSError) as exc:
                raise _PeerFailure(str(exc)) from None
            replayed = int(reply.get("replayed_blocks", 0)) if isinstance(reply, dict) else 0
            session.remote_name = name
        session.peer = peer
        session.replayed_on_open = replayed
        if replayed:
            self.stats["blocks_replayed"] += replayed
            session.rebuilt = True

    async def _attach(
        self, peer: str, session: _Session, payload: dict[str, Any], what: str,
        packed: bytes, value: Any,
    ) -> None:  # fmt: skip
        """Inline small values; stream big ones as a blob first and send its id."""
        if len(packed) <= self.config.inline_limit_bytes:
            payload[what] = value
            return
        blob_id = await trio.to_thread.run_sync(lambda: hashlib.sha256(packed).hexdigest())
        path = session.spooled.get(blob_id)
        if path is None:
            path = self._spool_dir() / blob_id
            await trio.to_thread.run_sync(path.write_bytes, packed)
            session.spooled[blob_id] = path
        await self.transport.send_blob(
            peer, path, blob_id=blob_id, timeout=self.config.open_timeout_s
        )
        self.stats["blobs_sent"] += 1
        payload[f"{what}_blob"] = blob_id

    def _spool_dir(self) -> Path:
        if self._spool_root is None:
            base = self.config.spool_dir
            if base is not None:
                base.mkdir(parents=True, exist_ok=True)
            self._spool_root = Path(tempfile.mkdtemp(prefix="kowalski-remote-", dir=base))
        return self._spool_root

    def _forget_spool(self, session: _Session) -> None:
        for path in session.spooled.values():
            with contextlib.suppress(OSError):
                path.unlink()
        session.spooled.clear()

    async def _release(self, session: _Session) -> None:
        """Close the session where it lives (best effort: a dead peer reaps it itself)."""
        peer, session.peer = session.peer, None
        if peer is None:
            return
        if peer == self.me:
            with contextlib.suppress(Exception):
                await self.local.close_session(session.remote_name)
            return
        if not self.chooser.is_live(peer):
            return
        with contextlib.suppress(TransportError):
            await self.transport.request(
                peer, protocol_ids.REPL, wire.REPL_CLOSE, {"session": session.remote_name},
                timeout=self.config.close_timeout_s,
            )  # fmt: skip

    # ------------------------------------------------------------------ execution

    async def _execute_locked(
        self, session: _Session, request: ExecRequest, book: _AnswerBook
    ) -> ExecResult:
        block = session.blocks
        session.blocks += 1
        notes = session.pending_notes
        session.pending_notes = []
        exclude: set[str] = set()
        failures: list[str] = []
        for _attempt in range(self.config.max_attempts):
            if session.peer is not None and not self.chooser.is_live(session.peer):
                notes.append(f"peer {_short(session.peer)} is no longer alive")
                exclude.add(session.peer)
                session.peer = None
            if session.peer is None:
                try:
                    await self._place(session, exclude)
                except SandboxError as exc:
                    failures.append(str(exc))
                    break
                note = f"session moved to {_label(session.peer, self.me)}"
                if session.replayed_on_open:
                    note += (
                        f"; namespace rebuilt by replaying {session.replayed_on_open} earlier "
                        "block(s) (their executions repeated)"
                    )
                notes.append(note)
            peer = session.peer
            assert peer is not None
            started = trio.current_time()
            replayed, session.replayed_on_open = session.replayed_on_open, 0
            try:
                result, batches, overhead_ms = await self._run_block(peer, session, request, book)
            except _PeerFailure as failure:
                ms = (trio.current_time() - started) * 1000.0
                session.runs.append(
                    BlockRun(session.session_id, block, peer, False, ms, failure.reason, replayed)
                )
                self.stats["peer_failures"] += 1
                self.stats["block_retries"] += 1
                if failure.penalise:
                    self.chooser.record_failure(peer)
                    exclude.add(peer)
                failures.append(f"{_short(peer)}: {failure.reason}")
                notes.append(
                    f"block failed on {_label(peer, self.me)} ({failure.reason}); running it again "
                    "elsewhere (its execution repeats)"
                )
                log.info(
                    "event=remote_block_failed session=%s block=%d peer=%s reason=%r",
                    session.session_id, block, peer, failure.reason,
                )  # fmt: skip
                session.peer = None
                continue
            ms = (trio.current_time() - started) * 1000.0
            session.runs.append(BlockRun(session.session_id, block, peer, True, ms, "", replayed))
            self.chooser.record_success(peer, overhead_ms)
            self.stats["blocks_local" if peer == self.me else "blocks_remote"] += 1
            if self._on_usage is not None:
                self._on_usage(session.session_id, peer)
            if result.error_kind in _REPLAYABLE:
                language = normalize_language(request.language)
                session.history.append(
                    HistoryBlock(request.code, language, float(request.timeout_s), tuple(batches))
                )
                session.history_ms.append(result.exec_ms)
            if session.rebuilt:
                result = replace(result, namespace_rebuilt=True)
                session.rebuilt = False
            return _with_notes(result, notes)
        reason = "; ".join(failures) or "no attempt left"
        return _with_notes(
            ExecResult(
                error=f"the block could not be run on any peer ({reason})", error_kind="sandbox"
            ),
            notes,
        )

    def _deadline_s(self, session: _Session, request: ExecRequest) -> float:
        """timeout + margin + room for a peer-side namespace rebuild (2x what blocks took)."""
        rebuild = 2.0 * sum(session.history_ms) / 1000.0
        return float(request.timeout_s) + self.config.exec_margin_s + rebuild

    async def _run_block(
        self,
        peer: str,
        session: _Session,
        request: ExecRequest,
        book: _AnswerBook,
    ) -> tuple[ExecResult, list[RecordedBatch], float]:
        """Run one attempt; returns (result, sub-call batches it got, overhead ms)."""
        batches: list[RecordedBatch] = []
        sub_time = [0.0]

        async def answer(prompts: list[str], model: str | None) -> list[SubCallResult]:
            started = trio.current_time()
            try:
                results = await book.answer(len(batches), list(prompts), model)
            finally:
                sub_time[0] += trio.current_time() - started
            batches.append(record_batch(prompts, model, results))
            return results

        if peer == self.me:
            local_request = replace(request, session_id=session.remote_name)
            try:
                result = await self.local.execute(local_request, answer)
            except SandboxError as exc:
                raise _PeerFailure(f"the local sandbox failed: {exc}") from None
            return result, batches, 0.0
        return await self._run_remote(peer, session, request, answer, batches, sub_time)

    async def _run_remote(
        self,
        peer: str,
        session: _Session,
        request: ExecRequest,
        answer: SubCallHandler,
        batches: list[RecordedBatch],
        sub_time: list[float],
    ) -> tuple[ExecResult, list[RecordedBatch], float]:
        exec_id = secrets.token_hex(8)
        budget = self._deadline_s(session, request)
        scope = trio.CancelScope(deadline=trio.current_time() + budget)
        answered: dict[int, dict[str, Any]] = {}

        async def on_sub(ask: wire.SubCallAsk) -> dict[str, Any]:
            if ask.index in answered:  # a duplicate delivery: same answer, no new sequence numbers
                return answered[ask.index]
            if ask.index != len(answered):
                raise RequestRejected(
                    env.ERR_BAD_REQUEST,
                    f"sub-call {ask.index} of block {exec_id} arrived out of order",
                )
            remaining = scope.deadline - trio.current_time()
            scope.deadline = math.inf  # answering is the leader's time, not the block's
            try:
                results = await answer(list(ask.prompts), ask.model)
            finally:
                scope.deadline = trio.current_time() + max(remaining, 0.0)
            reply = {"results": wire.sub_results_to_wire(results)}
            answered[ask.index] = reply
            return reply

        payload = {
            "session": session.remote_name,
            "exec_id": exec_id,
            "code": request.code,
            "language": request.language,
            "timeout_s": float(request.timeout_s),
        }
        started = trio.current_time()
        self._endpoint.expect_sub_calls(exec_id, peer, on_sub)
        try:
            done = await watched_request(
                self.transport, self.chooser, peer, protocol_ids.REPL, wire.REPL_EXEC, payload,
                ping_type=wire.REPL_PING, scope=scope, live_poll_s=self.config.live_poll_s,
                keepalive_s=self.config.keepalive_s,
            )  # fmt: skip
        except BaseException:
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(0.5),
                contextlib.suppress(TransportError),
            ):
                await self.transport.notify(
                    peer, protocol_ids.REPL, wire.REPL_CANCEL, {"exec_id": exec_id}, timeout=0.5
                )
            raise
        finally:
            self._endpoint.done(exec_id)
        reply, error = done.reply, done.error
        if isinstance(error, RemoteError):
            raise _PeerFailure(
                f"refused the block: {error.code}: {error.remote_message}",
                penalise=error.code != wire.ERR_UNKNOWN_SESSION,
            )
        if error is not None:
            raise _PeerFailure(str(error))
        if reply is None:
            reason = (
                "the peer is no longer alive (membership)"
                if done.peer_gone
                else f"no result within {budget:.1f} s (paused or overloaded?)"
            )
            raise _PeerFailure(reason)
        try:
            result = wire.exec_result_from_wire(reply)
        except ValueError as exc:
            raise _PeerFailure(str(exc)) from None
        total_ms = (trio.current_time() - started) * 1000.0
        overhead = max(0.0, total_ms - result.exec_ms - sub_time[0] * 1000.0)
        return result, batches, overhead


def _short(peer: str) -> str:
    return peer[-8:] if len(peer) > 8 else peer


def _label(peer: str | None, me: str) -> str:
    if peer is None:
        return "nowhere"
    return "this node (local)" if peer == me else f"peer {_short(peer)}"


def _with_notes(result: ExecResult, notes: list[str]) -> ExecResult:
    if not notes:
        return result
    tail = "\n".join(f"[remote] {n}" for n in notes)
    return replace(
        result,
        notes=[*notes, *result.notes],
        stderr=f"{result.stderr.rstrip()}\n{tail}".lstrip("\n"),
    )
