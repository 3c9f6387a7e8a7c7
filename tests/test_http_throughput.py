"""How many tasks per second the HTTP layer accepts (against the in-memory fake service).

This measures the API's own cost (parsing, validation, rendering, HTTP), not the node's:
the mesh bench measures the real node. The load runs in a separate process so server
and client do not share one core. Run it directly for numbers:

    python tests/test_http_throughput.py            # prints one JSON line per mode
    pytest -m slow tests/test_http_throughput.py -s

The default test run only checks that a large batch is accepted completely.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio

# Run as a script (the client child process below), the repository root must be on the
# path for `tests.http_fakes`, as pytest's rootdir is in a test run.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.http_fakes import FakeNodeService, serve_fake

BATCH_SIZE = 1000
BATCHES = 20
SINGLE_TOTAL = 2000
SINGLE_CONCURRENCY = 8


async def _client_load(url: str, mode: str) -> dict[str, float]:
    """The load generator (runs in the child process)."""
    limits = httpx.Limits(max_connections=SINGLE_CONCURRENCY, max_keepalive_connections=16)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        await client.post("/v1/tasks", json={"prompt": "warm-up"})
        if mode == "batch":
            bodies = [
                json.dumps(
                    {"tasks": [{"prompt": f"task {b}-{i}"} for i in range(BATCH_SIZE)]}
                ).encode()
                for b in range(BATCHES)
            ]
            start = time.perf_counter()
            for body in bodies:
                resp = await client.post(
                    "/v1/tasks/batch", content=body, headers={"content-type": "application/json"}
                )
                assert resp.status_code == 202, resp.text
            elapsed = time.perf_counter() - start
            return {"tasks": BATCH_SIZE * BATCHES, "seconds": elapsed}
        per_worker = SINGLE_TOTAL // SINGLE_CONCURRENCY

        async def worker(w: int) -> None:
            for i in range(per_worker):
                resp = await client.post("/v1/tasks", json={"prompt": f"task {w}-{i}"})
                assert resp.status_code == 202, resp.text

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for w in range(SINGLE_CONCURRENCY):
                nursery.start_soon(worker, w)
        elapsed = time.perf_counter() - start
        return {"tasks": per_worker * SINGLE_CONCURRENCY, "seconds": elapsed}


async def measure(mode: str) -> dict[str, float | str]:
    """Serve the fake here, drive it from a child process, return tasks/s."""
    fake = FakeNodeService()
    async with serve_fake(fake) as ep:
        proc = await trio.run_process(
            [sys.executable, __file__, "--client", ep.url, mode],
            capture_stdout=True,
            check=True,
        )
    report = json.loads(proc.stdout.decode())
    assert len(fake.tasks) == report["tasks"] + 1  # + the warm-up task
    return {
        "mode": mode,
        "tasks": report["tasks"],
        "seconds": round(report["seconds"], 3),
        "tasks_per_s": round(report["tasks"] / report["seconds"]),
    }


async def test_a_large_batch_is_accepted_completely() -> None:
    fake = FakeNodeService()
    tasks = [{"prompt": f"p{i}", "idempotency_key": f"k{i}"} for i in range(5000)]
    async with serve_fake(fake) as ep, httpx.AsyncClient(base_url=ep.url, timeout=60) as client:
        resp = await client.post("/v1/tasks/batch", json={"tasks": tasks})
    assert resp.status_code == 202
    body = resp.json()
    assert body["created"] == 5000 and len(fake.tasks) == 5000
    assert [a["idempotency_key"] for a in body["accepted"][:3]] == ["k0", "k1", "k2"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["batch", "single"])
async def test_measure_acceptance_throughput(mode: str) -> None:
    result = await measure(mode)
    print(json.dumps(result))
    assert float(result["tasks_per_s"]) > 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--client":
        print(json.dumps(trio.run(_client_load, sys.argv[2], sys.argv[3])))
    else:
        for run_mode in ("batch", "single"):
            print(json.dumps(trio.run(measure, run_mode)))
