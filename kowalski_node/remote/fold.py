"""Context folding on a nearby peer (/kowalski/fold/1.0.0).

Folding condenses a long text (an old part of the conversation, a large tool output)
into a short summary with a model. It is latency-bound and easy to offload, so the
leader asks the qualified peer with the lowest observed round trip among the best
scored ones (other than itself: the leader's own model is busy with the root turns);
when none answers it folds locally.

    register_fold_service(transport, backend)            # every node
    text = await FoldClient(transport, chooser, local).fold(long_text, task_id=..., sequence=n)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kowalski_node.adapters.libp2p import protocol_ids
from kowalski_node.adapters.libp2p.api import Request, TransportPort
from kowalski_node.adapters.libp2p.errors import RemoteError, RequestRejected, TransportError
from kowalski_node.errors import LlmError
from kowalski_node.llm.base import ChatMessage, LlmBackend, LlmRequest, LlmResponse
from kowalski_node.placement import Requirement
from kowalski_node.remote import wire
from kowalski_node.remote.llm_service import BackendSource
from kowalski_node.remote.placement import PeerChooser

log = logging.getLogger("kowalski_node.remote.fold")

FOLD_SYSTEM = (
    "You condense text. Keep every fact, number, name and open question that a reader "
    "would need later; drop repetition and filler. Answer with the condensed text only."
)


def fold_request(msg: wire.FoldRequest) -> LlmRequest:
    instruction = msg.instruction.strip() or "Condense the following text."
    return LlmRequest(
        messages=(
            ChatMessage("system", FOLD_SYSTEM),
            ChatMessage("user", f"{instruction}\n\n{msg.text}"),
        ),
        model=msg.model,
        max_tokens=msg.max_tokens,
        task_id=msg.task_id,
        purpose="fold",
        sequence=msg.sequence,
    )


class FoldService:
    """Peer side: summarise one text on the local backend."""

    def __init__(self, backend: LlmBackend | BackendSource) -> None:
        self._backend = backend
        self.folds = 0

    async def handle(self, request: Request) -> Any:
        msg = wire.parse(wire.FoldRequest, request.payload, "fold.summarise")
        backend = self._backend() if callable(self._backend) else self._backend
        try:
            response = await backend.complete(fold_request(msg))
        except LlmError as exc:
            raise RequestRejected("model_error", str(exc)) from None
        self.folds += 1
        return wire.llm_response_to_wire(response)


def register_fold_service(
    transport: TransportPort, backend: LlmBackend | BackendSource
) -> FoldService:
    service = FoldService(backend)
    transport.register_handler(protocol_ids.FOLD, service.handle, types={wire.FOLD_SUMMARISE})
    return service


@dataclass(frozen=True)
class FoldConfig:
    timeout_s: float = 120.0
    candidates: int = 3
    """Among this many best-scored peers, the one with the lowest round trip is asked."""


class FoldClient:
    """Leader side: fold on the nearest good peer, else locally."""

    def __init__(
        self,
        transport: TransportPort,
        chooser: PeerChooser,
        local: LlmBackend,
        config: FoldConfig | None = None,
        *,
        requirement: Requirement | None = None,
    ) -> None:
        self.transport = transport
        self.chooser = chooser
        self.local = local
        self.config = config or FoldConfig()
        kind = getattr(local, "name", "").split(":", 1)[0]
        self.requirement = requirement or Requirement(
            backend=kind
            if kind in ("llamacpp", "builtin", "ollama", "openai", "scripted")
            else None
        )
        self.last_peer: str | None = None

    async def fold(
        self,
        text: str,
        *,
        instruction: str = "",
        max_tokens: int = 256,
        model: str | None = None,
        task_id: str | None = None,
        sequence: int = 0,
    ) -> LlmResponse:
        msg = wire.FoldRequest(
            text=text, instruction=instruction, max_tokens=max_tokens, model=model,
            task_id=task_id, sequence=sequence,
        )  # fmt: skip
        placement = self.chooser.rank(self.requirement)
        others = [
            s for s in placement.ranked[: self.config.candidates] if s.peer != self.chooser.me
        ]
        for choice in sorted(others, key=lambda s: (s.latency_ms, -s.total)):
            try:
                reply = await self.transport.request(
                    choice.peer, protocol_ids.FOLD, wire.FOLD_SUMMARISE, msg.model_dump(),
                    timeout=self.config.timeout_s,
                )  # fmt: skip
                response = wire.llm_response_from_wire(reply, choice.peer)
            except (RemoteError, TransportError, ValueError) as exc:
                self.chooser.record_failure(choice.peer)
                log.info("event=fold_failed peer=%s reason=%r", choice.peer, str(exc))
                continue
            self.last_peer = choice.peer
            return response
        self.last_peer = self.chooser.me
        return await self.local.complete(fold_request(msg))
