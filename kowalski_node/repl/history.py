"""Per-session record of executed blocks and the sub-call answers they got.

Replaying it in a fresh worker rebuilds a session's namespace after the worker was
replaced, or on another node after a failover, without asking any model again. The plain
form (`to_plain`/`from_plain`) is JSON- and msgpack-safe and is the exchange format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kowalski_node.errors import SandboxError
from kowalski_node.repl.base import SubCallResult

FORMAT = "kowalski-repl-history/1"


@dataclass(frozen=True)
class RecordedBatch:
    """One `llm_query`/`llm_query_batched` call: prompt fingerprints and the answers given."""

    model: str | None
    prompt_digests: tuple[str, ...]
    results: tuple[SubCallResult, ...]

    def to_plain(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt_digests": list(self.prompt_digests),
            "results": [
                {"error": r.error} if r.error is not None else {"text": r.text or ""}
                for r in self.results
            ],
        }

    def to_worker(self) -> dict[str, Any]:
        return {"d": list(self.prompt_digests), "r": [[r.text, r.error] for r in self.results]}


@dataclass(frozen=True)
class HistoryBlock:
    code: str
    language: str
    timeout_s: float
    sub_calls: tuple[RecordedBatch, ...] = ()

    def to_plain(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "language": self.language,
            "timeout_s": self.timeout_s,
            "sub_calls": [b.to_plain() for b in self.sub_calls],
        }


def history_to_plain(blocks: list[HistoryBlock]) -> dict[str, Any]:
    return {"format": FORMAT, "blocks": [b.to_plain() for b in blocks]}


def history_from_plain(data: Any) -> list[HistoryBlock]:
    """Parse and validate; a malformed history is a SandboxError that says what is wrong."""
    if isinstance(data, list):
        data = {"format": FORMAT, "blocks": data}
    if not isinstance(data, dict):
        raise SandboxError(f"REPL history must be a dict, got {type(data).__name__}")
    if data.get("format", FORMAT) != FORMAT:
        raise SandboxError(
            f"unsupported REPL history format {data.get('format')!r} (expected {FORMAT})"
        )
    raw_blocks = data.get("blocks")
    if not isinstance(raw_blocks, list):
        raise SandboxError("REPL history needs a 'blocks' list")
    blocks: list[HistoryBlock] = []
    for i, raw in enumerate(raw_blocks):
        where = f"REPL history block {i}"
        if not isinstance(raw, dict) or not isinstance(raw.get("code"), str):
            raise SandboxError(f"{where}: needs a 'code' string")
        language = raw.get("language", "python")
        timeout = raw.get("timeout_s", 10.0)
        if not isinstance(language, str):
            raise SandboxError(f"{where}: 'language' must be a string")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            raise SandboxError(f"{where}: 'timeout_s' must be a positive number")
        batches: list[RecordedBatch] = []
        for j, batch in enumerate(raw.get("sub_calls") or []):
            batches.append(_batch_from_plain(batch, f"{where}, sub-call {j}"))
        blocks.append(HistoryBlock(raw["code"], language, float(timeout), tuple(batches)))
    return blocks


def _batch_from_plain(batch: Any, where: str) -> RecordedBatch:
    if not isinstance(batch, dict):
        raise SandboxError(f"{where}: must be a dict")
    model = batch.get("model")
    digests = batch.get("prompt_digests")
    results = batch.get("results")
    if model is not None and not isinstance(model, str):
        raise SandboxError(f"{where}: 'model' must be a string or null")
    if not isinstance(digests, list) or not all(isinstance(d, str) for d in digests):
        raise SandboxError(f"{where}: 'prompt_digests' must be a list of strings")
    if not isinstance(results, list) or len(results) != len(digests):
        raise SandboxError(f"{where}: 'results' must be a list as long as 'prompt_digests'")
    parsed: list[SubCallResult] = []
    for item in results:
        if isinstance(item, dict) and isinstance(item.get("error"), str):
            parsed.append(SubCallResult(error=item["error"]))
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            parsed.append(SubCallResult(text=item["text"]))
        else:
            raise SandboxError(f"{where}: each result needs a 'text' or an 'error' string")
    return RecordedBatch(model, tuple(digests), tuple(parsed))
