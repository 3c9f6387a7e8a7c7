"""`LlamaCppBackend`: llama.cpp in-process, through the prebuilt `xllamacpp` wheel.

Why this backend: on the same GGUF, llama.cpp decodes about 5x faster than the NumPy engine
(it reads the 4/5-bit weights directly), and `xllamacpp` ships it prebuilt as a 34 MB
manylinux wheel, so nobody compiles anything. It runs llama.cpp's own server in this
process (`xllamacpp.Server`); requests go straight to the server's handlers, not over HTTP.
The NumPy engine (`llm.builtin`) stays for layer ranges, which llama.cpp cannot run.

What it does for the RLM loop:
- Prefix reuse. The server keeps each slot's tokens and keys/values and, with
  `cache_prompt`, prefills only what follows the longest common prefix with the slot's last
  prompt. A slot is chosen by prompt similarity, and prompts evicted from a slot are kept in
  a host-memory prompt cache (`cache_ram_mib`), so a root turn that follows sub-calls still
  finds its conversation. `LlmResponse.extra["reused_tokens"]` says how many prompt tokens
  were not prefilled.
- Threads follow the cores that are free: `default_threads()` is the usable cores (CPU
  affinity and cgroup quota) minus one, at least one. llama.cpp's OpenMP threads spin while
  they wait for each other: with 2 threads on a 2-core machine where another process holds
  a core, decode fell to 0.4-0.8 tok/s (issue 9). `llm.llamacpp_threads` overrides it.
  `OMP_WAIT_POLICY=PASSIVE` is set (unless the environment says otherwise) so that even an
  oversubscribed count degrades gently instead of collapsing.
- The chat template comes from the GGUF (Jinja; ChatML for Qwen and SmolLM2).
- Greedy by default (temperature 0); temperature, top_p, stop, seed and max_tokens are
  passed through; top_k and min_p are switched off so top_p means what it says.
- One `xllamacpp.Server` per (model, settings) per process, loaded once in a worker thread
  and shared by every backend object. Each request runs in its own worker thread and
  streams tokens back through a trio channel; at most `parallel` requests are in flight
  (the server's slots decode them together), the others wait in trio where cancellation
  reaches them. A cancelled request stops at its next token.

The server also opens an HTTP listener on a free loopback port (xllamacpp always does);
it is given a random API key that nothing else knows, so no other local process can use it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio

from kowalski_node.errors import LlmError
from kowalski_node.llm.base import LlmRequest, LlmResponse
from kowalski_node.llm.llamacpp_prefix import (
    PREFIX_DIRNAME,
    PrefixOutcome,
    PrefixState,
    ensure_prefix,
)
from kowalski_node.llm.models import (
    DEFAULT_MODEL,
    display_name,
    models_home,
    pulled_model_names,
    resolve_model_path,
)

log = logging.getLogger(__name__)

DEFAULT_CONTEXT_TOKENS = 16384
DEFAULT_PARALLEL = 2
# Host memory for prompts evicted from a slot (llama.cpp's default is 8 GiB).
DEFAULT_CACHE_RAM_MIB = 512

# llama.cpp's threads run this much nicer than the node: see `start_server_lowered`.
DEFAULT_NICE = 10

FinishReason = Literal["stop", "length", "cancelled"]
# trio-typing's stubs (pulled in by py-libp2p) predate `abandon_on_cancel`; trio 0.35 has it.
_run_in_thread: Any = trio.to_thread.run_sync


def cores_from(affinity: int, cpu_max: str | None) -> int:
    """Usable cores from an affinity-mask size and a cgroup v2 `cpu.max` line ("max 100000"
    or "QUOTA PERIOD"); a quota of 1.5 cores counts as 2."""
    cores = max(1, affinity)
    if cpu_max:
        fields = cpu_max.split()
        if len(fields) >= 2 and fields[0] != "max":
            with contextlib.suppress(ValueError, ZeroDivisionError):
                cores = min(cores, max(1, math.ceil(int(fields[0]) / int(fields[1]))))
    return cores


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask, capped by a cgroup v2 quota."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    try:
        cpu_max: str | None = Path("/sys/fs/cgroup/cpu.max").read_text()
    except OSError:
        cpu_max = None
    return cores_from(affinity, cpu_max)


def default_threads(cores: int | None = None) -> int:
    """Cores minus one (left to the node, the sandbox and the rest), at least one."""
    return max(1, (usable_cores() if cores is None else cores) - 1)


def resolve_threads(setting: int | None) -> int:
    """`llm.llamacpp_threads`: 0 or None means `default_threads()`; else the number given."""
    if setting is None or setting == 0:
        return default_threads()
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
        raise ValueError(f"llamacpp threads must be an integer >= 0, got {setting!r}")
    return setting


@dataclass(frozen=True)
class ServerConfig:
    """Everything that shapes one loaded llama.cpp server; equal configs share a server."""

    path: Path
    threads: int
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    parallel: int = DEFAULT_PARALLEL
    extra_bufts: bool = False
    cache_ram_mib: int = DEFAULT_CACHE_RAM_MIB
    # Prefill (batches of prompt tokens) threads; 0 = every usable core. See `batch_threads`.
    batch_threads: int = 0
    # Where saved system-prompt prefixes live (llamacpp_prefix); None turns them off.
    prefix_dir: Path | None = None
    # How much lower than the node's own the priority of llama.cpp's threads is; see
    # `start_server_lowered`.
    nice: int = DEFAULT_NICE


@dataclass
class LoadedModel:
    """A running llama.cpp server and what we know about it."""

    config: ServerConfig
    server: Any  # xllamacpp.Server (the wheel ships no type hints)
    name: str
    load_s: float
    prefix: PrefixState | None = None
    # The loopback listener's key: only this process knows it (bench/devset.py points the
    # reference `rlms` library at the same server through it).
    api_key: str = ""


# llama.cpp's CPU backend runs on OpenMP (libgomp). Its threads spin between graph runs by
# default, which is what collapses decode when they outnumber the free cores. PASSIVE makes
# them sleep instead; it must be in the environment before libgomp loads with the wheel.
OMP_WAIT_POLICY_DEFAULT = "PASSIVE"


def _import_xllamacpp() -> Any:
    if OMP_WAIT_POLICY_DEFAULT and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = OMP_WAIT_POLICY_DEFAULT
    try:
        import xllamacpp
    except ImportError as exc:  # pragma: no cover - it is a dependency
        raise LlmError(
            "the llamacpp backend needs the `xllamacpp` package (a prebuilt llama.cpp wheel): "
            f"pip install xllamacpp ({exc})"
        ) from exc
    return xllamacpp


def batch_threads(setting: int, decode_threads: int) -> int:
    """Prefill threads: `setting`, or (0) every usable core and never fewer than decode's.

    Prefill is compute-bound and comes in short bursts, so it takes the core that decode
    leaves to the node: Qwen2.5-Coder-0.5B prefilled 56 tok/s on one thread and 106 tok/s
    on two on this 2-core machine (bench/llamacpp.py, quiet). With OMP_WAIT_POLICY=PASSIVE
    an oversubscribed burst slows down instead of collapsing.
    """
    if setting < 0:
        raise ValueError(f"llamacpp batch threads must be >= 0, got {setting}")
    return max(decode_threads, setting or usable_cores())


def start_server(config: ServerConfig, *, verbose: bool = False, api_key: str | None = None) -> Any:
    """Load the GGUF into a new in-process llama.cpp server (blocking: about 1-2 s)."""
    xl = _import_xllamacpp()
    params = xl.CommonParams()
    params.model.path = str(config.path)
    params.n_ctx = config.context_tokens
    params.n_parallel = config.parallel
    params.kv_unified = True  # the slots share one KV pool of n_ctx; any slot may use it all
    params.cache_prompt = True
    params.cache_ram_mib = config.cache_ram_mib
    params.ctx_shift = False  # a prompt that does not fit is an error, not silently cut
    params.cpuparams.n_threads = config.threads
    params.cpuparams_batch.n_threads = batch_threads(config.batch_threads, config.threads)
    # llama.cpp's "extra buffer types" repack weights for AMX/AVX kernels; a native build
    # crashed in the AMX repack path on this kind of machine, so it is off unless asked for.
    params.no_extra_bufts = not config.extra_bufts
    params.warmup = False
    params.verbosity = 3 if verbose else -1
    params.n_threads_http = 1
    # The loopback listener serves nobody else: only this process knows the key.
    params.api_keys = [api_key or secrets.token_hex(24)]
    if config.prefix_dir is not None:
        # Slot save/restore, used by llamacpp_prefix; llama.cpp joins path and file name as
        # strings, hence the trailing separator.
        params.endpoint_slots = True
        params.slot_save_path = str(config.prefix_dir) + os.sep
    params.endpoint_metrics = False
    with contextlib.suppress(AttributeError):
        params.ui = False
    try:
        return xl.Server(params)
    except Exception as exc:  # the wheel raises RuntimeError("Failed to init server ...")
        raise LlmError(
            f"llama.cpp could not load {config.path}: {exc} (is it a GGUF file that "
            f"llama.cpp supports? context {config.context_tokens} tokens, "
            f"{config.threads} thread(s))"
        ) from exc


def start_server_lowered(
    config: ServerConfig, *, verbose: bool = False, api_key: str | None = None
) -> Any:
    """`start_server` from a fresh thread whose priority is lowered by `config.nice` first.

    Why: inference must never starve the node's control plane. On Linux a thread's nice
    value is inherited by the threads it creates, and llama.cpp's server loop and its
    OpenMP workers all descend from the thread that builds the server. With them at the
    node's own priority, a 3-node demo on 2 busy cores saw every node declare the others
    dead 11-38 times in two minutes while llama.cpp prefilled (SWIM probes time out) and
    leases moved 1-3 times per task. A lowered llama.cpp only takes the CPU the node,
    its peers and the sandbox leave idle. Only this new thread is lowered: a pooled
    worker thread would carry the lower priority into unrelated work.
    """
    if config.nice <= 0:
        return start_server(config, verbose=verbose, api_key=api_key)
    outcome: list[Any] = []

    def build() -> None:
        with contextlib.suppress(OSError, AttributeError):
            tid = threading.get_native_id()
            current = os.getpriority(os.PRIO_PROCESS, tid)
            os.setpriority(os.PRIO_PROCESS, tid, min(19, current + config.nice))
        try:
            outcome.append(start_server(config, verbose=verbose, api_key=api_key))
        except BaseException as exc:
            outcome.append(exc)

    builder = threading.Thread(target=build, name="llamacpp-load", daemon=True)
    builder.start()
    builder.join()
    result = outcome[0] if outcome else LlmError("llama.cpp server start did not finish")
    if isinstance(result, BaseException):
        raise result
    return result


_servers: dict[ServerConfig, LoadedModel] = {}
_servers_lock = threading.Lock()


def load_shared(
    config: ServerConfig, models_dir: str | os.PathLike[str] | None = None
) -> LoadedModel:
    """The process-wide server for `config`, started on first use (blocking; thread-safe)."""
    with _servers_lock:
        found = _servers.get(config)
        if found is not None:
            return found
        started = time.perf_counter()
        api_key = secrets.token_hex(24)
        if config.prefix_dir is not None:
            config.prefix_dir.mkdir(parents=True, exist_ok=True)
        server = start_server_lowered(
            config, verbose=log.isEnabledFor(logging.DEBUG), api_key=api_key
        )
        loaded = LoadedModel(
            config=config,
            server=server,
            name=display_name(config.path, models_dir),
            load_s=time.perf_counter() - started,
            prefix=PrefixState(config.prefix_dir, api_key)
            if config.prefix_dir is not None
            else None,
            api_key=api_key,
        )
        log.info(
            "llama.cpp loaded %s in %.1f s (%d thread(s), context %d, %d slot(s))",
            loaded.name,
            loaded.load_s,
            config.threads,
            config.context_tokens,
            config.parallel,
        )
        _servers[config] = loaded
        return loaded


def unload_all() -> None:
    """Stop every shared server (tests and benches; the process exit does it otherwise)."""
    with _servers_lock:
        _servers.clear()


@dataclass
class CompletionOutcome:
    """What one streamed chat completion produced."""

    text: str = ""
    finish_reason: FinishReason = "stop"
    tokens_in: int = 0
    tokens_out: int = 0
    reused_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    error: str | None = None
    pieces: list[str] = field(default_factory=list)


def build_payload(request: LlmRequest) -> dict[str, Any]:
    """The OpenAI-style request body llama.cpp's chat handler takes, streaming with usage."""
    if not request.messages:
        raise LlmError("llamacpp backend: a chat request needs at least one message")
    if request.max_tokens < 1:
        raise LlmError(f"llamacpp backend: max_tokens must be >= 1, got {request.max_tokens}")
    if not 0.0 <= request.temperature <= 2.0:
        raise LlmError(
            f"llamacpp backend: temperature must be in [0, 2], got {request.temperature}"
        )
    if not 0.0 < request.top_p <= 1.0:
        raise LlmError(f"llamacpp backend: top_p must be in (0, 1], got {request.top_p}")
    payload: dict[str, Any] = {
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "top_k": 0,
        "min_p": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "cache_prompt": True,
    }
    if request.stop:
        payload["stop"] = list(request.stop)
    if request.seed is not None:
        payload["seed"] = int(request.seed) & 0xFFFFFFFF
    return payload


def _error_text(chunk: dict[str, Any]) -> str | None:
    err = chunk.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err)
    if err is not None:
        return str(err)
    if "choices" not in chunk and "message" in chunk and "code" in chunk:
        return str(chunk["message"])
    return None


def run_completion(
    server: Any,
    payload: dict[str, Any],
    cancel: threading.Event,
    on_piece: Callable[[str], None] | None = None,
) -> CompletionOutcome:
    """One streamed chat completion (blocking; run it in a worker thread).

    Returning True from the chunk callback tells the server to stop: that is how `cancel`
    takes effect, at the next token.
    """
    out = CompletionOutcome()
    finish: str | None = None

    def on_chunk(chunk: Any) -> bool:
        nonlocal finish
        if not isinstance(chunk, dict):
            out.error = f"unexpected reply from llama.cpp: {chunk!r:.200}"
            return True
        problem = _error_text(chunk)
        if problem is not None:
            out.error = problem
            return True
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            piece = delta.get("content")
            if piece:
                out.pieces.append(piece)
                if on_piece is not None:
                    on_piece(piece)
            if choice.get("finish_reason"):
                finish = choice["finish_reason"]
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            out.tokens_in = int(usage.get("prompt_tokens", 0))
            out.tokens_out = int(usage.get("completion_tokens", 0))
            details = usage.get("prompt_tokens_details") or {}
            out.reused_tokens = int(details.get("cached_tokens", 0))
        timings = chunk.get("timings")
        if isinstance(timings, dict):
            out.reused_tokens = int(timings.get("cache_n", out.reused_tokens))
            out.prefill_s = float(timings.get("prompt_ms", 0.0)) / 1000.0
            out.decode_s = float(timings.get("predicted_ms", 0.0)) / 1000.0
        return cancel.is_set()

    server.handle_chat_completions(payload, on_chunk)
    out.text = "".join(out.pieces)
    if cancel.is_set():
        out.finish_reason = "cancelled"
    elif finish == "length":
        out.finish_reason = "length"
    else:
        out.finish_reason = "stop"
    return out


def _system_text(payload: dict[str, Any]) -> str | None:
    messages = payload.get("messages") or ()
    if messages and messages[0].get("role") == "system":
        return str(messages[0].get("content") or "")
    return None


def _ensure_prefix(loaded: LoadedModel, system_text: str) -> PrefixOutcome:
    if loaded.prefix is None:
        return "skipped"
    xl = _import_xllamacpp()
    build = str(getattr(xl, "__version__", "unknown"))
    return ensure_prefix(
        loaded.server,
        str(loaded.server.listening_address),
        loaded.prefix,
        loaded.config.path,
        build,
        system_text,
    )


class LlamaCppBackend:
    """Runs pulled GGUF models in-process with llama.cpp; no separate server, no network."""

    name = "llamacpp"

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        models_dir: str | os.PathLike[str] | None = None,
        threads: int | None = None,
        context_tokens: int = DEFAULT_CONTEXT_TOKENS,
        parallel: int = DEFAULT_PARALLEL,
        extra_bufts: bool = False,
        cache_ram_mib: int = DEFAULT_CACHE_RAM_MIB,
        batch_threads: int = 0,
        prefix_cache: bool = True,
        nice: int = DEFAULT_NICE,
    ) -> None:
        if context_tokens < 256:
            raise ValueError(f"context_tokens must be >= 256, got {context_tokens}")
        if parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {parallel}")
        self.default_model: str | os.PathLike[str] = model if model is not None else DEFAULT_MODEL
        self.models_dir = models_dir
        self.threads = resolve_threads(threads)
        self.context_tokens = context_tokens
        self.parallel = parallel
        self.extra_bufts = extra_bufts
        self.cache_ram_mib = cache_ram_mib
        self.batch_threads = batch_threads
        self.prefix_cache = prefix_cache
        if not 0 <= nice <= 19:
            raise ValueError(f"llamacpp nice must be within 0..19, got {nice}")
        self.nice = nice
        self._limiter_obj: trio.CapacityLimiter | None = None
        self._limiter_token: object = None

    def _limiter(self) -> trio.CapacityLimiter:
        """One limiter per trio run (trio primitives must not cross runs)."""
        token = trio.lowlevel.current_trio_token()
        if self._limiter_obj is None or self._limiter_token is not token:
            self._limiter_obj = trio.CapacityLimiter(self.parallel)
            self._limiter_token = token
        return self._limiter_obj

    def server_config(self, model: str | os.PathLike[str] | None = None) -> ServerConfig:
        """Which server a request for `model` uses (raises ModelNotFound when not pulled)."""
        path = resolve_model_path(
            model if model is not None else self.default_model, self.models_dir
        ).resolve()
        return ServerConfig(
            path=path,
            threads=self.threads,
            context_tokens=self.context_tokens,
            parallel=self.parallel,
            extra_bufts=self.extra_bufts,
            cache_ram_mib=self.cache_ram_mib,
            batch_threads=self.batch_threads,
            nice=self.nice,
            prefix_dir=(models_home(self.models_dir) / PREFIX_DIRNAME).resolve()
            if self.prefix_cache
            else None,
        )

    async def load(self, model: str | os.PathLike[str] | None = None) -> LoadedModel:
        """The server for `model` (default: the backend's), loaded off the event loop once."""
        config = self.server_config(model)
        found = _servers.get(config)
        if found is not None:
            return found
        return await trio.to_thread.run_sync(load_shared, config, self.models_dir)

    async def _generate(
        self, request: LlmRequest, send: trio.MemorySendChannel[str] | None
    ) -> tuple[LoadedModel, CompletionOutcome]:
        payload = build_payload(request)
        loaded = await self.load(request.model)
        cancel = threading.Event()
        token = trio.lowlevel.current_trio_token()
        on_piece: Callable[[str], None] | None = None
        if send is not None:

            def on_piece(piece: str) -> None:
                with contextlib.suppress(
                    trio.RunFinishedError, trio.BrokenResourceError, trio.ClosedResourceError
                ):
                    trio.from_thread.run_sync(send.send_nowait, piece, trio_token=token)

        system = _system_text(payload)

        def work() -> CompletionOutcome:
            if system is not None:
                _ensure_prefix(loaded, system)
            return run_completion(loaded.server, payload, cancel, on_piece)

        async with self._limiter():
            try:
                # Abandoned on cancellation: the thread sees `cancel` at its next token and
                # ends by itself; trio does not wait for it.
                outcome: CompletionOutcome = await _run_in_thread(work, abandon_on_cancel=True)
            except BaseException:
                cancel.set()
                raise
        if outcome.error is not None:
            raise LlmError(f"llama.cpp rejected the request: {outcome.error}")
        return loaded, outcome

    def _response(
        self, loaded: LoadedModel, outcome: CompletionOutcome, started: float
    ) -> LlmResponse:
        return LlmResponse(
            text=outcome.text,
            model=loaded.name,
            backend=self.name,
            tokens_in=outcome.tokens_in,
            tokens_out=outcome.tokens_out,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            finish_reason=outcome.finish_reason,
            extra={
                "prefill_s": round(outcome.prefill_s, 4),
                "decode_s": round(outcome.decode_s, 4),
                "decode_tok_s": round(outcome.tokens_out / outcome.decode_s, 2)
                if outcome.decode_s > 0
                else None,
                "reused_tokens": outcome.reused_tokens,
                "threads": loaded.config.threads,
            },
        )

    async def warm_prefix(
        self, system_text: str, model: str | os.PathLike[str] | None = None
    ) -> PrefixOutcome:
        """Have `system_text`'s prefill ready before the first task needs it (a node calls
        this at start for the root prompt it will use; see llamacpp_prefix)."""
        loaded = await self.load(model)
        async with self._limiter():
            outcome: PrefixOutcome = await _run_in_thread(
                _ensure_prefix, loaded, system_text, abandon_on_cancel=True
            )
        return outcome

    async def complete(self, request: LlmRequest) -> LlmResponse:
        started = time.perf_counter()
        loaded, outcome = await self._generate(request, None)
        return self._response(loaded, outcome, started)

    async def stream(self, request: LlmRequest) -> AsyncIterator[str]:
        send, recv = trio.open_memory_channel[str](math.inf)
        failure: list[BaseException] = []

        async def produce() -> None:
            try:
                await self._generate(request, send)
            except BaseException as exc:
                failure.append(exc)
                raise
            finally:
                send.close()

        # The producer runs in a system task so that this generator never yields inside a
        # nursery; closing the generator early cancels the producer, which stops llama.cpp.
        cancel_scope = trio.CancelScope()

        async def guarded() -> None:
            with cancel_scope, contextlib.suppress(Exception):
                await produce()

        trio.lowlevel.spawn_system_task(guarded)
        try:
            async with recv:
                async for piece in recv:
                    yield piece
            if failure and not isinstance(failure[0], trio.Cancelled):
                raise failure[0]
        finally:
            cancel_scope.cancel()

    async def list_models(self) -> list[str]:
        names = pulled_model_names(self.models_dir)
        for loaded in list(_servers.values()):
            if loaded.name not in names:
                names.append(loaded.name)
        return names

    async def aclose(self) -> None:
        """Servers are shared by the process and stay loaded; nothing is held per object."""


def describe(backend: LlamaCppBackend) -> dict[str, object]:
    """Settings a bench or `status` can print."""
    return {
        "threads": backend.threads,
        "usable_cores": usable_cores(),
        "context_tokens": backend.context_tokens,
        "parallel": backend.parallel,
        "extra_bufts": backend.extra_bufts,
        "batch_threads": batch_threads(backend.batch_threads, backend.threads),
        "prefix_cache": backend.prefix_cache,
        "nice": backend.nice,
    }
