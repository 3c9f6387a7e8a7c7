"""KowalskiRLM API mechanics (builder, keywords, validation, batch, cancel, progress, sync)
driven by an in-test TaskExecutor, so they hold whatever executes the task."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel

import kowalski_node
from kowalski_node import (
    BatchCompletion,
    BatchConfig,
    BlockResult,
    ClusterConfig,
    DeviceFilter,
    ExecutionResult,
    KowalskiRLM,
    ProgressUpdate,
    QueueStrategy,
    ShardingStrategy,
    Task,
)
from kowalski_node.api import (
    ProgressSink,
    TaskExecutor,
    TaskRequest,
    decode_context,
)
from kowalski_node.client import encode_context
from kowalski_node.errors import ConfigError, TaskError


class FakeExecutor:
    """Emits one progress update per iteration; honours cancel; records concurrency."""

    name = "fake"

    def __init__(self, steps: int = 3, step_s: float = 0.0) -> None:
        self.steps = steps
        self.step_s = step_s
        self.cancels: dict[str, trio.Event] = {}
        self.running = 0
        self.peak = 0
        self.seen: list[TaskRequest] = []
        self.started: list[str] = []

    async def run(self, request: TaskRequest, progress: ProgressSink) -> ExecutionResult:
        self.seen.append(request)
        self.started.append(request.task_id)
        cancel = self.cancels[request.task_id] = trio.Event()
        self.running += 1
        self.peak = max(self.peak, self.running)
        max_it = request.settings.rlm.max_iterations
        try:
            for i in range(1, self.steps + 1):
                if cancel.is_set():
                    return ExecutionResult(request.task_id, "", i - 1, "cancelled")
                await progress(
                    ProgressUpdate(request.task_id, "model_response", i, max_it, tokens_in=10 * i)
                )
                with trio.move_on_after(self.step_s):
                    await cancel.wait()
            if request.prompt == "boom":
                raise TaskError("backend exploded")
            await progress(ProgressUpdate(request.task_id, "done", self.steps, max_it))
            return ExecutionResult(
                request.task_id, f"answer to {request.prompt}", self.steps, "final"
            )
        finally:
            self.running -= 1
            del self.cancels[request.task_id]

    async def cancel(self, task_id: str) -> bool:
        event = self.cancels.get(task_id)
        if event is None:
            return False
        event.set()
        return True

    async def aclose(self) -> None:
        return None


def make(tmp_path: Path, executor: FakeExecutor, **kw: Any) -> KowalskiRLM:
    return (
        KowalskiRLM.new()
        .with_setting("paths.home", tmp_path)
        .with_executor(executor)
        .with_batch_mode(kw.pop("batch", BatchConfig()))
        .with_max_iterations(kw.pop("max_iterations", 10))
        .build()
    )


def test_fake_executor_satisfies_protocol() -> None:
    assert isinstance(FakeExecutor(), TaskExecutor)


def test_builder_sets_everything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOWALSKI_HOME", str(tmp_path))
    rlm = (
        KowalskiRLM.new()
        .with_model("llama2")
        .with_sub_model("tiny")
        .with_backend("ollama")
        .with_device_filter(DeviceFilter.LOCAL)
        .with_sharding("pipeline")
        .with_max_iterations(7)
        .with_max_depth(2)
        .with_block_timeout(3)
        .with_time_budget(60)
        .with_token_budget(5000)
        .with_trajectory_dir(tmp_path / "traj")
        .with_batch_mode(BatchConfig(max_parallel_tasks=3, queue_strategy="fifo"))
        .build()
    )
    s = rlm.settings
    assert (s.llm.model, s.llm.sub_model, s.llm.backend) == ("llama2", "tiny", "ollama")
    assert (s.rlm.max_iterations, s.rlm.max_depth, s.rlm.token_budget) == (7, 2, 5000)
    assert s.rlm.block_timeout_s == 3.0 and s.rlm.time_budget_s == 60.0
    assert s.paths.trajectories_dir == tmp_path / "traj"
    assert rlm.cluster.device_filter is DeviceFilter.LOCAL
    assert rlm.cluster.sharding_strategy is ShardingStrategy.PIPELINE
    assert rlm.batch.queue_strategy is QueueStrategy.FIFO


def test_keyword_style_and_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KOWALSKI_HOME", str(tmp_path))
    monkeypatch.setenv("KOWALSKI_RLM__MAX_ITERATIONS", "4")
    monkeypatch.setenv("KOWALSKI_LLM__MODEL", "from-env")
    rlm = KowalskiRLM(model="deepseek-35b", cluster=ClusterConfig(device_filter="network"))
    assert rlm.cluster.device_filter is DeviceFilter.NETWORK
    assert rlm.settings.llm.model == "deepseek-35b"  # explicit beats env
    assert rlm.settings.rlm.max_iterations == 4  # env beats default
    assert rlm.api_url == "http://127.0.0.1:7471"


@pytest.mark.parametrize(
    ("build", "error", "pattern"),
    [
        (lambda: KowalskiRLM.new().with_max_iterations(0), ValueError, "max_iterations"),
        (lambda: KowalskiRLM.new().with_max_iterations(-3), ValueError, "max_iterations"),
        (lambda: KowalskiRLM.new().with_token_budget(-1), ValueError, "token_budget"),
        (lambda: KowalskiRLM.new().with_time_budget(0), ValueError, "time_budget_s"),
        (lambda: KowalskiRLM.new().with_model(""), ValueError, "model"),
        (lambda: KowalskiRLM.new().with_backend("gpt5"), ConfigError, "unknown backend"),
        (lambda: KowalskiRLM.new().with_device_filter("cloud"), ValueError, "local, network, all"),
        (lambda: BatchConfig(max_parallel_tasks=0), ValueError, "max_parallel_tasks"),
        (lambda: ClusterConfig(network_discovery_timeout_s=-1), ValueError, "timeout"),
        (lambda: KowalskiRLM(max_iterations=-1), ValueError, "max_iterations"),
        (
            lambda: KowalskiRLM.new().with_setting("sandbox.memory_mb", -5).build(),
            ConfigError,
            r"sandbox\.memory_mb: Input should be greater than or equal to 64",
        ),
        (
            lambda: KowalskiRLM.new().with_setting("rlm.max_iteratons", 5).build(),
            ConfigError,
            "did you mean rlm.max_iterations",
        ),
    ],
)
def test_bad_configuration_is_rejected(build: Any, error: type[Exception], pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        build()


async def test_bad_inputs_raise_value_error(tmp_path: Path) -> None:
    rlm = make(tmp_path, FakeExecutor())
    with pytest.raises(ValueError, match="prompt is empty"):
        await rlm.execute("   ")
    with pytest.raises(ValueError, match="prompt must be a str"):
        await rlm.execute(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unsupported context type set"):
        await rlm.execute("x", {1, 2})
    with pytest.raises(ValueError, match="plain JSON data"):
        await rlm.execute("x", {"a": object()})
    for bad_id in ("", "has space", "-leading-dash", "x" * 129, "a/b"):
        with pytest.raises(ValueError, match="task_id must be"):
            await rlm.execute("x", task_id=bad_id)
    assert (await rlm.execute("x", task_id="Run_1.2:a-b")).task_id == "Run_1.2:a-b"


async def test_context_types_pass_through(tmp_path: Path) -> None:
    fake = FakeExecutor(steps=1)
    rlm = make(tmp_path, fake)
    for ctx, expected in [
        ("text", "text"),
        (b"\x00\x01", b"\x00\x01"),
        (bytearray(b"ab"), b"ab"),
        ([1, "a"], [1, "a"]),
        (("t", 1), ["t", 1]),
        ({"k": [1]}, {"k": [1]}),
        (None, None),
    ]:
        await rlm.execute("p", ctx)
        assert fake.seen[-1].context == expected


def test_context_http_encoding_round_trips() -> None:
    for ctx in ["s", b"\xff\x00", [1, {"a": None}], {"x": "y"}, None]:
        assert decode_context(encode_context(ctx)) == ctx
    with pytest.raises(ValueError, match="base64"):
        decode_context({"context": "!!!", "context_encoding": "base64"})
    with pytest.raises(ValueError, match="context_encoding"):
        decode_context({"context": "x", "context_encoding": "rot13"})


async def test_execute_with_progress_callback_and_keyword_task_id(tmp_path: Path) -> None:
    rlm = make(tmp_path, FakeExecutor(steps=3), max_iterations=9)
    seen: list[ProgressUpdate] = []

    async def on_progress(update: ProgressUpdate) -> None:
        seen.append(update)

    result = await rlm.execute_with_progress("q", None, on_progress, task_id="task_001")
    assert result.task_id == "task_001" and result.content == "answer to q"
    assert [u.iteration for u in seen] == [1, 2, 3, 3]
    assert all(u.max_iterations == 9 for u in seen)
    assert seen[-1].done and seen[1].tokens == 20

    # a callback that raises does not break the task
    def broken(update: ProgressUpdate) -> None:
        raise RuntimeError("callback bug")

    result = await rlm.execute("q", on_progress=broken)
    assert result.ok


async def test_subscribe_to_progress_all_and_single_task(tmp_path: Path) -> None:
    rlm = make(tmp_path, FakeExecutor(steps=2))
    everything = rlm.subscribe_to_progress()
    only_b = rlm.subscribe_to_progress("b")
    got_b: list[ProgressUpdate] = []

    async def read_b() -> None:
        async for update in only_b:  # ends by itself after b's "done"
            got_b.append(update)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_b)
        await rlm.execute("first", task_id="a")
        await rlm.execute("second", task_id="b")
    assert [u.task_id for u in got_b] == ["b", "b", "b"] and got_b[-1].done
    await rlm.aclose()  # ends the open-ended subscription after draining
    all_updates = [u async for u in everything]
    assert [u.task_id for u in all_updates] == ["a"] * 3 + ["b"] * 3


async def test_cancel_running_task(tmp_path: Path) -> None:
    fake = FakeExecutor(steps=1000, step_s=0.01)
    rlm = make(tmp_path, fake)
    results: list[ExecutionResult] = []

    async def go() -> None:
        results.append(await rlm.execute("long", task_id="t1"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(go)
        while "t1" not in fake.cancels:
            await trio.sleep(0.001)
        assert await rlm.cancel_task("t1") is True
    assert results[0].stop_reason == "cancelled" and not results[0].ok
    assert await rlm.cancel_task("t1") is False  # finished
    assert await rlm.cancel_task("nope") is False


async def test_execute_batch_bounded_ordered_and_isolated(tmp_path: Path) -> None:
    fake = FakeExecutor(steps=2, step_s=0.005)
    rlm = make(tmp_path, fake, batch=BatchConfig(max_parallel_tasks=3, queue_strategy="fifo"))
    tasks = [Task(f"p{i}", task_id=f"t{i}") for i in range(10)] + [Task("boom", task_id="bad")]
    completions: list[BatchCompletion] = []
    results = await rlm.execute_batch(tasks, completions.append)
    assert [r.task_id for r in results] == [t.task_id for t in tasks]  # input order
    assert [r.content for r in results[:10]] == [f"answer to p{i}" for i in range(10)]
    assert results[-1].error == "backend exploded" and not results[-1].ok
    assert fake.peak == 3
    assert [c.completed for c in completions] == list(range(1, 12))
    assert completions[-1].queue_depth == 0 and completions[-1].total == 11
    assert all(c.throughput > 0 for c in completions)
    assert completions[0].queue_depth == 11 - 3  # 3 started, first finished, 8 waiting


async def test_batch_priority_order_and_cancel_queued(tmp_path: Path) -> None:
    fake = FakeExecutor(steps=1, step_s=0.01)
    rlm = make(tmp_path, fake, batch=BatchConfig(max_parallel_tasks=1))
    tasks = [
        Task("low", task_id="low", priority=0),
        Task("high", task_id="high", priority=5),
        Task("mid", task_id="mid", priority=2),
        Task("gone", task_id="gone", priority=1),
    ]
    cancelled: list[bool] = []

    async def cancel_soon() -> None:
        await trio.lowlevel.checkpoint()
        cancelled.append(await rlm.cancel_task("gone"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(cancel_soon)
        results = await rlm.execute_batch(tasks)
    assert cancelled == [True]
    assert fake.started == ["high", "mid", "low"]
    assert {r.task_id: r.stop_reason for r in results}["gone"] == "cancelled"


async def test_batch_accepts_plain_prompts_and_rejects_duplicates(tmp_path: Path) -> None:
    rlm = make(tmp_path, FakeExecutor(steps=1))
    results = await rlm.execute_batch(["a", "b"])
    assert [r.content for r in results] == ["answer to a", "answer to b"]
    with pytest.raises(ValueError, match="unique"):
        await rlm.execute_batch([Task("a", task_id="x"), Task("b", task_id="x")])
    with pytest.raises(ValueError, match="prompt is empty"):
        await rlm.execute_batch([Task("")])


def test_sync_helpers(tmp_path: Path) -> None:
    rlm = make(tmp_path, FakeExecutor(steps=1))
    assert rlm.execute_sync("s").content == "answer to s"
    assert rlm.execute_sync("again").content == "answer to again"  # a second trio.run
    assert [r.content for r in rlm.execute_batch_sync(["x", "y"])] == [
        "answer to x",
        "answer to y",
    ]
    rlm.close_sync()
    with pytest.raises(TaskError, match="closed"):
        rlm.execute_sync("after close")


async def test_sync_helper_refuses_inside_async(tmp_path: Path) -> None:
    rlm = make(tmp_path, FakeExecutor(steps=1))
    with pytest.raises(RuntimeError, match=r"await rlm\.execute"):
        rlm.execute_sync("x")


def test_public_names_are_exported() -> None:
    for name in (
        "KowalskiRLM",
        "KowalskiRLMBuilder",
        "ClusterConfig",
        "DeviceFilter",
        "ShardingStrategy",
        "BatchConfig",
        "QueueStrategy",
        "Task",
        "ExecutionResult",
        "ProgressUpdate",
        "BatchCompletion",
        "run",
    ):
        assert hasattr(kowalski_node, name), name


def test_result_dict_round_trip() -> None:
    result = ExecutionResult(
        "t",
        "c",
        2,
        "final",
        blocks=(BlockResult(0, 1, "python", "print(1)", "1\n", None, None, 3.25, 0),),
        tokens_in=5,
        tokens_out=6,
        timings={"elapsed_ms": 10.0},
        final_via="FINAL",
    )
    data = result.to_dict()
    assert data["tokens"] == {"in": 5, "out": 6, "total": 11}
    assert data["blocks"][0]["exec_ms"] == 3.25
    assert ExecutionResult.from_dict(data, executed_on="local") == result


def test_from_dict_keeps_keys_it_does_not_know() -> None:
    """A newer node's extra keys survive a round trip through this version's types."""
    data = {
        "task_id": "t",
        "content": "c",
        "iterations": 1,
        "stop_reason": "final",
        "blocks": [
            {"index": 0, "iteration": 1, "language": "python", "code": "x", "output": "",
             "error": None, "error_kind": None, "exec_ms": 1.0, "sub_calls": [],
             "replayable": True, "gpu_ms": 4.0},
        ],
        "cost_usd": 0.25,
    }  # fmt: skip
    result = ExecutionResult.from_dict(data)
    assert result.extra == {"cost_usd": 0.25}
    assert result.blocks[0].extra == {"gpu_ms": 4.0}  # `replayable` is known, not public
    again = result.to_dict()
    assert again["cost_usd"] == 0.25 and again["blocks"][0]["gpu_ms"] == 4.0

    update = ProgressUpdate.from_dict(
        {"task_id": "t", "stage": "exec_done", "iteration": 2, "peer": "p1", "epoch": 3, "gpu": 1}
    )
    assert (update.peer, update.epoch, update.extra) == ("p1", 3, {"gpu": 1})
    assert update.to_dict()["gpu"] == 1 and update.max_iterations == 0
    with pytest.raises(ValueError, match="lacks stage"):
        ProgressUpdate.from_dict({"task_id": "t"})


def test_progress_wire_fields_are_the_dataclass_fields() -> None:
    from dataclasses import fields

    from kowalski_node.rlm.types import PROGRESS_KEYS, ProgressEvent

    assert {f.name for f in fields(ProgressEvent)} - {"extra"} == PROGRESS_KEYS
    with pytest.raises(ValueError, match="'iteration': expected int"):
        ProgressEvent.from_dict({"task_id": "t", "stage": "s", "iteration": "many"})
    assert ProgressEvent.from_dict({"task_id": "t", "stage": "s", "iteration": "3"}).iteration == 3


def test_one_result_type_from_the_loop_to_the_wire(tmp_path: Path) -> None:
    """The loop's result is the public one: its public shape counts sub-calls and leaves
    `replayable` out, its record keeps both, and `from_dict` reads either form."""
    from kowalski_node.rlm.types import SubCallRecord

    sub = SubCallRecord(0, "label it", "qwen-0.5b", "spam", None, 3, 1, 12.5)
    blocks = (
        BlockResult(0, 1, "python", "print(1)", "1\n", None, None, 3.25, 2, (sub, sub)),
        BlockResult(1, 2, "python", "x", "", "boom", "NameError", 1, 0, (), replayable=False),
    )
    result = ExecutionResult(
        task_id="t1",
        content="42",
        iterations=2,
        stop_reason="final",
        final_via="FINAL",
        blocks=blocks,
        tokens_in=50,
        tokens_out=7,
        sub_calls=2,
        timings={"elapsed_ms": 100.0, "model_ms": 60.0, "sub_ms": 25.0, "exec_ms": 4.25},
        executed_on="network",
    )
    public = result.to_dict()
    assert [b["sub_calls"] for b in public["blocks"]] == [2, 0]
    assert "replayable" not in public["blocks"][1] and public["executed_on"] == "network"
    back = ExecutionResult.from_dict(public)
    assert back.blocks[0].sub_call_records == () and back.blocks[0].sub_calls == 2
    assert back.to_dict() == public
    record = blocks[0].to_record()
    assert record["sub_calls"] == [sub.to_dict(), sub.to_dict()]
    assert BlockResult.from_dict(record) == blocks[0]
    assert BlockResult.from_dict(blocks[1].to_record()).replayable is False
    with pytest.raises(ValueError, match="sub-call record"):  # rejected, not dropped
        BlockResult.from_dict({**record, "sub_calls": [{**sub.to_dict(), "cost": 1}]})
    summary = result.summary_dict()
    assert "blocks" not in summary and summary["timings"]["exec_ms"] == 4.25


def test_stored_result_without_a_model_reads_it_from_its_trajectory(tmp_path: Path) -> None:
    """A result stored before results named their model gets it from the trajectory."""
    import json

    from kowalski_node.runtime.payload import decode_result

    trajectory = tmp_path / "t.jsonl"
    turn = {"type": "model_response", "model": "qwen-0.5b", "backend": "llamacpp"}
    trajectory.write_text(json.dumps(turn) + "\n", encoding="utf-8")
    stored = {"task_id": "run", "content": "42", "trajectory_path": str(trajectory)}
    result = decode_result(json.dumps(stored).encode(), "api-id")
    assert result is not None and result.task_id == "api-id"
    assert (result.model, result.backend) == ("qwen-0.5b", "llamacpp")
    stored["model"] = "named"
    result = decode_result(json.dumps(stored).encode(), "api-id")
    assert result is not None and (result.model, result.backend) == ("named", "llamacpp")
