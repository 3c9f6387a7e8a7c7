"""Saved system-prompt prefixes (llm/llamacpp_prefix.py) and llama.cpp's lowered priority.

The unit tests need no model. The `model` tests run the real Qwen2.5-Coder-0.5B GGUF: a
prefix computed by one server is restored by a fresh one, and the request after it
prefills only what follows the system prompt.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

from kowalski_node.llm.base import ChatMessage, LlmRequest
from kowalski_node.llm.llamacpp_backend import (
    LlamaCppBackend,
    batch_threads,
    unload_all,
)
from kowalski_node.llm.llamacpp_prefix import (
    MIN_PREFIX_CHARS,
    PREFIX_DIRNAME,
    _file_lock,
    _prune,
    common_prefix,
    prefix_key,
)
from tests.test_llamacpp_backend import pulled

# A system prompt long enough to be worth saving (about 300 tokens).
SYSTEM = "You answer questions about the `context` variable with Python code.\n" + "\n".join(
    f"- Rule {i}: print only what you need, and check each number twice." for i in range(24)
)
assert len(SYSTEM) > MIN_PREFIX_CHARS


def test_common_prefix() -> None:
    assert common_prefix("<s>sys</s><a>", "<s>sys</s><u>?") == "<s>sys</s><"
    assert common_prefix("", "abc") == "" and common_prefix("abc", "abc") == "abc"


def test_key_names_the_build_the_model_file_and_the_text(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 10)
    key = prefix_key(model, "b1", SYSTEM)
    assert key == prefix_key(model, "b1", SYSTEM)
    assert key != prefix_key(model, "b2", SYSTEM)
    assert key != prefix_key(model, "b1", SYSTEM + " ")
    model.write_bytes(b"x" * 11)  # a replaced model never restores stale state
    assert key != prefix_key(model, "b1", SYSTEM)


def test_prune_keeps_the_newest_and_drops_old_partial_files(tmp_path: Path) -> None:
    now = time.time()
    for i in range(5):
        path = tmp_path / f"k{i}.bin"
        path.write_bytes(b"s")
        os.utime(path, (now - 100 + i, now - 100 + i))
    stale_tmp = tmp_path / "k9.123.ab.tmp"
    stale_tmp.write_bytes(b"half")
    os.utime(stale_tmp, (now - 7200, now - 7200))
    fresh_tmp = tmp_path / "k8.124.cd.tmp"  # another process may be writing it right now
    fresh_tmp.write_bytes(b"half")
    _prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k3.bin", "k4.bin", fresh_tmp.name]


def test_a_held_key_lock_makes_a_second_taker_give_up_after_its_wait(tmp_path: Path) -> None:
    lock = tmp_path / "k.lock"
    with _file_lock(lock, 1.0) as first:
        assert first is not None
        started = time.monotonic()
        with _file_lock(lock, 0.2) as second:
            assert second is None
        assert time.monotonic() - started >= 0.2
    with _file_lock(lock, 0.2) as third:
        assert third is not None


def test_prefill_threads_take_every_core_unless_set() -> None:
    assert batch_threads(0, 1) >= 1
    assert batch_threads(3, 1) == 3
    assert batch_threads(1, 4) == 4  # never fewer than decode's
    with pytest.raises(ValueError):
        batch_threads(-1, 1)


def test_bad_nice_is_refused() -> None:
    with pytest.raises(ValueError, match="nice"):
        LlamaCppBackend("x", nice=20)


def _request(user: str) -> LlmRequest:
    return LlmRequest((ChatMessage("system", SYSTEM), ChatMessage("user", user)), max_tokens=4)


def _thread_nices() -> list[int]:
    nices = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread may end while we read
            stat = (task / "stat").read_text()
            nices.append(int(stat[stat.rindex(")") + 2 :].split()[16]))
    return nices


@pytest.mark.model
async def test_a_saved_prefix_is_restored_by_a_fresh_server(tmp_path: Path) -> None:
    model = pulled("qwen2.5-coder-0.5b-instruct")
    directory = tmp_path / PREFIX_DIRNAME
    unload_all()
    first = LlamaCppBackend(model, models_dir=tmp_path, context_tokens=2048, nice=7)
    # No warm call: the first request with a long system prompt saves it by itself.
    reply = await first.complete(_request("Say hi."))
    saved = list(directory.glob("*.bin"))
    assert len(saved) == 1 and not list(directory.glob("*.tmp"))
    system_tokens = int(str(reply.extra["reused_tokens"]))
    assert system_tokens > 250  # the whole templated system message came from the slot
    assert await first.warm_prefix(SYSTEM) == "cached"  # once per server
    assert await first.warm_prefix("short system prompt") == "skipped"
    if Path("/proc/self/task").is_dir():
        own = os.getpriority(os.PRIO_PROCESS, 0)
        # llama.cpp's server and OpenMP workers run nicer; the node's threads do not.
        assert min(19, own + 7) in _thread_nices()
        assert int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[16]) == own

    unload_all()  # a new process would start from here: only the file is left
    second = LlamaCppBackend(model, models_dir=tmp_path, context_tokens=2048)
    assert await second.warm_prefix(SYSTEM) == "restored"
    reply = await second.complete(_request("Say hello."))
    assert int(str(reply.extra["reused_tokens"])) >= system_tokens - 2
    assert reply.tokens_in - int(str(reply.extra["reused_tokens"])) < 30

    # A corrupt file is not trusted: it is replaced by a fresh computation.
    saved[0].write_bytes(b"not a llama.cpp state file")
    unload_all()
    third = LlamaCppBackend(model, models_dir=tmp_path, context_tokens=2048)
    assert await third.warm_prefix(SYSTEM) == "computed"
    assert saved[0].stat().st_size > 1000
    unload_all()
    off = LlamaCppBackend(model, models_dir=tmp_path / "off", prefix_cache=False)
    assert off.server_config().prefix_dir is None
