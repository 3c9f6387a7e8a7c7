"""The OpenAI-compatible API's layer-pipeline route (`remote.completions.LayerPipeline`).

`ClusterCompletionRouter` asks `route(model, holders)` per request. The pipeline takes a
request when the node is told to shard (`inference.sharding = "pipeline"`), when no live
peer holds the whole model, or when this node has a memory cap (`inference.memory_cap_mb`)
in `auto` mode: the generator's planner then decides between one local stage and a split
by the model's real per-layer sizes. Everything else keeps the faster whole-model route
(this node's own backend, or the best peer holding the model).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Literal

from kowalski_node.inference.pipeline import GenerateRequest, GenerateResult, PipelineGenerator
from kowalski_node.llm.base import LlmRequest, LlmResponse


def generate_request(request: LlmRequest) -> GenerateRequest:
    """The pipeline's request for a chat request (same sampling, same stops)."""
    return GenerateRequest(
        model=request.model,
        messages=[(m.role, m.content) for m in request.messages],
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=tuple(request.stop),
    )


def llm_response(result: GenerateResult, latency_ms: float) -> LlmResponse:
    finish: Literal["stop", "length"] = "length" if result.finish_reason == "length" else "stop"
    return LlmResponse(
        text=result.text,
        model=result.model,
        backend="pipeline",
        tokens_in=result.tokens_in,
        tokens_out=result.tokens_out,
        latency_ms=latency_ms,
        finish_reason=finish,
        extra={"stages": result.stages, "failovers": result.failovers},
    )


class PipelineRoute:
    """`LayerPipeline` over this node's `PipelineGenerator`."""

    def __init__(
        self, generator: PipelineGenerator, *, sharding: str, memory_cap_mb: int | None
    ) -> None:
        self.generator = generator
        self.sharding = (sharding or "auto").lower()
        self.memory_cap_mb = memory_cap_mb
        self._last_peers: dict[str, tuple[str, ...]] = {}

    def route(self, model: str, holders: Sequence[str]) -> bool:
        if self.sharding == "pipeline" or not holders:
            return True
        return self.sharding == "auto" and self.memory_cap_mb is not None

    async def complete(self, request: LlmRequest) -> LlmResponse:
        started = time.perf_counter()
        result = await self.generator.generate(generate_request(request))
        self._remember(request.model, result)
        return llm_response(result, (time.perf_counter() - started) * 1000)

    async def stream(self, request: LlmRequest) -> AsyncIterator[str]:
        async for event in self.generator.stream(generate_request(request)):
            if event.text:
                yield event.text
            if event.result is not None:
                self._remember(request.model, event.result)

    def stage_peers(self, model: str) -> tuple[str, ...]:
        """The stages of the last generation of `model` (empty before the first)."""
        return self._last_peers.get(model, ())

    def _remember(self, model: str | None, result: GenerateResult) -> None:
        peers = tuple(str(s.get("peer", "")) for s in result.stages if s.get("peer"))
        self._last_peers[model or result.model] = peers
