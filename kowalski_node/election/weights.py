"""Capability weight for leadership: how strongly rendezvous hashing should favour a peer.

Leading a task is light (coordination, replication, RLM bookkeeping), so every live peer
may lead; the weight only biases the choice towards mains-powered, roomy, idle devices so
phones rarely end up coordinating. Zero means "cannot lead" (e.g. the peer opted out).
"""

from __future__ import annotations

import math

from kowalski_node.capabilities.profile import DeviceProfile

_CLASS_FACTOR = {"desktop": 1.0, "laptop": 0.7, "constrained": 0.2}


def leader_weight(profile: DeviceProfile) -> float:
    """A positive weight (typically 0.1 .. 6); 0 if the advert opts out of leading."""
    if profile.extra.get("lead") == "no":
        return 0.0
    w = 1.0 + math.log2(1 + profile.cores)
    w *= 0.5 + 0.5 * (1.0 - profile.cpu_load)
    w *= 0.5 + 0.5 * (1.0 - profile.mem_used_fraction)
    w *= _CLASS_FACTOR.get(profile.device_class, 0.5)
    if profile.on_battery:
        w *= 0.3
    return max(w, 1e-3)
