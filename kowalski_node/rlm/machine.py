"""The RLM loop as a pure state machine.

No trio, no clocks, no I/O: every method takes `now` (seconds on the driver's
clock) and returns effects (`kowalski_node.rlm.effects`). Its whole state is
plain data (`snapshot()`), so the mesh can checkpoint it after every step and
`restore()` it on another node, which then goes on from the same turn.

One turn: ask the root model -> parse its reply -> run its code blocks one by
one (sub-calls made by a block go through `on_sub_calls`) -> end on a final
marker, or feed the outputs back and ask again. When a limit is hit the model
is asked once for a final answer, and the result names the limit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from kowalski_node.llm.base import ChatMessage, LlmRequest, LlmResponse
from kowalski_node.repl.base import ExecResult
from kowalski_node.repl.namespace import RECURSIVE_MODEL_PREFIX, refusal_reason
from kowalski_node.rlm import prompts
from kowalski_node.rlm.config import RlmConfig
from kowalski_node.rlm.effects import (
    Abort,
    Effect,
    Final,
    NeedExec,
    NeedLlm,
    NeedSubCalls,
    Progress,
    SubCallOutcome,
    Trace,
)
from kowalski_node.rlm.languages import UNKNOWN, normalize_language
from kowalski_node.rlm.parser import parse_response
from kowalski_node.rlm.types import (
    BlockResult,
    ExecutionResult,
    FinalVia,
    ProgressEvent,
    Stage,
    StopReason,
    SubCallRecord,
)

SNAPSHOT_VERSION = 1

# Blocks whose effects on the namespace cannot be rebuilt by running them again.
_NOT_REPLAYABLE = frozenset(
    {"timeout", "memory", "killed", "unsupported_language", "sandbox", "syntax", "duplicate"}
)
# Blocks that never ran: a later identical block is not a repeat of them.
_NEVER_RAN = frozenset({"unsupported_language", "duplicate"})
# After a repeated block the next root turn samples at this temperature (at least): a
# greedy small model otherwise writes the very same block again.
_RESAMPLE_TEMPERATURE = 0.7
# How much of the last block outputs the "value only" extraction call reads.
_EXTRACT_BLOCKS = 3
_EXTRACT_CHARS = 1500


class SnapshotError(ValueError):
    """A snapshot could not be restored (wrong version or malformed)."""


class RlmMachine:
    """One task's RLM loop. Create, call `start(now)`, then feed it events."""

    def __init__(
        self,
        *,
        task_id: str,
        prompt: str,
        context_meta: Mapping[str, Any],
        config: RlmConfig | None = None,
        languages: Sequence[str] | None = ("python",),
        depth: int = 0,
    ) -> None:
        self.task_id = task_id
        self.prompt = prompt
        self.context_meta: dict[str, Any] = dict(context_meta)
        self.config = config or RlmConfig()
        # None: send every language to the executor and let it refuse.
        self.languages: list[str] | None = (
            sorted({normalize_language(lang) for lang in languages})
            if languages is not None
            else None
        )
        self.depth = depth
        self.phase = "idle"  # idle | awaiting_llm | executing | resolving | done
        self.messages: list[tuple[str, str]] = []
        self.traced_messages = 0
        self.iteration = 0
        self.root_sequence = 0  # answered root turns; the next root call uses this number
        self.sub_sequence = 0  # sub-call slots handed out so far
        self.next_call_id = 1
        self.pending: dict[str, Any] | None = None
        self.pending_subs: dict[int, dict[str, Any]] = {}
        # The current turn.
        self.turn_blocks: list[dict[str, Any]] = []
        self.turn_pos = 0
        self.turn_final: dict[str, str] | None = None
        self.turn_prose = ""
        self.turn_feedback: list[str] = []
        # The block in flight: its sub-calls, and answers recorded before a failover.
        self.block_sub_start = 0
        self.block_subs: list[dict[str, Any]] = []
        self.replay_cache: list[dict[str, Any]] = []
        self.blocks: list[BlockResult] = []
        self.block_dicts: list[dict[str, Any]] = []  # blocks as plain data, kept for snapshots
        self.variables: dict[str, str] = {}
        self.consecutive_errors = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.sub_calls = 0
        self.model_calls = 0
        self.model_ms = 0.0
        self.sub_ms = 0.0
        self.exec_ms = 0.0
        self.finalizing = False
        self.limit: str | None = None
        self.cancelled = False
        self.infra_failed = False
        self.resample = False  # the last turn repeated a block: sample the next one
        self.repeats = 0  # repeated blocks in a row (a model with nothing new to do)
        self.start_time = 0.0
        self.last_now = 0.0
        self.result: ExecutionResult | None = None

    # ------------------------------------------------------------------ queries

    @property
    def done(self) -> bool:
        return self.phase == "done"

    def elapsed(self, now: float) -> float:
        return max(0.0, now - self.start_time)

    def next_deadline(self) -> float | None:
        """When `tick` must next be called (the time budget), or None."""
        if self.done or self.finalizing or self.config.time_budget_s is None:
            return None
        return self.start_time + self.config.time_budget_s

    def replay_blocks(self) -> list[BlockResult]:
        """Blocks to run again, in order, to rebuild the REPL namespace after a restore."""
        return [b for b in self.blocks if b.replayable]

    def in_flight(self) -> list[int]:
        ids = [self.pending["call_id"]] if self.pending else []
        return ids + list(self.pending_subs)

    # ------------------------------------------------------------------ events

    def start(self, now: float) -> list[Effect]:
        if self.phase != "idle":
            return []
        self.start_time = now
        self.last_now = now
        system = root_system_prompt(self.config, self.context_meta)
        user = prompts.first_user_message(self.prompt, self.context_meta)
        self.messages = [("system", system), ("user", user)]
        effects: list[Effect] = [
            Trace(
                self._record(
                    now,
                    "task_start",
                    prompt=self.prompt,
                    context_meta=self.context_meta,
                    config=self.config.to_dict(),
                    depth=self.depth,
                    languages=self.languages,
                )
            ),
            self._progress(now, "start"),
        ]
        return effects + self._ask_model(now)

    def on_llm_response(self, call_id: int, response: LlmResponse, now: float) -> list[Effect]:
        if self._is_pending(call_id, "extract"):
            return self._on_extracted(response, now)
        if not self._is_pending(call_id, "llm"):
            return []
        self.last_now = now
        prefill = str((self.pending or {}).get("prefill", ""))
        if prefill:  # the model continued our opening fence: the reply is both together
            response = replace(response, text=prefill + response.text)
        self.pending = None
        self._count_root_call(response)
        self.messages.append(("assistant", response.text))
        self.traced_messages = len(self.messages)
        self.resample = False
        if not self.finalizing:
            self.iteration += 1
        effects: list[Effect] = [
            Trace(
                self._record(
                    now,
                    "model_response",
                    sequence=self.root_sequence - 1,
                    text=response.text,
                    model=response.model,
                    backend=response.backend,
                    tokens_in=response.tokens_in,
                    tokens_out=response.tokens_out,
                    latency_ms=response.latency_ms,
                    finish_reason=response.finish_reason,
                )
            ),
            self._progress(now, "model_response", model_latency_ms=response.latency_ms),
        ]
        parsed = parse_response(response.text)
        self.turn_blocks = [
            {"code": b.code, "language": b.language, "tag": b.tag, "kind": b.kind}
            for b in parsed.blocks
        ]
        self.turn_pos = 0
        self.turn_final = (
            {"kind": parsed.final.kind, "value": parsed.final.value} if parsed.final else None
        )
        self.turn_prose = parsed.prose if parsed.blocks else response.text.strip()
        self.turn_feedback = []
        return effects + self._advance(now)

    def on_llm_error(self, call_id: int, error: str, now: float) -> list[Effect]:
        """The root model failed for good (the driver has already retried)."""
        if self._is_pending(call_id, "extract"):  # the answer falls back to the reply's text
            self.pending = None
            trace = Trace(
                self._record(now, "model_error", sequence=self.root_sequence, error=error)
            )
            return [trace, *self._finish(now, self._fallback_text(), "text", self._limit_reason())]
        if not self._is_pending(call_id, "llm"):
            return []
        self.last_now = now
        self.pending = None
        trace = Trace(self._record(now, "model_error", sequence=self.root_sequence, error=error))
        if self.finalizing:
            return [trace, *self._finish(now, "", "none", self._limit_reason(), error=error)]
        return [trace, *self._finish(now, "", "none", "error", error=error)]

    def on_exec_result(self, call_id: int, result: ExecResult, now: float) -> list[Effect]:
        if self.pending is None or self.pending["call_id"] != call_id:
            return []
        self.last_now = now
        kind = self.pending["kind"]
        if kind == "resolve":
            return self._on_resolved(result, now)
        if kind != "exec":
            return []
        self.pending = None
        for call in list(self.pending_subs):  # sub-calls of a finished block can no longer land
            self.pending_subs.pop(call)
        block = self.turn_blocks[self.turn_pos]
        self.turn_pos += 1
        effects = self._record_block(block, result, now)
        if result.final_answer is not None:
            reason: StopReason = self._limit_reason() if self.finalizing else "final"
            return effects + self._finish(now, result.final_answer, "code", reason)
        if (
            not result.ok
            and not self.finalizing
            and self.consecutive_errors >= self.config.max_errors
        ):
            return effects + self._skip_rest_and_finalize(now, "max_errors")
        return effects + self._advance(now)

    def on_exec_lost(self, call_id: int, reason: str, now: float) -> list[Effect]:
        """The block in flight failed for an infrastructure reason, not because of its code.

        The REPL session was lost, its worker or peer died, or the executor broke. The
        model never sees this as its own error: the same block (or FINAL_VAR lookup) is
        issued again with `rebuild=True`, so the driver first rebuilds the namespace in a
        fresh session by replay. Sub-call answers it already got are reused, not asked
        again. After `infra_retries` such attempts the run ends with stop_reason "error"
        and `infra_failed` set, and nothing of it is committed as an answer.
        """
        pending = self.pending
        if (
            pending is None
            or pending["call_id"] != call_id
            or pending["kind"] not in {"exec", "resolve"}
        ):
            return []
        self.last_now = now
        attempts = int(pending.get("infra_attempts", 0)) + 1
        effects: list[Effect] = [
            Trace(self._record(now, "exec_retry", what=pending["kind"], attempt=attempts, reason=reason))
        ]  # fmt: skip
        for sub_call in list(self.pending_subs):
            effects.append(Abort(sub_call, "block restarted"))
            self.pending_subs.pop(sub_call)
        if attempts > self.config.infra_retries:
            self.infra_failed = True
            self.pending = None
            error = (
                f"the REPL failed for infrastructure reasons {attempts} time(s) in a row "
                f"(last: {reason}); the task was not answered"
            )
            return effects + self._finish(now, "", "none", "error", error=error)
        if pending["kind"] == "resolve":
            self.pending = None
            return effects + self._issue_resolve(
                str(pending["name"]), now, rebuild=True, infra_attempts=attempts
            )
        # The block runs again with the same sub-call numbers; answers already recorded are
        # handed back from the cache, exactly as after a failover.
        self.sub_calls -= self.sub_sequence - self.block_sub_start
        self.sub_sequence = self.block_sub_start
        self.replay_cache = [*self.replay_cache, *self.block_subs]
        self.pending = None
        block = self.turn_blocks[self.turn_pos]
        return effects + self._issue_exec(block, now, rebuild=True, infra_attempts=attempts)

    def on_sub_calls(
        self, exec_call_id: int, prompts_: Sequence[str], model: str | None, now: float
    ) -> list[Effect]:
        """A running block called `llm_query(_batched)` or `rlm_query(_batched)`; returns
        exactly one NeedSubCalls. rlm_query's model carries RECURSIVE_MODEL_PREFIX: its
        slots become child RLM runs where `max_depth` allows, else plain model calls."""
        self.last_now = max(self.last_now, now)
        wants_recursion = model is not None and model.startswith(RECURSIVE_MODEL_PREFIX)
        if model is not None and wants_recursion:
            model = model[len(RECURSIVE_MODEL_PREFIX) :] or None
        call_id = self._new_call_id()
        alive = (
            self.pending is not None
            and self.pending["call_id"] == exec_call_id
            and self.pending["kind"] == "exec"
        )
        requests: list[LlmRequest] = []
        answered: list[SubCallRecord | None] = []
        sequences: list[int] = []
        budget_left = self._tokens_left()
        for prompt in prompts_:
            seq = self.sub_sequence if alive else -1
            if alive:
                self.sub_sequence += 1
            sequences.append(seq)
            request = LlmRequest(
                messages=(ChatMessage("user", str(prompt)),),
                model=model or self.config.sub_model,
                max_tokens=self.config.sub_max_tokens,
                temperature=self.config.temperature,
                top_p=self.config.top_p,
                seed=self.config.seed,
                task_id=self.task_id,
                purpose="sub",
                sequence=max(seq, 0),
            )
            requests.append(request)
            if not alive:
                answered.append(
                    SubCallRecord(
                        seq, str(prompt), model, None, "the code block is no longer running"
                    )
                )
                continue
            cached = self._cached_sub(seq, str(prompt))
            if cached is not None:
                answered.append(cached)
            elif budget_left is not None and budget_left <= 0:
                answered.append(
                    SubCallRecord(seq, str(prompt), request.model, None,
                                  f"token budget exhausted ({self.tokens_in + self.tokens_out:,} of "
                                  f"{self.config.token_budget:,} tokens used)")
                )  # fmt: skip
            else:
                answered.append(None)
        if alive:
            self.pending_subs[call_id] = {
                "sequences": sequences,
                "prompts": [str(p) for p in prompts_],
                "model": model or self.config.sub_model,
                "answered": [a.to_dict() if a else None for a in answered],
            }
            self.sub_calls += len(prompts_)
        effects: list[Effect] = [
            NeedSubCalls(
                call_id,
                tuple(requests),
                tuple(answered),
                recursive=wants_recursion and self.depth + 1 < self.config.max_depth,
                depth=self.depth + 1,
            )
        ]
        if alive:
            effects.append(self._progress(now, "sub_calls", message=f"{len(prompts_)} sub-call(s)"))
        return effects

    def on_sub_results(
        self, call_id: int, outcomes: Sequence[SubCallOutcome | None], now: float
    ) -> list[Effect]:
        """Outcomes aligned with the NeedSubCalls requests (None for pre-answered slots)."""
        batch = self.pending_subs.pop(call_id, None)
        if batch is None:
            return []
        self.last_now = max(self.last_now, now)
        for i, seq in enumerate(batch["sequences"]):
            pre = batch["answered"][i]
            if pre is not None:
                self.block_subs.append(pre)
                continue
            outcome = outcomes[i] if i < len(outcomes) else None
            if outcome is None:
                outcome = SubCallOutcome(error="no result reported for this slot")
            self.tokens_in += outcome.tokens_in
            self.tokens_out += outcome.tokens_out
            self.sub_ms += outcome.latency_ms
            self.block_subs.append(
                SubCallRecord(
                    seq, batch["prompts"][i], batch["model"], outcome.text, outcome.error,
                    outcome.tokens_in, outcome.tokens_out, outcome.latency_ms,
                ).to_dict()
            )  # fmt: skip
        return [
            self._progress(now, "sub_calls_done", message=f"{len(batch['sequences'])} sub-call(s)")
        ]

    def cancel(self, now: float, *, graceful: bool = False) -> list[Effect]:
        """Stop the task. graceful=True asks the model once for an answer first."""
        if self.done or self.cancelled:
            return []
        self.last_now = now
        self.cancelled = True
        effects: list[Effect] = self._abort_in_flight("cancelled")
        effects.append(Trace(self._record(now, "cancelled", graceful=graceful)))
        if graceful and not self.finalizing:
            self._discard_turn("cancelled")
            return effects + self._enter_finalizing(now, "cancelled")
        return effects + self._finish(now, "", "none", "cancelled")

    def tick(self, now: float) -> list[Effect]:
        """Let time pass: enforces the total time budget while a call is in flight."""
        self.last_now = max(self.last_now, now)
        if self.done or self.finalizing or not self._time_over(now):
            return []
        if self.phase == "idle":
            return []
        effects = self._abort_in_flight("time budget reached")
        self._discard_turn("time_budget")
        return effects + self._enter_finalizing(now, "time_budget")

    # ------------------------------------------------------------------ snapshot

    def snapshot(self) -> dict[str, Any]:
        """The whole state as plain data (str/int/float/bool/None/list/dict): msgpack-able.

        Treat it as read-only: block records inside are shared with the machine.
        """
        return {
            "version": SNAPSHOT_VERSION,
            "task_id": self.task_id,
            "prompt": self.prompt,
            "context_meta": self.context_meta,
            "config": self.config.to_dict(),
            "languages": self.languages,
            "depth": self.depth,
            "phase": self.phase,
            "messages": [[role, content] for role, content in self.messages],
            "traced_messages": self.traced_messages,
            "iteration": self.iteration,
            "root_sequence": self.root_sequence,
            "sub_sequence": self.sub_sequence,
            "next_call_id": self.next_call_id,
            "pending": dict(self.pending) if self.pending else None,
            "turn": {
                "blocks": [dict(b) for b in self.turn_blocks],
                "pos": self.turn_pos,
                "final": dict(self.turn_final) if self.turn_final else None,
                "prose": self.turn_prose,
                "feedback": list(self.turn_feedback),
            },
            "block_sub_start": self.block_sub_start,
            "block_subs": [dict(s) for s in self.block_subs],
            "blocks": list(self.block_dicts),
            "variables": dict(self.variables),
            "consecutive_errors": self.consecutive_errors,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "sub_calls": self.sub_calls,
            "model_calls": self.model_calls,
            "model_ms": self.model_ms,
            "sub_ms": self.sub_ms,
            "exec_ms": self.exec_ms,
            "finalizing": self.finalizing,
            "limit": self.limit,
            "cancelled": self.cancelled,
            "resample": self.resample,
            "repeats": self.repeats,
            # Elapsed time, not a timestamp: the next node's clock is not ours.
            "elapsed_s": self.elapsed(self.last_now),
            "result": {**self.result.summary_dict(), "blocks": list(self.block_dicts)}
            if self.result
            else None,
        }

    @classmethod
    def restore(cls, data: Mapping[str, Any], now: float) -> RlmMachine:
        """Rebuild a machine from `snapshot()`; call `resume(now)` to get its pending work."""
        try:
            if data.get("version") != SNAPSHOT_VERSION:
                raise SnapshotError(
                    f"unsupported RLM snapshot version {data.get('version')!r} (expected {SNAPSHOT_VERSION})"
                )
            machine = cls(
                task_id=str(data["task_id"]),
                prompt=str(data["prompt"]),
                context_meta=dict(data["context_meta"]),
                config=RlmConfig.from_dict(dict(data["config"])),
                languages=data["languages"],
                depth=int(data["depth"]),
            )
            machine.phase = str(data["phase"])
            machine.messages = [(str(r), str(c)) for r, c in data["messages"]]
            machine.traced_messages = int(data["traced_messages"])
            machine.iteration = int(data["iteration"])
            machine.root_sequence = int(data["root_sequence"])
            machine.next_call_id = int(data["next_call_id"])
            machine.pending = dict(data["pending"]) if data["pending"] else None
            turn = data["turn"]
            machine.turn_blocks = [dict(b) for b in turn["blocks"]]
            machine.turn_pos = int(turn["pos"])
            machine.turn_final = dict(turn["final"]) if turn["final"] else None
            machine.turn_prose = str(turn["prose"])
            machine.turn_feedback = [str(f) for f in turn["feedback"]]
            machine.block_dicts = [dict(b) for b in data["blocks"]]
            machine.blocks = [BlockResult.from_dict(b) for b in machine.block_dicts]
            machine.variables = {str(k): str(v) for k, v in data["variables"].items()}
            machine.consecutive_errors = int(data["consecutive_errors"])
            machine.tokens_in = int(data["tokens_in"])
            machine.tokens_out = int(data["tokens_out"])
            machine.sub_calls = int(data["sub_calls"])
            machine.model_calls = int(data["model_calls"])
            machine.model_ms = float(data["model_ms"])
            machine.sub_ms = float(data["sub_ms"])
            machine.exec_ms = float(data["exec_ms"])
            machine.finalizing = bool(data["finalizing"])
            machine.limit = data["limit"]
            machine.cancelled = bool(data["cancelled"])
            machine.resample = bool(data.get("resample", False))
            machine.repeats = int(data.get("repeats", 0))
            machine.start_time = now - float(data["elapsed_s"])
            machine.last_now = now
            machine.block_sub_start = int(data["block_sub_start"])
            if machine.pending and machine.pending["kind"] == "exec":
                # The block in flight runs again with the same sub-call numbers; answers
                # that were already recorded are reused instead of asked again.
                machine.sub_sequence = machine.block_sub_start
                machine.sub_calls -= int(data["sub_sequence"]) - machine.block_sub_start
                machine.replay_cache = [dict(s) for s in data["block_subs"]]
                machine.block_subs = []
            else:
                machine.sub_sequence = int(data["sub_sequence"])
                machine.block_subs = [dict(s) for s in data["block_subs"]]
            if data["result"]:
                restored = ExecutionResult.from_dict(data["result"], executed_on="local")
                machine.result = replace(restored, blocks=tuple(machine.blocks))
        except SnapshotError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SnapshotError(f"malformed RLM snapshot: {type(exc).__name__}: {exc}") from exc
        return machine

    def resume(self, now: float) -> list[Effect]:
        """Effects that re-issue the work that was in flight when the snapshot was taken."""
        self.last_now = now
        if self.phase == "idle":
            return self.start(now)
        if self.done:
            assert self.result is not None
            return [Final(self.result)]
        effects: list[Effect] = [
            Trace(self._record(now, "resumed", iteration=self.iteration, root_sequence=self.root_sequence,
                               sub_sequence=self.sub_sequence, phase=self.phase)),
            self._progress(now, "resumed"),
        ]  # fmt: skip
        pending = self.pending
        self.pending = None
        if self.phase == "awaiting_llm" and pending is not None and pending["kind"] == "extract":
            return effects + self._extract(now)
        if self.phase == "awaiting_llm":
            return effects + self._ask_model(now, retrace=False)
        if self.phase == "executing" and pending is not None:
            block = self.turn_blocks[self.turn_pos]
            return effects + self._issue_exec(
                block, now, infra_attempts=int(pending.get("infra_attempts", 0))
            )
        if self.phase == "resolving" and pending is not None:
            return effects + self._issue_resolve(str(pending["name"]), now)
        return effects + self._advance(now)

    # ------------------------------------------------------------------ internals

    def _new_call_id(self) -> int:
        call_id = self.next_call_id
        self.next_call_id += 1
        return call_id

    def _is_pending(self, call_id: int, kind: str) -> bool:
        return (
            self.pending is not None
            and self.pending["call_id"] == call_id
            and self.pending["kind"] == kind
        )

    def _time_over(self, now: float) -> bool:
        budget = self.config.time_budget_s
        return budget is not None and self.elapsed(now) >= budget

    def _tokens_left(self) -> int | None:
        if self.config.token_budget is None:
            return None
        return self.config.token_budget - self.tokens_in - self.tokens_out

    def _limit_reason(self) -> StopReason:
        limit = self.limit or "max_iterations"
        reasons: dict[str, StopReason] = {
            "max_iterations": "max_iterations",
            "time_budget": "time_budget",
            "token_budget": "token_budget",
            "max_errors": "max_errors",
            "cancelled": "cancelled",
            "stalled": "stalled",
        }
        return reasons.get(limit, "max_iterations")

    def _ask_model(self, now: float, *, retrace: bool = True) -> list[Effect]:
        call_id = self._new_call_id()
        self.phase = "awaiting_llm"
        self.pending = {"call_id": call_id, "kind": "llm"}
        temperature = self.config.temperature
        if self.resample:
            temperature = max(temperature, _RESAMPLE_TEMPERATURE)
        messages = list(self.messages)
        if self._prefill_code():
            prefill = CODE_PREFILL
            if self.blocks and self.context_meta.get("type") == "str":
                # Its last block never read `context` (a made-up literal, printed): this
                # reply starts by reading it, and the model goes on from there.
                prefill += CONTEXT_LINES
            messages.append(("assistant", prefill))
            self.pending["prefill"] = prefill
        request = LlmRequest(
            messages=tuple(ChatMessage(role, content) for role, content in messages),  # type: ignore[arg-type]
            model=self.config.root_model,
            max_tokens=self.config.max_tokens,
            temperature=temperature,
            top_p=self.config.top_p,
            seed=self.config.seed,
            task_id=self.task_id,
            purpose="root",
            sequence=self.root_sequence,
        )
        new_messages = [[r, c] for r, c in self.messages[self.traced_messages :]]
        self.traced_messages = len(self.messages)
        effects: list[Effect] = []
        if retrace or new_messages:
            effects.append(
                Trace(self._record(now, "model_request", sequence=self.root_sequence,
                                   final_ask=self.finalizing, new_messages=new_messages))
            )  # fmt: skip
        effects.append(self._progress(now, "model_call"))
        effects.append(NeedLlm(call_id, request, self._final_ask_timeout(now)))
        return effects

    def _final_ask_timeout(self, now: float) -> float | None:
        """Bound of the one final-answer call: the grace period once time is up (or after a
        graceful cancel), else what is left of the time budget, but never less than the
        grace period. None (the runner's usual bound) outside the final ask."""
        if not self.finalizing:
            return None
        grace = self.config.final_grace_s
        if self.limit in {"time_budget", "cancelled"}:
            return grace
        budget = self.config.time_budget_s
        if budget is None:
            return None
        return min(max(budget - self.elapsed(now), grace), self.config.llm_timeout_s)

    def _advance(self, now: float) -> list[Effect]:
        """Run the next block of this turn, or end the turn."""
        effects: list[Effect] = []
        while self.turn_pos < len(self.turn_blocks):
            if not self.finalizing and self._time_over(now):
                return effects + self._skip_rest_and_finalize(now, "time_budget")
            block = self.turn_blocks[self.turn_pos]
            refusal = self._refusal(str(block["language"]))
            original = self._same_code_ran(str(block["code"])) if refusal is None else None
            if original is not None:
                # A small model repeats a block (or SHOW_VARS()) turn after turn: a short
                # nudge instead of a re-run. It counts as a failing block, so a model that
                # keeps repeating reaches max_errors and is asked for its answer.
                self.turn_pos += 1
                self.resample = True
                self.repeats += 1
                message = prompts.duplicate_block(
                    len(self.blocks),
                    original,
                    self.blocks[original].output,
                    read_context=self._read_context(len(self.blocks) - 1),
                    query=self.prompt,
                )
                effects += self._record_block(
                    block, ExecResult(error=message, error_kind="duplicate"), now
                )
                line = self._one_line_output(original)
                settled = line is not None and not _looks_empty(line)
                if not self.finalizing and (settled or self.repeats >= self.config.max_repeats):
                    # Stalled: the model has nothing new to run and gives no answer (a
                    # 0.5B model repeated a block whose output was the answer 5 turns in a
                    # row). Another turn of the whole conversation would be slow and the
                    # same; the short value-only extraction reads the outputs instead.
                    # When the repeated block read `context` and printed one short line,
                    # the first repeat settles it: the nudge that offered FINAL(<line>)
                    # was ignored in each of three traced runs of the demo task, at 3-8 s a
                    # turn.
                    self._discard_turn("stalled")
                    return effects + self._stall(now, original)
                if not self.finalizing and self.consecutive_errors >= self.config.max_errors:
                    return effects + self._skip_rest_and_finalize(now, "max_errors")
                continue
            if refusal is None:
                self.repeats = 0
                return effects + self._issue_exec(block, now)
            self.turn_pos += 1
            # An untagged block of unknown language is often prose or imagined output in a
            # plain fence: the model is told, but it does not count as a failing block.
            effects += self._record_block(
                block,
                ExecResult(error=refusal, error_kind="unsupported_language"),
                now,
                counts_as_error=block["language"] != UNKNOWN,
            )
            if not self.finalizing and self.consecutive_errors >= self.config.max_errors:
                return effects + self._skip_rest_and_finalize(now, "max_errors")
        final = self.turn_final
        if final is not None:
            if final["kind"] == "FINAL":
                why = refusal_reason(final["value"])
                if why is None and self._answer_before_reading():
                    why = prompts.NOT_READ_YET
                if why is not None:
                    self.turn_final = None
                    self.turn_feedback.append(
                        prompts.final_refused(f"FINAL({final['value']})", why)
                    )
                    refused = self._record(now, "final_refused", value=final["value"], reason=why)
                    return [*effects, Trace(refused), *self._end_turn(now)]
                reason: StopReason = self._limit_reason() if self.finalizing else "final"
                return effects + self._finish(now, final["value"], "FINAL", reason)
            return effects + self._issue_resolve(final["value"], now)
        return effects + self._end_turn(now)

    def _answer_before_reading(self) -> bool:
        """A FINAL before any code read the context cannot come from it (a 0.5B model
        answered FINAL(1000) to a CSV sum on its first turn). Allowed in the final ask, and
        for tasks without a context."""
        if not self.config.answer_after_code:
            return False
        if self.finalizing or self.context_meta.get("type") == "NoneType":
            return False
        return not self.blocks or not self._read_context(len(self.blocks) - 1)

    def _prefill_code(self) -> bool:
        """Open the reply with a code fence: on, not in the final ask, the task has a
        context, and no code has read it yet."""
        if not self.config.code_prefill or self.finalizing:
            return False
        if self.context_meta.get("type") == "NoneType":
            return False
        return not self.blocks or not self._read_context(len(self.blocks) - 1)

    def _read_context(self, index: int) -> bool:
        """Whether code up to block `index` (that ran) mentions `context`."""
        return any(
            "context" in b.code for b in self.blocks[: index + 1] if b.error_kind not in _NEVER_RAN
        )

    def _same_code_ran(self, code: str) -> int | None:
        """Index of an earlier block that ran the same code (blank lines and indentation of
        the whole block aside), or None."""
        wanted = _normalized_code(code)
        for record in self.blocks:
            if record.error_kind not in _NEVER_RAN and _normalized_code(record.code) == wanted:
                return record.index
        return None

    def _refusal(self, language: str) -> str | None:
        if language == UNKNOWN:
            return (
                "Could not tell which language this untagged block is written in, so it was not "
                "run. Put Python code in a ```repl block."
            )
        if self.languages is not None and language not in self.languages:
            return (
                f"This node cannot run {language} code (it runs: {', '.join(self.languages)}), so "
                "the block was not run. Rewrite it as Python in a ```repl block."
            )
        return None

    def _issue_exec(
        self,
        block: Mapping[str, Any],
        now: float,
        *,
        rebuild: bool = False,
        infra_attempts: int = 0,
    ) -> list[Effect]:
        call_id = self._new_call_id()
        index = len(self.blocks)
        self.phase = "executing"
        self.pending = {"call_id": call_id, "kind": "exec", "block_index": index,
                        "infra_attempts": infra_attempts}  # fmt: skip
        self.block_sub_start = self.sub_sequence
        self.block_subs = []
        need = NeedExec(
            call_id, index, str(block["code"]), str(block["language"]),
            self._block_timeout(now), rebuild=rebuild, attempt=infra_attempts,
        )  # fmt: skip
        return [self._progress(now, "exec_start", block_index=index), need]

    def _block_timeout(self, now: float) -> float:
        timeout = self.config.block_timeout_s
        if self.finalizing:
            return min(timeout, self.config.final_grace_s)
        budget = self.config.time_budget_s
        if budget is not None:
            timeout = min(timeout, max(budget - self.elapsed(now), 1.0))
        return timeout

    def _issue_resolve(
        self, name: str, now: float, *, rebuild: bool = False, infra_attempts: int = 0
    ) -> list[Effect]:
        if not name.isidentifier():
            self.turn_final = None
            self.turn_feedback.append(
                prompts.final_var_missing(name, self.variables, "not a valid variable name")
            )
            return [
                Trace(self._record(now, "final_var", name=name, ok=False)),
                *self._end_turn(now),
            ]
        call_id = self._new_call_id()
        self.phase = "resolving"
        self.pending = {"call_id": call_id, "kind": "resolve", "name": name,
                        "infra_attempts": infra_attempts}  # fmt: skip
        need = NeedExec(
            call_id, -1, f"FINAL_VAR({name!r})", "python", self._block_timeout(now), "resolve",
            rebuild=rebuild, attempt=infra_attempts,
        )  # fmt: skip
        return [need]

    def _on_resolved(self, result: ExecResult, now: float) -> list[Effect]:
        assert self.pending is not None
        name = str(self.pending["name"])
        self.pending = None
        if result.variables:
            self.variables = dict(result.variables)
        ok = result.final_answer is not None
        effects: list[Effect] = [
            Trace(self._record(now, "final_var", name=name, ok=ok, error=result.error))
        ]
        if result.final_answer is not None:
            reason: StopReason = self._limit_reason() if self.finalizing else "final"
            return effects + self._finish(now, result.final_answer, "FINAL_VAR", reason)
        self.turn_final = None
        refused = [ln for ln in result.stderr.splitlines() if "was refused:" in ln]
        if refused:
            self.turn_feedback.append(refused[-1].removeprefix("Error: "))
        else:
            detail = result.error or result.stderr.strip() or None
            self.turn_feedback.append(prompts.final_var_missing(name, self.variables, detail))
        return effects + self._end_turn(now)

    def _record_block(
        self,
        block: Mapping[str, Any],
        result: ExecResult,
        now: float,
        *,
        counts_as_error: bool = True,
    ) -> list[Effect]:
        limit = self.config.max_output_chars
        raw_output = result.stdout + (
            ("\n" if result.stdout else "") + result.stderr if result.stderr else ""
        )
        output = prompts.truncate(raw_output, limit)
        error = prompts.truncate(result.error, limit) if result.error is not None else None
        subs = tuple(
            SubCallRecord.from_dict(s) for s in sorted(self.block_subs, key=lambda s: s["sequence"])
        )
        self.block_subs = []
        self.replay_cache = []
        record = BlockResult(
            index=len(self.blocks),
            iteration=self.iteration,
            language=str(block["language"]),
            code=str(block["code"]),
            output=output,
            error=error,
            error_kind=result.error_kind if error is not None else None,
            exec_ms=result.exec_ms,
            sub_calls=len(subs),
            sub_call_records=subs,
            replayable=result.error_kind not in _NOT_REPLAYABLE,
        )
        self._add_block(record)
        self.exec_ms += result.exec_ms
        if result.variables:
            self.variables = dict(result.variables)
        if error is None:
            self.consecutive_errors = 0
        elif counts_as_error:
            self.consecutive_errors += 1
        self.turn_feedback.append(self._block_feedback(record))
        return [
            Trace({**self._record(now, "block"), **self.block_dicts[-1]}),
            self._progress(now, "exec_done", exec_ms=result.exec_ms, block_index=record.index),
        ]

    def _add_block(self, record: BlockResult) -> None:
        self.blocks.append(record)
        self.block_dicts.append(record.to_record())

    def _block_feedback(self, record: BlockResult) -> str:
        head = f"Block {record.index + 1} ({record.language}, {record.exec_ms:.0f} ms)"
        if record.error_kind == "unsupported_language":
            return f"{head} was not run: {record.error}"
        text = f"{head} output:\n{record.output if record.output.strip() else '(no output)'}"
        if record.error is not None:
            text += f"\nError ({record.error_kind or 'exception'}): {record.error}"
        if record.error_kind != "duplicate" and not self._read_context(record.index):
            # A 0.5B model "answers" by assigning a made-up literal and printing it.
            text += prompts.context_unread(self.prompt)
        elif record.error is None and _looks_empty(record.output.strip()):
            # A filter that matched nothing (on the dev set: `ln[3]` for the fourth CSV
            # field, "food" searched in messages that never say it) prints 0 or [].
            text += prompts.EMPTY_RESULT
        if record.error_kind == "timeout":
            text += (
                "\nThe block was stopped at its time limit; anything it did before that may be "
                "partial. Work on smaller pieces, or answer from what you already know."
            )
        elif record.error_kind in {"killed", "memory"}:
            text += (
                "\nThe REPL worker was stopped and replaced; check with SHOW_VARS() which "
                "variables still exist, and work in smaller steps."
            )
        return text

    def _end_turn(self, now: float) -> list[Effect]:
        if self.finalizing:
            return self._extract(now)
        limit = self._limit_hit(now)
        if limit is not None:
            return self._enter_finalizing(now, limit)
        if self.turn_feedback:
            body = "\n\n".join(self.turn_feedback)
            message = (
                f"{prompts.turn_header(self.iteration, self.config.max_iterations)}\n{body}\n\n"
                f"{prompts.continue_message(self.iteration, self.config.max_iterations, self.prompt)}"
            )
        else:
            message = prompts.NO_CODE_NUDGE
        self._push_user(message)
        self.turn_feedback = []  # delivered: a limit hit while the model thinks must not repeat it
        return self._ask_model(now)

    def _extract(self, now: float) -> list[Effect]:
        """The final ask gave no usable answer: one short "value only" call.

        It reads only the query, the last block outputs and the final reply, never the
        whole conversation, so a small model answers with the value its code printed
        instead of repeating our instruction (which must never become the answer).
        """
        # Only outputs of code that had read `context` by then: a printed made-up literal
        # is not evidence.
        outputs = [
            prompts.truncate(b.output + (f"\n{b.error}" if b.error else ""), _EXTRACT_CHARS)
            for b in self.blocks
            if b.error_kind not in _NEVER_RAN and self._read_context(b.index)
        ][-_EXTRACT_BLOCKS:]
        reply = self._fallback_text()
        if not any(o.strip() for o in outputs) and not reply:
            return self._finish(now, "", "none", self._limit_reason())
        call_id = self._new_call_id()
        self.phase = "awaiting_llm"
        self.pending = {"call_id": call_id, "kind": "extract"}
        request = LlmRequest(
            messages=(
                ChatMessage("system", prompts.EXTRACT_SYSTEM),
                ChatMessage("user", prompts.extract_message(self.prompt, outputs, reply)),
            ),
            model=self.config.root_model,
            max_tokens=self.config.extract_max_tokens,
            temperature=0.0,
            top_p=1.0,
            seed=self.config.seed,
            task_id=self.task_id,
            purpose="root",
            sequence=self.root_sequence,
        )
        return [
            Trace(self._record(now, "extract_request", sequence=self.root_sequence,
                               content=request.messages[-1].content)),
            self._progress(now, "model_call", message="extracting the answer"),
            NeedLlm(call_id, request, self._final_ask_timeout(now)),
        ]  # fmt: skip

    def _count_root_call(self, response: LlmResponse) -> None:
        self.root_sequence += 1
        self.model_calls += 1
        self.model_ms += response.latency_ms
        self.tokens_in += response.tokens_in
        self.tokens_out += response.tokens_out

    def _on_extracted(self, response: LlmResponse, now: float) -> list[Effect]:
        self.last_now = now
        self.pending = None
        self._count_root_call(response)
        limit = self.limit or "max_iterations"
        value = prompts.strip_echo(
            _extracted_value(response.text),
            prompts.final_ask_message(limit),
            prompts.extract_message(self.prompt, [], ""),
            prompts.EXTRACT_SYSTEM,
        )
        trace = Trace(self._record(now, "extract_response", text=response.text, value=value,
                                   latency_ms=response.latency_ms))  # fmt: skip
        if value and refusal_reason(value) is None and value.upper() != "UNKNOWN":
            return [trace, *self._finish(now, value, "extract", self._limit_reason())]
        line = self._last_one_line_output()
        if line is not None:  # a 0.5B extractor said UNKNOWN while the last output was "34"
            return [trace, *self._finish(now, line, "output", self._limit_reason())]
        return [trace, *self._finish(now, self._fallback_text(), "text", self._limit_reason())]

    def _fallback_text(self) -> str:
        """The final reply's prose, without anything it copied from our instructions."""
        limit = self.limit or "max_iterations"
        text = prompts.strip_echo(
            self.turn_prose, prompts.final_ask_message(limit), prompts.NO_CODE_NUDGE
        )
        return "" if refusal_reason(text) is not None else text

    def _limit_hit(self, now: float) -> str | None:
        if self.iteration >= self.config.max_iterations:
            return "max_iterations"
        if self.consecutive_errors >= self.config.max_errors:
            return "max_errors"
        left = self._tokens_left()
        if left is not None and left <= 0:
            return "token_budget"
        if self._time_over(now):
            return "time_budget"
        return None

    def _stall(self, now: float, repeated: int) -> list[Effect]:
        """The model keeps sending code that already ran. When that block read `context`
        and printed one short line, the model is re-running what it takes for the answer:
        that line is the answer (final_via "output"). Otherwise the value-only extraction
        reads the outputs."""
        self.finalizing = True
        self.limit = "stalled"
        self.turn_feedback = []
        effects: list[Effect] = [
            Trace(self._record(now, "limit", reason="stalled")),
            self._progress(now, "finalizing", message="stalled: the model repeats itself"),
        ]
        line = self._one_line_output(repeated)
        if line is not None:
            return effects + self._finish(now, line, "output", "stalled")
        return effects + self._extract(now)

    def _one_line_output(self, index: int) -> str | None:
        """Block `index`'s output when it read `context`, ran cleanly and printed one short
        line that is not a placeholder; else None."""
        record = self.blocks[index]
        if record.error is not None or not self._read_context(index):
            return None
        lines = [ln.strip() for ln in record.output.strip().splitlines() if ln.strip()]
        if len(lines) != 1 or len(lines[0]) > 80 or refusal_reason(lines[0]) is not None:
            return None
        return lines[0]

    def _last_one_line_output(self) -> str | None:
        for record in reversed(self.blocks):
            if record.error_kind not in _NEVER_RAN:
                return self._one_line_output(record.index)
        return None

    def _skip_rest_and_finalize(self, now: float, limit: str) -> list[Effect]:
        self._discard_turn(limit)
        return self._enter_finalizing(now, limit)

    def _discard_turn(self, reason: str) -> None:
        skipped = len(self.turn_blocks) - self.turn_pos
        if skipped > 0:
            self.turn_feedback.append(
                f"{skipped} remaining block(s) of this turn were not run ({reason})."
            )
        self.turn_blocks = []
        self.turn_pos = 0
        self.turn_final = None

    def _enter_finalizing(self, now: float, limit: str) -> list[Effect]:
        self.finalizing = True
        self.limit = limit
        feedback = "\n\n".join(self.turn_feedback)
        self.turn_feedback = []
        message = prompts.final_ask_message(limit)
        self._push_user(f"{feedback}\n\n{message}" if feedback else message)
        effects: list[Effect] = [
            Trace(self._record(now, "limit", reason=limit)),
            self._progress(now, "finalizing", message=f"limit reached: {limit}"),
        ]
        return effects + self._ask_model(now)

    def _push_user(self, text: str) -> None:
        if self.messages and self.messages[-1][0] == "user":
            role, previous = self.messages[-1]
            self.messages[-1] = (role, f"{previous}\n\n{text}")
            self.traced_messages = min(self.traced_messages, len(self.messages) - 1)
        else:
            self.messages.append(("user", text))

    def _abort_in_flight(self, reason: str) -> list[Effect]:
        effects: list[Effect] = []
        pending = self.pending
        if pending is not None:
            effects.append(Abort(int(pending["call_id"]), reason))
            if pending["kind"] == "exec":
                block = self.turn_blocks[self.turn_pos]
                self.turn_pos += 1
                subs = tuple(SubCallRecord.from_dict(s) for s in self.block_subs)
                record = BlockResult(
                    index=len(self.blocks), iteration=self.iteration, language=str(block["language"]),
                    code=str(block["code"]), output="", error=f"aborted: {reason}", error_kind="timeout",
                    exec_ms=0.0, sub_calls=len(subs), sub_call_records=subs, replayable=False,
                )  # fmt: skip
                self._add_block(record)
                self.block_subs = []
                self.turn_feedback.append(self._block_feedback(record))
        for call_id in self.pending_subs:
            effects.append(Abort(call_id, reason))
        self.pending_subs.clear()
        self.pending = None
        return effects

    def _cached_sub(self, seq: int, prompt: str) -> SubCallRecord | None:
        for entry in self.replay_cache:
            if entry["sequence"] == seq and entry["prompt"] == prompt:
                return SubCallRecord.from_dict(entry)
        return None

    def _finish(
        self,
        now: float,
        content: str,
        via: FinalVia,
        reason: StopReason,
        *,
        error: str | None = None,
    ) -> list[Effect]:
        self.phase = "done"
        self.pending = None
        self.last_now = now
        self.result = ExecutionResult(
            task_id=self.task_id,
            content=content,
            iterations=self.iteration,
            stop_reason=reason,
            final_via=via,
            blocks=tuple(self.blocks),
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            sub_calls=self.sub_calls,
            timings={
                "elapsed_ms": self.elapsed(now) * 1000.0,
                "model_ms": self.model_ms,
                "sub_ms": self.sub_ms,
                "exec_ms": self.exec_ms,
            },
            error=error,
        )
        summary = self.result.summary_dict()
        return [
            Trace({**self._record(now, "final"), **summary}),
            self._progress(now, "done", message=reason),
            Final(self.result),
        ]

    def _record(self, now: float, kind: str, **fields: Any) -> dict[str, Any]:
        return {
            "type": kind,
            "task_id": self.task_id,
            "t_ms": round(self.elapsed(now) * 1000.0, 3),
            **fields,
        }

    def _progress(self, now: float, stage: Stage, **fields: Any) -> Progress:
        return Progress(
            ProgressEvent(
                task_id=self.task_id,
                stage=stage,
                iteration=self.iteration,
                max_iterations=self.config.max_iterations,
                tokens_in=self.tokens_in,
                tokens_out=self.tokens_out,
                elapsed_ms=self.elapsed(now) * 1000.0,
                avg_latency_ms=(self.model_ms / self.model_calls) if self.model_calls else None,
                sub_calls=self.sub_calls,
                depth=self.depth,
                **fields,
            )
        )


# The opening of a root reply while no code has read `context` (config.code_prefill), and
# the first line after it once a block has run without reading a str context.
CODE_PREFILL = "```repl\n"
CONTEXT_LINES = "lines = context.splitlines()\n"


def _looks_empty(output: str) -> bool:
    return output in prompts.EMPTY_OUTPUTS


def root_system_prompt(config: RlmConfig, context_meta: Mapping[str, Any]) -> str:
    """The root model's system prompt for a task under `config` (also used to warm an
    engine's prompt cache before the first task: it must be the very same text)."""
    return prompts.system_prompt(
        context_meta,
        max_output_chars=config.max_output_chars,
        sub_chars=config.sub_context_chars,
        template=config.system_prompt,
        worked_examples=config.worked_examples,
    )


def _normalized_code(code: str) -> str:
    return "\n".join(line.strip() for line in code.strip().splitlines() if line.strip())


def _extracted_value(text: str) -> str:
    """The answer in an extraction reply: a FINAL(...) argument, else the first line."""
    parsed = parse_response(text)
    if parsed.final is not None and parsed.final.kind == "FINAL":
        return parsed.final.value.strip()
    for line in text.strip().splitlines():
        line = line.strip().strip("`").strip()
        if line:
            for prefix in ("answer:", "the answer is", "final answer:"):
                if line.lower().startswith(prefix):
                    line = line[len(prefix) :].strip()
            return line.rstrip(".").strip()[:500]
    return ""
