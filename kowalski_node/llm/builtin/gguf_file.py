"""Reading a GGUF file: metadata, tokenizer data and dequantised float32 tensors.

Wraps `gguf.GGUFReader` so that a truncated, corrupted or unsupported file becomes a
`ModelFileError` naming the file, never an IndexError from deep inside the reader.
Opening the reader costs about 2.5 s (it walks ~100k tokenizer strings), which is why
`weights.WeightStore` only opens it when its on-disk cache misses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kowalski_node.errors import LlmError
from kowalski_node.llm.builtin.config import LlamaConfig

# Architectures the engine runs, and whether ggml applies NEOX-style rope to them.
ROPE_NEOX = {"llama": False, "qwen2": True}
SUPPORTED_ARCHITECTURES = tuple(ROPE_NEOX)


class ModelFileError(LlmError):
    """The model file is missing, truncated, corrupted or of an unsupported kind."""


@dataclass(frozen=True)
class TokenizerData:
    """Everything needed to rebuild the tokenizer, as stored in GGUF metadata."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    chat_template: str | None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _require(reader: Any, key: str, path: Path) -> Any:
    value = _field(reader, key)
    if value is None:
        raise ModelFileError(f"{path}: GGUF metadata lacks {key!r}")
    return value


class GgufSource:
    """An opened GGUF file. Tensors come back as float32 arrays shaped (rows=out, cols=in)."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.path = path
        if not path.is_file():
            raise ModelFileError(f"model file not found: {path}")
        if path.stat().st_size == 0:
            raise ModelFileError(f"{path}: file is empty (interrupted download?)")
        try:
            self._reader = GGUFReader(str(path))
        except (
            ValueError,
            IndexError,
            KeyError,
            OverflowError,
            OSError,
            UnicodeDecodeError,
        ) as exc:
            raise ModelFileError(
                f"{path}: not a valid GGUF file (truncated or corrupted?): {exc}"
            ) from exc
        self._tensors = {t.name: t for t in self._reader.tensors}
        size = path.stat().st_size
        for t in self._reader.tensors:
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ModelFileError(
                    f"{path}: tensor {t.name} runs past the end of the file (truncated)"
                )
        self.config = self._read_config()

    def _read_config(self) -> LlamaConfig:
        r, p = self._reader, self.path
        arch = str(_require(r, "general.architecture", p))
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelFileError(
                f"{p}: architecture {arch!r} is not supported "
                f"(only {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        n_heads = int(_require(r, f"{arch}.attention.head_count", p))
        d_model = int(_require(r, f"{arch}.embedding_length", p))
        n_kv = int(_field(r, f"{arch}.attention.head_count_kv", n_heads))
        head_dim = d_model // n_heads
        rope_dim = int(_field(r, f"{arch}.rope.dimension_count", head_dim))
        if rope_dim != head_dim or n_heads % n_kv or d_model % n_heads or head_dim % 2:
            raise ModelFileError(
                f"{p}: unsupported head layout (heads {n_heads}, kv {n_kv}, rope {rope_dim})"
            )
        emb = self._tensors.get("token_embd.weight")
        if emb is None:
            raise ModelFileError(f"{p}: no token_embd.weight tensor")
        vocab = int(_field(r, f"{arch}.vocab_size", int(emb.shape[1])))
        bias_names = [f"blk.0.attn_{x}.bias" for x in ("q", "k", "v")]
        has_bias = [n in self._tensors for n in bias_names]
        if any(has_bias) and not all(has_bias):
            raise ModelFileError(f"{p}: only some of the Q/K/V biases are present")
        return LlamaConfig(
            n_layers=int(_require(r, f"{arch}.block_count", p)),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            ff_dim=int(_require(r, f"{arch}.feed_forward_length", p)),
            vocab_size=vocab,
            context_length=int(_field(r, f"{arch}.context_length", 2048)),
            rope_base=float(_field(r, f"{arch}.rope.freq_base", 10000.0)),
            rms_eps=float(_field(r, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            tied_embeddings="output.weight" not in self._tensors,
            architecture=arch,
            rope_neox=ROPE_NEOX[arch],
            qkv_bias=all(has_bias),
        )

    def tokenizer_data(self) -> TokenizerData:
        r, p = self._reader, self.path
        tokens = [str(t) for t in _require(r, "tokenizer.ggml.tokens", p)]
        types = [int(t) for t in _field(r, "tokenizer.ggml.token_type", [1] * len(tokens))]
        merges = [str(m) for m in _field(r, "tokenizer.ggml.merges", [])]
        bos = _field(r, "tokenizer.ggml.bos_token_id")
        eos = _field(r, "tokenizer.ggml.eos_token_id")
        template = _field(r, "tokenizer.chat_template")
        return TokenizerData(
            model=str(_require(r, "tokenizer.ggml.model", p)),
            pre=str(_field(r, "tokenizer.ggml.pre", "default")),
            tokens=tokens,
            token_types=types,
            merges=merges,
            bos_id=None if bos is None else int(bos),
            eos_id=None if eos is None else int(eos),
            add_bos=bool(_field(r, "tokenizer.ggml.add_bos_token", False)),
            chat_template=None if template is None else str(template),
        )

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors

    def tensor_type(self, name: str) -> str:
        """The GGML type name of a tensor (e.g. "Q5_0", "Q6_K", "F32")."""
        t = self._tensors.get(name)
        if t is None:
            raise ModelFileError(f"{self.path}: tensor {name!r} is missing")
        return str(t.tensor_type.name)

    def raw_blocks(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored (quantised blocks), memory-mapped from the file."""
        t = self._tensors.get(name)
        if t is None:
            raise ModelFileError(f"{self.path}: tensor {name!r} is missing")
        return np.asarray(t.data).view(np.uint8)

    def tensor(self, name: str) -> np.ndarray:
        """Dequantise one tensor to a C-contiguous float32 array."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self._tensors.get(name)
        if t is None:
            raise ModelFileError(f"{self.path}: tensor {name!r} is missing")
        try:
            if t.tensor_type == GGMLQuantizationType.F32:
                out = np.array(t.data, dtype=np.float32)
            else:
                out = dequantize(t.data, t.tensor_type)
        except (ValueError, NotImplementedError) as exc:
            raise ModelFileError(
                f"{self.path}: cannot dequantise {name} ({t.tensor_type.name}): {exc}"
            ) from exc
        expected = tuple(int(d) for d in reversed(t.shape.tolist()))
        if out.size != int(np.prod(expected)):
            raise ModelFileError(
                f"{self.path}: tensor {name} has {out.size} values, expected shape {expected}"
            )
        return np.ascontiguousarray(out.reshape(expected), dtype=np.float32)
