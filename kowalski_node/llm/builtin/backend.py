"""`BuiltinBackend`: the NumPy engine behind the async `LlmBackend` protocol.

CPU work never runs on the trio thread: loading runs in a worker thread, and generation
advances one step (a prefill chunk or one token) per `trio.to_thread.run_sync` call. A
shared CapacityLimiter (default 1) makes concurrent requests take turns token by token,
each with its own KV cache; cancellation takes effect between tokens.

Root turns keep their keys/values in the engine's prefix cache when they end, so the next
turn of the same task prefills only the messages added since (see `prefix.py`).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from kowalski_node.errors import LlmError
from kowalski_node.llm.base import LlmRequest, LlmResponse
from kowalski_node.llm.builtin.engine import Engine, GenerationParams, GenerationRun
from kowalski_node.llm.builtin.threads import DEFAULT_BLAS_THREADS
from kowalski_node.llm.models import DEFAULT_MODEL, pulled_model_names, resolve_model_path


class BuiltinBackend:
    """Runs pulled GGUF models in-process; no server, no network."""

    name = "builtin"

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        models_dir: str | os.PathLike[str] | None = None,
        use_weight_cache: bool = True,
        max_concurrent: int = 1,
        engine: Engine | None = None,
        blas_threads: int | None = DEFAULT_BLAS_THREADS,
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be >= 1")
        self.default_model: str | os.PathLike[str] = model if model is not None else DEFAULT_MODEL
        self.models_dir = models_dir
        self.use_weight_cache = use_weight_cache
        self.max_concurrent = max_concurrent
        self.blas_threads = blas_threads
        self._engines: dict[Path, Engine] = {}
        if engine is not None:
            self._engines[engine.path.resolve()] = engine
            if model is None:
                self.default_model = engine.path
        self._load_lock = threading.Lock()
        self._limiter_obj: trio.CapacityLimiter | None = None
        self._limiter_token: object = None

    def _limiter(self) -> trio.CapacityLimiter:
        """One limiter per trio run (trio primitives must not cross runs)."""
        token = trio.lowlevel.current_trio_token()
        if self._limiter_obj is None or self._limiter_token is not token:
            self._limiter_obj = trio.CapacityLimiter(self.max_concurrent)
            self._limiter_token = token
        return self._limiter_obj

    def _load_sync(self, path: Path) -> Engine:
        with self._load_lock:
            found = self._engines.get(path)
            if found is not None:
                return found
            engine = Engine.load(
                path,
                models_dir=self.models_dir,
                use_weight_cache=self.use_weight_cache,
                blas_threads=self.blas_threads,
            )
            self._engines[path] = engine
            return engine

    async def load(self, model: str | os.PathLike[str] | None = None) -> Engine:
        """The engine for `model` (default: the backend's), loading it off the event loop once."""
        if model is not None:
            for engine in self._engines.values():
                if engine.name == os.fspath(model):
                    return engine
        path = resolve_model_path(
            model if model is not None else self.default_model, self.models_dir
        ).resolve()
        loaded = self._engines.get(path)
        if loaded is not None:
            return loaded
        return await trio.to_thread.run_sync(self._load_sync, path)

    async def _start(self, request: LlmRequest) -> tuple[Engine, GenerationRun]:
        engine = await self.load(request.model)
        try:
            params = GenerationParams(
                max_tokens=request.max_tokens,
                temperature=request.temperature,
                top_p=request.top_p,
                stop=tuple(request.stop),
                seed=request.seed,
            )
        except ValueError as exc:
            raise LlmError(f"builtin backend rejected the request: {exc}") from exc

        def start() -> GenerationRun:
            # Off the event loop: tokenizing a long conversation and copying a shared
            # prefix's keys take milliseconds.
            ids = engine.encode_chat(request.messages)
            return engine.start(ids, params, reuse=True, keep=request.purpose == "root")

        try:
            run = await trio.to_thread.run_sync(start, limiter=self._limiter())
        except ValueError as exc:
            raise LlmError(f"builtin backend rejected the request: {exc}") from exc
        return engine, run

    @staticmethod
    def _settle(run: GenerationRun) -> None:
        """End a run abandoned by cancellation, so its keys still reach the prefix cache.

        Safe on the trio thread: a cancelled `to_thread` call has already returned, and a
        cancelled run's step does no model work.
        """
        if not run.done:
            run.cancel()
            run.step()

    async def _step(self, run: GenerationRun) -> str:
        try:
            return await trio.to_thread.run_sync(run.step, limiter=self._limiter())
        except ValueError as exc:
            raise LlmError(f"builtin engine failed: {exc}") from exc

    async def complete(self, request: LlmRequest) -> LlmResponse:
        started = time.perf_counter()
        engine, run = await self._start(request)
        try:
            while not run.done:
                await self._step(run)
        finally:
            self._settle(run)
        res = run.result
        return LlmResponse(
            text=res.text,
            model=engine.name,
            backend=self.name,
            tokens_in=res.tokens_in,
            tokens_out=res.tokens_out,
            latency_ms=(time.perf_counter() - started) * 1000.0,
            finish_reason=res.finish_reason,
            extra={
                "prefill_s": round(res.prefill_s, 4),
                "decode_s": round(res.decode_s, 4),
                "decode_tok_s": round(res.tokens_out / res.decode_s, 2)
                if res.decode_s > 0
                else None,
                "reused_tokens": res.reused_tokens,
            },
        )

    async def stream(self, request: LlmRequest) -> AsyncIterator[str]:
        _, run = await self._start(request)
        try:
            while not run.done:
                piece = await self._step(run)
                if piece:
                    yield piece
        finally:
            self._settle(run)

    async def list_models(self) -> list[str]:
        names = pulled_model_names(self.models_dir)
        for engine in self._engines.values():
            if engine.name not in names:
                names.append(engine.name)
        return names

    async def aclose(self) -> None:
        with self._load_lock:
            self._engines.clear()
