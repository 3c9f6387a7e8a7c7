"""Seeds that once failed a checker, kept as regression tests.

* leader-kill storm, seed 7 (16 nodes, the busiest leader killed every 0.5 s, restarted
  after 2 s): tasks kept being re-offered from step 0 and 5 of 18 were still running when
  the run ended, which the checker then reported as lost. Fixed by the final settle phase
  (unfinished tasks get up to 300 more simulated seconds after everything is healed; only
  what is still unfinished then is lost) — and the scaled fault schedule no longer shrinks
  a repeat interval below 5 s.
"""

from __future__ import annotations

from simulations.cli import run_scenario
from simulations.results import minimal_history
from simulations.scenario import parse_scenario

STORM = {
    "name": "leader-kill-storm",
    "nodes": 16,
    "duration": 20.0,
    "drain": 8.0,
    "seed": 7,
    "workload": {"rate": 1.0, "steps": {"dist": "int", "min": 4, "max": 12}},
    "faults": [
        {"kind": "kill", "target": "busiest-leader", "at": 0.67, "every": 0.5, "restart_after": 2.0}
    ],
}


def test_leader_kill_storm_seed_7_loses_nothing() -> None:
    sim, report = run_scenario(parse_scenario(STORM))
    tasks = report["tasks"]  # type: ignore[index]
    history = "\n".join(minimal_history(sim))
    assert (
        tasks["lost"] == 0 and tasks["duplicate_commits"] == 0 and tasks["stale_epoch_commits"] == 0
    ), history
    assert tasks["submitted"] == 18 and tasks["executions"] > 2 * tasks["submitted"]
    assert report["settle_extra_s"] > 0  # the storm really left work unfinished at the end
    assert report["failover_s"]["n"] >= 20  # type: ignore[index]
