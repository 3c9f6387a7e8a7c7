"""Llama hyper-parameters as plain Python numbers (never NumPy scalars: see `rope_base`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a Llama-family model (llama or qwen2), read from GGUF metadata.

    Every float is a Python float: a NumPy float64 scalar mixed into float32 activations
    silently promotes them to float64 under NumPy 2 (about 30x slower).
    """

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ff_dim: int
    vocab_size: int
    context_length: int
    rope_base: float
    rms_eps: float
    tied_embeddings: bool
    # "llama" (SmolLM2) or "qwen2"; the two differ only in the flags below.
    architecture: str = "llama"
    # NEOX rope rotates the halves (x[i], x[i + head_dim/2]); llama GGUFs rotate adjacent
    # pairs because the converter permuted the Q/K rows.
    rope_neox: bool = False
    # Q/K/V projections carry a bias (qwen2).
    qkv_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    def check_range(self, start: int, end: int) -> None:
        """Raise ValueError unless 0 <= start < end <= n_layers."""
        if not (isinstance(start, int) and isinstance(end, int)):
            raise ValueError(f"layer range must be integers, got [{start!r}, {end!r})")
        if not 0 <= start < end <= self.n_layers:
            raise ValueError(
                f"layer range [{start}, {end}) is outside this model's layers [0, {self.n_layers})"
            )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LlamaConfig:
        return cls(
            n_layers=int(data["n_layers"]),
            d_model=int(data["d_model"]),
            n_heads=int(data["n_heads"]),
            n_kv_heads=int(data["n_kv_heads"]),
            head_dim=int(data["head_dim"]),
            ff_dim=int(data["ff_dim"]),
            vocab_size=int(data["vocab_size"]),
            context_length=int(data["context_length"]),
            rope_base=float(data["rope_base"]),
            rms_eps=float(data["rms_eps"]),
            tied_embeddings=bool(data["tied_embeddings"]),
            architecture=str(data.get("architecture", "llama")),
            rope_neox=bool(data.get("rope_neox", False)),
            qkv_bias=bool(data.get("qkv_bias", False)),
        )
