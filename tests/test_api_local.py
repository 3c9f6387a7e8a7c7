"""KowalskiRLM running tasks in-process: scripted backend + the RLM runner + a REPL.

Every test runs against the real sandbox (`SubprocessReplExecutor`) and, for speed and
isolation of API logic, against the in-process FakeRepl used by the loop's own tests.
"""

from __future__ import annotations

import json
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from rlm_fake_repl import FakeRepl

import kowalski_node
from kowalski_node import (
    BatchCompletion,
    BatchConfig,
    ClusterConfig,
    DeviceFilter,
    KowalskiRLM,
    LocalExecutor,
    ProgressUpdate,
    Task,
)
from kowalski_node.config import Settings, load_settings
from kowalski_node.errors import BackendUnavailable
from kowalski_node.llm.base import LlmRequest, LlmResponse
from kowalski_node.llm.factory import make_backends
from kowalski_node.repl.base import ReplExecutor
from kowalski_node.runtime.task_setup import open_sandbox_repl

SCRIPT = {
    "responses": [
        "Let me look at the context.\n```repl\nprint(type(context).__name__, len(context))\n```",
        "```repl\nparts = llm_query_batched(['first?', 'second?'])\nprint(parts)\n```",
        "```repl\nanswer_text = ' + '.join(parts)\nprint(answer_text)\n```",
        "FINAL_VAR(answer_text)",
    ],
    "sub_responses": ["A", "B"],
}
SLOW_SCRIPT = {"responses": ["```repl\nimport time\ntime.sleep(30)\n```", "FINAL(late)"]}


async def fake_repl_factory(settings: Settings) -> ReplExecutor:
    return FakeRepl()


REPLS = [
    pytest.param(fake_repl_factory, id="fake-repl"),
    pytest.param(open_sandbox_repl, id="sandbox"),
]


@pytest.fixture(params=REPLS)
def repl_factory(request: pytest.FixtureRequest) -> Any:
    return request.param


def script_file(tmp_path: Path, script: dict[str, Any] = SCRIPT, name: str = "s.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(script), encoding="utf-8")
    return path


def settings_for(tmp_path: Path, backend: str, **extra: Any) -> Settings:
    overrides = {"paths.home": tmp_path, "llm.backend": backend, **extra}
    return load_settings(env={}, overrides=overrides)


def local_rlm(
    tmp_path: Path, repl_factory: Any, script: dict[str, Any] = SCRIPT, **kw: Any
) -> KowalskiRLM:
    settings = settings_for(tmp_path, f"scripted:{script_file(tmp_path, script)}", **kw)
    return KowalskiRLM(
        settings=settings, executor=LocalExecutor(settings, repl_factory=repl_factory)
    )


async def test_builder_style_runs_a_task(tmp_path: Path, repl_factory: Any) -> None:
    path = script_file(tmp_path)
    settings = settings_for(tmp_path, "builtin")
    rlm = (
        KowalskiRLM.new()
        .with_settings(settings)
        .with_backend(f"scripted:{path}")
        .with_device_filter(DeviceFilter.LOCAL)
        .with_max_iterations(10)
        .with_executor(
            LocalExecutor(
                settings.with_overrides({"llm.backend": f"scripted:{path}"}),
                repl_factory=repl_factory,
            )
        )
        .build()
    )
    seen: list[ProgressUpdate] = []
    result = await rlm.execute_with_progress("Combine the parts", ["x", "y", "z"], seen.append)
    await rlm.aclose()
    assert result.stop_reason == "final" and result.content == "A + B"
    assert result.iterations == 4 and result.executed_on == "local"
    assert [b.language for b in result.blocks] == ["python"] * 3
    assert result.blocks[0].output.strip() == "list 3"
    assert all(b.exec_ms >= 0 for b in result.blocks)
    assert result.sub_calls == 2 and result.tokens_in > 0 and result.tokens_out > 0
    assert result.trajectory_path is not None
    assert Path(result.trajectory_path).parent == tmp_path / "trajectories"
    assert Path(result.trajectory_path).is_file()
    assert seen and seen[-1].stage == "done"
    assert {u.max_iterations for u in seen} == {10}
    assert max(u.iteration for u in seen) == 4


async def test_keyword_style_with_task_id(tmp_path: Path, repl_factory: Any) -> None:
    rlm = local_rlm(tmp_path, repl_factory)
    assert rlm.cluster.device_filter is DeviceFilter.LOCAL
    async with rlm:
        result = await rlm.execute(prompt="Combine", context="abc", task_id="task_001")
    assert result.task_id == "task_001" and result.content == "A + B"
    data = result.to_dict()
    assert {
        "task_id",
        "content",
        "iterations",
        "stop_reason",
        "blocks",
        "tokens",
        "timings",
    } <= set(data)
    assert set(data["blocks"][0]) >= {"language", "exec_ms", "output", "error"}


class Recording:
    """Wraps a backend and records every request it sees."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.requests: list[LlmRequest] = []

    async def complete(self, request: LlmRequest) -> LlmResponse:
        self.requests.append(request)
        return await self.inner.complete(request)

    def stream(self, request: LlmRequest) -> Any:
        return self.inner.stream(request)

    async def list_models(self) -> list[str]:
        return await self.inner.list_models()

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_sub_calls_use_the_sub_model(tmp_path: Path, repl_factory: Any) -> None:
    settings = settings_for(
        tmp_path,
        f"scripted:{script_file(tmp_path)}",
        **{"llm.model": "big", "llm.sub_model": "small"},
    )
    backends = make_backends(settings)
    recording = Recording(backends.root)
    backends = replace(backends, root=recording, sub=recording)
    rlm = KowalskiRLM(
        settings=settings,
        executor=LocalExecutor(settings, backends=backends, repl_factory=repl_factory),
    )
    result = await rlm.execute("Combine", "ctx")
    assert result.content == "A + B"
    models = {(r.purpose, r.model) for r in recording.requests}
    assert models == {("root", "big"), ("sub", "small")}


async def test_cancel_a_running_local_task(tmp_path: Path, repl_factory: Any) -> None:
    rlm = local_rlm(tmp_path, repl_factory, SLOW_SCRIPT)
    results = []
    started = trio.Event()

    def on_progress(update: ProgressUpdate) -> None:
        if update.stage == "exec_start":
            started.set()

    async def go() -> None:
        results.append(await rlm.execute("slow", task_id="slow-1", on_progress=on_progress))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(go)
            await started.wait()
            assert await rlm.cancel_task("slow-1")
    assert results[0].stop_reason == "cancelled"
    assert await rlm.cancel_task("slow-1") is False


async def test_batch_and_subscription(tmp_path: Path, repl_factory: Any) -> None:
    rlm = local_rlm(tmp_path, repl_factory)
    rlm.batch = BatchConfig(max_parallel_tasks=2)
    updates: list[ProgressUpdate] = []
    completions: list[BatchCompletion] = []

    async def watch(sub: Any) -> None:
        async for update in sub:
            updates.append(update)

    async with rlm:
        sub = rlm.subscribe_to_progress()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, sub)
            results = await rlm.execute_batch(
                [Task("Combine", [i], task_id=f"b{i}") for i in range(4)], completions.append
            )
            sub.close()
    assert [r.content for r in results] == ["A + B"] * 4
    assert [c.completed for c in completions] == [1, 2, 3, 4]
    assert {u.task_id for u in updates} == {"b0", "b1", "b2", "b3"}
    assert sum(1 for u in updates if u.done) == 4


def test_sync_helpers_run_tasks(tmp_path: Path, repl_factory: Any) -> None:
    rlm = local_rlm(tmp_path, repl_factory)
    assert rlm.execute_sync("Combine", "x").content == "A + B"
    assert rlm.execute_sync("Combine", b"y").content == "A + B"  # second trio.run
    rlm.close_sync()


def test_module_level_run_uses_the_sandbox(tmp_path: Path) -> None:
    result = kowalski_node.run(
        "Combine",
        {"k": 1},
        backend=f"scripted:{script_file(tmp_path)}",
        paths__home=tmp_path,
    )
    assert result.content == "A + B" and result.stop_reason == "final"


async def test_unreachable_backend_raises_naming_it(tmp_path: Path, repl_factory: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = settings_for(
        tmp_path,
        "ollama:llama3",
        **{"llm.ollama_host": f"127.0.0.1:{port}", "llm.retries": 1, "llm.retry_backoff_s": 0.01},
    )
    rlm = KowalskiRLM(
        settings=settings, executor=LocalExecutor(settings, repl_factory=repl_factory)
    )
    with pytest.raises(BackendUnavailable, match=rf"ollama backend at http://127\.0\.0\.1:{port}"):
        await rlm.execute("hello")
    # in a batch the same failure is isolated to its slot
    results = await rlm.execute_batch(["a"])
    assert results[0].stop_reason == "error" and "unreachable" in (results[0].error or "")


async def test_all_falls_back_to_local_without_a_node(tmp_path: Path, repl_factory: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = settings_for(
        tmp_path, f"scripted:{script_file(tmp_path)}", **{"node.api.port": port}
    )
    rlm = KowalskiRLM(
        settings=settings,
        cluster=ClusterConfig(device_filter="all", network_discovery_timeout_s=1.0),
    )
    rlm._local = LocalExecutor(settings, repl_factory=repl_factory)
    result = await rlm.execute("Combine")
    assert result.executed_on == "local" and result.content == "A + B"


async def test_batch_starts_one_lazy_sandbox_pool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Code-free tasks start no worker; code tasks of a batch share one pool."""
    from kowalski_node.repl.executor import SubprocessReplExecutor

    starts: list[int] = []
    real_start = SubprocessReplExecutor.start

    async def counting_start(self: SubprocessReplExecutor) -> Any:
        if self.capabilities is None:
            starts.append(self.config.pool_size)
        return await real_start(self)

    monkeypatch.setattr(SubprocessReplExecutor, "start", counting_start)
    trivial = tmp_path / "trivial.json"
    trivial.write_text(json.dumps({"responses": ["FINAL(42)"]}))
    code = tmp_path / "code.json"
    code.write_text(json.dumps({"responses": ["```repl\nx = 6 * 7\n```", "FINAL_VAR(x)"]}))
    for script, expected_starts in ((trivial, []), (code, [3])):
        rlm = KowalskiRLM(
            backend=f"scripted:{script}",
            batch=BatchConfig(max_parallel_tasks=3),
            overrides={"paths.home": tmp_path / "home"},
        )
        results = await rlm.execute_batch([Task("q", "ctx") for _ in range(5)])
        assert [r.content for r in results] == ["42"] * 5
        assert starts == expected_starts  # one pool, as many warm workers as tasks in flight
        assert not rlm.local_executor().is_open  # closed again after the batch
        await rlm.aclose()
        starts.clear()
    # A single task outside `async with` that writes no code starts no worker either.
    rlm = KowalskiRLM(backend=f"scripted:{trivial}", overrides={"paths.home": tmp_path / "h"})
    assert (await rlm.execute("q", "ctx")).content == "42"
    assert starts == []
    await rlm.aclose()
