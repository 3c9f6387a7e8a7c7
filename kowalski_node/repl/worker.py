"""Sandbox worker process: `python -I -m kowalski_node.repl.worker`, spoken to over stdin/stdout.

Lifecycle: read the config frame, confine itself (`confine.confine`), say hello with what
it enforces, then wait in the pool. `init` binds it to one session (the context arrives
then); `exec` runs a block; `replay` re-runs recorded blocks with recorded sub-call
answers (namespace rebuild). A worker serves one session and dies with it.

Soft limits live here (SIGALRM for wall time, SIGXCPU for CPU time) and end a block with a
clean error while keeping the namespace; the node enforces the hard ones by killing the
whole sandbox. Imports only the stdlib, msgpack and sibling modules.
"""

from __future__ import annotations

import contextlib
import fcntl
import linecache
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import traceback
from typing import Any

from kowalski_node.repl import confine as confine_mod
from kowalski_node.repl.blocks import compile_block
from kowalski_node.repl.capture import Capture
from kowalski_node.repl.namespace import ReplNamespace
from kowalski_node.repl.protocol import HEADER, decode_body, encode, prompt_digest

_PROTOCOL_FD_FLOOR = 64
PYTHON = "python"
SHELL = "shell"


class BlockTimeout(BaseException):
    """Raised into user code by SIGALRM (BaseException so `except Exception` cannot eat it)."""


class CpuLimit(BaseException):
    """Raised into user code by SIGXCPU."""


class Channel:
    """Blocking framed I/O on the protocol pipe."""

    def __init__(self, in_fd: int, out_fd: int) -> None:
        self.in_fd = in_fd
        self.out_fd = out_fd

    def _read_exact(self, n: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < n:
            chunk = os.read(self.in_fd, min(n - len(chunks), 1 << 20))
            if not chunk:
                raise EOFError("node closed the pipe")
            chunks += chunk
        return bytes(chunks)

    def recv(self) -> dict[str, Any]:
        (length,) = HEADER.unpack(self._read_exact(HEADER.size))
        return decode_body(self._read_exact(length))

    def send(self, message: dict[str, Any]) -> None:
        view = memoryview(encode(message))
        while view:
            written = os.write(self.out_fd, view)
            view = view[written:]


class Worker:
    def __init__(self, channel: Channel, cfg: dict[str, Any], conf: confine_mod.Confinement,
                 capture: Capture) -> None:  # fmt: skip
        self.channel = channel
        self.cfg = cfg
        self.conf = conf
        self.capture = capture
        self.pid = os.getpid()
        self.ns: ReplNamespace | None = None
        self.blocks = 0
        self.in_user_code = False
        self.pending: type[BaseException] | None = None
        self.cpu_hard = int(cfg["cpu_total_s"])
        self.shell = shutil.which("bash") or shutil.which("sh")
        # Replay state: recorded sub-call batches for the block being replayed.
        self.replay_batches: list[dict[str, Any]] | None = None
        self.replay_diverged = False
        signal.signal(signal.SIGALRM, self._on_signal)
        signal.signal(signal.SIGXCPU, self._on_signal)

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum: int, frame: Any) -> None:
        exc = BlockTimeout if signum == signal.SIGALRM else CpuLimit
        if self.in_user_code and os.getpid() == self.pid:
            raise exc()
        self.pending = exc

    def _arm(self, timeout_s: float, cpu_s: float) -> None:
        self.pending = None
        usage = resource.getrusage(resource.RUSAGE_SELF)
        used = usage.ru_utime + usage.ru_stime
        soft = min(self.cpu_hard, math.ceil(used + max(cpu_s, 1.0)))
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_CPU, (soft, self.cpu_hard))
        self.in_user_code = True  # before the timer starts, so an early alarm still raises
        signal.setitimer(signal.ITIMER_REAL, max(timeout_s, 0.001))

    def _disarm(self) -> None:
        self.in_user_code = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_CPU, (self.cpu_hard, self.cpu_hard))
        self.pending = None

    # ------------------------------------------------------------------ sub-calls

    def _transport(
        self, prompts: list[str], model: str | None
    ) -> list[tuple[str | None, str | None]]:
        if os.getpid() != self.pid:
            raise RuntimeError(
                "llm_query is only available in the REPL process, not in a forked child"
            )
        if self.replay_batches is not None:
            return self._replayed_answers(prompts, model)
        self.in_user_code = False
        remaining, _ = signal.setitimer(signal.ITIMER_REAL, 0)
        try:
            self.channel.send({"t": "sub", "p": prompts, "m": model})
            reply = self.channel.recv()
            if reply.get("t") != "sub_result" or not isinstance(reply.get("r"), list):
                raise SystemExit(3)  # protocol broken: let the node replace us
            results = [(r[0], r[1]) for r in reply["r"]]
        finally:
            if remaining > 0:
                signal.setitimer(signal.ITIMER_REAL, remaining)
            self.in_user_code = True
        if self.pending is not None:
            pending, self.pending = self.pending, None
            raise pending()
        return results

    def _replayed_answers(
        self, prompts: list[str], model: str | None
    ) -> list[tuple[str | None, str | None]]:
        assert self.replay_batches is not None
        batch = self.replay_batches.pop(0) if self.replay_batches else None
        digests = [prompt_digest(p, model) for p in prompts]
        if batch is None or list(batch.get("d", [])) != digests:
            self.replay_diverged = True
            return [(None, "replay diverged: this sub-call was not recorded") for _ in prompts]
        return [(r[0], r[1]) for r in batch["r"]]

    # ------------------------------------------------------------------ blocks

    def run_block(self, code: str, language: str, timeout_s: float, cpu_s: float) -> dict[str, Any]:
        if self.ns is None:
            return {"error": "no session is bound to this worker", "kind": "sandbox"}
        self.blocks += 1
        self.capture.reset()
        self.ns.begin_block()
        started = time.perf_counter()
        if language == SHELL:
            error, kind = self._run_shell(code, timeout_s, cpu_s)
        else:
            error, kind = self._run_python(code, timeout_s, cpu_s)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        if os.getpid() != self.pid:  # a forked child of user code got here: vanish quietly
            os._exit(0)
        self._sweep()
        outcome = self.ns.end_block()
        stdout, stderr = self.capture.collect()
        notes = []
        if outcome.restored:
            names = ", ".join(n for n in outcome.restored if n != "__builtins__") or "__builtins__"
            notes.append(
                f"reserved name(s) {names} were reassigned by the code and have been restored"
            )
        return {
            "out": stdout, "err": stderr, "error": error, "kind": kind,
            "final": outcome.final_answer, "vars": self.ns.user_variables(),
            "ms": elapsed_ms, "notes": notes, "recycle": kind == "memory",
        }  # fmt: skip

    def _run_python(
        self, code: str, timeout_s: float, cpu_s: float
    ) -> tuple[str | None, str | None]:
        assert self.ns is not None
        filename = f"<block {self.blocks}>"
        try:
            body, last = compile_block(code, filename)
        except (SyntaxError, ValueError) as exc:
            return "".join(traceback.format_exception_only(type(exc), exc)).rstrip(), "syntax"
        except MemoryError:
            return "out of memory while compiling the block", "memory"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        globals_ = self.ns.globals
        try:
            try:
                self._arm(timeout_s, cpu_s)
                exec(body, globals_)  # noqa: S102 - running the model's code is the REPL's job; the worker is sandboxed (docs/sandbox.md)
                if last is not None:
                    value = eval(last, globals_)  # noqa: S307 - the REPL echoes the last expression, like Python's own; sandboxed
                    if value is not None:
                        print(repr(value))
            finally:
                self._disarm()
        except BlockTimeout:
            return (
                f"the block exceeded its wall-clock limit of {timeout_s:g} s and was interrupted",
                "timeout",
            )
        except CpuLimit:
            return (
                f"the block exceeded its CPU-time limit of {cpu_s:g} s and was interrupted",
                "timeout",
            )
        except MemoryError:
            limit = self.cfg.get("memory_mb")
            return (
                f"MemoryError: the block exceeded the sandbox memory limit ({limit} MiB)",
                "memory",
            )
        except SystemExit as exc:
            return (
                f"SystemExit({exc.code!r}): exiting is not allowed in the REPL; the session continues",
                "exception",
            )
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything, SystemExit included: it is the block's error
            return _format_user_traceback(exc), "exception"
        return None, None

    def _run_shell(
        self, code: str, timeout_s: float, cpu_s: float
    ) -> tuple[str | None, str | None]:
        if self.shell is None:
            return "no shell (bash or sh) is installed in this sandbox", "sandbox"
        self.capture.stdout.flush()
        self.capture.stderr.flush()
        proc: subprocess.Popen[bytes] | None = None
        try:
            try:
                self._arm(timeout_s, cpu_s)
                proc = subprocess.Popen(  # noqa: S603 - the model's shell blocks run in the sandbox by design (docs/sandbox.md)
                    [self.shell, "-c", code], stdin=subprocess.DEVNULL, stdout=1, stderr=2,
                    start_new_session=True,
                )  # fmt: skip
                rc = proc.wait()
            finally:
                self._disarm()
        except (BlockTimeout, CpuLimit) as exc:
            if proc is not None:
                _kill_group(proc)
            what = "wall-clock" if isinstance(exc, BlockTimeout) else "CPU-time"
            limit = timeout_s if isinstance(exc, BlockTimeout) else cpu_s
            return (
                f"the shell block exceeded its {what} limit of {limit:g} s and was killed",
                "timeout",
            )
        except OSError as exc:
            return f"could not start the shell: {exc}", "exception"
        if rc != 0:
            if rc < 0:
                return f"the shell was killed by signal {-rc} ({_signal_name(-rc)})", "exception"
            return f"the shell exited with status {rc}", "exception"
        return None, None

    def _sweep(self) -> None:
        """Kill anything the block left running, then reap (we may be PID 1)."""
        if self.conf.can_sweep:
            with contextlib.suppress(OSError):
                os.kill(-1, signal.SIGKILL)
        deadline = time.monotonic() + 0.5
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                if not self.conf.can_sweep or time.monotonic() > deadline:
                    return
                time.sleep(0.0005)

    def replay(self, blocks: list[dict[str, Any]]) -> dict[str, Any]:
        failed: list[dict[str, Any]] = []
        diverged: list[int] = []
        for i, block in enumerate(blocks):
            self.replay_batches = list(block.get("subs") or [])
            self.replay_diverged = False
            try:
                res = self.run_block(
                    str(block["code"]), str(block.get("lang", PYTHON)),
                    float(block.get("timeout", 10.0)), float(block.get("cpu", 10.0)),
                )  # fmt: skip
            finally:
                batches_left = bool(self.replay_batches)
                self.replay_batches = None
            if self.replay_diverged or batches_left:
                diverged.append(i)
            if res.get("kind") in ("timeout", "memory", "sandbox"):
                failed.append({"i": i, "kind": res["kind"], "error": res.get("error")})
                if res.get("kind") == "memory":
                    break
        return {"t": "replayed", "n": len(blocks), "diverged": diverged, "failed": failed,
                "vars": self.ns.user_variables() if self.ns else {}}  # fmt: skip

    # ------------------------------------------------------------------ main loop

    def serve(self) -> None:
        while True:
            try:
                msg = self.channel.recv()
            except EOFError:
                return
            kind = msg["t"]
            if kind == "init":
                self.ns = ReplNamespace(msg.get("ctx"), self._transport)
                self.channel.send({"t": "bound"})
            elif kind == "exec":
                res = self.run_block(str(msg["code"]), str(msg.get("lang", PYTHON)),
                                     float(msg["timeout"]), float(msg["cpu"]))  # fmt: skip
                res["t"] = "result"
                self.channel.send(res)
                if res.get("recycle"):
                    return
            elif kind == "replay":
                reply = self.replay(list(msg.get("blocks") or []))
                self.channel.send(reply)
                if reply["failed"] and reply["failed"][-1]["kind"] == "memory":
                    return
            elif kind == "bye":
                return
            else:
                self.channel.send(
                    {"t": "result", "error": f"unknown request {kind!r}", "kind": "sandbox"}
                )


def _format_user_traceback(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb)).rstrip()


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=2)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "unknown"


def _claim_protocol_fds() -> tuple[int, int]:
    """Move the pipes off 0/1 (to close-on-exec fds, so shells do not inherit them)."""
    in_fd = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, _PROTOCOL_FD_FLOOR)
    out_fd = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, _PROTOCOL_FD_FLOOR)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    return in_fd, out_fd


def main() -> int:
    in_fd, out_fd = _claim_protocol_fds()
    channel = Channel(in_fd, out_fd)
    try:
        cfg = channel.recv()
    except EOFError:
        return 0
    if cfg.get("t") != "config":
        print(
            f"kowalski repl worker: expected a config frame, got {cfg.get('t')!r}", file=sys.stderr
        )
        return 2
    conf = confine_mod.confine(cfg, (in_fd, out_fd))
    os.environ.clear()
    os.environ.update({str(k): str(v) for k, v in dict(cfg.get("env") or {}).items()})
    os.environ["HOME"] = os.environ["TMPDIR"] = conf.workdir
    capture = Capture(int(cfg["max_output_bytes"]))
    worker = Worker(channel, cfg, conf, capture)
    languages = [PYTHON] + ([SHELL] if worker.shell else [])
    channel.send({
        "t": "hello", "pid": os.getpid(), "uid": os.getuid(), "workdir": conf.workdir,
        "pidns": conf.pid_namespace,
        "caps": {name: e.to_wire() for name, e in conf.report.items()}, "langs": languages,
    })  # fmt: skip
    with contextlib.suppress(EOFError, BrokenPipeError):
        worker.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
