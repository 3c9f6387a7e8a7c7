"""NodeClient / SyncNodeClient against the real server, and api.NodeExecutor over the contract."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio
import trio.lowlevel

from kowalski_node.client import (
    ApiError,
    ApiUnreachable,
    NodeClient,
    SyncNodeClient,
    TaskNotFound,
    Unauthorized,
    default_api_token,
    default_api_url,
)
from kowalski_node.config import load_settings
from kowalski_node.errors import NodeUnreachable, TaskError
from kowalski_node.rlm.types import ProgressEvent
from kowalski_node.runtime.service import TaskStatus, TaskSubmission
from tests.http_fakes import OTHER_ID, FakeNodeService, serve_fake

TOKEN = "client-test-token-0123456789"


def _free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_submit_wait_with_progress_and_bytes_context() -> None:
    fake = FakeNodeService(auto_steps=3, step_delay=0.02)
    async with serve_fake(fake) as ep, NodeClient(ep.url) as node:
        accepted = await node.submit("sum it", context=b"\x00\xffraw", rlm={"max_iterations": 4})
        assert accepted.created and accepted.status == TaskStatus.QUEUED
        seen: list[ProgressEvent] = []
        with trio.fail_after(10):
            view = await node.wait(accepted.task_id, timeout=10, on_progress=seen.append)
        assert view.status == TaskStatus.DONE and view.result is not None
        assert view.result.content == "answer to: sum it"
        assert [p.iteration for p in seen] == [1, 2, 3] and seen[0].max_iterations == 4
        assert fake.submissions[0].context_value() == b"\x00\xffraw"
        assert (await node.get_task(accepted.task_id)).commits == 1
        assert [t.task_id for t in await node.list_tasks(status="done")] == [accepted.task_id]
        assert await node.health()


async def test_async_progress_handler_and_idempotency_key() -> None:
    fake = FakeNodeService(auto_steps=2, step_delay=0.01)
    async with serve_fake(fake) as ep, NodeClient(ep.url) as node:
        first = await node.submit("x", idempotency_key="abc")
        calls: list[int] = []

        async def handler(update: ProgressEvent) -> None:
            await trio.lowlevel.checkpoint()
            calls.append(update.iteration)

        with trio.fail_after(10):
            await node.wait(first.task_id, on_progress=handler)
        again = await node.submit("x", idempotency_key="abc")
        assert again.task_id == first.task_id and not again.created
        assert again.result is not None and calls == [1, 2]
        with pytest.raises(ApiError) as info:
            await node.submit("different", idempotency_key="abc")
        assert info.value.status == 409 and info.value.code == "idempotency_conflict"


async def test_submit_many_chunks_and_keeps_order() -> None:
    fake = FakeNodeService()
    items: list[TaskSubmission | dict[str, object] | str] = [
        "plain prompt",
        {"prompt": "as dict", "priority": 3},
        TaskSubmission(prompt="as model", idempotency_key="m1"),
    ] * 4
    async with serve_fake(fake) as ep, NodeClient(ep.url) as node:
        accepted = await node.submit_many(items, chunk=5)
    assert len(accepted) == 12
    assert sum(a.created for a in accepted) == 9  # the keyed item dedups to one task
    previews = [fake.tasks[a.task_id].view.prompt_preview for a in accepted]
    assert previews[:3] == ["plain prompt", "as dict", "as model"]


async def test_wait_times_out_and_falls_back_to_polling() -> None:
    fake = FakeNodeService()
    async with serve_fake(fake) as ep, NodeClient(ep.url) as node:
        task_id = (await node.submit("slow")).task_id
        with trio.fail_after(10), pytest.raises(TaskError, match="did not finish within"):
            await node.wait(task_id, timeout=0.3)
        # With a broken event stream the client polls GET /v1/tasks/{id} instead.
        fake.event_error = RuntimeError("stream broken")

        async def finish_later() -> None:
            await trio.sleep(0.3)
            fake.start(task_id)
            fake.finish(task_id, "polled")

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(finish_later)
                view = await node.wait(task_id, timeout=8, poll_interval=0.05)
        assert view.result is not None and view.result.content == "polled"


async def test_events_context_manager() -> None:
    fake = FakeNodeService(auto_steps=2, step_delay=0.02)
    async with serve_fake(fake) as ep, NodeClient(ep.url) as node:
        task_id = (await node.submit("stream me")).task_id
        names: list[str] = []
        with trio.fail_after(10):
            async with node.events(task_id) as stream:
                async for name, body in stream:
                    names.append(name)
                    assert body["task_id"] == task_id
        assert names[0] == "state" and names[-1] == "done" and names.count("progress") == 2
        # Leaving early closes the stream without errors.
        other = (await node.submit("again")).task_id
        with trio.fail_after(10):
            async with node.events(other) as stream:
                async for name, _ in stream:
                    assert name == "state"
                    break
        with pytest.raises(TaskNotFound):
            async with node.events("task-unknown") as stream:
                async for _ in stream:
                    pass


async def test_errors_are_typed_and_clear() -> None:
    fake = FakeNodeService()
    async with serve_fake(fake, token=TOKEN) as ep:
        async with NodeClient(ep.url, token="wrong-token") as node:
            with pytest.raises(Unauthorized, match="invalid bearer token"):
                await node.status()
        async with NodeClient(ep.url, token=TOKEN) as node:
            with pytest.raises(TaskNotFound, match="no task task-404"):
                await node.get_task("task-404")
            fake.start((await node.submit("x")).task_id)
            peers = await node.peers()
            assert {p.peer_id for p in peers} >= {OTHER_ID}
            assert (await node.status()).tasks_by_status == {"running": 1}
            assert "kowalski_tasks" in await node.metrics_text()
            cancelled = await node.cancel(fake.order[0])
            assert cancelled.status == TaskStatus.CANCELLED


async def test_nothing_listening_names_the_url_and_the_fix() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    async with NodeClient(url, connect_timeout=2) as node:
        with pytest.raises(ApiUnreachable) as info:
            await node.submit("x")
    message = str(info.value)
    assert url in message and "kowalski-node start" in message
    assert isinstance(info.value, NodeUnreachable)


async def test_sync_client_from_a_worker_thread() -> None:
    fake = FakeNodeService(auto_steps=1)
    async with serve_fake(fake) as ep:
        sync = SyncNodeClient(ep.url, timeout=10)

        def script() -> tuple[str, str]:
            accepted = sync.submit("hello")
            view = sync.wait(accepted.task_id, timeout=10)
            assert view.result is not None
            return accepted.task_id, view.result.content

        with trio.fail_after(20):
            task_id, content = await trio.to_thread.run_sync(script)
        assert content == "answer to: hello" and task_id in fake.tasks
        with pytest.raises(RuntimeError, match="inside async code"):
            sync.status()


def test_default_url_and_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KOWALSKI_API", raising=False)
    monkeypatch.delenv("KOWALSKI_API_TOKEN", raising=False)
    settings = load_settings(env={}, overrides={"node.api.host": "0.0.0.0", "node.api.port": 9000})
    assert default_api_url(settings) == "http://127.0.0.1:9000"
    settings = load_settings(env={}, overrides={"node.api.host": "::1", "node.api.token": "t0k"})
    assert default_api_url(settings) == "http://[::1]:7471"
    assert default_api_token(settings) == "t0k"
    monkeypatch.setenv("KOWALSKI_API", "http://127.0.0.2:1234/")
    monkeypatch.setenv("KOWALSKI_API_TOKEN", "from-env")
    assert default_api_url(settings) == "http://127.0.0.2:1234"
    assert default_api_token(settings) == "from-env"


async def test_python_api_node_executor_speaks_this_server() -> None:
    """The other side of the contract in docs/api.md: kowalski_node.api.NodeExecutor."""
    from kowalski_node.api import NodeExecutor, ProgressUpdate, TaskRequest

    fake = FakeNodeService(auto_steps=2, step_delay=0.02)
    settings = load_settings(env={})
    async with serve_fake(fake, token=TOKEN) as ep:
        executor = NodeExecutor(ep.url, TOKEN)
        updates: list[ProgressUpdate] = []

        async def sink(update: ProgressUpdate) -> None:
            updates.append(update)

        request = TaskRequest("task-from-api", "Summarise", {"k": [1, 2]}, settings)
        with trio.fail_after(15):
            result = await executor.run(request, sink)
        assert result.task_id == "task-from-api" and result.content == "answer to: Summarise"
        assert result.executed_on == "network"
        assert [u.iteration for u in updates] == [1, 2] and updates[0].active_devices == 2
        assert fake.submissions[0].context == {"k": [1, 2]}
        # A retry of the same task id is answered from the stored task, not run again.
        with trio.fail_after(15):
            again = await executor.run(request, sink)
        assert again.content == result.content and fake.executions_total == 1
        assert await executor.cancel("task-from-api") is True
        assert await executor.cancel("task-missing") is False


async def test_the_one_sse_reader_follows_the_event_stream_format() -> None:
    """Fields with and without the space, comments, multi-line data, events without data,
    and an event left open at the end of the stream (delivered, as some servers omit the
    last blank line)."""
    from kowalski_node.sse import sse_events

    async def lines() -> AsyncIterator[str]:
        for line in [
            ": keep-alive",
            "event: progress",
            'data: {"a":',
            "data:1}",
            "",
            "event: ignored-no-data",
            "",
            "",
            "data: [DONE]",
        ]:
            yield line
            await trio.lowlevel.checkpoint()

    got = [pair async for pair in sse_events(lines())]
    assert got == [("progress", '{"a":\n1}'), ("message", "[DONE]")]
