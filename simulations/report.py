"""Write a run's JSON report, its history, and a PNG (timeline of faults, leader changes and
task completions; latency CDFs). matplotlib runs on the Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from simulations.engine import Simulation
from simulations.results import history_bytes

_FAULT_COLOURS = {
    "kill": "tab:red",
    "pause": "tab:orange",
    "resume": "tab:green",
    "partition": "tab:purple",
    "network": "tab:brown",
    "churn": "tab:pink",
    "clock-jump": "tab:cyan",
}


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def write_outputs(
    sim: Simulation, report: dict[str, Any], out_dir: Path, *, plot: bool = True
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{sim.scn.name}-n{sim.scn.nodes}-s{sim.scn.seed}"
    paths = {"report": out_dir / f"{stem}.json", "history": out_dir / f"{stem}.history.log"}
    paths["history"].write_bytes(history_bytes(sim))
    paths["report"].write_text(
        json.dumps(_clean(report), indent=2, sort_keys=False) + "\n", encoding="utf-8"
    )
    if plot:
        paths["plot"] = out_dir / f"{stem}.png"
        plot_run(sim, report, paths["plot"])
    return paths


def _cdf(ax: Any, values: list[float], label: str) -> None:
    if not values:
        ax.plot([], [], label=f"{label} (none)")
        return
    xs = sorted(values)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", label=f"{label} (n={len(xs)})")


def plot_run(sim: Simulation, report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = sim.rec
    fig, axes = plt.subplots(2, 2, figsize=(14, 8.5))
    ax = axes[0][0]
    seen: set[str] = set()
    for start, end, kind, _ in rec.timeline_faults:
        colour = _FAULT_COLOURS.get(kind, "grey")
        label = kind if kind not in seen else None
        seen.add(kind)
        if end - start > 0.6:
            ax.axvspan(start, end, color=colour, alpha=0.15, label=label)
        else:
            ax.axvline(start, color=colour, alpha=0.5, lw=0.8, label=label)
    commits = rec.timeline_commits
    if commits:
        ax.plot(
            commits, range(1, len(commits) + 1), color="tab:blue", lw=1.5, label="tasks committed"
        )
    ax.set_xlabel("simulated time (s)")
    ax.set_ylabel("tasks committed (cumulative)")
    ax2 = ax.twinx()
    if rec.timeline_live:
        ax2.plot(
            [t for t, _ in rec.timeline_live],
            [n for _, n in rec.timeline_live],
            color="grey",
            lw=0.8,
            label="live nodes",
        )
    fo = [t for t, f in rec.timeline_leaders if f]
    ax2.scatter(
        fo,
        [sim.scn.nodes * 1.02] * len(fo),
        marker="v",
        color="tab:red",
        s=14,
        label="failover (leader change)",
    )
    ax2.set_ylabel("live nodes")
    ax2.set_ylim(0, sim.scn.nodes * 1.08)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=7)
    ax.set_title(
        f"{sim.scn.name}: {sim.scn.nodes} nodes, seed {sim.scn.seed}, "
        f"{'PASS' if report['passed'] else 'FAIL'}"
    )

    ax = axes[0][1]
    _cdf(ax, rec.failovers, "failover: leader lost -> resumed")
    _cdf(ax, rec.detections_all, "detection: all observers")
    _cdf(ax, rec.detections_first, "detection: first observer")
    ax.set_xlabel("seconds")
    ax.set_ylabel("CDF")
    ax.set_title("failover and failure detection")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)

    ax = axes[1][0]
    _cdf(ax, rec.task_latency, "submit -> commit")
    ax.set_xlabel("seconds")
    ax.set_ylabel("CDF")
    ax.set_title("task latency")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)

    ax = axes[1][1]
    _cdf(ax, rec.advert_latency, "advert publish -> seen")
    ax.set_xscale("log")
    ax.set_xlabel("seconds (log)")
    ax.set_ylabel("CDF")
    d = report["dissemination"]
    ax.set_title(f"capability dissemination (ratio {d['ratio']:.4f} once healed)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
