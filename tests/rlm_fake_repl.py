"""An in-process stand-in for the sandboxed REPL, for fast RLM loop tests.

It follows the `ReplExecutor` contract (kowalski_node/repl/base.py) and the REPL
conventions the loop relies on (context, llm_query, llm_query_batched, FINAL,
FINAL_VAR, SHOW_VARS, answer dict, reserved names restored after every block).
NOT a sandbox: code runs in a worker thread of the test process.
"""

from __future__ import annotations

import contextlib
import io
import time
import traceback
from collections.abc import Callable
from typing import Any

import trio

from kowalski_node.repl.base import ExecRequest, ExecResult, SubCallHandler
from kowalski_node.repl.namespace import RECURSIVE_MODEL_PREFIX

RESERVED = (
    "context", "llm_query", "llm_query_batched", "rlm_query", "rlm_query_batched",
    "FINAL", "FINAL_VAR", "SHOW_VARS", "print",
)  # fmt: skip


class FakeRepl:
    languages: tuple[str, ...] = ("python",)

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}
        self.contexts: dict[str, Any] = {}
        self.executed: list[tuple[str, str]] = []  # (session, code)
        self.closed: list[str] = []
        self.open_calls = 0
        self.printed: list[str] = []  # every print of every block, as it happens
        self._changed = trio.Event()  # set (and replaced) when `closed` or `printed` grows

    async def wait_until(self, condition: Callable[[FakeRepl], bool]) -> None:
        """Return once `condition(self)` holds: a session closed (a one-way message), or a
        block printed something (its stdout comes back only when it ends, so this lets a
        test act while the block still runs)."""
        while not condition(self):
            await self._changed.wait()

    def _note_change(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _on_print(self, printed: str) -> None:
        self.printed.append(printed)
        self._note_change()

    async def open_session(self, session_id: str, context: Any) -> None:
        self.open_calls += 1
        if session_id not in self.sessions:
            self.sessions[session_id] = {}
            self.contexts[session_id] = context

    async def close_session(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)
        self.closed.append(session_id)
        self._note_change()

    async def aclose(self) -> None:
        self.sessions.clear()

    async def execute(self, request: ExecRequest, sub_calls: SubCallHandler) -> ExecResult:
        if request.language != "python":
            return ExecResult(
                error=f"cannot run {request.language}", error_kind="unsupported_language"
            )
        namespace = self.sessions.setdefault(request.session_id, {})
        self.executed.append((request.session_id, request.code))
        started = time.perf_counter()
        token = trio.lowlevel.current_trio_token()
        try:
            with trio.move_on_after(request.timeout_s) as scope:
                result = await trio.to_thread.run_sync(
                    self._run,
                    namespace,
                    request,
                    sub_calls,
                    token,
                    abandon_on_cancel=True,  # type: ignore[call-arg]  # trio-typing stubs predate abandon_on_cancel
                )
        finally:
            self._restore(namespace, request.session_id)
        elapsed = (time.perf_counter() - started) * 1000.0
        if scope.cancelled_caught:
            return ExecResult(
                error=f"block exceeded its {request.timeout_s:g} s time limit",
                error_kind="timeout",
                exec_ms=elapsed,
            )
        result.exec_ms = elapsed
        return result

    def _restore(self, namespace: dict[str, Any], session_id: str) -> None:
        namespace["context"] = self.contexts.get(session_id)

    def _run(
        self,
        namespace: dict[str, Any],
        request: ExecRequest,
        sub_calls: SubCallHandler,
        token: trio.lowlevel.TrioToken,
    ) -> ExecResult:
        out = io.StringIO()
        err = io.StringIO()
        calls = 0
        recorded: list[str] = []

        def query_many(prompts: list[str], model: str | None = None) -> list[str]:
            nonlocal calls
            calls += len(prompts)
            results = trio.from_thread.run(sub_calls, list(prompts), model, trio_token=token)
            return [
                r.text if r.error is None and r.text is not None else f"Error: {r.error}"
                for r in results
            ]

        def final_var(name: str) -> None:
            # Like the real REPL: a missing variable is reported on stderr, nothing is recorded.
            if name not in namespace:
                err.write(f"FINAL_VAR: no variable named {name!r}\n")
                return
            recorded.append(str(namespace[name]))

        def final(value: Any) -> None:
            recorded.append(str(value))

        def show_vars() -> None:
            out.write(", ".join(sorted(self._variables(namespace))) + "\n")

        def fake_print(*args: Any, **kwargs: Any) -> None:
            kwargs.pop("file", None)
            line = io.StringIO()
            print(*args, file=line, **kwargs)
            out.write(line.getvalue())
            # An abandoned block (timed out) may print after the test's trio run ended.
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._on_print, line.getvalue(), trio_token=token)

        namespace.update(
            context=self.contexts.get(request.session_id),
            llm_query=lambda prompt, model=None: query_many([prompt], model)[0],
            llm_query_batched=query_many,
            rlm_query=lambda prompt, model=None: query_many(
                [prompt], RECURSIVE_MODEL_PREFIX + (model or "")
            )[0],
            rlm_query_batched=lambda prompts, model=None: query_many(
                prompts, RECURSIVE_MODEL_PREFIX + (model or "")
            ),
            FINAL=final,
            FINAL_VAR=final_var,
            SHOW_VARS=show_vars,
            print=fake_print,
        )
        error: str | None = None
        kind: Any = None
        try:
            code = compile(request.code, "<repl>", "exec")
        except SyntaxError as exc:
            return ExecResult(
                stdout=out.getvalue(), error=f"SyntaxError: {exc}", error_kind="syntax"
            )
        try:
            exec(code, namespace)
        except Exception as exc:
            lines = traceback.format_exception_only(type(exc), exc)
            error, kind = "".join(lines).strip(), "exception"
        final_value = recorded[0] if recorded else None
        answer = namespace.get("answer")
        if final_value is None and isinstance(answer, dict) and answer.get("ready") is True:
            final_value = str(answer.get("content", ""))
        return ExecResult(
            stdout=out.getvalue(),
            stderr=err.getvalue(),
            error=error,
            error_kind=kind,
            final_answer=final_value,
            variables=self._variables(namespace),
            sub_calls=calls,
        )

    @staticmethod
    def _variables(namespace: dict[str, Any]) -> dict[str, str]:
        return {
            k: type(v).__name__
            for k, v in namespace.items()
            if not k.startswith("_") and k not in RESERVED
        }
