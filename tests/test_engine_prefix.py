"""Prefix reuse of keys/values across turns, and the BLAS thread setting (tiny random GGUF)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pytest
import trio

from kowalski_node.llm.base import ChatMessage, LlmRequest
from kowalski_node.llm.builtin import BuiltinBackend, Engine, GenerationParams, LlamaModel
from kowalski_node.llm.builtin.prefix import PrefixCache, common_prefix
from kowalski_node.llm.builtin.threads import apply_blas_threads, blas_thread_info
from tests.engine_fixtures import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-prefix")
    return write_tiny_gguf(d / "tiny.gguf", context_length=128)


@pytest.fixture
def engine(tiny_path: Path) -> Engine:
    eng = Engine.load(tiny_path, models_dir=tiny_path.parent / "models")
    eng.prefix_cache = PrefixCache(min_tokens=4)
    return eng


def _conversation(*texts: str) -> tuple[ChatMessage, ...]:
    roles = ["user", "assistant"]
    return tuple(ChatMessage(roles[i % 2], t) for i, t in enumerate(texts))  # type: ignore[arg-type]


def _root(messages: tuple[ChatMessage, ...], **kw: object) -> LlmRequest:
    fields: dict[str, object] = {"max_tokens": 6, "task_id": "t", **kw}
    return LlmRequest(messages=messages, **fields)  # type: ignore[arg-type]


def _cold(engine: Engine, messages: tuple[ChatMessage, ...]) -> str:
    ids = engine.encode_chat(messages)
    run = engine.start(ids, GenerationParams(max_tokens=6))
    while not run.done:
        run.step()
    return run.result.text


async def test_a_growing_conversation_prefills_only_new_messages(engine: Engine) -> None:
    backend = BuiltinBackend(engine=engine)
    first = _conversation("count the lines")
    r1 = await backend.complete(_root(first))
    assert r1.extra["reused_tokens"] == 0 and len(engine.prefix_cache) == 1
    second = _conversation("count the lines", r1.text, "go on")
    r2 = await backend.complete(_root(second))
    # Everything of turn 1 (its prompt and the answer's keys) was reused.
    assert cast(int, r2.extra["reused_tokens"]) >= r1.tokens_in
    assert cast(int, r2.extra["reused_tokens"]) < r2.tokens_in  # at least one token is prefilled
    # ... and the answer is what a cold prefill gives.
    assert r2.text == _cold(engine, second)
    assert engine.prefix_cache.hits == 1


async def test_sub_calls_reuse_but_do_not_store(engine: Engine) -> None:
    backend = BuiltinBackend(engine=engine)
    await backend.complete(_root(_conversation("summarise this chunk"), purpose="sub"))
    assert len(engine.prefix_cache) == 0


async def test_a_turn_cancelled_midway_still_leaves_its_keys(engine: Engine) -> None:
    backend = BuiltinBackend(engine=engine)
    steps = 0
    real_step = backend._step

    async def counting_step(run: object) -> str:
        nonlocal steps
        steps += 1
        if steps == 3:  # prefill and two tokens done: the caller gives up
            scope.cancel()
        return await real_step(run)  # type: ignore[arg-type]

    backend._step = counting_step  # type: ignore[method-assign]
    with trio.CancelScope() as scope:
        await backend.complete(_root(_conversation("count the lines"), max_tokens=50))
    assert scope.cancelled_caught and len(engine.prefix_cache) == 1
    backend._step = real_step  # type: ignore[method-assign]
    r = await backend.complete(_root(_conversation("count the lines")))
    assert cast(int, r.extra["reused_tokens"]) > 0
    assert r.text == _cold(engine, _conversation("count the lines"))


def test_shared_prefix_is_copied_and_a_continuation_is_handed_over(engine: Engine) -> None:
    cache = engine.prefix_cache
    a = engine.encode_chat(_conversation("alpha beta gamma delta"))
    run = engine.start(a, GenerationParams(max_tokens=4), keep=True)
    while not run.done:
        run.step()
    assert len(cache) == 1
    stored = cache._entries[0]
    stored_ids, stored_len = stored.ids, stored.cache.length
    # Another prompt sharing only the start: a copy, the entry stays for its owner.
    other = [*a[:6], 7, 8, 9]
    got = cache.take(other, spare=4)
    assert got is not None
    copy, n = got
    assert n == common_prefix(stored_ids, other) and copy is not stored.cache
    assert len(cache) == 1 and stored.cache.length == stored_len
    for layer in range(copy.start, copy.end):
        np.testing.assert_array_equal(copy._k[layer][:, :n], stored.cache._k[layer][:, :n])
    # The same conversation going on: the entry itself is handed over.
    longer = [*list(stored_ids), 11, 12]
    got = cache.take(longer, spare=4)
    assert got is not None and got[0] is stored.cache and got[1] == len(stored_ids)
    assert len(cache) == 0


def test_take_leaves_one_token_and_respects_min_tokens(engine: Engine) -> None:
    cache = engine.prefix_cache
    ids = engine.encode_chat(_conversation("alpha beta gamma delta"))
    kv = engine.model.new_cache()
    engine.model.forward(ids, kv, 0)
    cache.put(ids, kv)
    got = cache.take(ids, spare=0)  # the very same prompt: its last token must run again
    assert got is not None and got[1] == len(ids) - 1
    assert cache.take([*ids[:3], 1, 2, 3, 4, 5], spare=0) is None  # 3 shared < min_tokens


def test_entries_are_bounded_in_count_and_bytes(engine: Engine) -> None:
    one = engine.model.new_cache(capacity=8)
    engine.model.forward(list(range(5, 13)), one, 0)
    cache = PrefixCache(max_entries=2, max_bytes=10 * one.nbytes, min_tokens=4)
    for first in (20, 40, 60):
        kv = engine.model.new_cache(capacity=8)
        ids = list(range(first, first + 8))
        engine.model.forward(ids, kv, 0)
        cache.put(ids, kv)
    assert len(cache) == 2  # the oldest went
    assert cache.take(list(range(20, 30)), spare=0) is None
    tight = PrefixCache(max_entries=8, max_bytes=one.nbytes, min_tokens=4)
    tight.put(list(range(5, 13)), one)
    tight.put(list(range(70, 78)), one.copy_prefix(8))
    assert len(tight) == 1 and tight.nbytes <= one.nbytes


def test_blas_threads_are_applied_process_wide(tiny_path: Path) -> None:
    before = [info["num_threads"] for info in blas_thread_info()]
    if not before:
        pytest.skip("numpy has no BLAS library that threadpoolctl can control here")
    try:
        LlamaModel.load(tiny_path, models_dir=tiny_path.parent / "models", blas_threads=1)
        assert {info["num_threads"] for info in blas_thread_info()} == {1}
        assert apply_blas_threads(None) is None  # None leaves it alone
        assert {info["num_threads"] for info in blas_thread_info()} == {1}
        with pytest.raises(ValueError, match="blas_threads"):
            apply_blas_threads(-1)
    finally:
        apply_blas_threads(1)
