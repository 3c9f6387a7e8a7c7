"""The peer side of remote REPL jobs (/kowalski/repl/1.0.0).

A leader opens a session here (`repl.open`, with its context inline or, when large,
as a blob it streamed first through the chunked, hash-verified blob protocol; with a
recorded history when the session is being rebuilt after another peer died), runs
blocks in it (`repl.exec`) and closes it (`repl.close`). Sub-calls the code makes go
back to that leader (`repl.sub`): the leader's RLM machine numbers and answers them,
so scripted replay and checkpoints stay deterministic wherever the code runs.

Sessions are keyed by (leader, session): a leader can only touch its own. Sessions a
leader stopped using (it died, or moved away) are closed after `session_idle_s`.
Bad requests get an error reply; nothing a peer sends can stop the service.

    service = register_repl_service(transport, executor)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from kowalski_node.adapters.libp2p import envelope as env
from kowalski_node.adapters.libp2p import protocol_ids
from kowalski_node.adapters.libp2p.api import Request, TransportPort
from kowalski_node.adapters.libp2p.errors import RequestRejected
from kowalski_node.errors import SandboxError
from kowalski_node.remote import wire
from kowalski_node.remote.endpoint import ReplEndpoint
from kowalski_node.remote.history import open_with_history
from kowalski_node.repl.base import ExecRequest, ExecResult, ReplExecutor, SubCallResult
from kowalski_node.runtime.context_blob import read_context_file

log = logging.getLogger("kowalski_node.remote.repl_service")

ERR_SANDBOX = "sandbox"


@dataclass(frozen=True)
class ReplServiceConfig:
    max_sessions: int = 64
    session_idle_s: float = 900.0
    sub_call_timeout_s: float = 900.0  # the leader's answer to one llm_query batch
    max_blob_bytes: int = 2 * 1024**3  # largest context/history blob this peer will load


@dataclass
class _PeerSession:
    leader: str
    name: str
    local_id: str
    last_used: float
    blobs: list[str] = field(default_factory=list)
    running: int = 0


class ReplService:
    """Runs REPL jobs for leaders on a local `ReplExecutor`."""

    def __init__(
        self,
        transport: TransportPort,
        executor: ReplExecutor,
        config: ReplServiceConfig | None = None,
        *,
        on_session_closed: Callable[[str], None] | None = None,
    ) -> None:
        self.transport = transport
        self.executor = executor
        self.config = config or ReplServiceConfig()
        self._on_closed = on_session_closed
        self._sessions: dict[tuple[str, str], _PeerSession] = {}
        self._running: dict[str, tuple[str, trio.CancelScope]] = {}
        self.stats: dict[str, int] = {
            "sessions_opened": 0,
            "sessions_restored": 0,
            "blocks_run": 0,
            "sub_calls_forwarded": 0,
            "bad_requests": 0,
            "sessions_reaped": 0,
        }

    # -------------------------------------------------------------- dispatch

    async def handle(self, request: Request) -> Any:
        try:
            if request.type == wire.REPL_OPEN:
                return await self._open(request)
            if request.type == wire.REPL_EXEC:
                return await self._exec(request)
            if request.type == wire.REPL_CLOSE:
                return await self._close(request)
            if request.type == wire.REPL_CANCEL:
                return self._cancel(request)
        except RequestRejected:
            self.stats["bad_requests"] += 1
            raise
        raise RequestRejected(env.ERR_UNKNOWN_TYPE, f"no REPL message type {request.type!r}")

    # -------------------------------------------------------------- open

    async def _open(self, request: Request) -> dict[str, Any]:
        msg = wire.parse(wire.OpenSession, request.payload, "repl.open")
        key = (request.peer_id, msg.session)
        existing = self._sessions.get(key)
        if existing is not None:
            existing.last_used = trio.current_time()
            return self._open_reply(msg.session, 0, ["session already open"])
        await self._reap_idle()
        if len(self._sessions) >= self.config.max_sessions:
            raise RequestRejected(
                env.ERR_OVERLOADED,
                f"this peer already holds {self.config.max_sessions} REPL sessions",
            )
        context = msg.context
        history = msg.history
        blobs: list[str] = []
        if msg.context_blob is not None:
            context = await self._load_blob(msg.context_blob, "context")
            blobs.append(msg.context_blob)
        if msg.history_blob is not None:
            history = await self._load_blob(msg.history_blob, "history")
            blobs.append(msg.history_blob)
        local_id = f"remote/{request.peer_id}/{msg.session}"
        session = _PeerSession(request.peer_id, msg.session, local_id, trio.current_time(), blobs)
        self._sessions[key] = session
        try:
            replayed = await open_with_history(self.executor, local_id, context, history)
        except SandboxError as exc:
            self._sessions.pop(key, None)
            await self._release_blobs(session)
            raise RequestRejected(ERR_SANDBOX, f"could not open the session here: {exc}") from None
        except BaseException:
            self._sessions.pop(key, None)
            await self._release_blobs(session)
            raise
        self.stats["sessions_opened"] += 1
        notes = []
        if replayed:
            self.stats["sessions_restored"] += 1
            notes.append(f"namespace rebuilt by replaying {replayed} block(s)")
        log.info(
            "event=remote_session_opened leader=%s session=%s replayed=%d",
            request.peer_id, msg.session, replayed,
        )  # fmt: skip
        return self._open_reply(msg.session, replayed, notes)

    def _open_reply(self, session: str, replayed: int, notes: list[str]) -> dict[str, Any]:
        return wire.OpenReply(
            session=session,
            languages=list(getattr(self.executor, "languages", ("python",))),
            replayed_blocks=replayed,
            notes=notes,
        ).model_dump()

    async def _load_blob(self, blob_id: str, what: str) -> Any:
        path = self.transport.blob_path(blob_id)
        if path is None:
            raise RequestRejected(
                wire.ERR_MISSING_BLOB,
                f"the {what} blob {blob_id[:12]}… has not arrived here (send it first)",
            )
        limit = self.config.max_blob_bytes

        def load() -> Any:
            size = path.stat().st_size
            if size > limit:
                raise ValueError(f"{size} bytes exceeds this peer's limit of {limit}")
            return read_context_file(path)  # big strings decoded in slices (GIL-friendly)

        try:
            return await trio.to_thread.run_sync(load)
        except (OSError, ValueError, msgpack.ExtraData, msgpack.FormatError) as exc:
            raise RequestRejected(
                env.ERR_BAD_REQUEST, f"the {what} blob is not usable: {exc}"
            ) from None

    # -------------------------------------------------------------- exec

    async def _exec(self, request: Request) -> dict[str, Any]:
        msg = wire.parse(wire.ExecBlock, request.payload, "repl.exec")
        session = self._sessions.get((request.peer_id, msg.session))
        if session is None:
            raise RequestRejected(
                wire.ERR_UNKNOWN_SESSION,
                f"no session {msg.session!r} of {request.peer_id} here (closed, reaped, or "
                "this peer restarted): open it again",
            )
        if msg.exec_id in self._running:
            raise RequestRejected(env.ERR_BAD_REQUEST, f"block {msg.exec_id!r} is already running")
        leader = request.peer_id
        index = 0

        async def sub_calls(prompts: list[str], model: str | None) -> list[SubCallResult]:
            nonlocal index
            ask = {"exec_id": msg.exec_id, "index": index, "prompts": prompts, "model": model}
            index += 1
            self.stats["sub_calls_forwarded"] += 1
            reply = await self.transport.request(
                leader, protocol_ids.REPL, wire.REPL_SUB, ask,
                timeout=self.config.sub_call_timeout_s,
            )  # fmt: skip
            return wire.sub_results_from_wire(reply, len(prompts))

        scope = trio.CancelScope()
        self._running[msg.exec_id] = (leader, scope)
        session.running += 1
        session.last_used = trio.current_time()
        result: ExecResult | None = None
        try:
            with scope:
                result = await self.executor.execute(
                    ExecRequest(session.local_id, msg.code, msg.language, msg.timeout_s),
                    sub_calls,
                )
        except SandboxError as exc:
            result = ExecResult(error=f"sandbox error on the peer: {exc}", error_kind="sandbox")
        finally:
            self._running.pop(msg.exec_id, None)
            session.running -= 1
            session.last_used = trio.current_time()
        if result is None:  # cancelled by the leader (repl.cancel)
            result = ExecResult(error="cancelled by the leader", error_kind="sandbox")
        self.stats["blocks_run"] += 1
        return wire.exec_result_to_wire(result)

    def _cancel(self, request: Request) -> dict[str, Any]:
        msg = wire.parse(wire.CancelExec, request.payload, "repl.cancel")
        running = self._running.get(msg.exec_id)
        if running is None or running[0] != request.peer_id:
            return {"cancelled": False}
        running[1].cancel()
        return {"cancelled": True}

    # -------------------------------------------------------------- close, reap

    async def _close(self, request: Request) -> dict[str, Any]:
        msg = wire.parse(wire.CloseSession, request.payload, "repl.close")
        session = self._sessions.pop((request.peer_id, msg.session), None)
        if session is None:
            return {"closed": False}
        await self._drop(session)
        return {"closed": True}

    async def _drop(self, session: _PeerSession) -> None:
        try:
            await self.executor.close_session(session.local_id)
        except Exception as exc:  # noqa: BLE001 - closing must not break the service
            log.warning(
                "event=remote_session_close_failed session=%s error=%r", session.local_id, str(exc)
            )
        await self._release_blobs(session)
        if self._on_closed is not None:
            self._on_closed(session.local_id)

    async def _release_blobs(self, session: _PeerSession) -> None:
        """Delete blobs no other session still uses (the store is content-addressed)."""
        in_use = {b for s in self._sessions.values() for b in s.blobs}
        for blob_id in session.blobs:
            if blob_id in in_use:
                continue
            path = self.transport.blob_path(blob_id)
            if path is not None:
                with contextlib.suppress(OSError):
                    path.unlink()

    async def _reap_idle(self) -> None:
        now = trio.current_time()
        stale = [
            key
            for key, s in self._sessions.items()
            if s.running == 0 and now - s.last_used > self.config.session_idle_s
        ]
        for key in stale:
            session = self._sessions.pop(key)
            self.stats["sessions_reaped"] += 1
            log.info(
                "event=remote_session_reaped leader=%s session=%s", session.leader, session.name
            )
            await self._drop(session)

    def session_count(self) -> int:
        return len(self._sessions)

    async def aclose(self) -> None:
        """Close every session this service opened."""
        sessions, self._sessions = list(self._sessions.values()), {}
        for scope in [s for _, s in self._running.values()]:
            scope.cancel()
        with trio.CancelScope(shield=True):
            for session in sessions:
                await self._drop(session)


def register_repl_service(
    transport: TransportPort,
    executor: ReplExecutor,
    config: ReplServiceConfig | None = None,
    *,
    on_session_closed: Callable[[str], None] | None = None,
) -> ReplService:
    """Serve REPL jobs for other peers on `transport` with `executor`; returns the service."""
    service = ReplService(transport, executor, config, on_session_closed=on_session_closed)
    ReplEndpoint.of(transport).service = service
    return service
