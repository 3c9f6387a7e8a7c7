"""Scenario files are validated: every mistake names its key."""

from __future__ import annotations

import math
import random

import pytest

from simulations.distributions import Dist, ScenarioError, parse_dist
from simulations.scenario import builtin_scenarios, load_scenario, parse_scenario


def test_builtin_scenarios_load() -> None:
    for name in builtin_scenarios():
        scn = load_scenario(name)
        assert scn.name == name and scn.description and scn.nodes >= 2


@pytest.mark.parametrize(
    "doc, needle",
    [
        ({"nodse": 3}, "unknown keys ['nodse']"),
        ({"nodes": 1}, "at least 2"),
        ({"devices": {"desktop": 0.5}}, "add up to 1"),
        ({"devices": {"toaster": 1.0}}, "unknown device class"),
        ({"network": {"loss": 1.5}}, "network.loss: must be a probability"),
        ({"workload": {"llm": {"dist": "gamma"}}}, "workload.llm.dist"),
        ({"workload": {"steps": {"dist": "int", "min": 5, "max": 2}}}, "max (2.0) < min (5.0)"),
        ({"faults": [{"kind": "meteor"}]}, "faults[0].kind"),
        ({"faults": [{"kind": "pause", "at": 3}]}, "needs duration > 0"),
        ({"faults": [{"kind": "partition", "duration": 3, "shape": "star"}]}, "faults[0].shape"),
        ({"faults": [{"kind": "churn", "every": 5}]}, "churn needs"),
        ({"checks": {"max_lost": 0}}, "unknown keys ['max_lost']"),
        ({"duration": 10, "drain": 20}, "must be shorter than the duration"),
    ],
)
def test_invalid_scenarios_name_the_key(doc: dict[str, object], needle: str) -> None:
    with pytest.raises(ScenarioError) as exc:
        parse_scenario(doc)
    assert needle in str(exc.value)


def test_distributions() -> None:
    rng = random.Random(1)
    assert parse_dist(0.5, "x") == Dist("const", 0.5)
    d = parse_dist({"dist": "int", "min": 1, "max": 3}, "x")
    assert {d.sample(rng) for _ in range(200)} == {1.0, 2.0, 3.0}
    ln = parse_dist({"dist": "lognormal", "median": 0.2, "sigma": 0.5}, "x")
    xs = sorted(ln.sample(rng) for _ in range(2001))
    assert 0.17 < xs[1000] < 0.23
    assert math.isclose(ln.mean(), 0.2 * math.exp(0.125))
    with pytest.raises(ScenarioError, match="unknown keys"):
        parse_dist({"dist": "exp", "mean": 1, "min": 0}, "x")


def test_duration_override_scales_the_fault_schedule() -> None:
    scn = load_scenario("leader-kill")
    short = scn.with_overrides(duration=60.0, nodes=10, seed=3)
    assert (short.nodes, short.seed, short.duration) == (10, 3, 60.0)
    assert short.drain < 60 and short.active_until > 0
    f = short.faults[0]
    assert (
        f.at < short.active_until
        and f.every > 0
        and f.restart_after is not None
        and f.restart_after >= 2.0
    )
    with pytest.raises(ScenarioError):
        scn.with_overrides(nodes=1)
