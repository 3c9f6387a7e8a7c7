"""What the leader and the stages need to know about a model: identity, sizes, tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from kowalski_node.llm.builtin.config import LlamaConfig
from kowalski_node.llm.builtin.tokenizer import ChatTemplate, GgufTokenizer
from kowalski_node.llm.builtin.weights import (
    EMBEDDING,
    OUTPUT,
    OUTPUT_NORM,
    WeightStore,
    expected_shape,
    layer_tensor_names,
)
from kowalski_node.llm.models import display_name, file_sha256, resolve_model_path

F32_BYTES = 4


def layer_names(config: LlamaConfig, layer: int) -> list[str]:
    """The engine tensors of one layer; an engine whose layers depend on the model (qwen2's
    Q/K/V bias) takes the config as a second argument."""
    try:
        return list(cast(Any, layer_tensor_names)(layer, config))
    except TypeError:
        return list(layer_tensor_names(layer))


def tensor_bytes(config: LlamaConfig, name: str) -> int:
    return int(np.prod(expected_shape(config, name))) * F32_BYTES


def layer_bytes(config: LlamaConfig) -> list[int]:
    return [
        sum(tensor_bytes(config, n) for n in layer_names(config, i)) for i in range(config.n_layers)
    ]


def embed_bytes(config: LlamaConfig) -> int:
    return tensor_bytes(config, EMBEDDING)


def head_bytes(config: LlamaConfig) -> int:
    out = tensor_bytes(config, OUTPUT_NORM)
    out += tensor_bytes(config, EMBEDDING if config.tied_embeddings else OUTPUT)
    return out


def range_tensor_names(config: LlamaConfig, start: int, end: int) -> list[str]:
    """Every engine tensor a stage for layers [start, end) loads (as `LlamaModel` does)."""
    config.check_range(start, end)
    names: list[str] = []
    for layer in range(start, end):
        names += layer_names(config, layer)
    has_head = end == config.n_layers
    if start == 0 or (has_head and config.tied_embeddings):
        names.append(EMBEDDING)
    if has_head:
        names.append(OUTPUT_NORM)
        if not config.tied_embeddings:
            names.append(OUTPUT)
    return names


def range_bytes(config: LlamaConfig, start: int, end: int) -> int:
    return sum(tensor_bytes(config, n) for n in range_tensor_names(config, start, end))


@dataclass
class LeaderModel:
    """A model as the leader of a generation holds it: tokenizer, template, sizes, id."""

    name: str
    path: Path
    sha256: str
    config: LlamaConfig
    tokenizer: GgufTokenizer
    template: ChatTemplate

    @classmethod
    def open(cls, name_or_path: str | None, models_dir: Path | None) -> LeaderModel:
        """From a pulled model (name/alias/path); reads only metadata, never every weight."""
        path = resolve_model_path(name_or_path, models_dir)
        store = WeightStore(path, models_dir=models_dir)
        data = store.tokenizer_data()
        tokenizer = GgufTokenizer(data)
        template = ChatTemplate.from_metadata(data.chat_template, tokenizer.special_tokens)
        return cls(
            display_name(path, models_dir),
            path,
            file_sha256(path),
            store.config,
            tokenizer,
            template,
        )

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        return self.template.encode(self.tokenizer, list(messages), add_generation_prompt=True)

    def plan_sizes(self) -> list[int]:
        """Per-layer bytes for the planner (embedding on layer 0, head on the last layer)."""
        sizes = layer_bytes(self.config)
        sizes[0] += embed_bytes(self.config)
        sizes[-1] += head_bytes(self.config)
        return sizes
