"""The Llama forward pass in NumPy, split into stages a pipeline can run on different peers.

    hidden = model.embed(token_ids)                              # first stage
    hidden = model.run_layers(hidden, start, end, cache, pos)    # any stage, layers [start, end)
    logits = model.head(hidden)                                  # last stage

Running [0, 15) then [15, 30) is the same arithmetic, op for op, as [0, 30), so the logits
are bitwise equal. Everything is float32; see `LlamaConfig` about NumPy 2 promotion.

Architecture (as measured for SmolLM2 GGUF): RMSNorm, RoPE on adjacent pairs (the GGUF
converter already permuted Q/K rows), grouped-query attention, SwiGLU, optional tied head.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kowalski_node.llm.builtin.config import LlamaConfig
from kowalski_node.llm.builtin.qkernels import HAVE_NUMBA, QMatrix, qmatvec
from kowalski_node.llm.builtin.threads import DEFAULT_BLAS_THREADS, apply_blas_threads
from kowalski_node.llm.builtin.weights import (
    BIAS_PART,
    EMBEDDING,
    OUTPUT,
    OUTPUT_NORM,
    WeightStore,
)

F32 = np.float32
# Up to this many rows per call go through the int8 kernels (decode, short appends); longer
# inputs (prefill chunks) use float32 BLAS, which is faster per row once a weight is reused.
QUANT_MAX_ROWS = 4
KERNELS = ("quantized", "float32")


def default_kernels() -> str:
    """ "quantized" where numba is importable, else "float32"; KOWALSKI_ENGINE_KERNELS overrides."""
    chosen = os.environ.get("KOWALSKI_ENGINE_KERNELS") or ("quantized" if HAVE_NUMBA else "float32")
    if chosen not in KERNELS:
        raise ValueError(f"KOWALSKI_ENGINE_KERNELS must be one of {KERNELS}, got {chosen!r}")
    if chosen == "quantized" and not HAVE_NUMBA:
        raise ValueError("quantized kernels need numba, which is not installed")
    return chosen


class LayerRangeCache:
    """Keys and values for layers [start, end) of one sequence.

    Each layer keeps its own length, so a cache covering [0, 30) can be filled by running
    [0, 15) and [15, 30) separately. Arrays grow by doubling; `truncate` rolls back (e.g.
    to replay after a failover).
    """

    def __init__(self, config: LlamaConfig, start: int, end: int, capacity: int = 256) -> None:
        config.check_range(start, end)
        self.start, self.end = start, end
        self._kv_heads, self._head_dim = config.n_kv_heads, config.head_dim
        self.max_length = config.context_length
        cap = max(1, min(capacity, self.max_length))
        self._k = [np.zeros((self._kv_heads, cap, self._head_dim), F32) for _ in range(end - start)]
        self._v = [np.zeros((self._kv_heads, cap, self._head_dim), F32) for _ in range(end - start)]
        self._lengths = [0] * (end - start)

    def covers(self, start: int, end: int) -> bool:
        return self.start <= start and end <= self.end

    def layer_length(self, layer: int) -> int:
        return self._lengths[layer - self.start]

    @property
    def length(self) -> int:
        """Tokens held by every layer in the range (the position the next token takes)."""
        return min(self._lengths)

    def truncate(self, length: int) -> None:
        """Forget every position >= length in all layers."""
        if length < 0:
            raise ValueError(f"cannot truncate to a negative length {length}")
        self._lengths = [min(n, length) for n in self._lengths]

    def _append(
        self, layer: int, k: np.ndarray, v: np.ndarray, position: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Store k, v ([kv_heads, T, head_dim]) at `position`; return this layer's keys/values so far."""
        i = layer - self.start
        if self._lengths[i] != position:
            raise ValueError(
                f"layer {layer} cache holds {self._lengths[i]} positions but the input starts at "
                f"position {position}; truncate the cache or pass the right position"
            )
        new_len = position + k.shape[1]
        if new_len > self.max_length:
            raise ValueError(
                f"sequence of {new_len} tokens exceeds the context length {self.max_length}"
            )
        cap = self._k[i].shape[1]
        if new_len > cap:
            grown = min(self.max_length, max(new_len, 2 * cap))
            for store in (self._k, self._v):
                bigger = np.zeros((self._kv_heads, grown, self._head_dim), F32)
                bigger[:, :position] = store[i][:, :position]
                store[i] = bigger
        self._k[i][:, position:new_len] = k
        self._v[i][:, position:new_len] = v
        self._lengths[i] = new_len
        return self._k[i][:, :new_len], self._v[i][:, :new_len]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._k) + sum(a.nbytes for a in self._v)

    def copy_prefix(self, length: int, spare: int = 0) -> LayerRangeCache:
        """A new cache holding the first `length` positions of every layer (room for `spare` more)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot copy {length} positions from a cache holding {self.length}")
        cfg_heads, cfg_dim = self._kv_heads, self._head_dim
        out = LayerRangeCache.__new__(LayerRangeCache)
        out.start, out.end, out.max_length = self.start, self.end, self.max_length
        out._kv_heads, out._head_dim = cfg_heads, cfg_dim
        cap = max(1, min(length + spare, self.max_length))
        out._k, out._v = [], []
        for src_k, src_v in zip(self._k, self._v, strict=True):
            k = np.empty((cfg_heads, cap, cfg_dim), F32)
            v = np.empty((cfg_heads, cap, cfg_dim), F32)
            k[:, :length] = src_k[:, :length]
            v[:, :length] = src_v[:, :length]
            out._k.append(k)
            out._v.append(v)
        out._lengths = [length] * len(self._lengths)
        return out


class _Layer:
    """One decoder layer's weights.

    Norms and biases are float32. Each matrix comes as int8 codes (`QMatrix`, used for up to
    `QUANT_MAX_ROWS` rows, i.e. decoding) when the store offers them, and as fused float32
    (in, out) arrays for BLAS (prefill). With quantised matrices the float32 ones are only
    read from the store on first need, so a node that only decodes never builds them.
    """

    def __init__(self, store: WeightStore, layer: int, quantised: bool) -> None:
        p = f"blk.{layer}."
        self._store, self._prefix = store, p
        self.attn_norm = store.get(p + "attn_norm")
        self.ffn_norm = store.get(p + "ffn_norm")
        self.bqkv: np.ndarray | None = None
        if store.config.qkv_bias and quantised:
            self.bqkv = store.get(p + BIAS_PART)
        self._f32: dict[str, np.ndarray] = {}
        self.q_qkv: list[QMatrix] | None = None
        self.q_wo = self.q_down = None
        self.q_gate_up: list[QMatrix] | None = None
        if quantised:
            get = store.get_quant
            qkv = [get(p + f"attn_{n}.weight") for n in ("q", "k", "v")]
            gate_up = [get(p + f"ffn_{n}.weight") for n in ("gate", "up")]
            self.q_qkv = None if None in qkv else [m for m in qkv if m is not None]
            self.q_gate_up = None if None in gate_up else [m for m in gate_up if m is not None]
            self.q_wo = get(p + "attn_output.weight")
            self.q_down = get(p + "ffn_down.weight")
        # matrices without codes are needed as float32 right away (as before)
        for part, needed in (
            ("attn_qkv", self.q_qkv is None),
            ("attn_output", self.q_wo is None),
            ("ffn_gate_up", self.q_gate_up is None),
            ("ffn_down", self.q_down is None),
        ):
            if needed:
                self.f32(part)

    def f32(self, part: str) -> np.ndarray:
        """The fused float32 (in, out) matrix for `part`, read from the store once."""
        array = self._f32.get(part)
        if array is None:
            array = self._f32[part] = self._store.get(self._prefix + part)
        return array

    def float32_arrays(self) -> list[np.ndarray]:
        """Every float32 array this layer holds now (for dtype checks)."""
        small = [a for a in (self.attn_norm, self.ffn_norm, self.bqkv) if a is not None]
        return small + list(self._f32.values())


def _qproduct(parts: list[QMatrix], x: np.ndarray) -> np.ndarray:
    """x [T, in] times the row-concatenation of `parts`, through the int8 kernels."""
    rows = sum(m.shape[0] for m in parts)
    out = np.empty((x.shape[0], rows), np.float32)
    for t in range(x.shape[0]):
        xt = np.ascontiguousarray(x[t])
        lo = 0
        for m in parts:
            qmatvec(m, xt, out[t, lo : lo + m.shape[0]])
            lo += m.shape[0]
    return out


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    mean_sq = np.mean(x * x, axis=-1, keepdims=True)
    return (x / np.sqrt(mean_sq + eps)) * weight


class LlamaModel:
    """Weights for a layer range of one GGUF model, plus (optionally) embedding and head."""

    def __init__(
        self,
        store: WeightStore,
        layers: tuple[int, int] | None = None,
        *,
        embed: bool | None = None,
        head: bool | None = None,
        blas_threads: int | None = DEFAULT_BLAS_THREADS,
        kernels: str | None = None,
        quant_max_rows: int = QUANT_MAX_ROWS,
    ) -> None:
        # Process-wide; see threads.py for why one thread is the default.
        apply_blas_threads(blas_threads)
        self.config = config = store.config
        self.store = store
        self.kernels = default_kernels() if kernels is None else kernels
        # Inputs of up to this many rows use the int8 kernels. Raising it to the prompt
        # length makes prefill quantise its activations too, as llama.cpp does: slower
        # (one row at a time) but the greedy tokens then follow llama.cpp's even at
        # near-ties (measured: 3 of 3 prompts whose float32 prefill diverged).
        self.quant_max_rows = quant_max_rows
        if self.kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {self.kernels!r}")
        if self.kernels == "quantized" and not HAVE_NUMBA:
            raise ValueError("quantized kernels need numba, which is not installed")
        # a store without codes (e.g. float32 shards from a peer) runs on float32 only
        quantised = self.kernels == "quantized" and bool(getattr(store, "quant_types", None))
        start, end = layers if layers is not None else (0, config.n_layers)
        config.check_range(start, end)
        self.layer_range = (start, end)
        self._layers = {i: _Layer(store, i, quantised) for i in range(start, end)}
        self.has_head = end == config.n_layers if head is None else head
        wants_embed = start == 0 if embed is None else embed
        # A tied head *is* the embedding matrix, so a last stage can embed for free.
        self.has_embed = wants_embed or (self.has_head and config.tied_embeddings)
        self._output_norm = store.get(OUTPUT_NORM) if self.has_head else None
        # int8 codes of the embedding / head when available; float32 ones on first need
        self._q_embedding = store.get_quant("token_embd.weight") if quantised else None
        self._q_output: QMatrix | None = None
        if self.has_head and quantised:
            self._q_output = (
                self._q_embedding if config.tied_embeddings else store.get_quant("output.weight")
            )
        if not self.has_embed:
            self._q_embedding = None
        self._embedding_t_array: np.ndarray | None = None
        self._output_t_array: np.ndarray | None = None
        if self.has_embed and self._q_embedding is None:
            self._embedding_t_array = store.get(EMBEDDING)
        if self.has_head and self._q_output is None:
            self._output_t_array = self._output_t()
        half = config.head_dim // 2
        self._inv_freq = 1.0 / (
            config.rope_base ** (np.arange(half, dtype=np.float64) * 2.0 / config.head_dim)
        )
        # (cos, sin) tables replaced as one tuple, so concurrent readers never see a mismatch
        self._rope_table: tuple[np.ndarray, np.ndarray] = (
            np.zeros((0, half), F32),
            np.zeros((0, half), F32),
        )
        self._scale = float(1.0 / np.sqrt(config.head_dim))

    @classmethod
    def load(
        cls,
        gguf_path: str | os.PathLike[str],
        layers: tuple[int, int] | None = None,
        *,
        embed: bool | None = None,
        head: bool | None = None,
        models_dir: str | os.PathLike[str] | None = None,
        use_weight_cache: bool = True,
        blas_threads: int | None = DEFAULT_BLAS_THREADS,
        kernels: str | None = None,
    ) -> LlamaModel:
        """Load only what layers [start, end) need (plus embedding/head for first/last stage).

        `kernels`: "quantized" (int8 codes for decode, float32 BLAS for prefill; the default
        where numba imports) or "float32" (float32 BLAS for everything).
        """
        store = WeightStore(Path(gguf_path), models_dir=models_dir, use_cache=use_weight_cache)
        return cls(
            store, layers, embed=embed, head=head, blas_threads=blas_threads, kernels=kernels
        )

    def _embedding_t(self) -> np.ndarray:
        if self._embedding_t_array is None:
            self._embedding_t_array = self.store.get(EMBEDDING)
        return self._embedding_t_array

    def _output_t(self) -> np.ndarray:
        if self._output_t_array is None:
            self._output_t_array = (
                self._embedding_t() if self.config.tied_embeddings else self.store.get(OUTPUT)
            )
        return self._output_t_array

    # -- stages -----------------------------------------------------------------------------
    def new_cache(
        self, start: int | None = None, end: int | None = None, capacity: int = 256
    ) -> LayerRangeCache:
        """A KV cache for [start, end), defaulting to the layers this model holds."""
        s = self.layer_range[0] if start is None else start
        e = self.layer_range[1] if end is None else end
        return LayerRangeCache(self.config, s, e, capacity)

    def embed(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Hidden states [T, d_model] float32 for the tokens (first pipeline stage)."""
        if not self.has_embed:
            raise ValueError("this model part was loaded without the token embedding")
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            raise ValueError("no tokens to embed")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token id out of range [0, {self.config.vocab_size})")
        if self._q_embedding is not None:  # the same values, rebuilt from the int8 codes
            return self._q_embedding.dequantize_rows(ids)
        return np.ascontiguousarray(self._embedding_t()[:, ids].T)

    def head(self, hidden: np.ndarray, *, float32: bool = False) -> np.ndarray:
        """Logits [T, vocab] float32 from final hidden states (last pipeline stage).

        `float32=True` multiplies in float32 even for a few rows: for the last row of a
        prompt that itself went through the float32 path, so the first sampled token comes
        from one arithmetic (mixing them flipped SmolLM2's near-tied first token, "The" vs
        "L", on the France golden prompt).
        """
        if not self.has_head or self._output_norm is None:
            raise ValueError("this model part was loaded without the output head")
        self._check_hidden(hidden)
        normed = _rms_norm(hidden, self._output_norm, self.config.rms_eps)
        if not float32 and self._q_output is not None and hidden.shape[0] <= self.quant_max_rows:
            return _qproduct([self._q_output], normed)
        return normed @ self._output_t()

    def run_layers(
        self,
        hidden: np.ndarray,
        start: int,
        end: int,
        cache: LayerRangeCache | None,
        position: int,
    ) -> np.ndarray:
        """Run decoder layers [start, end) on hidden [T, d] whose first row sits at `position`.

        With a cache, keys/values are appended to it (its length for these layers must equal
        `position`). Without one, attention sees only these T tokens (position must be 0).
        """
        self.config.check_range(start, end)
        lo, hi = self.layer_range
        if not (lo <= start and end <= hi):
            raise ValueError(
                f"layers [{start}, {end}) are not loaded here (this part holds [{lo}, {hi}))"
            )
        if cache is not None and not cache.covers(start, end):
            raise ValueError(f"cache covers [{cache.start}, {cache.end}), not [{start}, {end})")
        if cache is None and position != 0:
            raise ValueError("position must be 0 when running without a cache")
        if position < 0:
            raise ValueError(f"negative position {position}")
        self._check_hidden(hidden)
        t = hidden.shape[0]
        cos, sin = self._rope(position, t)
        mask = self._mask(position, t)
        x = hidden
        for layer in range(start, end):
            x = self._block(x, self._layers[layer], layer, cache, position, cos, sin, mask)
        return x

    def forward(
        self, token_ids: Sequence[int] | np.ndarray, cache: LayerRangeCache | None, position: int
    ) -> np.ndarray:
        """embed -> all held layers -> head, for a model that holds every stage."""
        hidden = self.embed(token_ids)
        hidden = self.run_layers(hidden, *self.layer_range, cache, position)
        return self.head(hidden)

    # -- internals ----------------------------------------------------------------------------
    def _check_hidden(self, hidden: np.ndarray) -> None:
        if not isinstance(hidden, np.ndarray) or hidden.dtype != np.float32:
            raise ValueError(
                f"hidden states must be a float32 ndarray, got {getattr(hidden, 'dtype', type(hidden))}"
            )
        if hidden.ndim != 2 or hidden.shape[1] != self.config.d_model or hidden.shape[0] == 0:
            raise ValueError(
                f"hidden states must be [T>0, {self.config.d_model}], got {list(hidden.shape)}"
            )

    def _rope(self, position: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        needed = position + t
        cos, sin = self._rope_table
        if needed > cos.shape[0]:
            if needed > self.config.context_length:
                raise ValueError(
                    f"position {needed - 1} is past the context length {self.config.context_length}"
                )
            n = min(self.config.context_length, max(needed, 2 * cos.shape[0], 256))
            angles = np.outer(np.arange(n, dtype=np.float64), self._inv_freq)
            cos, sin = np.cos(angles).astype(F32), np.sin(angles).astype(F32)
            self._rope_table = (cos, sin)
        return cos[position:needed, None, :], sin[position:needed, None, :]

    @staticmethod
    def _mask(position: int, t: int) -> np.ndarray | None:
        """Additive causal mask [T, position+T] for the new tokens; None for a single token."""
        if t == 1:
            return None
        rows = np.arange(t)[:, None] + position
        cols = np.arange(position + t)[None, :]
        return np.where(cols > rows, F32(-np.inf), F32(0.0)).astype(F32)

    def _apply_rope(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """Rotate pairs of x [T, heads, head_dim]: halves (x[i], x[i+half]) for NEOX rope
        (qwen2), adjacent (x[2i], x[2i+1]) otherwise (llama GGUFs, rows pre-permuted)."""
        out = np.empty_like(x)
        if self.config.rope_neox:
            half = x.shape[-1] // 2
            first, second = x[..., :half], x[..., half:]
            out[..., :half] = first * cos - second * sin
            out[..., half:] = second * cos + first * sin
            return out
        even, odd = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out

    def _block(
        self,
        x: np.ndarray,
        w: _Layer,
        layer: int,
        cache: LayerRangeCache | None,
        position: int,
        cos: np.ndarray,
        sin: np.ndarray,
        mask: np.ndarray | None,
    ) -> np.ndarray:
        c = self.config
        t = x.shape[0]
        short = t <= self.quant_max_rows
        normed = _rms_norm(x, w.attn_norm, c.rms_eps)
        if short and w.q_qkv is not None:
            qkv = _qproduct(w.q_qkv, normed)
            if w.bqkv is not None:
                qkv += w.bqkv
        else:
            wqkv = w.f32("attn_qkv")
            qkv = normed @ wqkv[: c.d_model]
            if c.qkv_bias:  # the bias is the matrix's extra last row
                qkv += wqkv[c.d_model]
        q = qkv[:, : c.q_dim].reshape(t, c.n_heads, c.head_dim)
        k = qkv[:, c.q_dim : c.q_dim + c.kv_dim].reshape(t, c.n_kv_heads, c.head_dim)
        v = qkv[:, c.q_dim + c.kv_dim :].reshape(t, c.n_kv_heads, c.head_dim)
        q = self._apply_rope(q, cos, sin)
        k = self._apply_rope(k, cos, sin)
        k_t, v_t = k.transpose(1, 0, 2), v.transpose(1, 0, 2)  # [kv_heads, T, hd]
        if cache is not None:
            keys, values = cache._append(layer, k_t, v_t, position)
        else:
            keys, values = k_t, v_t
        g = c.group_size
        # query head h reads kv head h // g: group queries as [kv_heads, g*T, hd]
        qg = (
            q.reshape(t, c.n_kv_heads, g, c.head_dim)
            .transpose(1, 2, 0, 3)
            .reshape(c.n_kv_heads, g * t, c.head_dim)
        )
        scores = (qg @ keys.transpose(0, 2, 1)) * self._scale  # [kv, g*T, S]
        if mask is not None:
            s = scores.shape[-1]
            scores = (scores.reshape(c.n_kv_heads, g, t, s) + mask).reshape(c.n_kv_heads, g * t, s)
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        attn = scores @ values  # [kv, g*T, hd]
        attn = (
            attn.reshape(c.n_kv_heads, g, t, c.head_dim).transpose(2, 0, 1, 3).reshape(t, c.q_dim)
        )
        if short and w.q_wo is not None:
            x = x + _qproduct([w.q_wo], attn)
        else:
            x = x + attn @ w.f32("attn_output")
        normed = _rms_norm(x, w.ffn_norm, c.rms_eps)
        if short and w.q_gate_up is not None:
            gate_up = _qproduct(w.q_gate_up, normed)
        else:
            gate_up = normed @ w.f32("ffn_gate_up")
        gate, up = gate_up[:, : c.ff_dim], gate_up[:, c.ff_dim :]
        # silu(g) = g * sigmoid(g), with sigmoid via tanh (no overflow warnings)
        act = gate * (0.5 * (1.0 + np.tanh(0.5 * gate))) * up
        if short and w.q_down is not None:
            return x + _qproduct([w.q_down], act)
        return x + act @ w.f32("ffn_down")
