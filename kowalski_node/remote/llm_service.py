"""Sub-calls across peers: the /kowalski/llm/1.0.0 service and the leader's `FanoutBackend`.

Peer side (`register_llm_service`): `llm.batch` runs a list of model requests on this
node's backend, at most `max_concurrent` at a time (one core's worth by default, so a
busy peer queues rather than thrashes), and answers one result per request: a response,
or an error for that slot only.

Leader side (`FanoutBackend`, an `LlmBackend`): the RLM runner issues the slots of an
`llm_query_batched` call concurrently; each slot goes to the qualified live peer with the
least work in flight relative to its weight (SmartScheduler score x advertised tokens/s),
this node included, so a batch spreads over the cluster in proportion to throughput.
`complete_many` sends one `llm.batch` per peer for callers that hold a whole batch. A
failed slot (peer died, timed out, or the model failed there) is retried once on another
peer (or locally); a second failure fails that slot only. Requests keep their task id,
purpose and sequence number, so a scripted backend on any peer answers the same way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from kowalski_node.adapters.libp2p import envelope as env
from kowalski_node.adapters.libp2p import protocol_ids
from kowalski_node.adapters.libp2p.api import Request, TransportPort
from kowalski_node.adapters.libp2p.errors import RemoteError, RequestRejected
from kowalski_node.errors import BackendUnavailable, LlmError
from kowalski_node.llm.base import LlmBackend, LlmRequest, LlmResponse
from kowalski_node.placement import Requirement
from kowalski_node.remote import wire
from kowalski_node.remote.placement import PeerChooser
from kowalski_node.remote.watched import watched_request

log = logging.getLogger("kowalski_node.remote.llm")

BackendSource = Callable[[], LlmBackend]
_KINDS = ("llamacpp", "builtin", "ollama", "openai", "scripted")


# ============================================================================ peer side


@dataclass(frozen=True)
class LlmServiceConfig:
    max_concurrent: int = 1
    """Requests run at once here; more wait their turn."""
    max_queued: int = 1024
    """Requests accepted (running + waiting); beyond that a batch is refused as overloaded."""
    item_timeout_s: float = 600.0


class LlmService:
    """Runs batches of model requests for other peers on a local backend."""

    def __init__(self, backend: LlmBackend | BackendSource, config: LlmServiceConfig | None = None):
        self._backend = backend
        self.config = config or LlmServiceConfig()
        self._limiter = trio.CapacityLimiter(self.config.max_concurrent)
        self._queued = 0
        self.stats: dict[str, int] = {"batches": 0, "requests": 0, "errors": 0, "refused": 0}

    def backend(self) -> LlmBackend:
        return self._backend() if callable(self._backend) else self._backend

    async def handle(self, request: Request) -> Any:
        if request.type == wire.LLM_PING:
            return {"ok": True, "queued": self._queued}
        batch = wire.parse(wire.LlmBatch, request.payload, "llm.batch")
        n = len(batch.requests)
        if self._queued + n > self.config.max_queued:
            self.stats["refused"] += 1
            raise RequestRejected(
                env.ERR_OVERLOADED,
                f"{self._queued} model requests already queued here (limit "
                f"{self.config.max_queued})",
            )
        self.stats["batches"] += 1
        self._queued += n
        results: list[dict[str, Any]] = [{"error": "not run"}] * n
        try:
            async with trio.open_nursery() as nursery:
                for i, item in enumerate(batch.requests):
                    nursery.start_soon(self._run_one, results, i, item.to_request())
        finally:
            self._queued -= n
        return {"results": results}

    async def _run_one(self, results: list[dict[str, Any]], i: int, request: LlmRequest) -> None:
        self.stats["requests"] += 1
        try:
            async with self._limiter:
                with trio.fail_after(self.config.item_timeout_s):
                    response = await self.backend().complete(request)
            results[i] = wire.llm_response_to_wire(response)
            return
        except trio.TooSlowError:
            error = f"the model did not answer within {self.config.item_timeout_s:g} s"
            unavailable = False
        except LlmError as exc:
            error, unavailable = str(exc), isinstance(exc, BackendUnavailable)
        except Exception as exc:  # a backend bug fails this slot, not the service
            log.exception("llm service: backend failed")
            error, unavailable = f"{type(exc).__name__}: {exc}", False
        self.stats["errors"] += 1
        results[i] = {"error": error, "unavailable": unavailable}


def register_llm_service(
    transport: TransportPort,
    backend: LlmBackend | BackendSource,
    config: LlmServiceConfig | None = None,
) -> LlmService:
    """Serve `llm.batch` on `transport`; `backend` may be a callable (loaded on first use)."""
    service = LlmService(backend, config)
    transport.register_handler(
        protocol_ids.LLM, service.handle, types={wire.LLM_BATCH, wire.LLM_PING}
    )
    return service


# ============================================================================ leader side


@dataclass(frozen=True)
class FanoutConfig:
    max_peers: int = 8
    """Best-ranked peers a batch is spread over."""
    request_timeout_s: float = 600.0
    """One peer's answer to one batch (the runner bounds each call as well)."""
    purposes: frozenset[str] = frozenset({"sub"})
    """Request purposes sent to peers; others (root turns) run on the local backend."""
    include_local: bool = True
    live_poll_s: float = 0.1
    keepalive_s: float = 15.0


@dataclass
class _Slot:
    index: int
    request: LlmRequest
    tried: tuple[str, ...] = ()
    outcome: LlmResponse | LlmError | None = None


class FanoutBackend:
    """An `LlmBackend` that spreads sub-calls over capable peers (see module doc)."""

    def __init__(
        self,
        transport: TransportPort,
        chooser: PeerChooser,
        local: LlmBackend,
        config: FanoutConfig | None = None,
        *,
        requirement: Requirement | None = None,
        on_usage: Callable[[str, str], None] | None = None,
    ) -> None:
        self.transport = transport
        self.chooser = chooser
        self.local = local
        self.config = config or FanoutConfig()
        self.name = getattr(local, "name", "llm")
        kind = self.name.split(":", 1)[0]
        self.requirement = requirement or Requirement(backend=kind if kind in _KINDS else None)
        self._on_usage = on_usage
        self._inflight: dict[str, int] = {}
        self.stats: dict[str, int] = {
            "slots_remote": 0,
            "slots_local": 0,
            "slot_retries": 0,
            "slot_failures": 0,
            "batches_sent": 0,
        }
        self.per_peer: dict[str, int] = {}

    # ------------------------------------------------------------------ LlmBackend

    async def complete(self, request: LlmRequest) -> LlmResponse:
        if request.purpose not in self.config.purposes:
            return await self.local.complete(request)
        outcome = (await self.complete_many([request]))[0]
        if isinstance(outcome, LlmError):
            raise outcome
        return outcome

    def stream(self, request: LlmRequest) -> AsyncIterator[str]:
        return self.local.stream(request)

    async def list_models(self) -> list[str]:
        return await self.local.list_models()

    async def aclose(self) -> None:
        """The local backend belongs to whoever created it; nothing of ours to release."""

    # ------------------------------------------------------------------ batches

    async def complete_many(self, requests: Sequence[LlmRequest]) -> list[LlmResponse | LlmError]:
        """One outcome per request, in order; a failed slot is an LlmError, not a raise."""
        slots = [_Slot(i, r) for i, r in enumerate(requests)]
        pending = slots
        for round_ in range(2):  # first placement, then one retry elsewhere
            if not pending:
                break
            groups = self._assign(pending, retry=round_ > 0)
            async with trio.open_nursery() as nursery:
                for peer, group in groups.items():
                    nursery.start_soon(self._run_group, peer, group)
            failed = [s for s in pending if isinstance(s.outcome, LlmError)]
            if round_ == 0:
                self.stats["slot_retries"] += len(failed)
            pending = failed
        out: list[LlmResponse | LlmError] = []
        for slot in slots:
            if slot.outcome is None:
                slot.outcome = LlmError("sub-call was not run")
            if isinstance(slot.outcome, LlmError):
                self.stats["slot_failures"] += 1
                if len(slot.tried) > 1:
                    slot.outcome = LlmError(
                        f"sub-call failed on {len(slot.tried)} peers: {slot.outcome}"
                    )
            out.append(slot.outcome)
        return out

    def _weights(self) -> list[tuple[str, float]]:
        placement = self.chooser.rank(self.requirement)
        ranked = list(placement.ranked[: self.config.max_peers])
        tps: dict[str, float] = {}
        for s in ranked:
            p = self.chooser.profile(s.peer)
            tps[s.peer] = p.tokens_per_s if p is not None else 0.0
        best = max(tps.values(), default=0.0)
        out: list[tuple[str, float]] = []
        for s in ranked:
            if s.peer == self.chooser.me and not self.config.include_local:
                continue
            speed = (tps[s.peer] / best) if best > 0 else 1.0
            out.append((s.peer, max(1e-3, s.total) * max(0.05, speed)))
        if self.config.include_local and all(p != self.chooser.me for p, _ in out):
            mean = sum(w for _, w in out) / len(out) if out else 1.0
            out.append((self.chooser.me, mean))
        return out

    def _assign(self, slots: Sequence[_Slot], *, retry: bool) -> dict[str, list[_Slot]]:
        weights = self._weights()
        planned: dict[str, int] = {}
        groups: dict[str, list[_Slot]] = {}
        for slot in slots:
            options = [(p, w) for p, w in weights if p not in slot.tried]
            if not options:
                # everyone qualified already failed this slot: the local backend is last resort
                options = [(self.chooser.me, 1.0)] if self.chooser.me not in slot.tried else []
            if not options:
                continue  # keeps its error
            best_peer = min(
                enumerate(options),
                key=lambda io: (
                    (self._inflight.get(io[1][0], 0) + planned.get(io[1][0], 0) + 1) / io[1][1],
                    io[0],
                ),
            )[1][0]
            planned[best_peer] = planned.get(best_peer, 0) + 1
            slot.tried = (*slot.tried, best_peer)
            slot.outcome = None
            groups.setdefault(best_peer, []).append(slot)
        return groups

    async def _run_group(self, peer: str, group: list[_Slot]) -> None:
        self._inflight[peer] = self._inflight.get(peer, 0) + len(group)
        try:
            if peer == self.chooser.me:
                async with trio.open_nursery() as nursery:
                    for slot in group:
                        nursery.start_soon(self._run_local, slot)
            else:
                await self._run_remote(peer, group)
        finally:
            self._inflight[peer] -= len(group)
        for slot in group:
            if isinstance(slot.outcome, LlmResponse):
                self.per_peer[peer] = self.per_peer.get(peer, 0) + 1
                if self._on_usage is not None and slot.request.task_id:
                    self._on_usage(slot.request.task_id, peer)

    async def _run_local(self, slot: _Slot) -> None:
        try:
            slot.outcome = await self.local.complete(slot.request)
            self.stats["slots_local"] += 1
        except LlmError as exc:
            slot.outcome = exc
        except Exception as exc:  # noqa: BLE001 - a backend bug fails this slot only
            slot.outcome = LlmError(f"{self.name} backend failed: {type(exc).__name__}: {exc}")

    async def _run_remote(self, peer: str, group: list[_Slot]) -> None:
        payload = {"requests": [wire.llm_request_to_wire(s.request) for s in group]}
        scope = trio.CancelScope(deadline=trio.current_time() + self.config.request_timeout_s)
        started = trio.current_time()
        failure = ""
        self.stats["batches_sent"] += 1
        done = await watched_request(
            self.transport, self.chooser, peer, protocol_ids.LLM, wire.LLM_BATCH, payload,
            ping_type=wire.LLM_PING, scope=scope, live_poll_s=self.config.live_poll_s,
            keepalive_s=self.config.keepalive_s,
        )  # fmt: skip
        reply = done.reply
        if isinstance(done.error, RemoteError):
            error = done.error
            failure = f"peer {peer[-8:]} refused the batch: {error.code}: {error.remote_message}"
        elif done.error is not None:
            failure = f"peer {peer[-8:]}: {done.error}"
        elif reply is None:
            failure = (
                f"peer {peer[-8:]} is no longer alive (membership)"
                if done.peer_gone
                else f"peer {peer[-8:]} did not answer within {self.config.request_timeout_s:g} s"
            )
        rows = reply.get("results") if isinstance(reply, dict) else None
        if not failure and (not isinstance(rows, list) or len(rows) != len(group)):
            failure = f"peer {peer[-8:]} sent a malformed batch answer"
        if failure:
            self.chooser.record_failure(peer)
            log.info(
                "event=fanout_batch_failed peer=%s slots=%d reason=%r", peer, len(group), failure
            )
            for slot in group:
                slot.outcome = LlmError(failure)
            return
        assert isinstance(rows, list)
        rtt_ms = (trio.current_time() - started) * 1000.0
        model_ms = 0.0
        for slot, row in zip(group, rows, strict=True):
            if isinstance(row, dict) and isinstance(row.get("error"), str):
                slot.outcome = LlmError(f"on peer {peer[-8:]}: {row['error']}")
                continue
            try:
                slot.outcome = wire.llm_response_from_wire(row, peer)
            except ValueError as exc:
                slot.outcome = LlmError(str(exc))
                continue
            model_ms = max(model_ms, slot.outcome.latency_ms)
            self.stats["slots_remote"] += 1
        self.chooser.record_success(
            peer, max(0.0, rtt_ms - model_ms) if math.isfinite(model_ms) else rtt_ms
        )
