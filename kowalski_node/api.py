"""The Python API: `KowalskiRLM` in builder and keyword styles, its value types, executors.

Two ways to build the same object:

    rlm = KowalskiRLM.new().with_model("m").with_device_filter(DeviceFilter.LOCAL).build()
    rlm = KowalskiRLM(model="m", cluster=ClusterConfig(device_filter="local"))

Where a task runs is decided by a `TaskExecutor`: `LocalExecutor` drives the RLM runner
in this process (sandboxed REPL workers, model backends from `llm.factory`);
`NodeExecutor` submits through the local node's HTTP API (contract in docs/api.md), so
`DeviceFilter.NETWORK` works as soon as a node serves that API and fails with a clear
`NodeUnreachable` until then. Settings always come from `config.load_settings`, so the
builder, the keyword style and the CLI share defaults, env vars and validation.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self, TypeVar, cast, runtime_checkable

import httpx
import outcome
import trio

from kowalski_node.client import ApiError, ApiUnreachable, NodeClient
from kowalski_node.config import Settings, load_settings
from kowalski_node.errors import ConfigError, KowalskiError, NodeUnreachable, TaskError
from kowalski_node.llm.factory import Backends, make_backends, parse_backend_spec
from kowalski_node.repl.base import ReplExecutor
from kowalski_node.repl.lazy import LazyRepl
from kowalski_node.rlm.types import BlockResult, ExecutionResult, ProgressEvent
from kowalski_node.runtime.task_setup import (
    open_sandbox_repl,
    rlm_config_from,
    sandbox_languages_for,
)

if TYPE_CHECKING:
    from kowalski_node.runtime.rlm_runner import TaskControl

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------


class _ParsableEnum(StrEnum):
    @classmethod
    def parse(cls, value: object) -> Self:
        """Accept a member or its name/value in any case; a clear ValueError otherwise."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            wanted = value.strip().lower().replace("-", "_")
            for member in cls:
                if wanted in (member.value, member.name.lower()):
                    return member
        choices = ", ".join(m.value for m in cls)
        raise ValueError(f"{cls.__name__} must be one of {choices}; got {value!r}")


class DeviceFilter(_ParsableEnum):
    """Where tasks may run: this process only, the mesh via the local node, or either."""

    LOCAL = "local"
    NETWORK = "network"
    ALL = "all"  # the node when one answers, else this process


class ShardingStrategy(_ParsableEnum):
    """How a model too large for one device is split (applies to network execution)."""

    AUTO = "auto"
    PIPELINE = "pipeline"
    TENSOR = "tensor"


class QueueStrategy(_ParsableEnum):
    """Order in which `execute_batch` starts tasks."""

    FIFO = "fifo"
    PRIORITY_FIFO = "priority_fifo"  # higher `Task.priority` first, then submission order


@dataclass(frozen=True)
class ClusterConfig:
    """Cluster-facing options; strings are accepted for the enums (`device_filter="network"`)."""

    device_filter: DeviceFilter | str = DeviceFilter.LOCAL
    sharding_strategy: ShardingStrategy | str = ShardingStrategy.AUTO
    network_discovery_timeout_s: float = 5.0
    # Base URL of the local node's HTTP API; None: from node.api.host/port in settings.
    api_url: str | None = None
    api_token: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "device_filter", DeviceFilter.parse(self.device_filter))
        object.__setattr__(
            self, "sharding_strategy", ShardingStrategy.parse(self.sharding_strategy)
        )
        timeout = self.network_discovery_timeout_s
        if not isinstance(timeout, int | float) or not timeout > 0 or math.isinf(timeout):
            raise ValueError(f"network_discovery_timeout_s must be > 0, got {timeout!r}")


@dataclass(frozen=True)
class BatchConfig:
    """Batch mode: how many tasks run at once and in which order they start."""

    max_parallel_tasks: int = 4
    queue_strategy: QueueStrategy | str = QueueStrategy.PRIORITY_FIFO

    def __post_init__(self) -> None:
        n = self.max_parallel_tasks
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"max_parallel_tasks must be an integer >= 1, got {n!r}")
        object.__setattr__(self, "queue_strategy", QueueStrategy.parse(self.queue_strategy))


# ---------------------------------------------------------------------------------------
# Value types
# ---------------------------------------------------------------------------------------


# Largest sandbox pool a batch keeps warm (an idle worker tree is about 30 MB RSS).
BATCH_POOL_MAX = 8

# Same rule as the node's HTTP API, so an id accepted here is accepted on the mesh too.
TASK_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def new_task_id() -> str:
    return "task-" + uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class Task:
    """One unit of batch work. A missing `task_id` is generated, so callers can refer to it."""

    prompt: str
    context: Any = None
    task_id: str | None = None
    priority: int = 0

    def __post_init__(self) -> None:
        if self.task_id is None:
            object.__setattr__(self, "task_id", new_task_id())


# The one progress type is the loop's own; the public API knows it by this name.
ProgressUpdate = ProgressEvent


@dataclass(frozen=True)
class BatchCompletion:
    """Passed to `execute_batch`'s callback as each task finishes."""

    task_id: str
    result: ExecutionResult
    completed: int
    total: int
    queue_depth: int  # tasks not started yet
    in_flight: int  # tasks still running
    elapsed_s: float
    throughput: float  # completed tasks per second since the batch started


ProgressCallback = Callable[[ProgressUpdate], Awaitable[None] | None]
CompletionCallback = Callable[[BatchCompletion], Awaitable[None] | None]


async def _call(callback: Callable[[Any], Awaitable[None] | None], value: Any) -> None:
    """Run a sync or async user callback; its failure is logged, never kills the task.

    Under the asyncio bridge the callback runs on the caller's asyncio loop (so an
    `async def` callback may await asyncio things), and the task waits for it.
    """
    loop = _CALLER_LOOP.get()
    if loop is not None:
        await _call_on_asyncio(loop, callback, value)
        return
    try:
        out = callback(value)
        if inspect.isawaitable(out):
            await out
    except Exception:
        log.exception("progress/completion callback %r failed", callback)


async def _call_on_asyncio(
    loop: asyncio.AbstractEventLoop, callback: Callable[[Any], Awaitable[None] | None], value: Any
) -> None:
    async def invoke() -> None:
        try:
            out = callback(value)
            if inspect.isawaitable(out):
                await out
        except Exception:
            log.exception("progress/completion callback %r failed", callback)

    try:
        future = asyncio.run_coroutine_threadsafe(invoke(), loop)
    except RuntimeError:  # the caller's loop is closed: nobody is listening any more
        return
    await _run_in_thread(future.result, abandon_on_cancel=True)


# ---------------------------------------------------------------------------------------
# asyncio support: a trio run in a worker thread, one per KowalskiRLM
# ---------------------------------------------------------------------------------------

# trio-typing's stubs (pulled in by py-libp2p) predate `abandon_on_cancel`; trio 0.35 has it.
_run_in_thread: Any = trio.to_thread.run_sync

# Set inside the portal's trio tasks: the asyncio loop of the call they serve.
_CALLER_LOOP: contextvars.ContextVar[asyncio.AbstractEventLoop | None] = contextvars.ContextVar(
    "kowalski_caller_loop", default=None
)


def _async_library() -> str:
    """'trio', 'asyncio', ... for the calling task ('' outside async code)."""
    import sniffio

    try:
        return sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return ""


_Method = TypeVar("_Method", bound=Callable[..., Awaitable[Any]])


def _bridged(method: _Method) -> _Method:
    """Make a `KowalskiRLM` coroutine method awaitable from trio (directly) and asyncio
    (through the instance's trio portal)."""

    @functools.wraps(method)
    async def wrapper(self: KowalskiRLM, *args: Any, **kwargs: Any) -> Any:
        library = _async_library()
        if library == "trio":
            return await method(self, *args, **kwargs)
        if library != "asyncio":
            raise RuntimeError(
                f"KowalskiRLM runs under trio or asyncio, not {library or 'this caller'}; "
                "from plain code use execute_sync()"
            )
        return await self._portal().call(functools.partial(method, self, *args, **kwargs))

    return cast(_Method, wrapper)


class _TrioPortal:
    """A trio event loop in a daemon thread that runs the API's coroutines for asyncio callers.

    The runtime (sandbox pools, memory channels, httpx over trio) is trio code; rather
    than port it, asyncio callers hand each call to this loop and await the answer as an
    asyncio future. One portal per `KowalskiRLM` keeps warm state (the `async with`
    sandbox pool) in one trio run across calls. Cancelling the awaiting asyncio task
    cancels the trio call.
    """

    def __init__(self) -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.thread_id: int | None = None

    def start(self) -> None:
        async def body() -> None:
            self._stop = trio.Event()
            self._token = trio.lowlevel.current_trio_token()
            self.thread_id = threading.get_ident()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

        self._thread = threading.Thread(
            target=trio.run, args=(body,), name="kowalski-trio", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(10.0):
            raise RuntimeError("the kowalski trio thread did not start")

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run_sync_soon(self, fn: Callable[[], object]) -> None:
        """Run a plain function on the trio thread (ignored once the portal stopped)."""
        if self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(fn)

    async def call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Await `fn()` (a trio coroutine function) from asyncio."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        scopes: list[trio.CancelScope] = []

        def deliver(result: outcome.Outcome[Any] | None) -> None:
            if future.done():
                return
            if result is None:
                future.set_exception(RuntimeError("the KowalskiRLM was closed mid-call"))
                return
            if isinstance(result, outcome.Error):
                error = result.error
                if isinstance(error, trio.Cancelled):
                    future.set_exception(RuntimeError("the KowalskiRLM was closed mid-call"))
                    return
                if isinstance(error, BaseExceptionGroup):
                    error = plain_exception(error)
                future.set_exception(error)
            else:
                future.set_result(result.unwrap())

        async def runner() -> None:
            _CALLER_LOOP.set(loop)
            result: outcome.Outcome[Any] | None = None
            with trio.CancelScope() as scope:
                scopes.append(scope)
                result = await outcome.acapture(fn)
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                loop.call_soon_threadsafe(deliver, result)

        def spawn() -> None:
            assert self._nursery is not None
            self._nursery.start_soon(runner)

        self.run_sync_soon(spawn)
        try:
            return await future
        except asyncio.CancelledError:

            def cancel_all() -> None:
                for scope in scopes:
                    scope.cancel()

            self.run_sync_soon(cancel_all)
            raise

    def stop(self) -> None:
        if self._stop is not None:
            self.run_sync_soon(self._stop.set)
        if self._thread is not None and threading.get_ident() != self.thread_id:
            self._thread.join(10.0)


# ---------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------

CONTEXT_TYPES = "str, bytes, list, dict or None"


def validate_prompt(prompt: object) -> str:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("prompt is empty")
    return prompt


def normalise_context(context: object) -> str | bytes | list[Any] | dict[str, Any] | None:
    """The context as the REPL will hold it; ValueError for types that cannot travel.

    Lists and dicts must be JSON data (nested str/int/float/bool/None/list/dict), because a
    task's context goes to a sandbox process and, on the mesh, to other nodes.
    """
    if context is None or isinstance(context, str | bytes):
        return context
    if isinstance(context, bytearray | memoryview):
        return bytes(context)
    if isinstance(context, tuple):
        context = list(context)
    if isinstance(context, list | dict):
        try:
            json.dumps(context, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"context must be plain JSON data inside lists/dicts: {exc}") from None
        return context
    raise ValueError(f"unsupported context type {type(context).__name__}; use {CONTEXT_TYPES}")


def decode_context(payload: Mapping[str, Any]) -> Any:
    """Inverse of `client.encode_context`: the context of a POST /v1/tasks body, decoded
    as the node decodes it (`TaskSubmission.context_value`); ValueError on bad input."""
    from kowalski_node.runtime.service import TaskSubmission

    submission = TaskSubmission.model_validate(
        {"prompt": "-", "context": payload.get("context")}
        | {"context_encoding": payload.get("context_encoding", "json")}
    )
    return submission.context_value()


# ---------------------------------------------------------------------------------------
# Executors
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskRequest:
    """Everything an executor needs to run one task."""

    task_id: str
    prompt: str
    context: str | bytes | list[Any] | dict[str, Any] | None
    settings: Settings


ProgressSink = Callable[[ProgressUpdate], Awaitable[None]]
# Opens a started REPL executor for the current trio run (the sandbox, or a remote REPL).
ReplFactory = Callable[[Settings], Awaitable[ReplExecutor]]


@runtime_checkable
class TaskExecutor(Protocol):
    """Runs tasks somewhere (this process, the mesh) and reports progress on the way."""

    name: str

    async def run(self, request: TaskRequest, progress: ProgressSink) -> ExecutionResult:
        """Run to completion; limits and cancellation end in a result, not an exception."""
        ...

    async def cancel(self, task_id: str) -> bool:
        """Ask a running task to stop; False when this executor does not know the task."""
        ...

    async def aclose(self) -> None: ...


class LocalExecutor:
    """Runs the RLM loop in this process: sandboxed REPL workers plus model backends.

    Backends live as long as the executor (a loaded builtin model is reused across tasks
    and across `trio.run` calls). The REPL executor owns worker processes, which belong to
    one trio run: inside `async with executor.session()` one pool serves every task;
    outside it, each task opens and closes its own so no process outlives its run.
    """

    name = "local"

    def __init__(
        self,
        settings: Settings,
        *,
        backends: Backends | None = None,
        repl_factory: ReplFactory | None = None,
    ) -> None:
        self.settings = settings
        self._backends = backends
        self._repl_factory: ReplFactory = repl_factory or open_sandbox_repl
        # Only the real sandbox can start lazily: its languages are known up front.
        self._lazy_languages = sandbox_languages_for(settings) if repl_factory is None else None
        self._repl: ReplExecutor | None = None
        self._repl_token: object = None
        self._controls: dict[str, TaskControl] = {}

    def backends(self) -> Backends:
        if self._backends is None:
            self._backends = make_backends(self.settings)
        return self._backends

    @property
    def is_open(self) -> bool:
        """Whether a shared REPL pool serves tasks of the current trio run."""
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            return False
        return self._repl is not None and self._repl_token is token

    async def open(self, *, lazy: bool = False, pool_size: int | None = None) -> None:
        """Start a shared REPL pool for the current trio run (used by `async with rlm`).

        `lazy` defers spawning workers until some task runs code, and `pool_size` (when
        larger than `sandbox.pool_size`) keeps more workers warm; `execute_batch` uses both.
        """
        if self._repl is None:
            settings = self.settings
            if pool_size is not None and pool_size > settings.sandbox.pool_size:
                settings = settings.with_overrides({"sandbox.pool_size": pool_size})
            self._repl = await self._new_repl(settings, lazy=lazy)
            self._repl_token = trio.lowlevel.current_trio_token()

    async def _new_repl(self, settings: Settings, *, lazy: bool) -> ReplExecutor:
        """A started REPL executor, or one that starts when a task first runs code."""
        if lazy and self._lazy_languages is not None:
            factory = self._repl_factory
            return LazyRepl(lambda: factory(settings), languages=self._lazy_languages)
        return await self._repl_factory(settings)

    async def run(self, request: TaskRequest, progress: ProgressSink) -> ExecutionResult:
        from kowalski_node.runtime.rlm_runner import TaskControl

        backends = self.backends()
        if request.task_id in self._controls:
            raise TaskError(f"task {request.task_id!r} is already running")
        control = self._controls[request.task_id] = TaskControl()
        try:
            shared = self._repl
            if shared is not None and self._repl_token is trio.lowlevel.current_trio_token():
                return await _run_local(request, backends, shared, progress, control)
            # A task of its own: workers start only if its model writes code.
            repl = await self._new_repl(request.settings, lazy=True)
            try:
                return await _run_local(request, backends, repl, progress, control)
            finally:
                with trio.CancelScope(shield=True):
                    await repl.aclose()
        finally:
            self._controls.pop(request.task_id, None)

    async def cancel(self, task_id: str) -> bool:
        control = self._controls.get(task_id)
        if control is None:
            return False
        control.cancel()
        return True

    async def close_repl(self) -> None:
        repl, self._repl = self._repl, None
        if repl is not None:
            with trio.CancelScope(shield=True):
                await repl.aclose()

    async def aclose(self) -> None:
        try:
            await self.close_repl()
        finally:
            backends, self._backends = self._backends, None
            if backends is not None:
                await backends.aclose()


async def _run_local(
    request: TaskRequest,
    backends: Backends,
    repl: ReplExecutor,
    progress: ProgressSink,
    control: TaskControl,
) -> ExecutionResult:
    """Drive the RLM runner for one task; progress is relayed in order, none dropped."""
    from kowalski_node.runtime.rlm_runner import run_rlm

    send, receive = trio.open_memory_channel[ProgressUpdate](math.inf)

    def on_event(event: ProgressEvent) -> None:
        send.send_nowait(event)

    async def relay() -> None:
        async with receive:
            async for update in receive:
                await progress(update)

    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(relay)
        try:
            result = await run_rlm(
                request.prompt,
                request.context,
                root=backends.root,
                sub=backends.sub,
                repl=repl,
                config=rlm_config_from(request.settings, backends),
                task_id=request.task_id,
                on_progress=on_event,
                control=control,
                trajectory_dir=request.settings.paths.trajectories_dir,
            )
        except Exception as exc:  # noqa: BLE001 - re-raised below, outside the nursery's exception group
            failure = exc
        finally:
            send.close()
    if failure is not None:
        raise failure
    return result


class NodeExecutor:
    """Submits tasks through the local node's HTTP API (see docs/api.md for the contract).

    A `TaskExecutor` over `client.NodeClient` (one HTTP client, one SSE parser). It really
    connects on every task, so it starts working as soon as a node serves the API; until
    then a refused connection becomes `NodeUnreachable` naming the URL.
    """

    name = "network"

    def __init__(
        self,
        api_url: str,
        token: str | None = None,
        *,
        connect_timeout_s: float = 5.0,
        poll_interval_s: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.token = token
        self.connect_timeout_s = connect_timeout_s
        self.poll_interval_s = poll_interval_s
        self._transport = transport
        self._running: set[str] = set()

    def _client(self) -> NodeClient:
        # "" (not None): no token means no Authorization header, not the settings' token.
        return NodeClient(
            self.api_url,
            self.token or "",
            timeout=30.0,
            connect_timeout=self.connect_timeout_s,
            transport=self._transport,
        )

    def _failure(self, exc: KowalskiError, what: str) -> TaskError:
        """The client's error as this executor's: unreachable, token refused, or refused."""
        if isinstance(exc, ApiUnreachable):
            return NodeUnreachable(self.api_url, exc.detail)
        if isinstance(exc, ApiError):
            if exc.status in (401, 403):
                return TaskError(
                    f"the node at {self.api_url} rejected the API token while trying to {what} "
                    f"(HTTP {exc.status}); set node.api.token / ClusterConfig(api_token=...)"
                )
            return TaskError(
                f"the node at {self.api_url} could not {what}: HTTP {exc.status}: "
                f"{exc.message[:300]}"
            )
        if isinstance(exc, TaskError):
            return exc
        return NodeUnreachable(self.api_url, str(exc))

    async def run(self, request: TaskRequest, progress: ProgressSink) -> ExecutionResult:
        rlm = request.settings.rlm
        llm = request.settings.llm
        async with self._client() as client:
            try:
                accepted = await client.submit(
                    request.prompt,
                    request.context,
                    task_id=request.task_id,
                    model=llm.model,
                    sub_model=llm.sub_model,
                    rlm=explicit_rlm_limits(request.settings),
                )
            except KowalskiError as exc:
                raise self._failure(exc, "accept the task") from exc
            task_id = accepted.task_id or request.task_id
            self._running.add(task_id)
            try:
                result = await self._follow_events(client, task_id, progress)
                if result is None:
                    deadline = trio.current_time() + rlm.time_budget_s + 60.0
                    result = await self._poll(client, task_id, deadline)
                return result
            finally:
                self._running.discard(task_id)

    async def _follow_events(
        self, client: NodeClient, task_id: str, progress: ProgressSink
    ) -> ExecutionResult | None:
        """Relay SSE progress; the `done` event carries the result. None: stream ended early."""
        done: list[ExecutionResult] = []

        async def handle(event: str, body: dict[str, Any]) -> bool:
            if event == "progress":
                try:
                    update = ProgressUpdate.from_dict(body)
                except (TypeError, ValueError) as exc:
                    log.warning(
                        "ignoring a malformed progress event from %s: %s", self.api_url, exc
                    )
                    return False
                await progress(update)
            elif event == "done":
                done.append(self._result_of(body))
                return True
            elif event == "error":
                # The node could not stream (it says why); the caller falls back to polling.
                log.warning("event stream error from %s: %.300s", self.api_url, body)
            return False

        try:
            await client.stream_events(task_id, handle)
        except KowalskiError as exc:
            log.warning("event stream of %s broke (%s); polling instead", task_id, exc)
        return done[0] if done else None

    def _result_of(self, body: Mapping[str, Any]) -> ExecutionResult:
        result = body.get("result")
        if isinstance(result, dict):
            return ExecutionResult.from_dict(result, executed_on="network")
        status = str(body.get("status", "failed"))
        reason = "cancelled" if status == "cancelled" else "error"
        message = str(body.get("error") or f"task ended with status {status}")
        return ExecutionResult.failed(str(body.get("task_id")), message, reason)

    async def _poll(self, client: NodeClient, task_id: str, deadline: float) -> ExecutionResult:
        delay = self.poll_interval_s
        while trio.current_time() < deadline:
            try:
                view = await client.get_task(task_id)
            except KowalskiError as exc:
                raise self._failure(exc, f"report task {task_id}") from exc
            if view.status.final:
                return self._result_of(view.model_dump(mode="json"))
            await trio.sleep(delay)
            delay = min(delay * 1.5, 5.0)
        raise TaskError(f"task {task_id} did not finish on the node at {self.api_url} in time")

    async def cancel(self, task_id: str) -> bool:
        async with self._client() as client:
            try:
                await client.cancel(task_id)
            except ApiError as exc:
                if exc.status == 404:
                    return False
                raise self._failure(exc, f"cancel task {task_id}") from exc
            except KowalskiError as exc:
                raise self._failure(exc, f"cancel task {task_id}") from exc
        return True

    async def aclose(self) -> None:
        return None


def explicit_rlm_limits(settings: Settings) -> dict[str, Any]:
    """The `rlm.*` limits some layer set (file, environment, argument) for a mesh task.

    Defaults are left out on purpose: the node applies its own configuration to them, and
    this client's backend-dependent defaults (the builtin model's short budget) say
    nothing about the model the node will use.
    """
    explicit = settings.explicit_keys()
    return {
        key: value
        for key, value in settings.rlm.model_dump(mode="json").items()
        if f"rlm.{key}" in explicit
    }


# ---------------------------------------------------------------------------------------
# Progress fan-out
# ---------------------------------------------------------------------------------------


class ProgressSubscription:
    """An async iterator of `ProgressUpdate`s; ends when closed or the RLM is closed.

    Delivery never blocks a task: when the buffer is full the update is dropped and
    counted in `dropped`. With `task_id`, only that task's updates arrive and the
    iterator ends after its final ("done") update.
    """

    def __init__(self, owner: KowalskiRLM, task_id: str | None, buffer: int) -> None:
        self._owner = owner
        self.task_id = task_id
        self._send, self._recv = trio.open_memory_channel[ProgressUpdate](buffer)
        self.dropped = 0

    def _offer(self, update: ProgressUpdate) -> None:
        if self.task_id is not None and update.task_id != self.task_id:
            return
        try:
            self._send.send_nowait(update)
        except trio.WouldBlock:
            self.dropped += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.close()
            return
        if self.task_id is not None and update.done:
            self.close()

    def close(self) -> None:
        portal = self._owner._portal_obj
        if portal is not None and portal.alive and threading.get_ident() != portal.thread_id:
            portal.run_sync_soon(self._close_now)  # the channel belongs to the trio thread
        else:
            self._close_now()
        self._owner._subscribers.discard(self)

    def _close_now(self) -> None:
        self._send.close()

    def __aiter__(self) -> AsyncIterator[ProgressUpdate]:
        return self

    async def __anext__(self) -> ProgressUpdate:
        try:
            if _async_library() == "asyncio":
                return cast(ProgressUpdate, await self._owner._portal().call(self._recv.receive))
            return await self._recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------
# KowalskiRLM
# ---------------------------------------------------------------------------------------


class KowalskiRLM:
    """Runs Recursive Language Model tasks locally or on the mesh.

    Use `async with KowalskiRLM(...) as rlm:` to keep sandbox workers warm across tasks;
    without it every `execute` starts and stops its own workers. `execute_sync` runs a task
    from plain (non-async) code.
    """

    def __init__(
        self,
        model: str | None = None,
        cluster: ClusterConfig | None = None,
        *,
        backend: str | None = None,
        sub_model: str | None = None,
        sub_backend: str | None = None,
        max_iterations: int | None = None,
        batch: BatchConfig | None = None,
        config_path: str | Path | None = None,
        settings: Settings | None = None,
        overrides: Mapping[str, Any] | None = None,
        executor: TaskExecutor | None = None,
    ) -> None:
        """Keyword style. Explicit arguments beat `overrides`, which beat env and the file."""
        if cluster is not None and not isinstance(cluster, ClusterConfig):
            raise ValueError("cluster must be a ClusterConfig")
        if batch is not None and not isinstance(batch, BatchConfig):
            raise ValueError("batch must be a BatchConfig")
        if max_iterations is not None and (
            not isinstance(max_iterations, int)
            or isinstance(max_iterations, bool)
            or max_iterations < 1
        ):
            raise ValueError(f"max_iterations must be an integer >= 1, got {max_iterations!r}")
        if backend is not None:
            parse_backend_spec(backend)
        if sub_backend is not None:
            parse_backend_spec(sub_backend)
        merged: dict[str, Any] = dict(overrides or {})
        explicit = {
            "llm.model": model,
            "llm.backend": backend,
            "llm.sub_model": sub_model,
            "llm.sub_backend": sub_backend,
            "rlm.max_iterations": max_iterations,
        }
        merged.update({k: v for k, v in explicit.items() if v is not None})
        if settings is None:
            settings = load_settings(config_path, overrides=merged)
        elif merged:
            settings = settings.with_overrides(merged)
        self.cluster = cluster or ClusterConfig()
        if self.cluster.sharding_strategy is not ShardingStrategy.AUTO:
            # read by the node's pipeline (docs/inference.md); TENSOR is refused there
            settings = settings.with_overrides(
                {"inference.sharding": str(self.cluster.sharding_strategy)}
            )
        self.settings = settings
        self.batch = batch or BatchConfig()
        self._executor = executor
        self._local: LocalExecutor | None = None
        self._network: NodeExecutor | None = None
        self._subscribers: set[ProgressSubscription] = set()
        self._running: dict[str, TaskExecutor] = {}
        self._pending_cancel: set[str] = set()
        self._queued: set[str] = set()
        self._closed = False
        self._portal_obj: _TrioPortal | None = None
        self._portal_lock = threading.Lock()

    def _portal(self) -> _TrioPortal:
        """The trio thread serving this instance's asyncio callers (started on first use)."""
        with self._portal_lock:
            if self._portal_obj is None or not self._portal_obj.alive:
                portal = _TrioPortal()
                portal.start()
                self._portal_obj = portal
            return self._portal_obj

    # -- construction -------------------------------------------------------------

    @classmethod
    def new(cls) -> KowalskiRLMBuilder:
        """Builder style: `KowalskiRLM.new().with_model(...).build()`."""
        return KowalskiRLMBuilder()

    def __repr__(self) -> str:
        llm = self.settings.llm
        return (
            f"KowalskiRLM(backend={llm.backend!r}, model={llm.model!r}, "
            f"device_filter={str(self.cluster.device_filter)!r})"
        )

    @property
    def api_url(self) -> str:
        if self.cluster.api_url:
            from kowalski_node.addresses import api_url

            return api_url(self.cluster.api_url)
        api = self.settings.node.api
        host = "127.0.0.1" if api.host in ("0.0.0.0", "::", "") else api.host  # noqa: S104 - a comparison: a wildcard host is mapped to loopback for clients
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{api.port}"

    def local_executor(self) -> LocalExecutor:
        if self._local is None:
            self._local = LocalExecutor(self.settings)
        return self._local

    def network_executor(self) -> NodeExecutor:
        if self._network is None:
            self._network = NodeExecutor(
                self.api_url,
                self.cluster.api_token or self.settings.node.api.token,
                connect_timeout_s=self.cluster.network_discovery_timeout_s,
            )
        return self._network

    # -- lifecycle ----------------------------------------------------------------

    def _warmable(self) -> LocalExecutor | None:
        """The local executor whose sandbox pool `async with` keeps warm, if tasks run here."""
        if isinstance(self._executor, LocalExecutor):
            return self._executor
        if self._executor is None and self.cluster.device_filter is DeviceFilter.LOCAL:
            return self.local_executor()
        return None

    @_bridged
    async def __aenter__(self) -> Self:
        local = self._warmable()
        if local is not None:
            await local.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop sandbox workers, release model backends and end progress subscriptions."""
        await self._aclose_bridged()
        portal, self._portal_obj = self._portal_obj, None
        if portal is not None and _async_library() == "asyncio":
            await asyncio.to_thread(portal.stop)

    @_bridged
    async def _aclose_bridged(self) -> None:
        self._closed = True
        for sub in list(self._subscribers):
            sub.close()
        for executor in (self._local, self._network, self._executor):
            if executor is not None:
                await executor.aclose()
        self._local = None

    # -- progress -----------------------------------------------------------------

    def subscribe_to_progress(
        self, task_id: str | None = None, *, buffer: int = 1024
    ) -> ProgressSubscription:
        """An async iterator of updates for every task (or only `task_id`)."""
        if buffer < 1:
            raise ValueError("buffer must be >= 1")
        sub = ProgressSubscription(self, task_id, buffer)
        self._subscribers.add(sub)
        return sub

    def _sink(self, callback: ProgressCallback | None) -> ProgressSink:
        async def sink(update: ProgressUpdate) -> None:
            if callback is not None:
                await _call(callback, update)
            for sub in list(self._subscribers):
                sub._offer(update)

        return sink

    # -- execution ----------------------------------------------------------------

    def _request(self, prompt: object, context: object, task_id: str | None) -> TaskRequest:
        if self._closed:
            raise TaskError("this KowalskiRLM has been closed")
        if task_id is not None and (
            not isinstance(task_id, str) or not TASK_ID_RE.fullmatch(task_id)
        ):
            raise ValueError(
                f"task_id must be 1-128 characters of letters, digits and ._:- "
                f"(starting with a letter or digit), got {task_id!r}"
            )
        return TaskRequest(
            task_id=task_id or new_task_id(),
            prompt=validate_prompt(prompt),
            context=normalise_context(context),
            settings=self.settings,
        )

    async def _pick_executor(self) -> TaskExecutor:
        if self._executor is not None:
            return self._executor
        mode = self.cluster.device_filter
        if mode is DeviceFilter.LOCAL:
            return self.local_executor()
        if mode is DeviceFilter.NETWORK:
            return self.network_executor()
        if await _reachable(self.api_url, self.cluster.network_discovery_timeout_s):
            return self.network_executor()
        log.info("no node at %s; running locally (DeviceFilter.ALL)", self.api_url)
        return self.local_executor()

    @_bridged
    async def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        seed: int | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        """One plain generation on the cluster, pipelined across peers as
        `cluster.sharding_strategy` says (docs/inference.md); the result as JSON data."""
        from kowalski_node.client import NodeClient
        from kowalski_node.inference.core import decide_sharding

        strategy = str(self.cluster.sharding_strategy)
        decide_sharding(strategy, 0, 0)  # TENSOR: refused here, naming pipeline
        body: dict[str, Any] = {
            "messages": [["user", validate_prompt(prompt)]],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "sharding": strategy,
        }
        if seed is not None:
            body["seed"] = seed
        if model is not None:
            body["model"] = model
        async with NodeClient(self.api_url, self.cluster.api_token, timeout=600.0) as client:
            resp = await client._request("POST", "/v1/generate", json=body)
        return dict(resp.json())

    @_bridged
    async def execute(
        self,
        prompt: str,
        context: Any = None,
        *,
        task_id: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> ExecutionResult:
        """Run one task to its end. Limits and cancellation give a result whose
        `stop_reason` says so; an unusable setup (no model, no node) raises."""
        request = self._request(prompt, context, task_id)
        return await self._execute(request, on_progress)

    async def _execute(
        self, request: TaskRequest, on_progress: ProgressCallback | None
    ) -> ExecutionResult:
        if request.task_id in self._pending_cancel:
            self._pending_cancel.discard(request.task_id)
            return ExecutionResult.failed(request.task_id, "cancelled before start", "cancelled")
        if request.task_id in self._running:
            raise TaskError(f"task {request.task_id!r} is already running")
        executor = await self._pick_executor()
        self._running[request.task_id] = executor
        try:
            return await executor.run(request, self._sink(on_progress))
        finally:
            self._running.pop(request.task_id, None)

    @_bridged
    async def execute_with_progress(
        self, prompt: str, context: Any, callback: ProgressCallback, *, task_id: str | None = None
    ) -> ExecutionResult:
        """`execute` with a callback (sync or async) receiving every `ProgressUpdate`."""
        if not callable(callback):
            raise ValueError("callback must be callable")
        return await self.execute(prompt, context, task_id=task_id, on_progress=callback)

    @_bridged
    async def cancel_task(self, task_id: str) -> bool:
        """Stop a running task (its `execute` returns with stop_reason "cancelled").

        A task still queued in `execute_batch` is cancelled before it starts. Returns False
        when no such task is running or queued here.
        """
        executor = self._running.get(task_id)
        if executor is not None:
            return await executor.cancel(task_id)
        if task_id in self._queued:
            self._pending_cancel.add(task_id)
            return True
        return False

    @_bridged
    async def execute_batch(
        self,
        tasks: Iterable[Task | str],
        on_completion: CompletionCallback | None = None,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> list[ExecutionResult]:
        """Run many tasks, at most `BatchConfig.max_parallel_tasks` at once.

        Results come back in input order. One failing task yields a failed result in its
        slot (`error` set) and does not stop the others.
        """
        items = [Task(prompt=t) if isinstance(t, str) else t for t in tasks]
        for item in items:
            if not isinstance(item, Task):
                raise ValueError(f"execute_batch takes Task objects or prompts, got {item!r}")
        requests = [self._request(t.prompt, t.context, t.task_id) for t in items]
        ids = [r.task_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("task ids in a batch must be unique")
        order = list(range(len(items)))
        if self.batch.queue_strategy is QueueStrategy.PRIORITY_FIFO:
            order.sort(key=lambda i: -items[i].priority)
        results: list[ExecutionResult | None] = [None] * len(items)
        queue: list[int] = list(reversed(order))  # pop() takes the next task
        self._queued = self._queued | set(ids)
        started = time.perf_counter()
        completed = 0
        in_flight = 0

        async def worker() -> None:
            nonlocal completed, in_flight
            while queue:
                index = queue.pop()
                request = requests[index]
                self._queued.discard(request.task_id)
                in_flight += 1
                try:
                    result = await self._execute(request, on_progress)
                except KowalskiError as exc:
                    result = ExecutionResult.failed(request.task_id, str(exc))
                except ValueError as exc:
                    result = ExecutionResult.failed(request.task_id, f"invalid task: {exc}")
                finally:
                    in_flight -= 1
                results[index] = result
                completed += 1
                if on_completion is not None:
                    elapsed = time.perf_counter() - started
                    await _call(
                        on_completion,
                        BatchCompletion(
                            task_id=request.task_id,
                            result=result,
                            completed=completed,
                            total=len(items),
                            queue_depth=len(queue),
                            in_flight=in_flight,
                            elapsed_s=elapsed,
                            throughput=completed / elapsed if elapsed > 0 else 0.0,
                        ),
                    )

        # One sandbox pool for the whole batch (unless `async with` keeps one open already),
        # started only when some task runs code: a task answered without code costs no
        # worker process, and one that runs code takes a warm worker from the pool.
        local = self._warmable()
        pooled_here = local is not None and not local.is_open
        try:
            if pooled_here:
                assert local is not None
                # Each task that runs code takes a worker of its own; with as many warm
                # ones as tasks in flight (up to BATCH_POOL_MAX), few wait for a start.
                wanted = min(self.batch.max_parallel_tasks, len(items), BATCH_POOL_MAX)
                await local.open(lazy=True, pool_size=wanted)
            async with trio.open_nursery() as nursery:
                for _ in range(min(self.batch.max_parallel_tasks, len(items))):
                    nursery.start_soon(worker)
        finally:
            self._queued = self._queued - set(ids)
            if pooled_here:
                assert local is not None
                await local.close_repl()
        return [r for r in results if r is not None]

    # -- synchronous helpers ----------------------------------------------------------

    def execute_sync(
        self,
        prompt: str,
        context: Any = None,
        *,
        task_id: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> ExecutionResult:
        """Blocking `execute` for scripts; must not be called from inside an async loop."""
        _refuse_inside_trio("execute_sync")

        async def main() -> ExecutionResult:
            # Outside `async with`, the local executor opens and closes its own workers.
            return await self.execute(prompt, context, task_id=task_id, on_progress=on_progress)

        return cast(ExecutionResult, _trio_run(main))

    def execute_batch_sync(
        self, tasks: Iterable[Task | str], on_completion: CompletionCallback | None = None
    ) -> list[ExecutionResult]:
        """Blocking `execute_batch` (one shared sandbox pool for the whole batch)."""
        _refuse_inside_trio("execute_batch_sync")
        task_list = list(tasks)

        async def main() -> list[ExecutionResult]:
            return await self.execute_batch(task_list, on_completion)

        return cast(list[ExecutionResult], _trio_run(main))

    def close_sync(self) -> None:
        """Blocking `aclose` for scripts."""
        _refuse_inside_trio("close_sync")
        _trio_run(self.aclose)


def plain_exception(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a caller should see from a trio exception group.

    Ctrl-C inside nurseries arrives grouped: it becomes a bare KeyboardInterrupt. A group
    holding a single error becomes that error; anything else stays the group.
    """
    interrupted, _ = group.split(KeyboardInterrupt)
    if interrupted is not None:
        return KeyboardInterrupt()
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else group


def _trio_run(fn: Callable[[], Awaitable[Any]]) -> Any:
    """`trio.run` for the synchronous helpers, with exception groups flattened."""
    try:
        return trio.run(fn)
    except BaseExceptionGroup as group:
        raise plain_exception(group) from None


def _refuse_inside_trio(name: str) -> None:
    """The sync helpers block: refuse them inside a running trio or asyncio loop."""
    inside = True
    try:
        trio.lowlevel.current_trio_token()
    except RuntimeError:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            inside = False
    if inside:
        raise RuntimeError(f"{name}() blocks; inside async code use `await rlm.execute(...)`")


async def _reachable(api_url: str, timeout_s: float) -> bool:
    """Whether something accepts HTTP connections at the node API address."""
    async with NodeClient(api_url, "", timeout=timeout_s, connect_timeout=timeout_s) as client:
        return await client.answers()


class KowalskiRLMBuilder:
    """Fluent construction; `build()` validates everything at once and raises ConfigError."""

    def __init__(self) -> None:
        self._overrides: dict[str, Any] = {}
        self._cluster = ClusterConfig()
        self._batch: BatchConfig | None = None
        self._config_path: str | Path | None = None
        self._settings: Settings | None = None
        self._executor: TaskExecutor | None = None

    def _set(self, key: str, value: Any) -> Self:
        self._overrides[key] = value
        return self

    def with_model(self, model: str) -> Self:
        return self._set("llm.model", _non_empty("model", model))

    def with_sub_model(self, model: str) -> Self:
        """A (smaller) model for `llm_query` sub-calls."""
        return self._set("llm.sub_model", _non_empty("sub_model", model))

    def with_backend(self, spec: str) -> Self:
        """builtin | ollama | openai | scripted:PATH (or `ollama:MODEL`-style sugar)."""
        parse_backend_spec(spec)
        return self._set("llm.backend", spec)

    def with_sub_backend(self, spec: str) -> Self:
        parse_backend_spec(spec)
        return self._set("llm.sub_backend", spec)

    def with_device_filter(self, device_filter: DeviceFilter | str) -> Self:
        self._cluster = replace(self._cluster, device_filter=DeviceFilter.parse(device_filter))
        return self

    def with_sharding(self, strategy: ShardingStrategy | str) -> Self:
        self._cluster = replace(self._cluster, sharding_strategy=ShardingStrategy.parse(strategy))
        return self

    def with_cluster(self, cluster: ClusterConfig) -> Self:
        self._cluster = cluster
        return self

    def with_batch_mode(self, batch: BatchConfig) -> Self:
        if not isinstance(batch, BatchConfig):
            raise ValueError("with_batch_mode takes a BatchConfig")
        self._batch = batch
        return self

    def with_max_iterations(self, n: int) -> Self:
        return self._set("rlm.max_iterations", _positive_int("max_iterations", n))

    def with_max_depth(self, n: int) -> Self:
        """1 = `llm_query` is a plain model call; 2+ = sub-calls are RLM runs themselves."""
        return self._set("rlm.max_depth", _positive_int("max_depth", n))

    def with_time_budget(self, seconds: float) -> Self:
        return self._set("rlm.time_budget_s", _positive_number("time_budget_s", seconds))

    def with_block_timeout(self, seconds: float) -> Self:
        return self._set("rlm.block_timeout_s", _positive_number("block_timeout_s", seconds))

    def with_token_budget(self, tokens: int) -> Self:
        return self._set("rlm.token_budget", _positive_int("token_budget", tokens))

    def with_trajectory_dir(self, path: str | Path) -> Self:
        return self._set("paths.trajectories", Path(path))

    def with_setting(self, key: str, value: Any) -> Self:
        """Any dotted settings key, e.g. `with_setting("sandbox.memory_mb", 512)`."""
        return self._set(key, value)

    def with_config(self, path: str | Path) -> Self:
        self._config_path = path
        return self

    def with_settings(self, settings: Settings) -> Self:
        self._settings = settings
        return self

    def with_executor(self, executor: TaskExecutor) -> Self:
        """Run tasks through a custom executor (tests, embedding in the node)."""
        self._executor = executor
        return self

    def build(self) -> KowalskiRLM:
        return KowalskiRLM(
            cluster=self._cluster,
            batch=self._batch,
            config_path=self._config_path,
            settings=self._settings,
            overrides=self._overrides,
            executor=self._executor,
        )


def _non_empty(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    return value


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _positive_number(name: str, value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def run(
    prompt: str,
    context: Any = None,
    *,
    model: str | None = None,
    backend: str | None = None,
    max_iterations: int | None = None,
    config_path: str | Path | None = None,
    device_filter: DeviceFilter | str = DeviceFilter.LOCAL,
    on_progress: ProgressCallback | None = None,
    **overrides: Any,
) -> ExecutionResult:
    """One task from plain code: `kowalski_node.run("Summarise", context=text)`.

    Extra keyword arguments are dotted settings keys with `__` for the dot
    (`rlm__block_timeout_s=5`).
    """
    dotted = {key.replace("__", "."): value for key, value in overrides.items()}
    rlm = KowalskiRLM(
        model=model,
        backend=backend,
        max_iterations=max_iterations,
        config_path=config_path,
        cluster=ClusterConfig(device_filter=DeviceFilter.parse(device_filter)),
        overrides=dotted,
    )
    _refuse_inside_trio("run")

    async def main() -> ExecutionResult:
        try:
            return await rlm.execute(prompt, context, on_progress=on_progress)
        finally:
            await rlm.aclose()

    return cast(ExecutionResult, _trio_run(main))


__all__ = [
    "BatchCompletion",
    "BatchConfig",
    "BlockResult",
    "ClusterConfig",
    "ConfigError",
    "DeviceFilter",
    "ExecutionResult",
    "KowalskiRLM",
    "KowalskiRLMBuilder",
    "LocalExecutor",
    "NodeExecutor",
    "ProgressSubscription",
    "ProgressUpdate",
    "QueueStrategy",
    "ShardingStrategy",
    "Task",
    "TaskExecutor",
    "TaskRequest",
    "run",
]
