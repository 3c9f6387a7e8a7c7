"""Log trio task steps that hold the event loop too long (they starve membership probes).

A node answers membership probes within ~40 ms on the LAN profile; one synchronous step
that runs longer than that makes peers suspect it. `SlowStepWatch` is a trio
`Instrument` that times every task step and logs the slow ones with the task's name
(`event=slow_step task=... ms=...`), which is how such stalls are found.

`LoopLagProbe` measures what a peer's probe actually meets: how late a sleeping task
wakes up. It also sees stalls no task step shows, such as the loop thread waiting for the
GIL while a worker thread runs one long C call (a 50 MB `json.dumps`).
"""

from __future__ import annotations

import logging
import time

import trio
from trio.abc import Instrument

log = logging.getLogger("kowalski_node.runtime.loop")


class SlowStepWatch(Instrument):
    def __init__(self, threshold_ms: float = 250.0) -> None:
        self.threshold_s = threshold_ms / 1000.0
        self._started = 0.0
        self.slow_steps = 0
        self.worst_ms = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        if not self._started:
            return
        took = time.perf_counter() - self._started
        if took >= self.threshold_s:
            self.slow_steps += 1
            self.worst_ms = max(self.worst_ms, took * 1000.0)
            log.warning("event=slow_step task=%s ms=%.0f", task.name, took * 1000.0)


class LoopLagProbe:
    """A task that sleeps `interval_s` again and again and records how late it wakes."""

    def __init__(self, interval_s: float = 0.02, report_ms: float = 100.0) -> None:
        self.interval_s = interval_s
        self.report_s = report_ms / 1000.0
        self.worst_ms = 0.0
        self.late_wakeups = 0

    async def run(self) -> None:
        while True:
            before = time.perf_counter()
            await trio.sleep(self.interval_s)
            lag = time.perf_counter() - before - self.interval_s
            if lag > self.worst_ms / 1000.0:
                self.worst_ms = lag * 1000.0
            if lag >= self.report_s:
                self.late_wakeups += 1
                log.warning("event=loop_lag ms=%.0f", lag * 1000.0)
