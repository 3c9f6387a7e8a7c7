"""`SubprocessReplExecutor`: the sandboxed `ReplExecutor` used by nodes.

Each session (one task) is bound to its own warm worker process taken from a pool of
pre-started ones, so opening a session costs one round trip. Blocks run in that worker;
sub-calls come back over the pipe and go to the caller's `SubCallHandler`. Every block
that ran to completion (ok or raised) is recorded with the sub-call answers it received,
so when a worker has to be replaced (hard timeout, memory limit, crash, hostile code)
the next block first rebuilds the namespace by replaying that history in a fresh worker
without calling any model again. The same history moves a session to another node
(`session_history` / `open_session(..., history=...)`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import trio

from kowalski_node.errors import SandboxError
from kowalski_node.repl.base import (
    ErrorKind,
    ExecRequest,
    ExecResult,
    SubCallHandler,
    SubCallResult,
)
from kowalski_node.repl.capabilities import SandboxCapabilities
from kowalski_node.repl.config import SandboxConfig
from kowalski_node.repl.history import (
    HistoryBlock,
    RecordedBatch,
    history_from_plain,
    history_to_plain,
)
from kowalski_node.repl.process import UidAllocator, WorkerGone, WorkerProcess
from kowalski_node.repl.protocol import encode_sliced, prompt_digest
from kowalski_node.rlm.languages import normalize_language

log = logging.getLogger("kowalski_node.repl")

_KINDS: frozenset[str] = frozenset(
    {"exception", "syntax", "timeout", "memory", "killed", "unsupported_language", "sandbox"}
)
# Blocks whose effects a replay reproduces: they ran to their end (or raised) in the worker.
_REPLAYABLE: frozenset[str | None] = frozenset({None, "exception"})


@dataclass
class _Session:
    session_id: str
    context: Any
    history: list[HistoryBlock] = field(default_factory=list)
    worker: WorkerProcess | None = None
    lock: trio.Lock = field(default_factory=trio.Lock)
    needs_rebuild: bool = False
    pending_notes: list[str] = field(default_factory=list)
    rebuilt: bool = False


class SubprocessReplExecutor:
    """Sandboxed REPL: warm subprocess workers with OS-level limits (see docs/sandbox.md)."""

    def __init__(self, config: SandboxConfig | None = None, **overrides: Any) -> None:
        self.config = SandboxConfig.from_kwargs(config, **overrides) if overrides else (
            config or SandboxConfig()
        )  # fmt: skip
        self.languages: tuple[str, ...] = ("python",)
        self.capabilities: SandboxCapabilities | None = None
        self._idle: list[WorkerProcess] = []
        self._sessions: dict[str, _Session] = {}
        self._uids = UidAllocator(self.config)
        self._start_lock = trio.Lock()
        self._started = False
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> SandboxCapabilities:
        """Start the pool and learn (from a real worker) what this machine enforces."""
        async with self._start_lock:
            if self._closed:
                raise SandboxError("the REPL executor is closed")
            if self.capabilities is not None:
                return self.capabilities
            for _ in range(self.config.pool_size):
                self._idle.append(await self._spawn())
            first = self._idle[0]
            try:
                hello = await first.hello()
            except WorkerGone as exc:
                tail = await first.stderr_tail()
                await self.aclose()
                raise SandboxError(
                    f"the sandbox worker failed to start: {exc}\n{tail}".rstrip()
                ) from None
            caps = SandboxCapabilities.from_hello(hello)
            self.capabilities = caps
            self.languages = caps.languages
            missing = caps.missing()
            (log.warning if missing else log.info)("%s", caps.summary())
            required = sorted(self.config.require & set(missing))
            if required:
                await self.aclose()
                raise SandboxError(
                    "the sandbox cannot enforce required limit(s) on this machine: "
                    + "; ".join(f"{n} ({caps.limits[n].how})" for n in required)
                )
            self._started = True
            return caps

    async def aclose(self) -> None:
        """Kill every worker (idle and bound); no process is left behind."""
        self._closed = True
        workers = list(self._idle) + [s.worker for s in self._sessions.values() if s.worker]
        self._idle.clear()
        self._sessions.clear()
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for worker in workers:
                    nursery.start_soon(worker.kill)

    async def __aenter__(self) -> SubprocessReplExecutor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ sessions

    async def open_session(self, session_id: str, context: Any, *, history: Any = None) -> None:
        """Bind a warm worker to a new session holding `context`; idempotent.

        `history` (from `session_history`, possibly on another node) rebuilds the
        namespace by replaying it now; the next result reports `namespace_rebuilt`.
        """
        if session_id in self._sessions:
            return
        _check_context(context)
        blocks = history_from_plain(history) if history is not None else []
        await self.start()
        session = _Session(session_id, context, history=blocks)
        self._sessions[session_id] = session
        async with session.lock:
            try:
                if blocks:
                    await self._rebuild(session, reason="restored from a recorded history")
                else:
                    session.worker = await self._bind(session)
            except BaseException:
                self._sessions.pop(session_id, None)
                if session.worker is not None:
                    await session.worker.kill()
                raise

    async def restore_session(self, session_id: str, context: Any, history: Any) -> None:
        """Open a session whose namespace is rebuilt from `history` (failover to this node)."""
        await self.open_session(session_id, context, history=history)

    def session_history(self, session_id: str) -> dict[str, Any]:
        """The session's replayable history as plain data (msgpack/JSON safe)."""
        return history_to_plain(self._session(session_id).history)

    def session_ids(self) -> list[str]:
        return list(self._sessions)

    async def close_session(self, session_id: str) -> None:
        session = self._sessions.pop(session_id, None)
        if session is not None and session.worker is not None:
            worker, session.worker = session.worker, None
            await worker.kill()

    # ------------------------------------------------------------------ execution

    async def execute(self, request: ExecRequest, sub_calls: SubCallHandler) -> ExecResult:
        language = normalize_language(request.language)
        if language not in self.languages:
            return ExecResult(
                error=f"cannot run {request.language!r} code in this REPL; supported languages: "
                f"{', '.join(self.languages)} (python also as repl/py/python3"
                + (", shell also as bash/sh)" if "shell" in self.languages else ")"),
                error_kind="unsupported_language",
            )
        if not isinstance(request.code, str):
            return ExecResult(error="code must be a string", error_kind="sandbox")
        session = self._session(request.session_id)
        async with session.lock:
            notes: list[str] = []
            if session.worker is not None and not session.worker.alive:
                await self._retire(session)  # it died between blocks (a thread of the code?)
                session.pending_notes.append("the worker had died since the previous block")
            if session.worker is None or session.needs_rebuild:
                await self._rebuild(session, reason="the previous worker was replaced")
            notes.extend(session.pending_notes)
            session.pending_notes = []
            rebuilt, session.rebuilt = session.rebuilt, False
            result = await self._run(session, request, language, sub_calls)
            result.namespace_rebuilt = rebuilt
            result.notes = notes + result.notes
            if result.notes:
                tail = "\n".join(f"[sandbox] {n}" for n in result.notes)
                result.stderr = f"{result.stderr.rstrip()}\n{tail}".lstrip("\n")
            return result

    async def _run(
        self, session: _Session, request: ExecRequest, language: str, handler: SubCallHandler
    ) -> ExecResult:
        worker = session.worker
        assert worker is not None
        batches: list[RecordedBatch] = []
        prompts_used = 0
        started = trio.current_time()
        timeout = max(float(request.timeout_s), 0.001)
        message = {"t": "exec", "code": request.code, "lang": language, "timeout": timeout,
                   "cpu": float(self.config.cpu_s)}  # fmt: skip
        reply: dict[str, Any] | None = None
        try:
            await worker.send(message)
            with trio.CancelScope(
                deadline=trio.current_time() + timeout + self.config.timeout_grace_s
            ) as scope:
                while True:
                    frame = await worker.recv()
                    kind = frame.get("t")
                    if kind == "result":
                        reply = frame
                        break
                    if kind != "sub":
                        raise WorkerGone(f"worker sent an unexpected {kind!r} message")
                    remaining = scope.deadline - trio.current_time()
                    scope.deadline = math.inf  # time spent in sub-calls is not the block's
                    batch = await self._answer(frame, handler, prompts_used)
                    prompts_used += len(batch.results)
                    batches.append(batch)
                    scope.deadline = trio.current_time() + max(remaining, 0.0)
                    await worker.send(
                        {"t": "sub_result", "r": [[r.text, r.error] for r in batch.results]}
                    )
        except WorkerGone as gone:
            await self._retire(session)
            return ExecResult(
                error=f"the sandbox worker died while running the block: {gone}; "
                "it was replaced and the namespace will be rebuilt before the next block",
                error_kind="killed", exec_ms=_ms_since(started), sub_calls=prompts_used,
            )  # fmt: skip
        except BaseException:  # cancelled mid-block: the worker's state is unknown
            await self._retire(session)
            raise
        if reply is None:  # hard deadline: the soft timeout did not stop the code
            await self._retire(session)
            return ExecResult(
                error=f"the block exceeded its wall-clock limit of {timeout:g} s and did not "
                f"stop when interrupted, so its worker was killed; the namespace will be "
                f"rebuilt from the {len(session.history)} earlier block(s) before the next block",
                error_kind="timeout", exec_ms=_ms_since(started), sub_calls=prompts_used,
            )  # fmt: skip
        result = _result_from_reply(reply, prompts_used)
        if result.error_kind in _REPLAYABLE:
            session.history.append(HistoryBlock(request.code, language, timeout, tuple(batches)))
        if reply.get("recycle"):
            await self._retire(session)
            result.notes.append(
                "the worker hit the memory limit and was replaced; the namespace will be rebuilt "
                "(without this block's effects) before the next block"
            )
        return result

    async def _answer(
        self, frame: dict[str, Any], handler: SubCallHandler, used: int
    ) -> RecordedBatch:
        prompts_raw = frame.get("p")
        model = frame.get("m")
        if not isinstance(prompts_raw, list) or not all(isinstance(p, str) for p in prompts_raw):
            raise WorkerGone("worker sent a malformed sub-call (prompts must be strings)")
        if model is not None and not isinstance(model, str):
            raise WorkerGone("worker sent a malformed sub-call (model must be a string)")
        prompts: list[str] = prompts_raw
        digests = tuple(prompt_digest(p, model) for p in prompts)
        limit = self.config.max_sub_calls_per_block
        if used + len(prompts) > limit:
            error = f"sub-call limit of {limit} per block reached"
            return RecordedBatch(model, digests, tuple(SubCallResult(error=error) for _ in prompts))
        try:
            answers = list(await handler(prompts, model))
        except Exception as exc:  # noqa: BLE001 - the handler broke: every slot of this batch fails
            detail = f"{type(exc).__name__}: {exc}"
            return RecordedBatch(
                model, digests, tuple(SubCallResult(error=detail) for _ in prompts)
            )
        results: list[SubCallResult] = []
        for slot in range(len(prompts)):
            answer = answers[slot] if slot < len(answers) else None
            if not isinstance(answer, SubCallResult):
                results.append(
                    SubCallResult(error="the sub-call handler returned no answer for this prompt")
                )
            elif answer.error is not None or answer.text is None:
                results.append(SubCallResult(error=answer.error or "empty answer"))
            else:
                results.append(SubCallResult(text=str(answer.text)))
        return RecordedBatch(model, digests, tuple(results))

    # ------------------------------------------------------------------ workers

    async def _spawn(self) -> WorkerProcess:
        return await WorkerProcess.spawn(self.config, self._uids.allocate())

    async def _bind(self, session: _Session) -> WorkerProcess:
        """Take a warm worker (or start one), give it the context, top the pool up."""
        if self._closed:
            raise SandboxError("the REPL executor is closed")
        last_error = "no worker available"
        for _ in range(3):
            worker = self._idle.pop(0) if self._idle else await self._spawn()
            try:
                await worker.hello()
                # the frame is built in a worker thread, in slices (large contexts)
                frame = await trio.to_thread.run_sync(
                    encode_sliced, {"t": "init", "sid": session.session_id, "ctx": session.context}
                )
                await worker.send_frame(frame)
                with trio.fail_after(self.config.startup_timeout_s):
                    reply = await worker.recv()
                if reply.get("t") != "bound":
                    raise WorkerGone(f"worker answered {reply.get('t')!r} to init")
            except (WorkerGone, trio.TooSlowError) as exc:
                last_error = str(exc) or "the worker did not accept the context in time"
                await worker.kill()
                continue
            except BaseException:
                await worker.kill()
                raise
            while len(self._idle) < self.config.pool_size and not self._closed:
                self._idle.append(await self._spawn())
            return worker
        raise SandboxError(
            f"could not bind a sandbox worker to session {session.session_id!r}: {last_error} "
            f"(a context too large for the {self.config.memory_mb} MiB memory limit fails this way)"
        )

    async def _retire(self, session: _Session) -> None:
        worker, session.worker = session.worker, None
        session.needs_rebuild = True
        if worker is not None:
            await worker.kill()

    async def _rebuild(self, session: _Session, reason: str) -> None:
        """A fresh worker with the session's context, then its history replayed into it."""
        session.worker = await self._bind(session)
        session.needs_rebuild = False
        if not session.history:
            session.pending_notes.append(f"new worker ({reason}); no earlier blocks to replay")
            session.rebuilt = True
            return
        blocks = [
            {"code": b.code, "lang": b.language, "timeout": b.timeout_s, "cpu": float(self.config.cpu_s),
             "subs": [batch.to_worker() for batch in b.sub_calls]}
            for b in session.history
        ]  # fmt: skip
        budget = sum(b.timeout_s for b in session.history) + self.config.timeout_grace_s + 1.0
        started = trio.current_time()
        reply: dict[str, Any] | None = None
        try:
            await session.worker.send({"t": "replay", "blocks": blocks})
            with trio.move_on_after(budget):
                reply = await session.worker.recv()
            if reply is not None and reply.get("t") != "replayed":
                raise WorkerGone(f"worker answered {reply.get('t')!r} to replay")
        except WorkerGone as gone:
            reply = None
            failure = str(gone)
        except BaseException:
            await self._retire(session)
            raise
        else:
            failure = f"replay took longer than {budget:g} s" if reply is None else ""
        ms = _ms_since(started)
        session.rebuilt = True
        failed = [f for f in (reply or {}).get("failed") or [] if isinstance(f, dict)]
        if reply is None or failed:
            detail = failure or "; ".join(f"block {f.get('i')}: {f.get('kind')}" for f in failed)
            await self._retire(session)
            count = len(session.history)
            session.history = []
            session.worker = await self._bind(session)
            session.needs_rebuild = False
            session.pending_notes.append(
                f"{reason}, but the namespace could not be rebuilt from {count} recorded block(s) "
                f"({detail}); this session continues with a fresh namespace (context only)"
            )
            return
        assert reply is not None
        diverged = reply.get("diverged") or []
        note = f"{reason}; namespace rebuilt by replaying {len(session.history)} block(s) in {ms:.0f} ms"
        if diverged:
            note += (
                f" (block(s) {', '.join(str(i) for i in diverged)} asked different sub-calls than "
                "recorded, so their state may differ)"
            )
        session.pending_notes.append(note)

    def _session(self, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is None:
            raise SandboxError(f"no REPL session {session_id!r} (call open_session first)")
        return session


def _ms_since(started: float) -> float:
    return (trio.current_time() - started) * 1000.0


def _check_context(context: Any) -> None:
    if context is not None and not isinstance(context, (str, bytes, bytearray, list, tuple, dict)):
        raise SandboxError(
            f"context must be str, bytes, list or dict, got {type(context).__name__}"
        )
    if isinstance(context, (str, bytes, bytearray)):
        return  # always encodable; packing 50 MB just to check would stall the loop
    try:
        msgpack.packb(context, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise SandboxError(
            "context holds a value the sandbox cannot receive (allowed inside lists and dicts: "
            f"str, bytes, int, float, bool, None, list, dict): {exc}"
        ) from None


def _result_from_reply(reply: dict[str, Any], sub_calls: int) -> ExecResult:
    kind = reply.get("kind")
    error_kind: ErrorKind | None = kind if isinstance(kind, str) and kind in _KINDS else None  # type: ignore[assignment]
    error = reply.get("error")
    if error is not None and error_kind is None:
        error_kind = "exception"
    variables = reply.get("vars") if isinstance(reply.get("vars"), dict) else {}
    assert isinstance(variables, dict)
    final = reply.get("final")
    notes = reply.get("notes") if isinstance(reply.get("notes"), list) else []
    assert isinstance(notes, list)
    return ExecResult(
        stdout=str(reply.get("out") or ""), stderr=str(reply.get("err") or ""),
        error=str(error) if error is not None else None, error_kind=error_kind,
        exec_ms=float(reply.get("ms") or 0.0),
        final_answer=str(final) if final is not None else None,
        variables={str(k): str(v) for k, v in variables.items()},
        sub_calls=sub_calls, notes=[str(n) for n in notes],
    )  # fmt: skip
