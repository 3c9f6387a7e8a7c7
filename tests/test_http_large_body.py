"""Large request bodies: streamed to a temp file in the spool dir, parsed off the loop,
the file removed afterwards; the size limit is a named setting."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import trio

from kowalski_node.config import load_settings
from tests.http_fakes import FakeNodeService, serve_fake

CONTEXT = "a large context, streamed to disk\n" * 100_000  # ~3.4 MB


async def test_large_body_is_spooled_to_disk_then_removed(tmp_path: Path) -> None:
    fake = FakeNodeService()
    spool = tmp_path / "tmp"
    body = json.dumps({"prompt": "count the lines", "context": CONTEXT}).encode()
    seen_on_disk: list[int] = []

    async def upload() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 256 * 1024):
            yield body[i : i + 256 * 1024]
            if i >= 2 * 1024 * 1024 and not seen_on_disk:
                # half-way through the upload the body is already in a file, not in memory
                with trio.move_on_after(5):
                    while not seen_on_disk:
                        sizes = [p.stat().st_size for p in spool.glob("body-*.json")]
                        if sizes and max(sizes) > 0:
                            seen_on_disk.append(max(sizes))
                        await trio.sleep(0.01)

    async with (
        serve_fake(fake, spool_dir=spool) as ep,
        httpx.AsyncClient(base_url=ep.url, timeout=30) as client,
    ):
        resp = await client.post("/v1/tasks", content=upload())
        assert resp.status_code == 202, resp.text
        bad = await client.post("/v1/tasks", content=b"[" + b"1," * 700_000 + b"oops")
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert seen_on_disk and seen_on_disk[0] > 512 * 1024
    assert fake.submissions[0].context == CONTEXT
    assert list(spool.iterdir()) == []  # parsed, then removed (also after a bad body)


async def test_too_large_names_the_setting_and_leaves_no_file(tmp_path: Path) -> None:
    fake = FakeNodeService()
    spool = tmp_path / "tmp"
    body = json.dumps({"prompt": "x", "context": "y" * 3_000_000}).encode()

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: refused while streaming
        for i in range(0, len(body), 64 * 1024):
            yield body[i : i + 64 * 1024]

    async with (
        serve_fake(fake, max_body_bytes=2_000_000, spool_dir=spool) as ep,
        httpx.AsyncClient(base_url=ep.url, timeout=30) as client,
    ):
        resp = await client.post("/v1/tasks", content=chunks())
    assert resp.status_code == 413
    message = resp.json()["error"]["message"]
    assert "node.api.max_body_bytes" in message and "KOWALSKI_NODE__API__MAX_BODY_BYTES" in message
    assert not fake.submissions
    assert not spool.exists() or list(spool.iterdir()) == []


def test_body_limit_is_a_setting_with_an_env_variable(tmp_path: Path) -> None:
    env = {"KOWALSKI_HOME": str(tmp_path), "KOWALSKI_NODE__API__MAX_BODY_BYTES": "123456789"}
    assert load_settings(env=env).node.api.max_body_bytes == 123_456_789
    default = load_settings(env={"KOWALSKI_HOME": str(tmp_path)}).node.api.max_body_bytes
    assert default == 256 * 1024 * 1024
