"""`ScriptedBackend`: deterministic replay of recorded model answers, for tests and demos.

Script format (JSON, keep it stable: other tools write it)::

    {
      "responses":     ["root turn 0", "root turn 1", ...],   # required
      "sub_responses": ["llm_query 0", "llm_query 1", ...],   # optional
      "fold_responses": [...],                                # optional (context folding)
      "latency_ms": 0,            # optional: number, or {"root": ms, "sub": ms, "fold": ms}
      "model": "scripted",        # optional: model name reported in responses
      "description": "..."        # optional, ignored
    }

An entry is a string, or an object `{"text": ..., "tokens_out": N, "latency_ms": ms}`,
or `{"error": "message"}` (that call fails with LlmError) or
`{"error": "message", "unavailable": true}` (fails with BackendUnavailable).

The i-th root turn of a task gets `responses[i]` and the i-th sub-call gets
`sub_responses[i]`, where i is `LlmRequest.sequence`. The position lives in the
request (the task's checkpoint), not in this object, so a task resumed on another
node goes on where it stopped and one backend can serve many tasks at once.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from kowalski_node.errors import BackendUnavailable, ConfigError, LlmError, ScriptExhausted
from kowalski_node.llm.base import LlmRequest, LlmResponse

_KEYS = {"responses", "sub_responses", "fold_responses", "latency_ms", "model", "description"}
_ENTRY_KEYS = {"text", "tokens_out", "latency_ms", "error", "unavailable"}
_LISTS = {"root": "responses", "sub": "sub_responses", "fold": "fold_responses"}


@dataclass(frozen=True)
class ScriptEntry:
    text: str | None = None
    error: str | None = None
    unavailable: bool = False
    tokens_out: int | None = None
    latency_ms: float | None = None


def estimate_tokens(text: str) -> int:
    """About four characters per token: deterministic, close enough for budgets."""
    return max(1, math.ceil(len(text) / 4)) if text else 0


class ScriptedBackend:
    """Answers from a script; keeps no per-task state (see module docstring)."""

    name = "scripted"

    def __init__(
        self,
        responses: Sequence[str | Mapping[str, Any]],
        sub_responses: Sequence[str | Mapping[str, Any]] = (),
        *,
        fold_responses: Sequence[str | Mapping[str, Any]] = (),
        latency_ms: float | Mapping[str, float] = 0.0,
        model: str = "scripted",
        source: str = "<inline script>",
    ) -> None:
        self.source = source
        self.model = model
        self._lists: dict[str, tuple[ScriptEntry, ...]] = {
            "root": _entries(responses, "responses", source),
            "sub": _entries(sub_responses, "sub_responses", source),
            "fold": _entries(fold_responses, "fold_responses", source),
        }
        self._latency = _latency(latency_ms, source)

    # ------------------------------------------------------------------ building

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<inline script>") -> ScriptedBackend:
        if not isinstance(data, Mapping):
            raise ConfigError(f"scripted backend ({source}): the script must be a JSON object")
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise ConfigError(
                f"scripted backend ({source}): unknown key(s) {', '.join(unknown)}; "
                f"allowed: {', '.join(sorted(_KEYS))}"
            )
        if "responses" not in data:
            raise ConfigError(f"scripted backend ({source}): missing the required 'responses' list")
        model = data.get("model", "scripted")
        if not isinstance(model, str) or not model:
            raise ConfigError(f"scripted backend ({source}): 'model' must be a non-empty string")
        return cls(
            _as_list(data["responses"], "responses", source),
            _as_list(data.get("sub_responses", []), "sub_responses", source),
            fold_responses=_as_list(data.get("fold_responses", []), "fold_responses", source),
            latency_ms=data.get("latency_ms", 0.0),
            model=model,
            source=source,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> ScriptedBackend:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise ConfigError(f"scripted backend: no script file at {file}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"scripted backend: cannot read {file}: {exc}") from exc
        if _looks_like_trajectory(text):
            return cls.from_dict(script_from_trajectory(file), source=str(file))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"scripted backend: {file} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
            ) from exc
        return cls.from_dict(data, source=str(file))

    def to_dict(self) -> dict[str, Any]:
        """The script in file format (round-trips through `from_dict`)."""
        out: dict[str, Any] = {"model": self.model, "latency_ms": dict(self._latency)}
        for purpose, key in _LISTS.items():
            out[key] = [_entry_to_json(e) for e in self._lists[purpose]]
        return out

    def __len__(self) -> int:
        return len(self._lists["root"])

    # ------------------------------------------------------------------ LlmBackend

    def _entry(self, request: LlmRequest) -> ScriptEntry:
        purpose = request.purpose if request.purpose in self._lists else "root"
        entries = self._lists[purpose]
        seq = request.sequence
        if 0 <= seq < len(entries):
            return entries[seq]
        what = {"root": "root turn", "sub": "sub-call", "fold": "fold call"}[purpose]
        raise ScriptExhausted(
            f"scripted backend ({self.source}): task {request.task_id or '-'} asked for {what} "
            f"#{seq + 1} (sequence {seq}) but '{_LISTS[purpose]}' has only {len(entries)} entr"
            f"{'y' if len(entries) == 1 else 'ies'}"
        )

    async def complete(self, request: LlmRequest) -> LlmResponse:
        started = time.perf_counter()
        entry = self._entry(request)
        delay = entry.latency_ms if entry.latency_ms is not None else self._latency[request.purpose]
        if delay > 0:
            await trio.sleep(delay / 1000.0)
        if entry.error is not None:
            if entry.unavailable:
                raise BackendUnavailable("scripted", self.source, entry.error)
            raise LlmError(f"scripted backend ({self.source}): {entry.error}")
        text = entry.text or ""
        prompt_chars = sum(len(m.content) for m in request.messages)
        return LlmResponse(
            text=text,
            model=request.model or self.model,
            backend=self.name,
            tokens_in=max(1, math.ceil(prompt_chars / 4)),
            tokens_out=entry.tokens_out if entry.tokens_out is not None else estimate_tokens(text),
            latency_ms=(time.perf_counter() - started) * 1000.0,
            extra={"sequence": request.sequence, "purpose": request.purpose},
        )

    async def stream(self, request: LlmRequest) -> AsyncIterator[str]:
        response = await self.complete(request)
        words = response.text.split(" ")
        for i, word in enumerate(words):
            yield word if i == len(words) - 1 else word + " "

    async def list_models(self) -> list[str]:
        return [self.model]

    async def aclose(self) -> None:
        return None


def _looks_like_trajectory(text: str) -> bool:
    """A JSONL trajectory (`kowalski-node run` writes one per task) rather than a script."""
    first = next((line for line in text.splitlines() if line.strip()), "")
    try:
        record = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "type" in record and "responses" not in record


def script_from_trajectory(path: Path) -> dict[str, Any]:
    """A script replaying a recorded trajectory's root-model answers in order.

    Each `model_response` record gives the answer of root turn `sequence`; a resumed task
    may record a turn twice, and the last recording wins. Sub-call answers are not in
    trajectories, so a replayed `llm_query` fails with ScriptExhausted.
    """
    from kowalski_node.runtime.trajectory import TrajectoryError, read_trajectory

    try:
        records = read_trajectory(path)
    except TrajectoryError as exc:
        raise ConfigError(f"scripted backend: {exc}") from exc
    by_turn: dict[int, str] = {}
    model = "scripted"
    for record in records:
        if record.get("type") == "model_response" and isinstance(record.get("text"), str):
            by_turn[int(record.get("sequence", len(by_turn)))] = record["text"]
            model = str(record.get("model") or model)
    if not by_turn:
        raise ConfigError(f"scripted backend: trajectory {path} has no model answers to replay")
    return {
        "responses": [by_turn[k] for k in sorted(by_turn)],
        "model": f"replay:{model}",
        "description": f"replay of {path}",
    }


def _as_list(value: Any, key: str, source: str) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(
            f"scripted backend ({source}): '{key}' must be a list, got {type(value).__name__}"
        )
    return value


def _entries(items: Sequence[Any], key: str, source: str) -> tuple[ScriptEntry, ...]:
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise ConfigError(f"scripted backend ({source}): '{key}' must be a list")
    return tuple(_entry(item, f"{key}[{i}]", source) for i, item in enumerate(items))


def _entry(item: Any, where: str, source: str) -> ScriptEntry:
    if isinstance(item, str):
        return ScriptEntry(text=item)
    if not isinstance(item, Mapping):
        raise ConfigError(
            f"scripted backend ({source}): {where} must be a string or an object, got {type(item).__name__}"
        )
    unknown = sorted(set(item) - _ENTRY_KEYS)
    if unknown:
        raise ConfigError(
            f"scripted backend ({source}): {where} has unknown key(s) {', '.join(unknown)}"
        )
    text, error = item.get("text"), item.get("error")
    if (text is None) == (error is None):
        raise ConfigError(
            f"scripted backend ({source}): {where} needs exactly one of 'text' or 'error'"
        )
    if not isinstance(text if text is not None else error, str):
        raise ConfigError(f"scripted backend ({source}): {where} 'text'/'error' must be a string")
    tokens_out = item.get("tokens_out")
    if tokens_out is not None and (
        not isinstance(tokens_out, int) or isinstance(tokens_out, bool) or tokens_out < 0
    ):
        raise ConfigError(
            f"scripted backend ({source}): {where} 'tokens_out' must be an integer >= 0"
        )
    latency = item.get("latency_ms")
    if latency is not None and (
        not isinstance(latency, (int, float)) or isinstance(latency, bool) or latency < 0
    ):
        raise ConfigError(
            f"scripted backend ({source}): {where} 'latency_ms' must be a number >= 0"
        )
    return ScriptEntry(
        text=text,
        error=error,
        unavailable=bool(item.get("unavailable", False)),
        tokens_out=tokens_out,
        latency_ms=float(latency) if latency is not None else None,
    )


def _latency(value: Any, source: str) -> dict[str, float]:
    def number(v: Any, where: str) -> float:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 or not math.isfinite(v):
            raise ConfigError(f"scripted backend ({source}): {where} must be a number >= 0")
        return float(v)

    if isinstance(value, Mapping):
        unknown = sorted(set(value) - set(_LISTS))
        if unknown:
            raise ConfigError(
                f"scripted backend ({source}): latency_ms has unknown key(s) {', '.join(unknown)}; "
                "allowed: root, sub, fold"
            )
        return {p: number(value.get(p, 0.0), f"latency_ms.{p}") for p in _LISTS}
    base = number(value, "latency_ms")
    return dict.fromkeys(_LISTS, base)


def _entry_to_json(entry: ScriptEntry) -> str | dict[str, Any]:
    if entry.error is None and entry.tokens_out is None and entry.latency_ms is None:
        return entry.text or ""
    out: dict[str, Any] = {}
    if entry.error is not None:
        out["error"] = entry.error
        if entry.unavailable:
            out["unavailable"] = True
    else:
        out["text"] = entry.text or ""
    if entry.tokens_out is not None:
        out["tokens_out"] = entry.tokens_out
    if entry.latency_ms is not None:
        out["latency_ms"] = entry.latency_ms
    return out
