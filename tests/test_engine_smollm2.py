"""The builtin engine on the real SmolLM2-135M-Instruct GGUF (pulled once, loaded once).

Golden ids in tests/data/engine_golden.json were recorded with this engine; regenerate with
`python tests/engine_fixtures.py` only after a deliberate numerical change.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from kowalski_node.llm import models
from kowalski_node.llm.base import ChatMessage, LlmRequest
from kowalski_node.llm.builtin import BuiltinBackend, Engine, GenerationParams, LlamaModel
from tests.engine_fixtures import GOLDEN_PATH, greedy_with_margins, real_engine, real_model_path

pytestmark = pytest.mark.model

GOLDEN = json.loads(GOLDEN_PATH.read_text())
FRANCE, OCEAN = GOLDEN["cases"]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return real_engine()


def test_config_from_metadata(engine: Engine) -> None:
    c = engine.model.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ff_dim) == (
        30,
        576,
        9,
        3,
        64,
        1536,
    )
    assert (c.vocab_size, c.rope_base, c.tied_embeddings) == (49152, 100000.0, True)
    assert engine.name == "smollm2-135m-instruct"


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=lambda c: c["prompt"][:20])
def test_greedy_tokens_match_golden(engine: Engine, case: dict[str, object]) -> None:
    assert engine.encode_chat([("user", str(case["prompt"]))]) == case["prompt_ids"]
    ids, _ = greedy_with_margins(engine, str(case["prompt"]), GOLDEN["max_tokens"])
    assert ids == case["greedy_ids"]
    assert engine.tokenizer.decode(ids) == case["text"]


def test_generate_matches_golden_text(engine: Engine) -> None:
    result = engine.generate([("user", FRANCE["prompt"])], GenerationParams(max_tokens=32))
    assert result.text == "The capital of France is Paris."
    assert list(result.token_ids) == FRANCE["greedy_ids"][:-1]  # end-of-turn not in the text
    assert result.finish_reason == "stop"
    assert result.tokens_out == len(FRANCE["greedy_ids"])


def test_layer_halves_give_exactly_the_full_logits(engine: Engine) -> None:
    model = engine.model
    ids = FRANCE["prompt_ids"]
    full = model.head(model.run_layers(model.embed(ids), 0, 30, model.new_cache(), 0))
    cache = model.new_cache()
    h = model.run_layers(model.embed(ids), 0, 15, cache, 0)
    h = model.run_layers(h, 15, 30, cache, 0)
    halves = model.head(h)
    assert full.dtype == halves.dtype == np.float32
    assert np.array_equal(full, halves)


def test_stage_models_loaded_separately_match(engine: Engine) -> None:
    """What two mesh peers would load: [0,15)+embedding and [15,30)+head."""
    path = real_model_path()
    first = LlamaModel.load(path, (0, 15))
    second = LlamaModel.load(path, (15, 30))
    assert first.has_embed and not first.has_head and second.has_head
    ids = FRANCE["prompt_ids"]
    c1, c2 = first.new_cache(), second.new_cache()
    logits = second.head(
        second.run_layers(first.run_layers(first.embed(ids), 0, 15, c1, 0), 15, 30, c2, 0)
    )
    assert np.array_equal(logits, engine.model.forward(ids, None, 0))
    assert int(logits[-1].argmax()) == FRANCE["greedy_ids"][0]


def test_kv_cache_decode_equals_full_recompute(engine: Engine) -> None:
    model = engine.model
    ids = FRANCE["prompt_ids"] + FRANCE["greedy_ids"][:4]
    cache = model.new_cache()
    model.forward(ids[:-1], cache, 0)
    step = model.forward(ids[-1:], cache, len(ids) - 1)[-1]
    full = model.forward(ids, None, 0)[-1]
    assert step.dtype == np.float32
    if model.kernels == "float32":
        # Not bitwise: BLAS blocks a 1-row and an N-row product differently.
        np.testing.assert_allclose(step, full, rtol=0, atol=2e-3)
    else:
        # The decode step quantises its activations to int8 as llama.cpp does; the
        # recompute (11 rows) is float32. SmolLM2's outliers (|h| ~ 2e4) make that ~4 %.
        assert np.abs(step - full).max() < 0.06 * float(np.abs(full).max())
    assert int(step.argmax()) == int(full.argmax()) == FRANCE["greedy_ids"][4]


def test_everything_is_float32(engine: Engine) -> None:
    model = engine.model
    h = model.embed([1, 2, 3])
    assert h.dtype == np.float32
    h = model.run_layers(h, 0, 30, model.new_cache(), 0)
    assert h.dtype == np.float32
    assert model.head(h).dtype == np.float32
    for layer in model._layers.values():
        assert all(a.dtype == np.float32 for a in layer.float32_arrays())


def test_tokenizer_round_trip_and_specials(engine: Engine) -> None:
    tok = engine.tokenizer
    samples = [
        "Hello, world!",
        "def f(x):\n    return x ** 2  # squares",
        "Zürich, 東京, emoji 🎉 and math ∑ᵢ xᵢ",
        "year 2024 has 366 days",
        "   leading and trailing spaces   ",
    ]
    for text in samples:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("2024")) == 4  # digits are split one by one
    assert tok.special_tokens["<|endoftext|>"] == 0
    assert tok.special_tokens["<|im_start|>"] == 1
    assert tok.special_tokens["<|im_end|>"] == 2
    assert len(tok.special_tokens) == 17
    assert tok.encode("<|im_start|>user") == [1, *tok.encode("user")]
    assert 1 not in tok.encode("<|im_start|>", allow_special=False)
    assert {0, 2} <= tok.end_ids


def test_chat_template_from_metadata(engine: Engine) -> None:
    assert engine.template.default_system == (
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    )
    text = engine.template.render([("system", "Be brief."), ("user", "Hi")])
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert engine.tokenizer.encode(text) == engine.encode_chat(
        [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")]
    )


def test_stop_sequences_and_max_tokens(engine: Engine) -> None:
    msgs = [("user", OCEAN["prompt"])]
    stopped = engine.generate(msgs, GenerationParams(max_tokens=32, stop=(" vast",)))
    assert stopped.text == "The ocean is a"
    assert stopped.finish_reason == "stop"
    short = engine.generate(msgs, GenerationParams(max_tokens=5))
    assert short.finish_reason == "length" and short.tokens_out == 5
    assert list(short.token_ids) == OCEAN["greedy_ids"][:5]
    assert short.text == engine.tokenizer.decode(OCEAN["greedy_ids"][:5])


def test_sampling_reproducible_with_seed(engine: Engine) -> None:
    msgs = [("user", "Tell me a fun fact.")]
    params = GenerationParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234)
    a = engine.generate(msgs, params)
    b = engine.generate(msgs, params)
    assert a.token_ids == b.token_ids and a.text == b.text


async def test_backend_complete_and_stream(engine: Engine) -> None:
    backend = BuiltinBackend(engine=engine)
    req = LlmRequest(messages=(ChatMessage("user", FRANCE["prompt"]),), max_tokens=32)
    resp = await backend.complete(req)
    assert resp.text == "The capital of France is Paris."
    assert (resp.model, resp.backend, resp.finish_reason) == (
        "smollm2-135m-instruct",
        "builtin",
        "stop",
    )
    assert resp.tokens_in == len(FRANCE["prompt_ids"]) and resp.tokens_out == 8
    pieces = [p async for p in backend.stream(req)]
    assert len(pieces) > 3 and "".join(pieces) == resp.text
    assert "smollm2-135m-instruct" in await backend.list_models()


def test_weight_cache_is_complete_after_load(engine: Engine) -> None:
    assert engine.model.store.cache_dir is not None
    spec = models.find_spec("default")
    assert spec is not None
    [info] = [i for i in models.list_models() if i.name == spec.name]
    assert info.present and info.sha_ok and info.weight_cache
