"""Text generation on one device: chat prompt -> tokens -> KV-cached decode -> text.

`GenerationRun.step()` does a bounded piece of work (one prefill chunk or one token) and
returns the text that became safe to show, so callers can run it token by token off the
event loop, interleave concurrent requests, and cancel between tokens.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from kowalski_node.llm.base import ChatMessage
from kowalski_node.llm.builtin.model import LayerRangeCache, LlamaModel
from kowalski_node.llm.builtin.prefix import PrefixCache
from kowalski_node.llm.builtin.sampling import Sampler, SamplingParams
from kowalski_node.llm.builtin.threads import DEFAULT_BLAS_THREADS
from kowalski_node.llm.builtin.tokenizer import ChatTemplate, GgufTokenizer
from kowalski_node.llm.builtin.weights import WeightStore
from kowalski_node.llm.models import display_name, resolve_model_path

FinishReason = Literal["stop", "length", "cancelled"]
Message = ChatMessage | tuple[str, str]


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    prefill_chunk: int = 256  # prompt tokens per step: bounds memory and cancellation delay

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        if any(not s for s in self.stop):
            raise ValueError("stop sequences must be non-empty strings")
        SamplingParams(self.temperature, self.top_p)  # validates


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: tuple[int, ...]  # generated ids, without the end-of-turn token
    tokens_in: int
    tokens_out: int  # tokens sampled, including an end-of-turn token
    finish_reason: FinishReason
    prefill_s: float
    decode_s: float
    reused_tokens: int = 0  # prompt tokens whose keys came from the prefix cache


def _held_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that starts some stop sequence."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best


class GenerationRun:
    """One generation in progress; drive it with `step()` or iterate it for text pieces."""

    def __init__(
        self,
        engine: Engine,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        *,
        reuse: bool = False,
        keep: bool = False,
    ) -> None:
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        ctx = engine.context_length
        if len(prompt_ids) >= ctx:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the context holds {ctx}")
        self._engine = engine
        self._model = engine.model
        self._prompt = list(prompt_ids)
        self.params = params
        self._max_tokens = min(params.max_tokens, ctx - len(self._prompt))
        seed_rng = np.random.default_rng(params.seed)
        self._sampler = Sampler(SamplingParams(params.temperature, params.top_p), seed_rng)
        spare = min(self._max_tokens, 512)
        reused = engine.prefix_cache.take(self._prompt, spare) if reuse else None
        self._cache: LayerRangeCache
        if reused is not None:
            self._cache, self._prefilled = reused
        else:
            self._cache = self._model.new_cache(capacity=len(self._prompt) + spare)
            self._prefilled = 0
        self._reused = self._prefilled
        self._keep = keep
        self._logits: np.ndarray | None = None
        self._generated: list[int] = []
        self._sampled = 0
        self._text = ""
        self._emitted = 0
        self._max_stop = max((len(s) for s in params.stop), default=0)
        self._cancel = threading.Event()
        self._finish: FinishReason | None = None
        self._prefill_s = 0.0
        self._decode_s = 0.0

    @property
    def done(self) -> bool:
        return self._finish is not None

    def cancel(self) -> None:
        """Ask the run to stop before its next token (safe from any thread)."""
        self._cancel.set()

    @property
    def result(self) -> GenerationResult:
        if self._finish is None:
            raise RuntimeError("generation has not finished")
        return GenerationResult(
            text=self._text,
            token_ids=tuple(self._generated),
            tokens_in=len(self._prompt),
            tokens_out=self._sampled,
            finish_reason=self._finish,
            prefill_s=self._prefill_s,
            decode_s=self._decode_s,
            reused_tokens=self._reused,
        )

    def __iter__(self) -> Iterator[str]:
        while not self.done:
            piece = self.step()
            if piece:
                yield piece

    def _end(self, reason: FinishReason) -> str:
        self._finish = reason
        if self._keep:  # the next turn of this conversation starts from these keys
            self._engine.prefix_cache.put(self._prompt + self._generated, self._cache)
            self._keep = False
        piece = self._text[self._emitted :]
        self._emitted = len(self._text)
        return piece

    def step(self) -> str:
        """Do one prefill chunk or one decode token; return newly showable text."""
        if self._finish is not None:
            return ""
        if self._cancel.is_set():
            return self._end("cancelled")
        if self._sampled >= self._max_tokens:
            return self._end("length")
        if self._prefilled < len(self._prompt):
            self._prefill_chunk()
            return ""
        started = time.perf_counter()
        try:
            return self._decode_one()
        finally:
            self._decode_s += time.perf_counter() - started

    def _prefill_chunk(self) -> None:
        started = time.perf_counter()
        lo = self._prefilled
        hi = min(len(self._prompt), lo + self.params.prefill_chunk)
        model = self._model
        hidden = model.embed(self._prompt[lo:hi])
        hidden = model.run_layers(hidden, *model.layer_range, self._cache, lo)
        self._prefilled = hi
        if hi == len(self._prompt):
            float32_prefill = hi - lo > model.quant_max_rows
            self._logits = model.head(hidden[-1:], float32=float32_prefill)[0]
        self._prefill_s += time.perf_counter() - started

    def _decode_one(self) -> str:
        assert self._logits is not None
        token = self._sampler(self._logits)
        self._sampled += 1
        tokenizer = self._engine.tokenizer
        if token in tokenizer.end_ids:
            return self._end("stop")
        self._generated.append(token)
        self._text = tokenizer.decode(self._generated)
        if self.params.stop:
            # a match cannot start inside text already shown (partial matches are held back)
            window = max(0, self._emitted - self._max_stop)
            hits = [i for i in (self._text.find(s, window) for s in self.params.stop) if i >= 0]
            if hits:
                self._text = self._text[: min(hits)]
                return self._end("stop")
        if self._sampled >= self._max_tokens:
            return self._end("length")
        position = len(self._prompt) + len(self._generated) - 1
        self._logits = self._model.forward([token], self._cache, position)[0]
        safe = len(self._text)
        while safe > self._emitted and self._text[safe - 1] == "\ufffd":
            safe -= 1  # an incomplete UTF-8 sequence: wait for its remaining bytes
        safe -= _held_suffix(self._text[:safe], self.params.stop)
        if safe <= self._emitted:
            return ""
        piece = self._text[self._emitted : safe]
        self._emitted = safe
        return piece


class Engine:
    """A whole model on one device: weights, tokenizer and chat template."""

    def __init__(
        self,
        model: LlamaModel,
        tokenizer: GgufTokenizer,
        template: ChatTemplate,
        name: str,
        *,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        if model.layer_range != (0, model.config.n_layers) or not (
            model.has_embed and model.has_head
        ):
            raise ValueError("an Engine needs every layer plus the embedding and the head")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError("tokenizer vocabulary is larger than the model's")
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.name = name
        self.path: Path = model.store.path
        self.prefix_cache = prefix_cache if prefix_cache is not None else PrefixCache()

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] | None = None,
        *,
        models_dir: str | os.PathLike[str] | None = None,
        use_weight_cache: bool = True,
        blas_threads: int | None = DEFAULT_BLAS_THREADS,
    ) -> Engine:
        """Load a pulled model by name/alias (default SmolLM2) or a GGUF path."""
        path = resolve_model_path(model, models_dir)
        store = WeightStore(path, models_dir=models_dir, use_cache=use_weight_cache)
        llama = LlamaModel(store, blas_threads=blas_threads)
        data = store.tokenizer_data()
        tokenizer = GgufTokenizer(data)
        template = ChatTemplate.from_metadata(data.chat_template, tokenizer.special_tokens)
        return cls(llama, tokenizer, template, display_name(path, models_dir))

    @property
    def context_length(self) -> int:
        return self.model.config.context_length

    def encode_chat(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> list[int]:
        pairs = [
            (m.role, m.content) if isinstance(m, ChatMessage) else (m[0], m[1]) for m in messages
        ]
        return self.template.encode(
            self.tokenizer, pairs, add_generation_prompt=add_generation_prompt
        )

    def start(
        self,
        prompt_ids: Sequence[int],
        params: GenerationParams,
        *,
        reuse: bool = False,
        keep: bool = False,
    ) -> GenerationRun:
        """A generation; `reuse` starts from cached keys of a shared prompt prefix, `keep`
        stores this one's keys when it ends (for a conversation that will go on)."""
        return GenerationRun(self, prompt_ids, params, reuse=reuse, keep=keep)

    def generate(
        self, prompt: Sequence[Message] | str, params: GenerationParams | None = None
    ) -> GenerationResult:
        """Blocking generation from chat messages, or from a raw prompt string (no template)."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else self.encode_chat(prompt)
        run = self.start(ids, params or GenerationParams())
        while not run.done:
            run.step()
        return run.result
