"""The RLM runs this node leads: one cancel scope per task and epoch.

`StartRun` → `run_rlm(..., resume=snapshot, on_checkpoint=hook)` in its own cancel scope.
The hook reports each step (`step_finished`) and then waits for the core's `ContinueRun`:
the checkpoint is acknowledged by the owner (and, bounded, by the k replicas) before the
next step runs. The result goes to `run_finished`, a failure of the task itself to
`run_failed`. `AbortRun` (fenced, cancelled, re-offered) cancels the run's scope, so a
fenced leader stops at once and never commits. Progress and usage go to the task's owner
(`progress` / `usage` messages, or straight to this node's read model when it owns it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack
import trio

from kowalski_node.coordination.core import Coordinator
from kowalski_node.coordination.effects import AbortRun, ContinueRun, StartRun
from kowalski_node.coordination.messages import Abandon, Offer
from kowalski_node.errors import TaskError
from kowalski_node.llm.base import LlmBackend
from kowalski_node.rlm.types import PROGRESS_KEYS
from kowalski_node.runtime.contexts import ContextStore
from kowalski_node.runtime.execution import ExecutionEnv
from kowalski_node.runtime.payload import TaskPayload, encode_result
from kowalski_node.runtime.ports import CoordinatorLoop
from kowalski_node.runtime.sender import PeerSender
from kowalski_node.runtime.task_views import TaskViews
from kowalski_node.wire import WireError

log = logging.getLogger("kowalski_node.runtime.tasks")

PROGRESS = "progress"
USAGE = "usage"
LEAD_CAPACITY_FACTOR = 2


@dataclass
class _Run:
    """A run of one task this node leads at one epoch."""

    task_id: str
    epoch: int
    owner: str
    step: int
    acked: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    changed: trio.Event = field(default_factory=trio.Event)
    abort_reason: str = ""
    started: float = field(default_factory=time.monotonic)
    done: trio.Event = field(default_factory=trio.Event)
    """Set when the run has fully stopped (its REPL session closed)."""
    after: _Run | None = None
    """The aborted run of the same task this one replaces: it starts once that one is done,
    so the old run's cleanup never closes the session the new run opened (same id)."""


class LeaderRuns:
    """Starts, paces, aborts and hands over the RLM runs this node leads."""

    def __init__(
        self,
        me: str,
        coord: Coordinator,
        loop: CoordinatorLoop,
        sender: PeerSender,
        views: TaskViews,
        *,
        execution: ExecutionEnv,
        contexts: ContextStore,
        max_runs: int,
        trajectories_dir: Path | str | None,
    ) -> None:
        self.me = me
        self.coord = coord
        self.loop = loop
        self.sender = sender
        self.views = views
        self.execution = execution
        self.contexts = contexts
        self.max_runs = max_runs
        self.trajectories_dir = trajectories_dir
        self.wrap_sub: Callable[[LlmBackend], LlmBackend] | None = None
        """Wraps the sub-call backend (the remote services' fan-out to peers), if any."""
        self.nursery: trio.Nursery | None = None
        """Where runs start; set while the engine runs."""
        self._runs: dict[str, _Run] = {}
        self._slots = trio.Semaphore(max_runs)

    def __len__(self) -> int:
        """RLM runs this node is leading right now."""
        return len(self._runs)

    def leads(self, task_id: str) -> bool:
        """Whether a run of `task_id` is going on here (at any epoch)."""
        return task_id in self._runs

    def refuse_offer(self, msg: Offer, *, draining: bool) -> str:
        """Why we decline to lead (draining, or already leading our capacity), else ''.

        Every led task costs lease heartbeats and bookkeeping even while it waits for a
        run slot, so a leader with `LEAD_CAPACITY_FACTOR` x `max_runs` runs started or
        waiting declines more (tasks only waiting for their commit reply do not count): the work stays durably queued at its owner (backpressure) instead of piling
        up here until this node is too busy to answer membership probes.
        """
        if draining:
            return "this peer is shutting down"
        if self.coord.led(msg.task_id) is not None:
            return ""
        capacity = self.max_runs * LEAD_CAPACITY_FACTOR
        if len(self._runs) >= capacity:
            return f"this peer already runs or queues {capacity} tasks"
        return ""

    # ================================================================ effects

    def continue_run(self, eff: ContinueRun) -> None:
        run = self._runs.get(eff.task_id)
        if run is not None and run.epoch == eff.epoch:
            run.acked = max(run.acked, eff.step)
            led = self.coord.led(eff.task_id)
            if led is not None:  # a takeover may have kept this run under a new owner
                run.owner = led.owner
            run.changed.set()

    def abort_run(self, eff: AbortRun) -> None:
        run = self._runs.get(eff.task_id)
        if run is not None and run.epoch == eff.epoch:
            run.abort_reason = eff.reason
            run.scope.cancel()
        self.views.bump("runs_aborted_total")
        log.info("event=run_aborted task=%s epoch=%d reason=%r", eff.task_id, eff.epoch, eff.reason)

    def start_run(self, eff: StartRun) -> None:
        old = self._runs.get(eff.task_id)
        if old is not None:
            old.abort_reason = f"replaced by epoch {eff.epoch}"
            old.scope.cancel()
        if self.nursery is None:
            return
        led = self.coord.led(eff.task_id)
        owner = led.owner if led is not None else ""
        run = _Run(eff.task_id, eff.epoch, owner, eff.resume_step, eff.resume_step)
        run.after = old
        self._runs[eff.task_id] = run
        self.views.bump("executions_total")
        log.info(
            "event=run_started task=%s epoch=%d owner=%s resume_step=%d",
            eff.task_id,
            eff.epoch,
            owner,
            eff.resume_step,
        )
        self.nursery.start_soon(self._run_task, run, eff)

    # ================================================================ one run

    async def _run_task(self, run: _Run, eff: StartRun) -> None:
        from kowalski_node.runtime.rlm_runner import run_rlm

        env = self.execution
        outcome: tuple[str, Any] | None = None
        slot = False
        with run.scope:
            try:
                if run.after is not None:
                    await run.after.done.wait()
                    run.after = None
                payload = TaskPayload.decode(eff.payload)
                context = await self.contexts.resolve(payload, run.owner)  # maybe fetched
                snapshot = (
                    msgpack.unpackb(eff.snapshot, raw=False, strict_map_key=False)
                    if eff.snapshot
                    else None
                )
                await self._slots.acquire()
                slot = True
                backends = env.backends()
                config = env.rlm_config(payload)

                async def on_checkpoint(snap: dict[str, Any]) -> None:
                    await self._checkpoint(run, snap)

                result = await run_rlm(
                    payload.prompt,
                    context,
                    root=backends.root,
                    sub=self.wrap_sub(backends.sub) if self.wrap_sub is not None else backends.sub,
                    repl=env.repl,
                    config=config,
                    task_id=eff.task_id,
                    on_progress=lambda ev: self._progress_out(run, ev.to_dict()),
                    trajectory_dir=self.trajectories_dir,
                    resume=snapshot,
                    on_checkpoint=on_checkpoint,
                )
                if result.sub_calls and not env.usage(eff.task_id).get("subcall_peers"):
                    env.record_usage(eff.task_id, "subcall_peers", self.me)
                data = replace(result, executed_on="network").to_dict()
                outcome = ("ok", data)
            except (WireError, ValueError, TaskError) as exc:
                outcome = ("failed", f"{type(exc).__name__}: {exc}")
            except Exception as exc:  # noqa: BLE001 - the task failed (model unreachable, sandbox error, ...)
                log.warning("event=run_failed task=%s error=%r", eff.task_id, str(exc)[:300])
                outcome = ("failed", f"{type(exc).__name__}: {exc}")
            finally:
                if slot:
                    self._slots.release()
        run.done.set()
        if self._runs.get(run.task_id) is run:
            del self._runs[run.task_id]
        if run.scope.cancelled_caught or outcome is None:
            log.info(
                "event=run_stopped task=%s epoch=%d reason=%r",
                run.task_id,
                run.epoch,
                run.abort_reason or "cancelled",
            )
            return
        self._send_usage(run)
        now = self.loop.clock()
        kind, value = outcome
        if kind == "ok" and isinstance(value, dict):
            self.loop.apply(
                self.coord.run_finished(now, run.task_id, run.epoch, encode_result(value))
            )
        else:
            self.loop.apply(self.coord.run_failed(now, run.task_id, run.epoch, str(value)))

    async def _checkpoint(self, run: _Run, snap: dict[str, Any]) -> None:
        """After each step: checkpoint through the core, wait until it is acknowledged."""
        run.step += 1
        packed: bytes = msgpack.packb(snap, use_bin_type=True)
        self.loop.apply(
            self.coord.step_finished(self.loop.clock(), run.task_id, run.epoch, run.step, packed)
        )
        if self.coord.led(run.task_id) is None and run.acked < run.step:
            run.abort_reason = run.abort_reason or "the core no longer leads this task"
            run.scope.cancel()
        while run.acked < run.step:
            run.changed = trio.Event()
            await run.changed.wait()

    def _progress_out(self, run: _Run, event: dict[str, Any]) -> None:
        usage = self.execution.usage(run.task_id)
        peers = {self.me, *usage.get("repl_peers", ()), *usage.get("subcall_peers", ())}
        payload = {k: v for k, v in event.items() if k in PROGRESS_KEYS}
        payload.update(
            task_id=run.task_id, active_devices=len(peers), peer=self.me, epoch=run.epoch
        )
        if run.owner == self.me:
            self.views.progress_from(self.me, payload)
        elif run.owner:
            self.sender.send(run.owner, PROGRESS, payload)

    def _send_usage(self, run: _Run) -> None:
        usage = self.execution.usage(run.task_id)
        payload = {
            "task_id": run.task_id,
            "repl_peers": sorted(usage.get("repl_peers", ())),
            "subcall_peers": sorted(usage.get("subcall_peers", ())),
        }
        if run.owner == self.me:
            self.views.usage_from(self.me, payload)
        elif run.owner:
            self.sender.send(run.owner, USAGE, payload)
        self.execution.forget_usage(run.task_id)

    # ================================================================ drain

    def hand_over(self) -> None:
        """Stop the runs we lead for other owners; each owner re-offers from the last
        checkpoint at epoch + 1 (`Abandon`)."""
        for task_id, run in list(self._runs.items()):
            if run.owner and run.owner != self.me:
                run.abort_reason = "draining: handed over"
                run.scope.cancel()
                led = self.coord.led(task_id)  # a kept run may lead at a newer epoch
                msg = Abandon(task_id, led.epoch if led is not None else run.epoch)
                self.sender.send(run.owner, msg.TAG, msg.to_wire())
                self._runs.pop(task_id, None)
                log.info(
                    "event=run_handed_over task=%s epoch=%d owner=%s", task_id, run.epoch, run.owner
                )
