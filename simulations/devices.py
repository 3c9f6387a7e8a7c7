"""Heterogeneous simulated devices: desktop, laptop and phone-class speeds, memory and links."""

from __future__ import annotations

import random
from dataclasses import dataclass

from kowalski_node.capabilities import DeviceProfile, ServedModel

GIB = 1024**3
SUBCALL_MODEL = "smollm2-135m"


@dataclass(frozen=True, slots=True)
class Device:
    """What a simulated node is: fixed for its life (restarts keep the hardware)."""

    cls: str
    cores: int
    ram_total: int
    ram_free: int
    speed: float
    """Work rate relative to a desktop (a job of d seconds takes d / speed)."""
    on_battery: bool
    access_latency: float
    """One-way latency of its network access link, seconds."""


def make_device(cls: str, rng: random.Random, access_latency: float) -> Device:
    if cls == "desktop":
        total = rng.randint(64, 128) * GIB
        free = rng.randint(48, max(48, total // GIB - 8)) * GIB
        return Device(
            cls, rng.choice((8, 12, 16)), total, free, rng.uniform(0.9, 1.2), False, access_latency
        )
    if cls == "laptop":
        total = rng.choice((16, 24, 32)) * GIB
        free = rng.randint(10, total // GIB - 4) * GIB
        return Device(
            cls,
            rng.choice((4, 8)),
            total,
            free,
            rng.uniform(0.5, 0.8),
            rng.random() < 0.3,
            access_latency,
        )
    total = rng.choice((4, 6, 8)) * GIB
    free = rng.randint(2, min(6, total // GIB - 1)) * GIB
    return Device(
        cls,
        rng.choice((4, 6, 8)),
        total,
        free,
        rng.uniform(0.15, 0.35),
        rng.random() < 0.8,
        access_latency,
    )


def profile_of(peer: str, dev: Device, version: int, cpu_load: float) -> DeviceProfile:
    """The capability advert a simulated node publishes (what the real probe would measure)."""
    device_class = "constrained" if dev.cls == "phone" else dev.cls
    used = min(dev.ram_free, int(dev.ram_total * 0.05 * cpu_load))
    return DeviceProfile(
        peer=peer,
        version=version,
        device_class=device_class,  # type: ignore[arg-type]
        cores=dev.cores,
        ram_total=dev.ram_total,
        ram_free=dev.ram_free - used,
        cpu_load=min(1.0, max(0.0, cpu_load)),
        power_plugged=not dev.on_battery,
        battery_percent=70.0 if dev.on_battery else None,
        backends=("builtin",),
        models=(ServedModel(SUBCALL_MODEL, 30),),
        repl_languages=("python",),
        tokens_per_s=30.0 * dev.speed,
        cost_per_op={"desktop": 0.0, "laptop": 0.3, "phone": 1.0}[dev.cls]
        + (1.0 if dev.on_battery else 0.0),
    )
