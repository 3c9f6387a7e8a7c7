"""Collect a :class:`DeviceProfile` from the local machine with psutil (the one non-pure module here).

Battery and temperature are included only where psutil exposes them (Linux/macOS laptops,
some desktops); everything else degrades to ``None`` rather than failing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import psutil

from kowalski_node.capabilities.profile import (
    DeviceClass,
    DeviceProfile,
    ServedModel,
    estimate_cost_per_op,
)

CONSTRAINED_RAM_BYTES = 4 * 1024**3


def _battery() -> tuple[float | None, bool | None]:
    fn = getattr(psutil, "sensors_battery", None)
    if fn is None:
        return None, None
    try:
        b = fn()
    except (OSError, RuntimeError, NotImplementedError):
        return None, None
    if b is None:
        return None, None
    plugged = b.power_plugged if isinstance(b.power_plugged, bool) else None
    return float(max(0.0, min(100.0, b.percent))), plugged


def _temperature() -> float | None:
    fn = getattr(psutil, "sensors_temperatures", None)
    if fn is None:
        return None
    try:
        temps = fn()
    except (OSError, RuntimeError, NotImplementedError):
        return None
    readings = [
        t.current
        for entries in temps.values()
        for t in entries
        if t.current is not None and -50 < t.current < 150
    ]
    return float(max(readings)) if readings else None


def _cpu_load(cores: int) -> float:
    """Fraction of the CPU in use: 1-minute load average per core where available (non-blocking)."""
    try:
        load1 = os.getloadavg()[0]
        return float(max(0.0, min(1.0, load1 / max(1, cores))))
    except (OSError, AttributeError):
        return float(max(0.0, min(1.0, psutil.cpu_percent(interval=None) / 100.0)))


def guess_device_class(ram_total: int, has_battery: bool) -> DeviceClass:
    """Small-memory devices are constrained; battery-powered ones are laptops; the rest desktops."""
    if ram_total < CONSTRAINED_RAM_BYTES:
        return "constrained"
    if has_battery:
        return "laptop"
    return "desktop"


def collect_profile(
    peer: str,
    version: int,
    *,
    backends: Sequence[str] = (),
    models: Sequence[ServedModel] = (),
    repl_languages: Sequence[str] = (),
    tokens_per_s: float = 0.0,
    device_class: DeviceClass | None = None,
) -> DeviceProfile:
    """Read cores, memory, load, battery and temperature now and build an advert."""
    cores = psutil.cpu_count(logical=True) or 1
    vm = psutil.virtual_memory()
    percent, plugged = _battery()
    cls = device_class or guess_device_class(int(vm.total), percent is not None)
    return DeviceProfile(
        peer=peer,
        version=version,
        device_class=cls,
        cores=int(cores),
        ram_total=int(vm.total),
        ram_free=int(vm.available),
        cpu_load=_cpu_load(int(cores)),
        battery_percent=percent,
        power_plugged=plugged,
        temperature_c=_temperature(),
        backends=tuple(backends),
        models=tuple(models),
        repl_languages=tuple(repl_languages),
        tokens_per_s=float(tokens_per_s),
        cost_per_op=estimate_cost_per_op(cls, plugged, percent),
    )
