"""Seeded duration/size distributions, declared in scenario files as small tables.

``{dist = "const", value = 0.3}``, ``{dist = "uniform", min = 1, max = 5}``,
``{dist = "lognormal", median = 0.3, sigma = 0.5}``, ``{dist = "exp", mean = 0.2}``,
``{dist = "int", min = 0, max = 3}`` (integers, inclusive). A bare number means const.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

KINDS = ("const", "uniform", "lognormal", "exp", "int")


class ScenarioError(ValueError):
    """A scenario file is invalid; the message names the key."""


@dataclass(frozen=True, slots=True)
class Dist:
    kind: str
    a: float
    b: float = 0.0

    def sample(self, rng: random.Random) -> float:
        k = self.kind
        if k == "const":
            return self.a
        if k == "uniform":
            return rng.uniform(self.a, self.b)
        if k == "lognormal":
            return self.a * math.exp(self.b * rng.gauss(0.0, 1.0))
        if k == "exp":
            return rng.expovariate(1.0 / self.a) if self.a > 0 else 0.0
        return float(rng.randint(int(self.a), int(self.b)))

    def sampler(self, rng: random.Random) -> Callable[[], float]:
        """A zero-argument ``sample(rng)`` for hot paths: the same draws from ``rng``, bit for
        bit (``exp`` inlines ``Random.expovariate``'s formula), without the per-call dispatch."""
        k, a = self.kind, self.a
        if k == "const":
            return lambda: a
        if k == "exp":
            if a <= 0:
                return lambda: 0.0
            lambd = 1.0 / a
            rnd = rng.random
            log = math.log
            return lambda: -log(1.0 - rnd()) / lambd
        return partial(self.sample, rng)

    def mean(self) -> float:
        k = self.kind
        if k == "const":
            return self.a
        if k in ("uniform", "int"):
            return (self.a + self.b) / 2
        if k == "lognormal":
            return self.a * math.exp(self.b**2 / 2)
        return self.a

    def describe(self) -> str:
        return {
            "const": f"{self.a:g}",
            "uniform": f"U({self.a:g}, {self.b:g})",
            "lognormal": f"LogN(median {self.a:g}, sigma {self.b:g})",
            "exp": f"Exp(mean {self.a:g})",
            "int": f"randint({int(self.a)}, {int(self.b)})",
        }[self.kind]


def parse_dist(value: Any, where: str) -> Dist:
    """Build a :class:`Dist` from a scenario value; raises :class:`ScenarioError` naming ``where``."""
    if isinstance(value, bool):
        raise ScenarioError(f"{where}: expected a number or a distribution table, got a bool")
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise ScenarioError(f"{where}: must be a finite number >= 0, got {value}")
        return Dist("const", float(value))
    if not isinstance(value, Mapping):
        raise ScenarioError(
            f'{where}: expected a number or a table like {{dist = "uniform", min = 1, max = 2}}'
        )
    kind = value.get("dist")
    if kind not in KINDS:
        raise ScenarioError(f"{where}.dist: must be one of {KINDS}, got {kind!r}")

    def num(key: str) -> float:
        v = value.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
            raise ScenarioError(f"{where}.{key}: expected a finite number >= 0, got {v!r}")
        return float(v)

    allowed = {
        "const": {"value"},
        "uniform": {"min", "max"},
        "int": {"min", "max"},
        "lognormal": {"median", "sigma"},
        "exp": {"mean"},
    }[kind]
    extra = set(value) - allowed - {"dist"}
    if extra:
        raise ScenarioError(
            f"{where}: unknown keys {sorted(extra)} for dist {kind!r} (allowed: {sorted(allowed)})"
        )
    if kind == "const":
        return Dist("const", num("value"))
    if kind in ("uniform", "int"):
        lo, hi = num("min"), num("max")
        if hi < lo:
            raise ScenarioError(f"{where}: max ({hi}) < min ({lo})")
        return Dist(kind, lo, hi)
    if kind == "lognormal":
        return Dist(kind, num("median"), num("sigma"))
    return Dist(kind, num("mean"))
