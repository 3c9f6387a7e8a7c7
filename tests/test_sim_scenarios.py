"""A short pass of every built-in scenario: the checkers must pass (lost = 0, duplicates = 0, ...)."""

from __future__ import annotations

import pytest

from simulations.cli import run_scenario
from simulations.results import minimal_history
from simulations.scenario import builtin_scenarios, load_scenario

SHORT = {"nodes": 24, "duration": 40.0}
OVERRIDES = {
    "placement-671b": {"nodes": 60, "duration": 30.0},
    # fewer nodes killed for good per acceptor set than 24 nodes x 40 s would give
    "owner-kill": {"nodes": 48, "duration": 60.0},
}


def test_every_scenario_file_is_covered() -> None:
    assert set(builtin_scenarios()) >= {
        "baseline",
        "leader-kill",
        "pause-stale-leader",
        "churn-25pct",
        "partition-majority",
        "partition-ring",
        "lossy-5pct",
        "clock-skew",
        "placement-671b",
        "owner-kill",
        "client-retry",
        "large-context",
    }


@pytest.mark.parametrize("name", builtin_scenarios())
def test_short_pass(name: str) -> None:
    opts = OVERRIDES.get(name, SHORT)
    scn = load_scenario(name).with_overrides(
        nodes=int(opts["nodes"]), duration=float(opts["duration"])
    )
    sim, report = run_scenario(scn)
    failed = [c for c in report["checks"] if not c["ok"]]
    assert not failed, f"{name} seed {scn.seed}: {failed}\n" + "\n".join(minimal_history(sim))
    tasks = report["tasks"]
    if scn.workload.rate > 0:
        assert tasks["submitted"] > 0
    assert tasks["committed"] == tasks["submitted"] - tasks["failed"]
    assert tasks["executions"] >= tasks["committed"]
    assert report["dissemination"]["ratio"] == 1.0
    coord = report["coordination"]
    if name == "leader-kill":
        assert report["failover_s"]["n"] >= 3 and report["detection_all_s"]["n"] >= 3
        assert coord["resumes"] >= 1
    if name == "pause-stale-leader":
        assert (
            coord["fenced_checkpoints"] + coord["fenced_commits"] >= 1
            and coord["fenced_aborts"] >= 1
        )
    if name == "large-context":  # leaders fetched contexts, also after failovers
        ctx = report["contexts"]
        assert ctx["fetch_s"]["n"] >= 1 and ctx["fetch_failures"] == 0
        assert report["failover_s"]["n"] >= 1
    if name == "owner-kill":
        fo = report["failover_s"]
        assert fo["owner_deaths"]["n"] >= 1 and coord["takeovers"] >= 1
        assert fo["owner_death_to_commit"]["n"] >= 1
    if name == "client-retry":
        assert report["client"]["retries_at_another_node"] >= 1
        assert report["tasks"]["never_acknowledged"] == 0
    if name.startswith("partition"):
        assert report["network"]["dropped_partition"] > 0
    if name in ("lossy-5pct", "membership-soak-5pct"):
        m = report["membership"]
        assert m["node_hours_at_5pct_loss_or_more"] > 0 and m["false_dead_verdicts"] == 0
    if name == "churn-25pct":
        assert report["detection_all_s"]["n"] >= 5
    if name == "placement-671b":
        pl = report["placement"]
        replan = pl["leave"]["replan"]
        assert pl["plan"]["min_headroom_fraction"] >= 0.1
        assert replan["moved_layers"] >= pl["leave"]["orphaned_layers"]
        assert replan["moved_layers"] <= replan["full_replan_moved_layers"]
        assert not replan["uses_departed"]
