"""Next-token choice: greedy, or temperature + nucleus (top-p) sampling from a seeded Generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Picks token ids from a logits row. Same seed + same logits = same choices."""

    def __init__(self, params: SamplingParams, rng: np.random.Generator) -> None:
        self.params = params
        self._rng = rng

    def __call__(self, logits: np.ndarray) -> int:
        if logits.ndim != 1:
            raise ValueError(f"expected one logits row, got shape {logits.shape}")
        if self.params.greedy:
            return int(np.argmax(logits))
        # Probabilities in float64 only here: one row, and sums must be exact enough for choice().
        scaled = logits.astype(np.float64) / self.params.temperature
        scaled -= scaled.max()
        probs = np.exp(scaled)
        probs /= probs.sum()
        if self.params.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            keep = int(np.searchsorted(cumulative, self.params.top_p)) + 1
            chosen = order[:keep]
            kept = probs[chosen] / probs[chosen].sum()
            return int(chosen[self._rng.choice(keep, p=kept)])
        return int(self._rng.choice(probs.shape[0], p=probs))
