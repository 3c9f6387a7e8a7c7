"""Where one chat completion runs: the routing port behind the OpenAI-compatible API.

`CompletionRouter` is the port the HTTP layer (`adapters/http/openai_api.py`) talks to:
`models()` lists the cluster's models with where they run, and `complete()` / `stream()`
run one request. `ClusterCompletionRouter` implements it over the mesh:

1. the model id must be advertised by a live peer (capability adverts, `ServedModel`);
2. when the `LayerPipeline` port is installed and `pipeline.route(model, holders)` says
   so, the request runs layer-pipelined across peers (the `pipeline` engineer's
   inference package plugs in here; nothing else changes for the API);
3. otherwise the peers that hold the *whole* model are ranked by the placement
   scheduler (`PeerChooser.rank(Requirement(model=...))`: load, latency, failures,
   specialisation) and the best one runs it: this node through its own backend, another
   peer through the `/kowalski/llm/1.0.0` service (`llm.batch` of one request). A peer
   that fails (died, refused, timed out, the model failed there) is reported to the
   chooser and the next holder is tried once;
4. a model that only partial holders advertise, with no pipeline installed, is a
   `ModelUnavailable` naming the layer ranges seen.

Streaming: this node's backend streams token by token. `llm.batch` has no streaming
frames, so a remote peer's answer arrives as one piece (with exact usage); the pipeline
port streams if it implements `stream`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import trio

from kowalski_node.adapters.libp2p import protocol_ids
from kowalski_node.adapters.libp2p.api import TransportPort
from kowalski_node.adapters.libp2p.errors import RemoteError, TransportError
from kowalski_node.capabilities.profile import DeviceProfile
from kowalski_node.errors import LlmError
from kowalski_node.llm.base import LlmBackend, LlmRequest, LlmResponse
from kowalski_node.placement import Requirement
from kowalski_node.remote import wire
from kowalski_node.remote.placement import PeerChooser

log = logging.getLogger("kowalski_node.remote.completions")

DEFAULT_TIMEOUT_S = 600.0


class ModelNotFound(LlmError):
    """No live peer advertises this model id (the API answers 404 `model_not_found`)."""

    def __init__(self, model: str, known: Sequence[str]) -> None:
        listed = ", ".join(sorted(known)[:20]) or "none"
        super().__init__(f"model {model!r} is not served by this cluster (models: {listed})")
        self.model = model


class ModelUnavailable(LlmError):
    """The model is known but cannot run now (the API answers 503 `model_unavailable`)."""


@dataclass(frozen=True)
class LayerHolder:
    """A peer holding layers [start, end) of a model's `n_layers`."""

    peer: str
    start: int
    end: int
    n_layers: int

    @property
    def full(self) -> bool:
        return self.start == 0 and self.end == self.n_layers


@dataclass(frozen=True)
class ModelCard:
    """One model of the cluster and where it runs (the `/v1/models` entry)."""

    id: str
    holders: tuple[str, ...]
    """Live peers that hold the whole model, best first."""
    partial: tuple[LayerHolder, ...] = ()
    """Live peers that hold only a layer range."""
    route: str = "peer"
    """How a request for it runs now: `peer`, `pipeline` or `unavailable`."""


@dataclass(frozen=True)
class Completion:
    """A finished completion and where it ran."""

    response: LlmResponse
    route: str  # "local", "peer" or "pipeline"
    peers: tuple[str, ...]  # who ran it (the stage peers, for a pipeline)


@dataclass
class CompletionStream:
    """Text pieces as they come; `result` is set when the route knows exact usage."""

    pieces: AsyncIterator[str]
    route: str
    peers: tuple[str, ...]
    result: LlmResponse | None = None


@runtime_checkable
class CompletionRouter(Protocol):
    """The port behind `/v1/chat/completions` and `/v1/models`."""

    async def models(self) -> list[ModelCard]:
        """The cluster's models, with the peers that hold them."""
        ...

    async def complete(self, request: LlmRequest) -> Completion:
        """Run `request` (its `model` is an id from `models()`) where it fits best.

        Raises `ModelNotFound`, `ModelUnavailable` or another `LlmError`."""
        ...

    async def open_stream(self, request: LlmRequest) -> CompletionStream:
        """Place `request` and start it; errors before the first piece raise here."""
        ...


@runtime_checkable
class LayerPipeline(Protocol):
    """Layer-pipelined generation across peers, for the `pipeline` engineer to implement.

    `route(model, holders)` decides per request: True runs it through the pipeline.
    `holders` are the live peers holding the whole model (empty when none does), so an
    implementation can pipeline only when needed, or always when the user asked for
    `--sharding pipeline`. `complete` and `stream` follow `LlmBackend`: the request's
    `model` is the cluster model id; `stream` yields text pieces. `stage_peers(model)`
    names the peers of the current plan (reported in the API's answer).
    """

    def route(self, model: str, holders: Sequence[str]) -> bool: ...

    async def complete(self, request: LlmRequest) -> LlmResponse: ...

    def stream(self, request: LlmRequest) -> AsyncIterator[str]: ...

    def stage_peers(self, model: str) -> tuple[str, ...]: ...


@dataclass
class RouterStats:
    local: int = 0
    remote: int = 0
    pipeline: int = 0
    retries: int = 0
    failures: int = 0
    per_peer: dict[str, int] = field(default_factory=dict)


class ClusterCompletionRouter:
    """`CompletionRouter` over the mesh (see the module docstring)."""

    def __init__(
        self,
        me: str,
        transport: TransportPort,
        chooser: PeerChooser,
        profiles: Callable[[], Mapping[str, DeviceProfile]],
        live: Callable[[], Sequence[str]],
        local_backend: Callable[[], LlmBackend],
        *,
        pipeline: LayerPipeline | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.me = me
        self.transport = transport
        self.chooser = chooser
        self._profiles = profiles
        self._live = live
        self._local_backend = local_backend
        self.pipeline = pipeline
        self.timeout_s = timeout_s
        self.stats = RouterStats()

    def set_pipeline(self, pipeline: LayerPipeline | None) -> None:
        """Install (or remove) the layer-pipelined route."""
        self.pipeline = pipeline

    # ------------------------------------------------------------------ catalogue

    def _holders(self) -> dict[str, list[LayerHolder]]:
        live = set(self._live()) | {self.me}
        out: dict[str, list[LayerHolder]] = {}
        for peer, profile in sorted(self._profiles().items()):
            if peer not in live:
                continue
            for m in profile.models:
                out.setdefault(m.name, []).append(
                    LayerHolder(peer, m.layer_start, m.end, m.n_layers)
                )
        return out

    def _card(self, model: str, holders: list[LayerHolder]) -> ModelCard:
        full = self._ranked_full(model, holders)
        partial = tuple(sorted((h for h in holders if not h.full), key=lambda h: (h.start, h.peer)))
        if self.pipeline is not None and self.pipeline.route(model, full):
            route = "pipeline"
        elif full:
            route = "peer"
        else:
            route = "unavailable"
        return ModelCard(model, full, partial, route)

    def _ranked_full(self, model: str, holders: list[LayerHolder]) -> tuple[str, ...]:
        full = {h.peer for h in holders if h.full}
        if not full:
            return ()
        ranked = [s.peer for s in self.chooser.rank(Requirement(model=model)).ranked]
        ordered = [p for p in ranked if p in full]
        # Holders the scheduler did not rank (e.g. no profile yet) go last, in id order.
        return (*ordered, *sorted(full - set(ordered)))

    async def models(self) -> list[ModelCard]:
        return [self._card(name, hs) for name, hs in sorted(self._holders().items())]

    def task_model(self, model: str) -> str | None:
        """The `model` an RLM task submission carries for this cluster model id: None (the
        leader's default) when the id is only a backend's name (e.g. `scripted`)."""
        for profile in self._profiles().values():
            if model in profile.backends:
                return None
        return model

    async def card(self, model: str) -> ModelCard:
        """The card of one model id; `ModelNotFound` when no live peer advertises it."""
        holders = self._holders()
        if model not in holders:
            raise ModelNotFound(model, list(holders))
        return self._card(model, holders[model])

    # ------------------------------------------------------------------ running

    async def complete(self, request: LlmRequest) -> Completion:
        card = await self.card(request.model or "")
        if card.route == "pipeline":
            assert self.pipeline is not None
            self.stats.pipeline += 1
            response = await self.pipeline.complete(request)
            return Completion(response, "pipeline", self.pipeline.stage_peers(card.id))
        if not card.holders:
            raise ModelUnavailable(_no_holder_message(card))
        failures: list[str] = []
        for attempt, peer in enumerate(card.holders[:2]):
            if attempt:
                self.stats.retries += 1
            try:
                response = await self._run_on(peer, request)
            except LlmError as exc:
                failures.append(f"{_short(peer)}: {exc}")
                log.info("event=completion_failed peer=%s reason=%r", peer, str(exc)[:200])
                continue
            self.stats.per_peer[peer] = self.stats.per_peer.get(peer, 0) + 1
            return Completion(response, "local" if peer == self.me else "peer", (peer,))
        self.stats.failures += 1
        raise LlmError(
            f"model {card.id!r} failed on {len(failures)} peer(s): " + "; ".join(failures)
        )

    async def open_stream(self, request: LlmRequest) -> CompletionStream:
        card = await self.card(request.model or "")
        if card.route == "pipeline":
            assert self.pipeline is not None
            self.stats.pipeline += 1
            return CompletionStream(
                self.pipeline.stream(request), "pipeline", self.pipeline.stage_peers(card.id)
            )
        if not card.holders:
            raise ModelUnavailable(_no_holder_message(card))
        if card.holders[0] == self.me:
            self.stats.local += 1
            backend = self._local_backend()
            return CompletionStream(
                backend.stream(_for_backend(request, self._profiles().get(self.me))),
                "local",
                (self.me,),
            )
        done = await self.complete(request)
        return CompletionStream(
            _one_piece(done.response.text), done.route, done.peers, done.response
        )

    async def _run_on(self, peer: str, request: LlmRequest) -> LlmResponse:
        target = _for_backend(request, self._profiles().get(peer))
        if peer == self.me:
            self.stats.local += 1
            with trio.fail_after(self.timeout_s):
                return await self._local_backend().complete(target)
        self.stats.remote += 1
        started = trio.current_time()
        try:
            reply: Any = await self.transport.request(
                peer,
                protocol_ids.LLM,
                wire.LLM_BATCH,
                {"requests": [wire.llm_request_to_wire(target)]},
                timeout=self.timeout_s,
            )
        except RemoteError as exc:
            self.chooser.record_failure(peer)
            raise LlmError(f"peer refused: {exc.code}: {exc.remote_message}") from exc
        except TransportError as exc:
            self.chooser.record_failure(peer)
            raise LlmError(f"peer unreachable: {exc}") from exc
        rows = reply.get("results") if isinstance(reply, dict) else None
        if not isinstance(rows, list) or len(rows) != 1:
            self.chooser.record_failure(peer)
            raise LlmError("peer sent a malformed answer")
        row = rows[0]
        if isinstance(row, dict) and isinstance(row.get("error"), str):
            raise LlmError(str(row["error"]))
        try:
            response = wire.llm_response_from_wire(row, peer)
        except ValueError as exc:
            raise LlmError(str(exc)) from exc
        overhead = (trio.current_time() - started) * 1000.0 - response.latency_ms
        self.chooser.record_success(peer, max(0.0, overhead))
        return response


def _for_backend(request: LlmRequest, profile: DeviceProfile | None) -> LlmRequest:
    """A model id that is only the peer's backend name means that backend's default model."""
    if profile is not None and request.model in profile.backends:
        return replace(request, model=None)
    return request


async def _one_piece(text: str) -> AsyncIterator[str]:
    if text:
        yield text


def _short(peer: str) -> str:
    return f"…{peer[-8:]}"


def _no_holder_message(card: ModelCard) -> str:
    if card.partial:
        ranges = ", ".join(f"{_short(h.peer)}[{h.start}:{h.end}]" for h in card.partial)
        return (
            f"model {card.id!r}: no live peer holds all of it (layer ranges: {ranges}) and "
            "layer-pipelined generation is not available on this node"
        )
    return f"model {card.id!r}: no live peer can run it now"
