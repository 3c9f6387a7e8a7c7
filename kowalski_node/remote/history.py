"""Rebuilding a REPL namespace from a recorded history, on any `ReplExecutor`.

The sandbox executor can restore a session from history itself (`restore_session`);
other executors (a lazy wrapper, a test double) get the same effect by opening the
session and running the recorded blocks again, answering their sub-calls from the
recording so no model is asked twice and no sub-call sequence number is spent again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from kowalski_node.repl.base import ExecRequest, ReplExecutor, SubCallResult
from kowalski_node.repl.history import HistoryBlock, RecordedBatch, history_from_plain
from kowalski_node.repl.protocol import prompt_digest


def recorded_handler(
    batches: Sequence[RecordedBatch],
) -> Callable[[list[str], str | None], Awaitable[list[SubCallResult]]]:
    """Hand back recorded batches in order; an unrecorded call gets an error per slot."""
    position = 0

    async def answer(prompts: list[str], model: str | None) -> list[SubCallResult]:
        nonlocal position
        if position < len(batches) and len(batches[position].results) == len(prompts):
            batch = batches[position]
            position += 1
            return list(batch.results)
        position += 1
        return [SubCallResult(error="replay: no recorded answer for this sub-call")] * len(prompts)

    return answer


def record_batch(
    prompts: Sequence[str], model: str | None, results: Sequence[SubCallResult]
) -> RecordedBatch:
    return RecordedBatch(model, tuple(prompt_digest(p, model) for p in prompts), tuple(results))


async def open_with_history(
    executor: ReplExecutor, session_id: str, context: Any, history: Any
) -> int:
    """Open `session_id` holding `context`, its namespace rebuilt from `history`.

    Returns how many blocks were replayed. `history` is the plain form
    (`kowalski-repl-history/1`) or None.
    """
    blocks: list[HistoryBlock] = history_from_plain(history) if history is not None else []
    restore = getattr(executor, "restore_session", None)
    if blocks and callable(restore):
        await restore(session_id, context, history)
        return len(blocks)
    await executor.open_session(session_id, context)
    for block in blocks:
        request = ExecRequest(session_id, block.code, block.language, block.timeout_s)
        await executor.execute(request, recorded_handler(block.sub_calls))
    return len(blocks)
