"""Model backends behind one async protocol (see `base.LlmBackend`)."""

from kowalski_node.llm.base import ChatMessage, LlmBackend, LlmRequest, LlmResponse

__all__ = ["ChatMessage", "LlmBackend", "LlmRequest", "LlmResponse"]
