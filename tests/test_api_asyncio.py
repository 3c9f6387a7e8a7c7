"""The Python API under asyncio: the same calls as under trio, through the trio portal."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import trio

from kowalski_node import DeviceFilter, KowalskiRLM, ProgressUpdate


def _script(tmp_path: Path, responses: list[object], latency_ms: float = 0) -> str:
    path = tmp_path / "script.json"
    path.write_text(json.dumps({"responses": responses, "latency_ms": latency_ms}))
    return f"scripted:{path}"


def _rlm(tmp_path: Path, backend: str) -> KowalskiRLM:
    return (
        KowalskiRLM.new()
        .with_backend(backend)
        .with_device_filter(DeviceFilter.LOCAL)
        .with_trajectory_dir(tmp_path / "traj")
        .build()
    )


def _portal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kowalski-trio"]


def test_execute_progress_batch_and_subscription_under_asyncio(tmp_path: Path) -> None:
    backend = _script(tmp_path, ["```python\nprint(len(context))\n```", "FINAL(42)"])
    loop_threads: list[int] = []

    async def main() -> None:
        rlm = _rlm(tmp_path, backend)
        updates: list[ProgressUpdate] = []

        async def on_progress(update: ProgressUpdate) -> None:
            await asyncio.sleep(0)  # an asyncio-only await: runs on the caller's loop
            loop_threads.append(threading.get_ident())
            updates.append(update)

        async with rlm:
            result = await rlm.execute_with_progress("How long?", "hello", on_progress)
            assert result.content == "42" and result.stop_reason == "final"
            assert result.blocks[0].output.strip() == "5"
            assert updates and updates[-1].done
            batch = await rlm.execute_batch(["a", "b", "c"])
            assert [r.content for r in batch] == ["42", "42", "42"]
            sub = rlm.subscribe_to_progress()

            async def consume() -> int:
                return len([u async for u in sub])

            counter = asyncio.create_task(consume())
            await rlm.execute("again", "x")
        # aclose (from `async with`) ends the subscription and stops the trio thread
        assert await asyncio.wait_for(counter, 10) > 0
        assert rlm._portal_obj is None

    asyncio.run(main())
    assert loop_threads and set(loop_threads) == {threading.get_ident()}
    assert not _portal_threads()


def test_asyncio_cancellation_reaches_the_task(tmp_path: Path) -> None:
    backend = _script(tmp_path, ["FINAL(1)"], latency_ms=20_000)

    async def main() -> float:
        rlm = _rlm(tmp_path, backend)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(rlm.execute("slow"), 0.5)
        took = time.monotonic() - started
        await rlm.aclose()
        return took

    assert asyncio.run(main()) < 5.0


def test_errors_keep_their_type_under_asyncio(tmp_path: Path) -> None:
    async def main() -> None:
        rlm = _rlm(tmp_path, _script(tmp_path, ["FINAL(1)"]))
        with pytest.raises(ValueError, match="prompt"):
            await rlm.execute("")
        with pytest.raises(RuntimeError, match="blocks"):
            rlm.execute_sync("x")
        await rlm.aclose()

    asyncio.run(main())


def test_trio_and_sync_still_work(tmp_path: Path) -> None:
    backend = _script(tmp_path, ["FINAL(7)"])

    async def main() -> str:
        async with _rlm(tmp_path, backend) as rlm:
            return (await rlm.execute("q")).content

    assert trio.run(main) == "7"
    rlm = _rlm(tmp_path, backend)
    assert rlm.execute_sync("q").content == "7"
    rlm.close_sync()
    assert not _portal_threads()
