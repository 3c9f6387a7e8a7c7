"""Message schemas of the remote-work protocols (REPL jobs, sub-call batches, folding).

Every payload is a msgpack map inside the transport's envelope (protocols/README.md);
these pydantic models validate what a peer sends before anything acts on it, so a
malformed request becomes an error reply (`bad_request`) instead of a crash. Unknown
fields are ignored: a newer peer may add fields without breaking older ones.

    /kowalski/repl/1.0.0   repl.open  repl.exec  repl.close  repl.cancel  repl.ping (leader -> peer)
                           repl.sub                                        (peer -> leader)
    /kowalski/llm/1.0.0    llm.batch  llm.ping
    /kowalski/fold/1.0.0   fold.summarise
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kowalski_node.adapters.libp2p import envelope as env
from kowalski_node.adapters.libp2p.errors import RequestRejected
from kowalski_node.llm.base import ChatMessage, LlmRequest, LlmResponse
from kowalski_node.repl.base import ExecResult, SubCallResult

# message types
REPL_OPEN = "repl.open"
REPL_EXEC = "repl.exec"
REPL_CLOSE = "repl.close"
REPL_CANCEL = "repl.cancel"
REPL_SUB = "repl.sub"
REPL_PING = "repl.ping"  # keeps a long block's stream from looking idle
LLM_BATCH = "llm.batch"
LLM_PING = "llm.ping"
FOLD_SUMMARISE = "fold.summarise"

# error codes beyond the envelope's own (sent as RemoteError.code)
ERR_UNKNOWN_SESSION = "unknown_session"
ERR_MISSING_BLOB = "missing_blob"

MAX_ID = 200
MAX_CODE = 4 * 1024 * 1024
MAX_BATCH = 256
MAX_PROMPTS_PER_SUB = 10_000


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


_WireT = TypeVar("_WireT", bound=_Wire)


# ----------------------------------------------------------------------------- REPL


class OpenSession(_Wire):
    """Open (or restore) a namespace on a peer. Big values arrive first as blobs."""

    session: str = Field(min_length=1, max_length=MAX_ID)
    context: Any = None
    context_blob: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    history: Any = None  # kowalski-repl-history/1 plain form (repl.history)
    history_blob: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class OpenReply(_Wire):
    session: str
    languages: list[str] = Field(default_factory=list)
    replayed_blocks: int = 0
    notes: list[str] = Field(default_factory=list)


class ExecBlock(_Wire):
    session: str = Field(min_length=1, max_length=MAX_ID)
    exec_id: str = Field(min_length=1, max_length=64)
    code: str = Field(max_length=MAX_CODE)
    language: str = Field(default="python", min_length=1, max_length=32)
    timeout_s: float = Field(default=10.0, gt=0, le=24 * 3600)


class CloseSession(_Wire):
    session: str = Field(min_length=1, max_length=MAX_ID)


class CancelExec(_Wire):
    exec_id: str = Field(min_length=1, max_length=64)


class SubCallAsk(_Wire):
    """A peer's code called llm_query(_batched): the leader answers (and numbers) it."""

    exec_id: str = Field(min_length=1, max_length=64)
    index: int = Field(ge=0)  # n-th sub-call batch of this execution (duplicate detection)
    prompts: list[str] = Field(max_length=MAX_PROMPTS_PER_SUB)
    model: str | None = None


def exec_result_to_wire(result: ExecResult) -> dict[str, Any]:
    return {
        "stdout": result.stdout,
        "stderr": result.stderr,
        "error": result.error,
        "error_kind": result.error_kind,
        "exec_ms": result.exec_ms,
        "final_answer": result.final_answer,
        "variables": dict(result.variables),
        "sub_calls": result.sub_calls,
        "namespace_rebuilt": result.namespace_rebuilt,
        "notes": list(result.notes),
    }


class _ExecResultWire(_Wire):
    stdout: str = ""
    stderr: str = ""
    error: str | None = None
    error_kind: (
        Literal[
            "exception", "syntax", "timeout", "memory", "killed", "unsupported_language", "sandbox"
        ]
        | None
    ) = None
    exec_ms: float = 0.0
    final_answer: str | None = None
    variables: dict[str, str] = Field(default_factory=dict)
    sub_calls: int = 0
    namespace_rebuilt: bool = False
    notes: list[str] = Field(default_factory=list)


def exec_result_from_wire(payload: Any) -> ExecResult:
    """Raises ValueError with a readable reason when a peer's reply is not an ExecResult."""
    try:
        w = _ExecResultWire.model_validate(payload)
    except ValidationError as exc:
        raise ValueError(f"malformed exec result: {first_problem(exc)}") from None
    return ExecResult(
        stdout=w.stdout, stderr=w.stderr, error=w.error, error_kind=w.error_kind,
        exec_ms=w.exec_ms, final_answer=w.final_answer, variables=dict(w.variables),
        sub_calls=w.sub_calls, namespace_rebuilt=w.namespace_rebuilt, notes=list(w.notes),
    )  # fmt: skip


def sub_results_to_wire(results: list[SubCallResult]) -> list[list[str | None]]:
    return [[r.text, r.error] for r in results]


def sub_results_from_wire(payload: Any, expected: int) -> list[SubCallResult]:
    """The leader's answer to a repl.sub; a malformed one fails every slot with a reason."""
    rows = payload.get("results") if isinstance(payload, dict) else None
    if not isinstance(rows, list) or len(rows) != expected:
        return [SubCallResult(error="the leader sent a malformed sub-call answer")] * expected
    out: list[SubCallResult] = []
    for row in rows:
        if isinstance(row, list) and len(row) == 2 and isinstance(row[0], str):
            out.append(SubCallResult(text=row[0]))
        elif isinstance(row, list) and len(row) == 2 and isinstance(row[1], str):
            out.append(SubCallResult(error=row[1]))
        else:
            out.append(SubCallResult(error="the leader sent a malformed sub-call answer"))
    return out


# ----------------------------------------------------------------------------- LLM


class _Message(_Wire):
    role: Literal["system", "user", "assistant"]
    content: str


class LlmRequestWire(_Wire):
    messages: list[_Message] = Field(min_length=1, max_length=4096)
    model: str | None = Field(default=None, max_length=256)
    max_tokens: int = Field(default=512, ge=1, le=1_000_000)
    temperature: float = Field(default=0.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=64)
    seed: int | None = None
    task_id: str | None = Field(default=None, max_length=MAX_ID)
    purpose: Literal["root", "sub", "fold"] = "sub"
    sequence: int = Field(default=0, ge=0)

    def to_request(self) -> LlmRequest:
        return LlmRequest(
            messages=tuple(ChatMessage(m.role, m.content) for m in self.messages),
            model=self.model, max_tokens=self.max_tokens, temperature=self.temperature,
            top_p=self.top_p, stop=tuple(self.stop), seed=self.seed, task_id=self.task_id,
            purpose=self.purpose, sequence=self.sequence,
        )  # fmt: skip


def llm_request_to_wire(request: LlmRequest) -> dict[str, Any]:
    return {
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "model": request.model,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stop": list(request.stop),
        "seed": request.seed,
        "task_id": request.task_id,
        "purpose": request.purpose,
        "sequence": request.sequence,
    }


class LlmBatch(_Wire):
    requests: list[LlmRequestWire] = Field(min_length=1, max_length=MAX_BATCH)


def llm_response_to_wire(response: LlmResponse) -> dict[str, Any]:
    return {
        "text": response.text,
        "model": response.model,
        "backend": response.backend,
        "tokens_in": response.tokens_in,
        "tokens_out": response.tokens_out,
        "latency_ms": response.latency_ms,
        "finish_reason": response.finish_reason,
    }


class _LlmResponseWire(_Wire):
    text: str
    model: str = ""
    backend: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    latency_ms: float = 0.0
    finish_reason: Literal["stop", "length", "cancelled"] = "stop"


def llm_response_from_wire(payload: Any, peer: str) -> LlmResponse:
    try:
        w = _LlmResponseWire.model_validate(payload)
    except ValidationError as exc:
        raise ValueError(f"malformed model response from {peer}: {first_problem(exc)}") from None
    return LlmResponse(
        text=w.text, model=w.model, backend=w.backend, tokens_in=w.tokens_in,
        tokens_out=w.tokens_out, latency_ms=w.latency_ms, finish_reason=w.finish_reason,
        extra={"peer": peer},
    )  # fmt: skip


# ----------------------------------------------------------------------------- fold


class FoldRequest(_Wire):
    text: str = Field(max_length=2 * 1024 * 1024)
    instruction: str = Field(default="", max_length=8192)
    max_tokens: int = Field(default=256, ge=1, le=100_000)
    model: str | None = Field(default=None, max_length=256)
    task_id: str | None = Field(default=None, max_length=MAX_ID)
    sequence: int = Field(default=0, ge=0)


# ----------------------------------------------------------------------------- helpers


def first_problem(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "payload"
    return f"{where}: {err['msg']}"


def parse(model: type[_WireT], payload: Any, what: str) -> _WireT:
    """Validate a request payload; a bad one becomes a `bad_request` error reply."""
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise RequestRejected(env.ERR_BAD_REQUEST, f"bad {what}: {first_problem(exc)}") from None
