"""Device profiles for `kowalski-node start --profile`: timing and resource limits together.

| profile | membership / leases | sandbox workers | sandbox memory | concurrent runs | advert refresh |
|---|---|---|---|---|---|
| desktop | LAN (sub-second detection) | `sandbox.pool_size` | `sandbox.memory_mb` | 16 x cores | 5 s |
| laptop | LAN | at most 2 | at most 1024 MB | 8 x cores | 5 s |
| constrained | WAN (patient, fewer messages) | 1 | at most 256 MB | 2 | 15 s |

"Concurrent runs" caps the RLM loops one node leads at once (each holds a trajectory
file, a REPL session and model calls); further tasks it accepted wait for a slot while
their leases stay renewed. Runs spend most of their time waiting (model calls,
checkpoint round trips), so the cap is well above the core count; it bounds open files
and event-loop load, not CPU.

`node.profile = "wan"` in the config forces WAN timing for any device profile (Wi-Fi
across sites). The device class advertised to peers follows the profile, so leadership
(rendezvous weight) and placement prefer desktops.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from kowalski_node.capabilities.profile import DeviceClass
from kowalski_node.config import Settings
from kowalski_node.coordination.config import CoordConfig
from kowalski_node.errors import ConfigError
from kowalski_node.membership import SwimConfig

ProfileName = Literal["desktop", "laptop", "constrained"]
PROFILE_NAMES: tuple[ProfileName, ...] = ("desktop", "laptop", "constrained")


@dataclass(frozen=True)
class NodeProfile:
    name: ProfileName
    device_class: DeviceClass
    swim: SwimConfig
    coord: CoordConfig
    sandbox_pool: int
    sandbox_memory_mb: int
    advert_refresh_s: float
    max_runs: int
    timing: Literal["lan", "wan"]


def node_profile(name: str, settings: Settings) -> NodeProfile:
    """The profile `name` applied over `settings` (ConfigError for an unknown name)."""
    key = name.strip().lower()
    if key not in PROFILE_NAMES:
        raise ConfigError(f"unknown profile {name!r}: expected one of {', '.join(PROFILE_NAMES)}")
    wan = key == "constrained" or settings.node.profile == "wan"
    swim = SwimConfig.wan() if wan else SwimConfig.lan()
    coord = CoordConfig.wan() if wan else CoordConfig.lan()
    pool = settings.sandbox.pool_size
    memory = settings.sandbox.memory_mb
    refresh = 5.0
    cores = os.cpu_count() or 1
    max_runs = 16 * cores
    if key == "laptop":
        pool = min(pool, 2)
        memory = min(memory, 1024)
        max_runs = 8 * cores
    elif key == "constrained":
        pool = 1
        memory = min(memory, 256)
        refresh = 15.0
        max_runs = 2
    return NodeProfile(
        name=key,
        device_class=key,
        swim=swim,
        coord=coord,
        sandbox_pool=pool,
        sandbox_memory_mb=memory,
        advert_refresh_s=refresh,
        max_runs=max_runs,
        timing="wan" if wan else "lan",
    )
