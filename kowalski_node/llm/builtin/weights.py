"""Float32 weights for the engine, with a per-model on-disk cache of memory-mapped `.npy` files.

Dequantising the GGUF costs seconds per process and opening its reader another ~2.5 s,
so the first load writes what it produced under
`<models_dir>/f32-cache/<gguf sha256>/`:

    meta.json             format, config, tensor list, source file
    tokenizer.json        tokenizer data from the GGUF metadata (tokens, merges, ids, template)
    tensors/<name>.npy    one float32 array per engine tensor, memory-mapped read-only (npy.load_npy)

Tensors are cached one at a time, when first needed, so a node that only serves layers
[a, b) dequantises and stores only those (plus the embedding when it owns the first or
last stage). Engine tensors differ from GGUF tensors: matrices are stored transposed
(in, out) so activations multiply as `x @ W`, and Q/K/V and gate/up are fused.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from kowalski_node.llm.builtin.config import LlamaConfig
from kowalski_node.llm.builtin.gguf_file import GgufSource, ModelFileError, TokenizerData
from kowalski_node.llm.builtin.npy import load_npy
from kowalski_node.llm.builtin.qkernels import QUANT_FORMATS, QMatrix, qmatrix_from_gguf
from kowalski_node.llm.models import file_sha256, weight_cache_root

CACHE_FORMAT = 2  # 2: adds quant_types and the int8 code/scale/offset files
EMBEDDING = "token_embd_t"  # (d_model, vocab): embedding columns, and the tied output head
OUTPUT_NORM = "output_norm"
OUTPUT = "output_t"  # only for models whose head is not tied to the embedding
LAYER_PARTS = ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_gate_up", "ffn_down")


# Fused Q/K/V bias (qwen2). It also rides as the last row of `attn_qkv`, so the list of
# engine tensors per layer (what a pipeline peer fetches) is the same for every architecture;
# the separate tensor serves the int8 path, which never needs the float32 matrix.
BIAS_PART = "attn_qkv_bias"


LAYER_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def quantisable_names(config: LlamaConfig) -> list[str]:
    """GGUF matrices the quantised kernels can use (when their type is supported)."""
    names = ["token_embd.weight"]
    if not config.tied_embeddings:
        names.append("output.weight")
    for layer in range(config.n_layers):
        names.extend(f"blk.{layer}.{m}.weight" for m in LAYER_MATRICES)
    return names


def layer_tensor_names(layer: int) -> list[str]:
    """Engine tensors of one layer: the same for every architecture (a qwen2 bias rides in
    `attn_qkv`), so pipeline peers fetch the same names for llama and qwen2."""
    return [f"blk.{layer}.{part}" for part in LAYER_PARTS]


def all_tensor_names(config: LlamaConfig) -> list[str]:
    names = [EMBEDDING, OUTPUT_NORM]
    if not config.tied_embeddings:
        names.append(OUTPUT)
    for layer in range(config.n_layers):
        names.extend(layer_tensor_names(layer))
    return names


def build_tensor(source: GgufSource, name: str) -> np.ndarray:
    """Produce one engine tensor from GGUF tensors (dequantise, fuse, transpose)."""
    if name == EMBEDDING:
        return np.ascontiguousarray(source.tensor("token_embd.weight").T)
    if name == OUTPUT_NORM:
        return source.tensor("output_norm.weight")
    if name == OUTPUT:
        return np.ascontiguousarray(source.tensor("output.weight").T)
    prefix, _, part = name.rpartition(".")
    if part in ("attn_norm", "ffn_norm"):
        return source.tensor(f"{prefix}.{part}.weight")
    if part == BIAS_PART:
        return _qkv_bias(source, prefix)
    if part == "attn_qkv":
        rows = [source.tensor(f"{prefix}.attn_{p}.weight") for p in ("q", "k", "v")]
        fused = np.concatenate(rows, axis=0).T
        if source.config.qkv_bias:  # (d_model + 1, out): the last row is the bias
            fused = np.concatenate([fused, _qkv_bias(source, prefix)[None, :]], axis=0)
        return np.ascontiguousarray(fused)
    if part == "ffn_gate_up":
        rows = [source.tensor(f"{prefix}.ffn_{p}.weight") for p in ("gate", "up")]
        return np.ascontiguousarray(np.concatenate(rows, axis=0).T)
    if part in ("attn_output", "ffn_down"):
        return np.ascontiguousarray(source.tensor(f"{prefix}.{part}.weight").T)
    raise KeyError(f"unknown engine tensor {name!r}")


def _qkv_bias(source: GgufSource, prefix: str) -> np.ndarray:
    return np.concatenate([source.tensor(f"{prefix}.attn_{p}.bias") for p in ("q", "k", "v")])


def expected_shape(config: LlamaConfig, name: str) -> tuple[int, ...]:
    d, ff = config.d_model, config.ff_dim
    if name in (EMBEDDING, OUTPUT):
        return (d, config.vocab_size)
    if name == OUTPUT_NORM:
        return (d,)
    part = name.rpartition(".")[2]
    return {
        "attn_norm": (d,),
        BIAS_PART: (config.q_dim + 2 * config.kv_dim,),
        "ffn_norm": (d,),
        "attn_qkv": (d + int(config.qkv_bias), config.q_dim + 2 * config.kv_dim),
        "attn_output": (config.q_dim, d),
        "ffn_gate_up": (d, 2 * ff),
        "ffn_down": (ff, d),
    }[part]


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".npy.tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class WeightStore:
    """Serves engine tensors for one GGUF, from the float32 cache when it has them."""

    def __init__(
        self,
        gguf_path: str | os.PathLike[str],
        *,
        models_dir: str | os.PathLike[str] | None = None,
        use_cache: bool = True,
    ) -> None:
        self.path = Path(gguf_path).expanduser()
        if not self.path.is_file():
            raise ModelFileError(f"model file not found: {self.path}")
        self._source: GgufSource | None = None
        self.cache_dir: Path | None = None
        self.cache_hits = 0
        self.cache_misses = 0
        meta: dict[str, Any] | None = None
        if use_cache:
            sha = file_sha256(self.path)
            self.cache_dir = weight_cache_root(models_dir) / sha
            meta = self._read_meta()
        if meta is not None:
            self.config = LlamaConfig.from_json(meta["config"])
            self.quant_types: dict[str, str] = dict(meta["quant_types"])
        else:
            self.config = self.source.config
            self.quant_types = {
                n: self.source.tensor_type(n)
                for n in quantisable_names(self.config)
                if self.source.has_tensor(n)
            }
            if self.cache_dir is not None:
                self._write_meta()

    @property
    def source(self) -> GgufSource:
        """The GGUF reader, opened on first need (about 2.5 s)."""
        if self._source is None:
            self._source = GgufSource(self.path)
        return self._source

    # -- cache metadata -----------------------------------------------------------------
    def _read_meta(self) -> dict[str, Any] | None:
        assert self.cache_dir is not None
        try:
            meta = json.loads((self.cache_dir / "meta.json").read_text())
            if (
                meta.get("format") != CACHE_FORMAT
                or not (self.cache_dir / "tokenizer.json").is_file()
            ):
                return None
            LlamaConfig.from_json(meta["config"])
            if not isinstance(meta.get("quant_types"), dict):
                return None
            return dict(meta)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_meta(self) -> None:
        assert self.cache_dir is not None
        try:
            (self.cache_dir / "tensors").mkdir(parents=True, exist_ok=True)
            _atomic_write_text(
                self.cache_dir / "tokenizer.json", json.dumps(asdict(self.source.tokenizer_data()))
            )
            meta = {
                "format": CACHE_FORMAT,
                "source": str(self.path),
                "config": self.config.to_json(),
                "tensor_names": all_tensor_names(self.config),
                "quant_types": self.quant_types,
            }
            _atomic_write_text(self.cache_dir / "meta.json", json.dumps(meta, indent=1))
        except OSError:
            self.cache_dir = None  # unwritable location: run uncached rather than fail

    # -- data ---------------------------------------------------------------------------
    def tokenizer_data(self) -> TokenizerData:
        if self.cache_dir is not None:
            try:
                raw = json.loads((self.cache_dir / "tokenizer.json").read_text())
                return TokenizerData(**raw)
            except (OSError, ValueError, TypeError):
                pass
        return self.source.tokenizer_data()

    def get(self, name: str) -> np.ndarray:
        """One engine tensor, float32, memory-mapped from the cache when possible."""
        shape = expected_shape(self.config, name)
        if self.cache_dir is not None:
            path = self.cache_dir / "tensors" / f"{name}.npy"
            if path.is_file():
                try:
                    arr = load_npy(path)
                    if arr.dtype == np.float32 and arr.shape == shape:
                        self.cache_hits += 1
                        return arr
                except (OSError, ValueError):
                    pass  # damaged cache entry: rebuild it below
        self.cache_misses += 1
        array = build_tensor(self.source, name)
        if array.shape != shape:
            raise ModelFileError(
                f"{self.path}: tensor {name} has shape {array.shape}, expected {shape}"
            )
        if self.cache_dir is not None:
            with contextlib.suppress(OSError):  # unwritable cache: serve from memory
                _atomic_save_npy(self.cache_dir / "tensors" / f"{name}.npy", array)
        return array

    def get_quant(self, gguf_name: str) -> QMatrix | None:
        """A GGUF matrix as exact int8 codes + block scales, or None when its type has no
        quantised kernel (F16/F32 and types outside `QUANT_FORMATS`)."""
        qtype = getattr(self, "quant_types", {}).get(gguf_name)  # subclasses may lack it
        if qtype not in QUANT_FORMATS:
            return None
        block, act, has_offset = QUANT_FORMATS[qtype]
        parts = ("codes", "scale", "offset") if has_offset else ("codes", "scale")
        paths = (
            [self.cache_dir / "tensors" / f"{gguf_name}.{p}.npy" for p in parts]
            if self.cache_dir is not None
            else []
        )
        if paths and all(p.is_file() for p in paths):
            try:
                arrays = [load_npy(p) for p in paths]
                codes, scale = arrays[0], arrays[1]
                offset = arrays[2] if has_offset else None
                if (
                    codes.dtype == np.int8
                    and codes.ndim == 2
                    and scale.dtype == np.float32
                    and scale.shape == (codes.shape[0], codes.shape[1] // block)
                    and (offset is None or offset.shape == scale.shape)
                ):
                    self.cache_hits += 1
                    return QMatrix(codes, scale, offset, block, act, qtype)
            except (OSError, ValueError):
                pass  # damaged entry: rebuild below
        self.cache_misses += 1
        values = self.source.tensor(gguf_name)
        rows, cols = values.shape
        try:
            matrix = qmatrix_from_gguf(qtype, self.source.raw_blocks(gguf_name), values, rows, cols)
        except ValueError as exc:
            raise ModelFileError(f"{self.path}: tensor {gguf_name}: {exc}") from exc
        if paths:
            arrays_out = [matrix.codes, matrix.scale] + (
                [matrix.offset] if matrix.offset is not None else []
            )
            with contextlib.suppress(OSError):
                for path, array in zip(paths, arrays_out, strict=True):
                    _atomic_save_npy(path, array)
        return matrix

    def cached_tensor_count(self) -> int:
        if self.cache_dir is None:
            return 0
        return sum(
            (self.cache_dir / "tensors" / f"{n}.npy").is_file()
            for n in all_tensor_names(self.config)
        )


def warm_weight_cache(
    gguf_path: str | os.PathLike[str], models_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Build the whole float32 cache for a model now (used by `models pull --warm-cache`)."""
    store = WeightStore(gguf_path, models_dir=models_dir)
    if store.cache_dir is None:
        raise ModelFileError(f"cannot write the weight cache under {weight_cache_root(models_dir)}")
    for name in all_tensor_names(store.config):
        store.get(name)
    for name in quantisable_names(store.config):
        store.get_quant(name)  # int8 codes for the decode kernels (None for F16/F32 types)
    return store.cache_dir
