"""Shared helpers for the sandbox tests (tests/test_repl_*.py)."""

from __future__ import annotations

import contextlib
import os
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import psutil
import pytest
import trio
import trio.lowlevel

from kowalski_node.repl.base import ExecRequest, ExecResult, SubCallResult
from kowalski_node.repl.executor import SubprocessReplExecutor

UID_SPAN = 64
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


class Handler:
    """A SubCallHandler that answers "re:<prompt>", fails prompts containing "fail", counts calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], str | None]] = []

    async def __call__(self, prompts: list[str], model: str | None) -> list[SubCallResult]:
        self.calls.append((list(prompts), model))
        await trio.lowlevel.checkpoint()
        return [
            SubCallResult(error="model unavailable")
            if "fail" in p
            else SubCallResult(text=f"re:{p}")
            for p in prompts
        ]


def sandbox_processes(uid_base: int) -> list[psutil.Process]:
    """Live or zombie processes running under this executor's sandbox uids, plus any worker
    process that is still a child of the test process."""
    found: dict[int, psutil.Process] = {}
    if IS_ROOT:
        for proc in psutil.process_iter(["uids"]):
            uids = proc.info.get("uids")
            if uids is not None and uid_base <= uids.real < uid_base + UID_SPAN:
                found[proc.pid] = proc
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "kowalski_node.repl.worker" in " ".join(child.cmdline()):
                found[child.pid] = child
    return list(found.values())


def assert_no_sandbox_processes(uid_base: int) -> None:
    deadline = time.monotonic() + 3.0
    while True:
        left = sandbox_processes(uid_base)
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    described = []
    for proc in left:
        with contextlib.suppress(psutil.Error):
            described.append(f"{proc.pid} {proc.status()} {proc.cmdline()}")
    assert not left, f"processes left behind: {described}"


@contextlib.asynccontextmanager
async def sandbox(**overrides: Any) -> AsyncIterator[SubprocessReplExecutor]:
    """A started executor with its own uid range; on exit, checks nothing is left running."""
    uid_base = random.randrange(1_000_000_000, 2_000_000_000)
    options: dict[str, Any] = {
        "pool_size": 1,
        "sandbox_uid_base": uid_base,
        "sandbox_uid_count": UID_SPAN,
        "timeout_grace_s": 0.5,
    }
    options.update(overrides)
    executor = SubprocessReplExecutor(**options)
    try:
        await executor.start()
        yield executor
    finally:
        await executor.aclose()
        assert_no_sandbox_processes(uid_base)


async def run(
    executor: SubprocessReplExecutor,
    code: str,
    *,
    session: str = "s",
    language: str = "python",
    timeout_s: float = 5.0,
    handler: Handler | None = None,
) -> ExecResult:
    return await executor.execute(
        ExecRequest(session, code, language, timeout_s), handler or Handler()
    )


def require_enforced(executor: SubprocessReplExecutor, *limits: str) -> None:
    """Skip (saying why) where this machine cannot enforce a limit; the report must say so."""
    caps = executor.capabilities
    assert caps is not None
    for limit in limits:
        report = caps.limits[limit]
        if not report.enforced:
            assert report.how, f"{limit} is not enforced and the report does not say why"
            pytest.skip(f"{limit} is not enforced on this machine: {report.how}")
