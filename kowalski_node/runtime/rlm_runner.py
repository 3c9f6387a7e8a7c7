"""The trio driver of the RLM machine: model calls, REPL jobs, sub-calls, progress.

`run_rlm(...)` is the entry point. Everything the mesh needs to drive a task
differently is a parameter: the executor (local sandbox or a remote REPL), the
root and sub backends (local engine, a peer, a fan-out dispatcher), a
checkpoint hook called after every step, and `resume=` to go on from a
checkpoint taken on another node.
"""

from __future__ import annotations

import inspect
import logging
import math
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, assert_never

import trio

from kowalski_node.errors import BackendUnavailable, KowalskiError, LlmError, SandboxError
from kowalski_node.llm.base import LlmBackend, LlmRequest, LlmResponse
from kowalski_node.repl.base import ExecRequest, ExecResult, ReplExecutor, SubCallResult
from kowalski_node.rlm import effects as fx
from kowalski_node.rlm.config import RlmConfig
from kowalski_node.rlm.machine import RlmMachine
from kowalski_node.rlm.prompts import context_metadata
from kowalski_node.rlm.types import ExecutionResult, ProgressEvent, SubCallRecord
from kowalski_node.runtime.trajectory import TrajectoryWriter, model_used, trajectory_path

log = logging.getLogger(__name__)

ProgressCallback = Callable[[ProgressEvent], None]
CheckpointHook = Callable[[dict[str, Any]], Awaitable[None] | None]

# The prompt a child RLM (max_depth > 1) answers: the sub-call's text is its context.
CHILD_PROMPT = (
    "The variable `context` holds a request, together with any text it refers to. "
    "Carry out that request and give the answer with FINAL."
)
# The executor enforces each block's timeout; this is only a backstop if it does not.
_EXEC_BACKSTOP_S = 5.0
# A run's REPL session id is "<task id>~<run nonce>": a run aborted by a re-offer or by
# fencing closes only its own session, never the one a newer run of the task uses.
SESSION_RUN_SEPARATOR = "~"
# Pause before re-running a block whose infrastructure failed (grows per attempt).
_INFRA_BACKOFF_S = 0.2


def session_task_id(session_id: str) -> str:
    """The task a REPL session belongs to (its id without the run nonce)."""
    return session_id.split(SESSION_RUN_SEPARATOR, 1)[0]


def _new_session_id(task_id: str) -> str:
    return f"{task_id}{SESSION_RUN_SEPARATOR}{uuid.uuid4().hex[:12]}"


class TaskControl:
    """Cancel a running task and watch its progress as async iterators.

    Create one, pass it as `control=` to `run_rlm`, and from other trio tasks call
    `cancel()` or iterate `subscribe()`. Subscribe before the task starts to see
    every event (`last_event` holds the latest for late-comers). A subscriber whose
    buffer is full misses events rather than slowing the task down. Use from the
    trio thread only.
    """

    def __init__(self) -> None:
        self._cancel_event = trio.Event()
        self.graceful = False
        self._subscribers: list[trio.MemorySendChannel[ProgressEvent]] = []
        self._closed = False
        self.last_event: ProgressEvent | None = None

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_event.is_set()

    def cancel(self, *, graceful: bool = False) -> None:
        """Stop the task; graceful=True lets the model give one final answer first."""
        self.graceful = graceful
        self._cancel_event.set()

    def subscribe(self, max_buffer: int = 1024) -> trio.MemoryReceiveChannel[ProgressEvent]:
        """A channel of ProgressEvents that closes when the task ends."""
        send, receive = trio.open_memory_channel[ProgressEvent](max_buffer)
        if self._closed:
            send.close()
        else:
            self._subscribers.append(send)
        return receive

    async def wait_cancelled(self) -> None:
        await self._cancel_event.wait()

    def publish(self, event: ProgressEvent) -> None:
        self.last_event = event
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._subscribers.remove(channel)

    def close(self) -> None:
        self._closed = True
        for channel in self._subscribers:
            channel.close()
        self._subscribers.clear()


@dataclass
class _State:
    machine: RlmMachine
    send: trio.MemorySendChannel[Callable[[float], list[fx.Effect]]]
    nursery: trio.Nursery
    scopes: dict[int, trio.CancelScope]
    root_error: BaseException | None = None
    result: ExecutionResult | None = None


class _InfraFailure(Exception):
    """A block could not run for a reason that is not the model's code."""


class RlmRunner:
    """Drives one task (or a resumed one) to its end.

    `control` and `on_checkpoint` belong to one task, so use one runner per task;
    the backends and the executor can be shared by many runners.
    """

    def __init__(
        self,
        *,
        root: LlmBackend,
        repl: ReplExecutor,
        sub: LlmBackend | None = None,
        config: RlmConfig | None = None,
        trajectory_dir: str | Path | None = None,
        on_progress: ProgressCallback | None = None,
        on_checkpoint: CheckpointHook | None = None,
        control: TaskControl | None = None,
        depth: int = 0,
    ) -> None:
        self.root = root
        self.sub = sub
        self.repl = repl
        self.config = config or RlmConfig()
        self.trajectory_dir = Path(trajectory_dir) if trajectory_dir is not None else None
        self.on_progress = on_progress
        self.on_checkpoint = on_checkpoint
        self.control = control
        self.depth = depth
        self._checkpoint_lock = trio.Lock()
        self._sub_limiter = trio.CapacityLimiter(self.config.sub_concurrency)
        self._session_lock = trio.Lock()
        self._session_open = False
        self._session_id = ""
        self._context: Any = None

    async def run(
        self,
        prompt: str,
        context: Any,
        *,
        task_id: str | None = None,
        resume: dict[str, Any] | None = None,
    ) -> ExecutionResult:
        """Run to the end; raises LlmError if the root model fails for good."""
        now = trio.current_time()
        languages = tuple(getattr(self.repl, "languages", ("python",)))
        if resume is not None:
            machine = RlmMachine.restore(resume, now)
        else:
            machine = RlmMachine(
                task_id=task_id or uuid.uuid4().hex[:16],
                prompt=prompt,
                context_meta=context_metadata(
                    context, preview_chars=self.config.context_preview_chars
                ),
                config=self.config,
                languages=languages,
                depth=self.depth,
            )
        writer = (
            TrajectoryWriter(trajectory_path(self.trajectory_dir, machine.task_id))
            if self.trajectory_dir is not None
            else None
        )
        # The REPL session is opened on the first block, not up front: a task the model
        # answers without code never costs a sandbox worker. Its id is this run's own.
        self._session_id = _new_session_id(machine.task_id)
        self._context = context
        self._session_open = False
        try:
            if resume is not None and machine.replay_blocks():
                await self._replay(machine, writer)
            result = await self._drive(machine, writer, resume is not None)
        finally:
            if writer is not None:
                writer.close()
            if self.control is not None and self.depth == 0:
                self.control.close()
            with trio.CancelScope(shield=True):
                await self._close_session()
        if writer is not None:
            result = replace(result, trajectory_path=str(writer.path))
            if self.depth == 0:  # a sub-RLM's result is a sub-call answer: no model to name
                model, backend = model_used(writer.path)
                result = replace(result, model=model or "unknown", backend=backend or "unknown")
        return result

    # ------------------------------------------------------------------ main loop

    async def _drive(
        self, machine: RlmMachine, writer: TrajectoryWriter | None, resumed: bool
    ) -> ExecutionResult:
        send, receive = trio.open_memory_channel[Callable[[float], list[fx.Effect]]](math.inf)
        async with trio.open_nursery() as nursery:
            state = _State(machine, send, nursery, {})
            now = trio.current_time()
            effects = machine.resume(now) if resumed else machine.start(now)
            await self._apply(state, effects, writer)
            await self._checkpoint(machine)
            if self.control is not None and self.depth == 0:
                nursery.start_soon(self._watch_cancel, state)
            while not machine.done:
                deadline = machine.next_deadline()
                event: Callable[[float], list[fx.Effect]] | None = None
                with trio.move_on_at(deadline if deadline is not None else math.inf):
                    event = await receive.receive()
                now = trio.current_time()
                effects = event(now) if event is not None else machine.tick(now)
                if not effects:
                    continue
                await self._apply(state, effects, writer)
                await self._checkpoint(machine)
            nursery.cancel_scope.cancel()
        assert state.result is not None
        result = state.result
        if result.stop_reason == "error":
            if machine.infra_failed:
                raise SandboxError(result.error or "the REPL failed")
            if isinstance(state.root_error, LlmError):
                raise state.root_error
            raise LlmError(result.error or "the root model failed")
        return result

    async def _watch_cancel(self, state: _State) -> None:
        assert self.control is not None
        control = self.control
        machine = state.machine
        await control.wait_cancelled()
        await state.send.send(lambda now: machine.cancel(now, graceful=control.graceful))

    async def _apply(
        self, state: _State, effects: Sequence[fx.Effect], writer: TrajectoryWriter | None
    ) -> None:
        for effect in effects:
            match effect:
                case fx.Progress():
                    self._publish(effect.event)
                case fx.Trace():
                    if writer is not None:
                        writer.write(effect.record)
                case fx.NeedLlm():
                    scope = trio.CancelScope()
                    state.scopes[effect.call_id] = scope
                    state.nursery.start_soon(self._llm_worker, state, effect, scope)
                case fx.NeedExec():
                    scope = trio.CancelScope()
                    state.scopes[effect.call_id] = scope
                    state.nursery.start_soon(self._exec_worker, state, effect, scope, writer)
                case fx.Abort():
                    scope_to_cancel = state.scopes.pop(effect.call_id, None)
                    if scope_to_cancel is not None:
                        scope_to_cancel.cancel()
                case fx.Final():
                    state.result = effect.result
                case fx.NeedSubCalls():  # only returned by on_sub_calls, handled there
                    raise AssertionError("NeedSubCalls outside a sub-call handler")
                case _:
                    assert_never(effect)

    def _publish(self, event: ProgressEvent) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(event)
            except Exception:  # a broken observer must not break the task
                log.exception("progress callback failed")
        if self.control is not None:
            self.control.publish(event)

    async def _checkpoint(self, machine: RlmMachine) -> None:
        if self.on_checkpoint is None:
            return
        async with self._checkpoint_lock:
            outcome = self.on_checkpoint(machine.snapshot())
            if inspect.isawaitable(outcome):
                await outcome

    # ------------------------------------------------------------------ workers

    async def _llm_worker(self, state: _State, effect: fx.NeedLlm, scope: trio.CancelScope) -> None:
        machine = state.machine
        with scope:
            try:
                if effect.timeout_s is not None:  # the bounded final-answer turn
                    response = await complete_within(
                        self.root, effect.request, effect.timeout_s, self.config
                    )
                else:
                    response = await call_with_retry(self.root, effect.request, self.config)
            except KowalskiError as exc:  # LlmError, or a setup error such as a missing model name
                error = exc if isinstance(exc, LlmError) else LlmError(str(exc))
                if state.root_error is None:
                    state.root_error = error
                message = str(error)
                await state.send.send(
                    lambda now: machine.on_llm_error(effect.call_id, message, now)
                )
                return
            except Exception as exc:  # noqa: BLE001 - a backend bug becomes a clear task error, not a crash
                wrapped = LlmError(f"{self.root.name} backend failed: {type(exc).__name__}: {exc}")
                state.root_error = state.root_error or wrapped
                await state.send.send(
                    lambda now: machine.on_llm_error(effect.call_id, str(wrapped), now)
                )
                return
            await state.send.send(
                lambda now: machine.on_llm_response(effect.call_id, response, now)
            )
        state.scopes.pop(effect.call_id, None)

    async def _exec_worker(
        self,
        state: _State,
        effect: fx.NeedExec,
        scope: trio.CancelScope,
        writer: TrajectoryWriter | None,
    ) -> None:
        machine = state.machine
        with scope:
            try:
                if effect.rebuild:
                    await trio.sleep(_INFRA_BACKOFF_S * effect.attempt)
                    await self._rebuild_session(machine, writer)
                handler = self._sub_handler(state, effect.call_id, writer)
                request = ExecRequest(
                    self._session_id, effect.code, effect.language, effect.timeout_s
                )
                result = await self._execute(request, handler, first_try=effect.attempt == 0)
            except _InfraFailure as failure:
                reason = str(failure)
                log.warning(
                    "event=repl_infra_failure task=%s attempt=%d reason=%r",
                    machine.task_id, effect.attempt, reason,
                )  # fmt: skip
                await state.send.send(lambda now: machine.on_exec_lost(effect.call_id, reason, now))
            else:
                await state.send.send(
                    lambda now: machine.on_exec_result(effect.call_id, result, now)
                )
        state.scopes.pop(effect.call_id, None)

    async def _ensure_session(self) -> None:
        """Open this run's REPL session once, on first use (blocks run one at a time)."""
        async with self._session_lock:
            if not self._session_open:
                await self.repl.open_session(self._session_id, self._context)
                self._session_open = True

    async def _close_session(self) -> None:
        """Close this run's own session (never another run's: the id is per run)."""
        if not self._session_open:
            return
        self._session_open = False
        try:
            await self.repl.close_session(self._session_id)
        except Exception as exc:  # noqa: BLE001 - closing must never hide the task's own outcome
            log.warning("closing REPL session %s failed: %s", self._session_id, exc)

    async def _rebuild_session(self, machine: RlmMachine, writer: TrajectoryWriter | None) -> None:
        """A fresh session holding the namespace the recorded blocks built (after an
        infrastructure failure). A replay that fails the same way is itself an attempt."""
        with trio.CancelScope(shield=True):
            await self._close_session()
        self._session_id = _new_session_id(machine.task_id)
        await self._replay(machine, writer, strict=True)

    async def _execute(
        self,
        request: ExecRequest,
        handler: Callable[[list[str], str | None], Awaitable[list[SubCallResult]]],
        *,
        first_try: bool = True,
    ) -> ExecResult:
        """Run one block. Raises _InfraFailure when the REPL, not the code, failed: the
        session was lost, the executor or sandbox broke, no peer could run it, or (on a
        first try) the worker died under it."""
        backstop = request.timeout_s * 2 + _EXEC_BACKSTOP_S
        started = trio.current_time()
        try:
            await self._ensure_session()
            with trio.fail_after(backstop):
                result = await self.repl.execute(request, handler)
        except trio.TooSlowError:
            return ExecResult(
                error=f"the REPL did not return within {backstop:.1f} s", error_kind="timeout",
                exec_ms=(trio.current_time() - started) * 1000.0,
            )  # fmt: skip
        except SandboxError as exc:
            raise _InfraFailure(f"sandbox error: {exc}") from exc
        except Exception as exc:  # the executor broke: retry elsewhere, keep the node up
            log.exception("REPL executor failed")
            raise _InfraFailure(f"REPL executor failed: {type(exc).__name__}: {exc}") from exc
        if result.error_kind == "sandbox":
            raise _InfraFailure(result.error or "sandbox error")
        if result.error_kind == "killed" and first_try:
            # The worker died under the block. A second death of the same block in a fresh
            # worker is the code's own doing and is shown to the model.
            raise _InfraFailure(result.error or "the REPL worker died")
        return result

    def _sub_handler(
        self, state: _State, exec_call_id: int, writer: TrajectoryWriter | None
    ) -> Callable[[list[str], str | None], Awaitable[list[SubCallResult]]]:
        machine = state.machine

        async def handler(prompts: list[str], model: str | None) -> list[SubCallResult]:
            effects = machine.on_sub_calls(exec_call_id, list(prompts), model, trio.current_time())
            need = next(e for e in effects if isinstance(e, fx.NeedSubCalls))
            await self._apply(state, [e for e in effects if e is not need], writer)
            outcomes: list[fx.SubCallOutcome | None] = [None] * len(need.requests)
            with trio.CancelScope() as scope:
                state.scopes[need.call_id] = scope
                await self._run_sub_calls(need, outcomes, writer)
            state.scopes.pop(need.call_id, None)
            done = machine.on_sub_results(need.call_id, outcomes, trio.current_time())
            await self._apply(state, done, writer)
            if done:
                await self._checkpoint(machine)
            results: list[SubCallResult] = []
            for pre, outcome in zip(need.answered, outcomes, strict=True):
                if pre is not None:
                    results.append(SubCallResult(text=pre.text, error=pre.error))
                elif outcome is None:
                    results.append(SubCallResult(error="sub-call aborted"))
                else:
                    results.append(SubCallResult(text=outcome.text, error=outcome.error))
            return results

        return handler

    async def _run_sub_calls(
        self,
        need: fx.NeedSubCalls,
        outcomes: list[fx.SubCallOutcome | None],
        writer: TrajectoryWriter | None,
    ) -> None:
        backend = self.sub if self.sub is not None else self.root

        async def one(slot: int, request: LlmRequest) -> None:
            async with self._sub_limiter:
                started = trio.current_time()
                try:
                    if need.recursive:
                        outcomes[slot] = await self._child_run(request, need.depth)
                        return
                    response = await call_with_retry(backend, request, self.config)
                    outcomes[slot] = fx.SubCallOutcome(
                        text=response.text, tokens_in=response.tokens_in,
                        tokens_out=response.tokens_out, latency_ms=response.latency_ms,
                    )  # fmt: skip
                except Exception as exc:  # noqa: BLE001 - one failed slot fails only itself
                    detail = (
                        str(exc) if isinstance(exc, LlmError) else f"{type(exc).__name__}: {exc}"
                    )
                    outcomes[slot] = fx.SubCallOutcome(
                        error=detail, latency_ms=(trio.current_time() - started) * 1000.0
                    )

        async with trio.open_nursery() as nursery:
            for slot, (request, pre) in enumerate(zip(need.requests, need.answered, strict=True)):
                if pre is None:
                    nursery.start_soon(one, slot, request)

    async def _child_run(self, request: LlmRequest, depth: int) -> fx.SubCallOutcome:
        """A sub-call that is itself an RLM run (max_depth > 1) on the sub model."""
        sub_config = replace(
            self.config, root_model=self.config.sub_model or self.config.root_model
        )
        child = RlmRunner(
            root=self.sub if self.sub is not None else self.root, sub=self.sub, repl=self.repl, config=sub_config,
            trajectory_dir=self.trajectory_dir, on_progress=self.on_progress, depth=depth,
        )  # fmt: skip
        task_id = f"{request.task_id or 'task'}.sub{request.sequence}"
        result = await child.run(CHILD_PROMPT, request.messages[-1].content, task_id=task_id)
        error = result.error if result.stop_reason in {"error", "cancelled"} else None
        return fx.SubCallOutcome(
            text=None if error else result.content, error=error, tokens_in=result.tokens_in,
            tokens_out=result.tokens_out, latency_ms=result.timings.get("elapsed_ms", 0.0),
        )  # fmt: skip

    async def _replay(
        self, machine: RlmMachine, writer: TrajectoryWriter | None, *, strict: bool = False
    ) -> None:
        """Rebuild the REPL namespace: run recorded blocks again with recorded sub-call answers.

        On resume a replay failure is left for the next block to meet; `strict` (a rebuild
        after an infrastructure failure) raises _InfraFailure instead.
        """
        blocks = machine.replay_blocks()
        started = trio.current_time()
        for block in blocks:
            request = ExecRequest(
                self._session_id, block.code, block.language, self.config.block_timeout_s
            )
            try:
                await self._execute(request, _recorded_answers(block.sub_call_records))
            except _InfraFailure:
                if strict:
                    raise
                log.warning("replaying block %d of task %s failed", block.index, machine.task_id)
        if writer is not None:
            writer.write({"type": "replay", "task_id": machine.task_id, "blocks": len(blocks),
                          "ms": round((trio.current_time() - started) * 1000.0, 3)})  # fmt: skip


def _recorded_answers(
    answers: Sequence[SubCallRecord],
) -> Callable[[list[str], str | None], Awaitable[list[SubCallResult]]]:
    """A sub-call handler that hands back recorded answers in order (replay after failover)."""
    position = 0

    async def recorded(prompts: list[str], model: str | None) -> list[SubCallResult]:
        nonlocal position
        out: list[SubCallResult] = []
        for _ in prompts:
            if position < len(answers):
                out.append(
                    SubCallResult(text=answers[position].text, error=answers[position].error)
                )
            else:
                out.append(SubCallResult(error="replay: no recorded answer for this sub-call"))
            position += 1
        return out

    return recorded


async def call_with_retry(
    backend: LlmBackend, request: LlmRequest, config: RlmConfig, timeout_s: float | None = None
) -> LlmResponse:
    """One model call: bounded by `llm_timeout_s`; an unreachable backend is retried with backoff.

    Other model errors (missing model, exhausted script) are not retried: trying
    again cannot help. The last BackendUnavailable is re-raised, so the caller's
    error names the backend and the address.
    """
    limit = timeout_s if timeout_s is not None else config.llm_timeout_s
    attempt = 0
    started = trio.current_time()
    while True:
        try:
            with trio.fail_after(limit):
                return await backend.complete(request)
        except trio.TooSlowError as exc:
            raise LlmError(f"{backend.name} backend did not answer within {limit:g} s") from exc
        except BackendUnavailable as exc:
            if attempt >= config.llm_retries:
                if attempt == 0:
                    raise
                spent = trio.current_time() - started
                raise BackendUnavailable(
                    exc.backend,
                    exc.address,
                    f"{exc.detail} (gave up after {attempt + 1} attempts over {spent:.1f} s)",
                ) from exc
            delay = min(config.retry_backoff_s * (2**attempt), config.retry_backoff_max_s)
            attempt += 1
            log.info("%s backend unreachable; retry %d in %.2f s", backend.name, attempt, delay)
            await trio.sleep(delay)


async def complete_within(
    backend: LlmBackend, request: LlmRequest, timeout_s: float, config: RlmConfig
) -> LlmResponse:
    """A model call bounded by `timeout_s` that keeps a partial answer.

    Used for the final-answer turn: it streams, and when the bound is reached the text
    received so far is the answer (finish_reason "length"), which beats no answer at all
    from a slow model. Token counts are estimated (about four characters per token), since
    a stream does not report them. An unreachable backend is retried with backoff inside
    the bound. Raises LlmError only when nothing arrived in time.
    """
    started = trio.current_time()
    pieces: list[str] = []
    attempt = 0
    with trio.move_on_after(timeout_s) as scope:
        while True:
            stream = backend.stream(request)
            try:
                async for piece in stream:
                    pieces.append(piece)
                break
            except BackendUnavailable:
                if pieces or attempt >= config.llm_retries:
                    raise
            finally:
                closer = getattr(stream, "aclose", None)
                if closer is not None:
                    with trio.CancelScope(shield=True):
                        await closer()
            delay = min(config.retry_backoff_s * (2**attempt), config.retry_backoff_max_s)
            attempt += 1
            await trio.sleep(delay)
    text = "".join(pieces)
    if scope.cancelled_caught and not text:
        raise LlmError(f"{backend.name} backend did not answer within {timeout_s:g} s")
    prompt_chars = sum(len(m.content) for m in request.messages)
    return LlmResponse(
        text=text, model=request.model or backend.name, backend=backend.name,
        tokens_in=max(1, math.ceil(prompt_chars / 4)), tokens_out=math.ceil(len(text) / 4),
        latency_ms=(trio.current_time() - started) * 1000.0,
        finish_reason="length" if scope.cancelled_caught else "stop",
        extra={"partial": scope.cancelled_caught, "tokens_estimated": True},
    )  # fmt: skip


async def run_rlm(
    prompt: str,
    context: Any,
    *,
    root: LlmBackend,
    repl: ReplExecutor,
    sub: LlmBackend | None = None,
    config: RlmConfig | None = None,
    task_id: str | None = None,
    on_progress: ProgressCallback | None = None,
    control: TaskControl | None = None,
    trajectory_dir: str | Path | None = None,
    resume: dict[str, Any] | None = None,
    on_checkpoint: CheckpointHook | None = None,
) -> ExecutionResult:
    """Run one RLM task to its end and return its result.

    - `context` (str, bytes, list or dict) goes into the REPL as `context`; the model sees
      only its metadata.
    - `sub` serves `llm_query` (defaults to `root`), e.g. a smaller model.
    - `on_progress` is called with every ProgressEvent; `control` cancels the task and
      gives async iterators of the same events (`control.subscribe()`).
    - `trajectory_dir` gets `<task_id>.jsonl`.
    - `on_checkpoint(snapshot)` is called (and awaited, if async) after every step;
      `resume=snapshot` goes on from such a snapshot (the same `context` must be passed).

    A limit ends the run with a result whose `stop_reason` names it; a cancelled task
    returns `stop_reason="cancelled"`. Raises `LlmError` (e.g. `BackendUnavailable`,
    which names backend and address) when the root model fails for good.
    """
    runner = RlmRunner(
        root=root, repl=repl, sub=sub, config=config, trajectory_dir=trajectory_dir,
        on_progress=on_progress, on_checkpoint=on_checkpoint, control=control,
    )  # fmt: skip
    return await runner.run(prompt, context, task_id=task_id, resume=resume)
