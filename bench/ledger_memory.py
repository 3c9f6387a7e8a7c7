"""What the coordination core's in-memory ledger costs: memory and start-up load time.

The core holds every task record whole (docs/cores.md, "tasks"). This stores N committed
records in a fresh SQLite file, as a node would after N tasks, then measures what
`LedgerState(store.load())` allocates (tracemalloc) and how long the load takes.

    python bench/ledger_memory.py --tasks 10000 --payload 2048 --result 2048
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from kowalski_node.adapters.sqlite_store import SqliteLedgerStore
from kowalski_node.coordination.spec import final_snapshot
from kowalski_node.tasks import LedgerState, TaskLedger


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--payload", type=int, default=2048, help="bytes of each task's payload")
    ap.add_argument("--result", type=int, default=2048, help="bytes of each committed result")
    args = ap.parse_args()
    if args.tasks < 1 or args.payload < 0 or args.result < 0:
        ap.error("--tasks must be >= 1, --payload and --result >= 0")
    with tempfile.TemporaryDirectory() as tmp:
        store = SqliteLedgerStore(Path(tmp))
        ledger = TaskLedger(LedgerState(), "me", random.Random(1))
        rng = random.Random(2)
        for i in range(args.tasks):
            tid = ledger.submit(float(i), rng.randbytes(args.payload), idempotency_key=f"k{i}")
            task_id = tid.record.task_id
            ledger.lease(float(i), task_id, 1, "leader")
            result = rng.randbytes(args.result)
            ledger.checkpoint(float(i), task_id, 1, "leader", 9, final_snapshot(result))
            ledger.commit(float(i), task_id, 1, "leader", result)
        with store.batch():
            store.apply(ledger.state.take_writes())
        del ledger
        store.close()
        store = SqliteLedgerStore(Path(tmp))
        started = time.perf_counter()
        state = LedgerState(store.load())
        took = time.perf_counter() - started
        del state
        tracemalloc.start()  # a second load, measured (tracemalloc slows it down)
        state = LedgerState(store.load())
        used, _peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        data = args.tasks * (args.payload + 2 * (args.result + 1))
        print(
            f"{len(state)} records: {used / 2**20:.1f} MiB in memory "
            f"({data / 2**20:.1f} MiB of payload, result and final checkpoint bytes; "
            f"{(used - data) / len(state):.0f} B per record besides), loaded in {took:.2f} s",
            file=sys.stderr,
        )
        report = {
            "records": len(state),
            "memory_mib": round(used / 2**20, 2),
            "bytes_fields_mib": round(data / 2**20, 2),
            "overhead_bytes_per_record": round((used - data) / len(state)),
            "load_s": round(took, 3),
        }
        print(json.dumps(report))
        store.close()


if __name__ == "__main__":
    main()
