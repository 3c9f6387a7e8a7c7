"""Engine logic on a tiny random GGUF: no network, no 98 MB model, runs in a few seconds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import trio

from kowalski_node.errors import LlmError, ModelNotFound
from kowalski_node.llm.base import ChatMessage, LlmBackend, LlmRequest
from kowalski_node.llm.builtin import (
    BuiltinBackend,
    Engine,
    GenerationParams,
    LlamaModel,
    ModelFileError,
    WeightStore,
)
from kowalski_node.llm.builtin.weights import all_tensor_names, layer_tensor_names
from tests.engine_fixtures import reference_logits, write_tiny_gguf

IDS = [5, 40, 77, 100, 3, 200, 9, 1, 44, 61]


@pytest.fixture(autouse=True, scope="module")
def _float32_kernels() -> object:
    """These tests pin the float32 arithmetic (1e-4 against the float64 reference) and the
    float32 cache; the int8 decode kernels have their own tests (test_engine_qkernels.py)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KOWALSKI_ENGINE_KERNELS", "float32")
    yield
    mp.undo()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    write_tiny_gguf(d / "tiny.gguf")
    write_tiny_gguf(d / "untied.gguf", tied=False, quantize=False, seed=7, n_heads=4, n_kv_heads=1)
    return d


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> LlamaModel:
    return LlamaModel.load(tiny_dir / "tiny.gguf", models_dir=tiny_dir / "models")


@pytest.fixture(scope="module")
def tiny_engine(tiny_dir: Path) -> Engine:
    return Engine.load(tiny_dir / "tiny.gguf", models_dir=tiny_dir / "models")


@pytest.mark.parametrize("name", ["tiny.gguf", "untied.gguf"])
def test_forward_matches_naive_reference(tiny_dir: Path, name: str) -> None:
    model = LlamaModel.load(tiny_dir / name, models_dir=tiny_dir / "models")
    ours = model.forward(IDS, None, 0)
    ref = reference_logits(tiny_dir / name, IDS)
    assert ours.dtype == np.float32
    assert ours.shape == (len(IDS), model.config.vocab_size)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * float(np.abs(ref).max()))


def test_layer_ranges_compose_exactly(tiny: LlamaModel) -> None:
    full = tiny.head(tiny.run_layers(tiny.embed(IDS), 0, 4, tiny.new_cache(), 0))
    h = tiny.embed(IDS)
    cache = tiny.new_cache()
    for a, b in [(0, 1), (1, 3), (3, 4)]:
        h = tiny.run_layers(h, a, b, cache, 0)
        assert h.dtype == np.float32
    assert np.array_equal(tiny.head(h), full)
    assert cache.length == len(IDS)


def test_separate_stage_models_equal_whole_model(tiny_dir: Path, tiny: LlamaModel) -> None:
    """Two peers, each loading only its layers, reproduce the single-device logits."""
    first = LlamaModel.load(tiny_dir / "tiny.gguf", (0, 2), models_dir=tiny_dir / "models")
    second = LlamaModel.load(tiny_dir / "tiny.gguf", (2, 4), models_dir=tiny_dir / "models")
    # the tied head is the embedding matrix, so the last stage can embed too
    assert (first.has_embed, first.has_head, second.has_embed, second.has_head) == (
        True,
        False,
        True,
        True,
    )
    c1, c2 = first.new_cache(), second.new_cache()
    logits = second.head(
        second.run_layers(first.run_layers(first.embed(IDS), 0, 2, c1, 0), 2, 4, c2, 0)
    )
    assert np.array_equal(logits, tiny.forward(IDS, None, 0))
    # decode one more token through both stages
    nxt = second.head(
        second.run_layers(
            first.run_layers(first.embed([7]), 0, 2, c1, len(IDS)), 2, 4, c2, len(IDS)
        )
    )
    recompute = tiny.forward([*IDS, 7], None, 0)[-1]
    np.testing.assert_allclose(nxt[0], recompute, rtol=0, atol=1e-4)
    middle = LlamaModel.load(tiny_dir / "untied.gguf", (1, 3), models_dir=tiny_dir / "models")
    with pytest.raises(ValueError, match="embedding"):
        middle.embed([1])
    with pytest.raises(ValueError, match="head"):
        first.head(np.zeros((1, first.config.d_model), np.float32))


def test_kv_cache_decode_equals_full_recompute(tiny: LlamaModel) -> None:
    cache = tiny.new_cache(capacity=2)  # forces the cache to grow
    tiny.forward(IDS[:-1], cache, 0)
    step = tiny.forward(IDS[-1:], cache, len(IDS) - 1)[-1]
    full = tiny.forward(IDS, None, 0)[-1]
    assert step.dtype == np.float32
    np.testing.assert_allclose(step, full, rtol=0, atol=1e-4)
    assert int(step.argmax()) == int(full.argmax())


def test_chunked_prefill_equals_single_prefill(tiny: LlamaModel) -> None:
    c1, c2 = tiny.new_cache(), tiny.new_cache()
    one = tiny.forward(IDS, c1, 0)[-1]
    tiny.forward(IDS[:4], c2, 0)
    tiny.forward(IDS[4:7], c2, 4)
    chunked = tiny.forward(IDS[7:], c2, 7)[-1]
    np.testing.assert_allclose(chunked, one, rtol=0, atol=1e-4)


def test_cache_truncate_replays_identically(tiny: LlamaModel) -> None:
    cache = tiny.new_cache()
    tiny.forward(IDS, cache, 0)
    first = tiny.forward([11], cache, len(IDS))
    cache.truncate(len(IDS))
    assert cache.length == len(IDS)
    assert np.array_equal(tiny.forward([11], cache, len(IDS)), first)


def test_all_activations_are_float32(tiny: LlamaModel) -> None:
    h = tiny.embed(IDS)
    assert h.dtype == np.float32
    h = tiny.run_layers(h, 0, 4, None, 0)
    assert h.dtype == np.float32
    assert tiny.head(h).dtype == np.float32
    for layer in tiny._layers.values():
        assert all(a.dtype == np.float32 for a in layer.float32_arrays())
    assert isinstance(tiny.config.rope_base, float) and isinstance(tiny.config.rms_eps, float)
    with pytest.raises(ValueError, match="float32"):
        tiny.run_layers(h.astype(np.float64), 0, 4, None, 0)


@pytest.mark.parametrize("bad", [(-1, 2), (0, 5), (3, 3), (4, 2), (2, 9)])
def test_out_of_range_layers_raise_value_error(
    tiny: LlamaModel, tiny_dir: Path, bad: tuple[int, int]
) -> None:
    h = tiny.embed(IDS)
    with pytest.raises(ValueError, match="layer range"):
        tiny.run_layers(h, bad[0], bad[1], None, 0)
    with pytest.raises(ValueError, match="layer range"):
        LlamaModel.load(tiny_dir / "tiny.gguf", bad, models_dir=tiny_dir / "models")
    with pytest.raises(ValueError, match="layer range"):
        tiny.new_cache(*bad)


def test_misuse_of_stages_is_rejected(tiny_dir: Path, tiny: LlamaModel) -> None:
    part = LlamaModel.load(tiny_dir / "tiny.gguf", (1, 3), models_dir=tiny_dir / "models")
    h = tiny.embed(IDS)
    with pytest.raises(ValueError, match="not loaded here"):
        part.run_layers(h, 0, 2, None, 0)
    cache = tiny.new_cache(0, 2)
    with pytest.raises(ValueError, match="cache covers"):
        tiny.run_layers(h, 0, 3, cache, 0)
    tiny.run_layers(h, 0, 2, cache, 0)
    with pytest.raises(ValueError, match="position"):
        tiny.run_layers(h, 0, 2, cache, 3)  # cache holds 10 positions, not 3
    with pytest.raises(ValueError, match="position must be 0"):
        tiny.run_layers(h, 0, 2, None, 5)
    with pytest.raises(ValueError, match="token id"):
        tiny.embed([tiny.config.vocab_size])
    with pytest.raises(ValueError, match="context length"):
        tiny.forward(list(range(tiny.config.context_length + 1)), tiny.new_cache(), 0)


def test_range_load_dequantises_only_its_tensors(tiny_dir: Path, tmp_path: Path) -> None:
    store = WeightStore(tiny_dir / "tiny.gguf", models_dir=tmp_path)
    LlamaModel(store, (1, 3))
    assert store.cache_misses == len(layer_tensor_names(1)) * 2  # no embedding, no head
    cached = {p.stem for p in (store.cache_dir / "tensors").glob("*.npy")}  # type: ignore[operator]
    assert cached == set(layer_tensor_names(1) + layer_tensor_names(2))


def test_weight_cache_cold_then_warm(tiny_dir: Path, tmp_path: Path) -> None:
    cold = WeightStore(tiny_dir / "tiny.gguf", models_dir=tmp_path)
    cold_model = LlamaModel(cold)
    assert cold.cache_hits == 0 and cold.cache_misses == len(all_tensor_names(cold.config))
    warm = WeightStore(tiny_dir / "tiny.gguf", models_dir=tmp_path)
    warm_model = LlamaModel(warm)
    assert warm.cache_misses == 0 and warm._source is None  # GGUF never opened
    assert isinstance(warm.get("blk.0.attn_qkv"), np.memmap)
    assert np.array_equal(warm_model.forward(IDS, None, 0), cold_model.forward(IDS, None, 0))
    # a damaged cache entry is rebuilt, not trusted
    npy = warm.cache_dir / "tensors" / "blk.0.ffn_down.npy"  # type: ignore[operator]
    npy.write_bytes(b"garbage")
    again = WeightStore(tiny_dir / "tiny.gguf", models_dir=tmp_path)
    assert again.get("blk.0.ffn_down").shape == (again.config.ff_dim, again.config.d_model)
    assert again.cache_misses == 1


def test_uncached_load_matches_cached(tiny_dir: Path, tiny: LlamaModel) -> None:
    plain = LlamaModel.load(tiny_dir / "tiny.gguf", use_weight_cache=False)
    assert plain.store.cache_dir is None
    assert np.array_equal(plain.forward(IDS, None, 0), tiny.forward(IDS, None, 0))


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="no model named"):
        Engine.load(tmp_path / "absent.gguf")
    with pytest.raises(ModelFileError, match="not found"):
        WeightStore(tmp_path / "absent.gguf")


@pytest.mark.parametrize("keep", [0, 5, 400, 0.5, 0.99])
def test_truncated_gguf_is_a_clear_error(tiny_dir: Path, tmp_path: Path, keep: float) -> None:
    data = (tiny_dir / "tiny.gguf").read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:n])
    with pytest.raises(ModelFileError, match=r"bad\.gguf"):
        Engine.load(bad, models_dir=tmp_path / "models")


def test_garbage_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(b"this is not a model" * 100)
    with pytest.raises(ModelFileError, match="not a valid GGUF"):
        LlamaModel.load(bad, models_dir=tmp_path / "models")


def test_tiny_tokenizer_and_template(tiny_engine: Engine) -> None:
    tok = tiny_engine.tokenizer
    for text in ["hello world", "héllo 1234 ✓", "  spaces\n\ttabs", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("hello") == [tok.token_to_id("hell"), tok.token_to_id("o")]
    assert tok.encode("42") == [tok.token_to_id("4"), tok.token_to_id("2")]  # digits split
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_start|>", allow_special=False) != [1]
    assert tok.end_ids == frozenset({0, 2})  # <|endoftext|> and <|im_end|> (eos)
    ids = tiny_engine.encode_chat([("user", "hi <|im_end|>")])
    assert ids.count(2) == 2  # the system turn's and the user turn's; not the injected one
    text = tiny_engine.template.render([("user", "hi")])
    assert text == (
        "<|im_start|>system\nYou are tiny.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tok.encode(text) == tiny_engine.encode_chat([("user", "hi")])


def test_generation_limits_stops_and_streaming(tiny_engine: Engine) -> None:
    msgs = [("user", "hello world")]
    full = tiny_engine.generate(msgs, GenerationParams(max_tokens=12))
    assert full.finish_reason == "length" and full.tokens_out == 12 and len(full.token_ids) == 12
    none = tiny_engine.generate(msgs, GenerationParams(max_tokens=0))
    assert (none.text, none.tokens_out, none.finish_reason) == ("", 0, "length")
    # stop at a substring the greedy output is known to contain
    stop = full.text[3:5]
    assert stop
    stopped = tiny_engine.generate(msgs, GenerationParams(max_tokens=12, stop=(stop,)))
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.find(stop)]
    # streamed pieces add up to the final text, and never contain the stop sequence
    run = tiny_engine.start(
        tiny_engine.encode_chat(msgs), GenerationParams(max_tokens=12, stop=(stop,))
    )
    pieces = list(run)
    assert "".join(pieces) == run.result.text == stopped.text
    assert run.result.prefill_s > 0 and run.result.tokens_in == len(tiny_engine.encode_chat(msgs))


def test_sampling_is_reproducible_with_a_seed(tiny_engine: Engine) -> None:
    msgs = [("user", "hello")]

    def sample(seed: int) -> tuple[int, ...]:
        return tiny_engine.generate(
            msgs, GenerationParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=seed)
        ).token_ids

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)
    greedy = tiny_engine.generate(msgs, GenerationParams(max_tokens=16)).token_ids
    assert greedy == tiny_engine.generate(msgs, GenerationParams(max_tokens=16, seed=99)).token_ids


@pytest.mark.parametrize(
    "params",
    [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_tokens": -1}, {"stop": ("",)}],
)
def test_bad_generation_params(params: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        GenerationParams(**params)  # type: ignore[arg-type]


def test_prompt_longer_than_context(tiny_engine: Engine) -> None:
    with pytest.raises(ValueError, match="context"):
        tiny_engine.start(list(range(10, 10 + tiny_engine.context_length)), GenerationParams())


def _request(text: str, **kw: object) -> LlmRequest:
    return LlmRequest(messages=(ChatMessage("user", text),), **kw)  # type: ignore[arg-type]


async def test_backend_complete_stream_and_concurrency(tiny_engine: Engine) -> None:
    backend = BuiltinBackend(engine=tiny_engine)
    assert isinstance(backend, LlmBackend)
    expected = tiny_engine.generate([("user", "hello")], GenerationParams(max_tokens=10))
    resp = await backend.complete(_request("hello", max_tokens=10))
    assert resp.text == expected.text
    assert (resp.backend, resp.model, resp.tokens_in, resp.tokens_out) == (
        "builtin",
        "tiny",
        expected.tokens_in,
        10,
    )
    assert resp.finish_reason == "length" and resp.latency_ms > 0
    pieces = [p async for p in backend.stream(_request("hello", max_tokens=10))]
    assert "".join(pieces) == expected.text
    results: dict[int, str] = {}

    async def one(i: int) -> None:
        results[i] = (await backend.complete(_request("hello", max_tokens=10))).text

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(one, i)
    assert set(results.values()) == {expected.text}  # per-call caches: no cross-talk
    assert "tiny" in await backend.list_models()
    await backend.aclose()


async def test_backend_errors_are_llm_errors(tiny_engine: Engine, tmp_path: Path) -> None:
    backend = BuiltinBackend(engine=tiny_engine)
    with pytest.raises(LlmError, match="temperature"):
        await backend.complete(_request("hi", temperature=-2.0))
    with pytest.raises(LlmError, match="context"):
        await backend.complete(_request("x" * 500))
    with pytest.raises(ModelNotFound):
        await backend.complete(_request("hi", model=str(tmp_path / "nope.gguf")))
    missing = BuiltinBackend(models_dir=tmp_path)
    with pytest.raises(ModelNotFound, match="models pull"):
        await missing.complete(_request("hi"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(LlmError, match=r"bad\.gguf"):
        await BuiltinBackend(bad, models_dir=tmp_path).complete(_request("hi"))


async def test_backend_cancellation_stops_between_tokens(tiny_dir: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.gguf"
    write_tiny_gguf(big, context_length=4096, d_model=128, n_layers=6, seed=3)
    backend = BuiltinBackend(big, models_dir=tmp_path / "models")
    await backend.load()
    with trio.move_on_after(0.2) as scope:
        await backend.complete(_request("hello", max_tokens=3000))
    assert scope.cancelled_caught
    # the backend is still usable afterwards
    resp = await backend.complete(_request("hello", max_tokens=3))
    assert resp.tokens_out == 3


def test_copy_of_model_shares_weight_cache(tiny_dir: Path, tmp_path: Path) -> None:
    """The cache is keyed by content (sha256), not by path."""
    copy = tmp_path / "copy.gguf"
    shutil.copy(tiny_dir / "tiny.gguf", copy)
    a = WeightStore(tiny_dir / "tiny.gguf", models_dir=tmp_path / "m")
    b = WeightStore(copy, models_dir=tmp_path / "m")
    assert a.cache_dir == b.cache_dir
