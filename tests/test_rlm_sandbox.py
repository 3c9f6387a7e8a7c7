"""The RLM runner over the real sandboxed REPL (kowalski_node.repl.SubprocessReplExecutor).

Skipped, with the reason shown, until the sandbox package exports the executor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from kowalski_node.llm.scripted import ScriptedBackend
from kowalski_node.repl.base import ReplExecutor
from kowalski_node.rlm import RlmConfig
from kowalski_node.runtime.rlm_runner import run_rlm

repl_module = pytest.importorskip("kowalski_node.repl")
if not hasattr(repl_module, "SubprocessReplExecutor"):
    pytest.skip(
        "kowalski_node.repl.SubprocessReplExecutor is not available yet", allow_module_level=True
    )

DATA = Path(__file__).parent / "data"
CONTEXT = [
    f"Branch report {i}\nCity: {city}\nUnits sold: {units}\nNotes: " + "steady week. " * 15
    for i, (city, units) in enumerate(
        [("Oslo", 120), ("Bergen", 340), ("Trondheim", 90), ("Oslo", 300), ("Trondheim", 90)]
    )
]


@pytest.fixture
async def sandbox() -> AsyncIterator[ReplExecutor]:
    executor: Any = repl_module.SubprocessReplExecutor()
    start = getattr(executor, "start", None)
    if start is not None:
        await start()
    try:
        yield executor
    finally:
        await executor.aclose()


async def test_sales_trajectory_in_the_sandbox(sandbox: ReplExecutor) -> None:
    result = await run_rlm(
        "Which city sold the most units?", CONTEXT,
        root=ScriptedBackend.from_file(DATA / "rlm_sales.json"), repl=sandbox,
    )  # fmt: skip
    assert (result.content, result.stop_reason, result.final_via) == (
        "Oslo sold the most units (420)", "final", "FINAL_VAR"
    )  # fmt: skip
    assert "Error: " in result.blocks[2].output  # the failed slot, as the REPL reports it
    assert all(b.language == "python" and b.exec_ms > 0 for b in result.blocks)


async def test_block_timeout_in_the_sandbox_and_the_loop_goes_on(sandbox: ReplExecutor) -> None:
    backend = ScriptedBackend(
        ["```repl\nwhile True:\n    pass\n```", "```repl\nprint('alive')\n```", "FINAL(ok)"]
    )
    result = await run_rlm(
        "q", "ctx", root=backend, repl=sandbox, config=RlmConfig(block_timeout_s=1.0)
    )
    assert result.content == "ok"
    assert result.blocks[0].error_kind == "timeout"
    assert result.blocks[1].output.strip() == "alive"


async def test_resume_mid_task_in_a_fresh_sandbox(sandbox: ReplExecutor) -> None:
    snapshots: list[dict[str, Any]] = []
    straight = await run_rlm(
        "q", CONTEXT, root=ScriptedBackend.from_file(DATA / "rlm_sales.json"), repl=sandbox,
        on_checkpoint=snapshots.append, task_id="sb-1",
    )  # fmt: skip
    snap = next(s for s in snapshots if s["phase"] == "awaiting_llm" and s["root_sequence"] == 4)
    wire = msgpack.unpackb(msgpack.packb(snap), raw=False)
    resumed = await run_rlm(
        "q", CONTEXT, root=ScriptedBackend.from_file(DATA / "rlm_sales.json"), repl=sandbox, resume=wire,
    )  # fmt: skip
    assert resumed.content == straight.content == "Oslo sold the most units (420)"
    assert [b.output for b in resumed.blocks] == [b.output for b in straight.blocks]
