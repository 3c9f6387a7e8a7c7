"""Device profiles: what a peer advertises about itself (pure data, versioned)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from kowalski_node.wire import (
    WireError,
    check_type_tag,
    expect_dict,
    get_float,
    get_int,
    get_list,
    get_opt_bool,
    get_opt_float,
    get_str,
    get_str_list,
)

DeviceClass = Literal["desktop", "laptop", "constrained"]
DEVICE_CLASSES: tuple[DeviceClass, ...] = ("desktop", "laptop", "constrained")
MAX_MODELS = 64
MAX_PEER = 256


@dataclass(frozen=True, slots=True)
class ServedModel:
    """A model a peer can serve: layers [layer_start, layer_end) of ``n_layers`` in total."""

    name: str
    n_layers: int
    layer_start: int = 0
    layer_end: int = -1
    """-1 means "up to n_layers" (the whole model)."""

    def __post_init__(self) -> None:
        end = self.n_layers if self.layer_end == -1 else self.layer_end
        if self.n_layers < 0 or not 0 <= self.layer_start <= end <= self.n_layers:
            raise ValueError(
                f"model {self.name!r}: layer range [{self.layer_start}, {self.layer_end}) "
                f"does not fit in {self.n_layers} layers"
            )

    @property
    def end(self) -> int:
        return self.n_layers if self.layer_end == -1 else self.layer_end

    @property
    def full(self) -> bool:
        return self.layer_start == 0 and self.end == self.n_layers

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "n": self.n_layers, "a": self.layer_start, "b": self.end}

    @classmethod
    def from_wire(cls, obj: object) -> ServedModel:
        what = "ServedModel"
        d = expect_dict(obj, what)
        try:
            return cls(
                name=get_str(d, "name", what, max_len=256, allow_empty=False),
                n_layers=get_int(d, "n", what, min_value=0, max_value=100_000),
                layer_start=get_int(d, "a", what, min_value=0, max_value=100_000),
                layer_end=get_int(d, "b", what, min_value=0, max_value=100_000),
            )
        except WireError:
            raise
        except ValueError as exc:
            raise WireError(f"{what}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """One advert. ``version`` must grow with every advert a peer sends (across restarts too)."""

    peer: str
    version: int
    device_class: DeviceClass = "desktop"
    cores: int = 1
    ram_total: int = 0
    ram_free: int = 0
    cpu_load: float = 0.0
    """0..1, fraction of the machine's CPU in use."""
    battery_percent: float | None = None
    power_plugged: bool | None = None
    temperature_c: float | None = None
    backends: tuple[str, ...] = ()
    models: tuple[ServedModel, ...] = ()
    repl_languages: tuple[str, ...] = ()
    tokens_per_s: float = 0.0
    cost_per_op: float = 0.0
    """Relative cost of running work here (energy, battery); 0 = free. See ``estimate_cost_per_op``."""
    extra: dict[str, str] = field(default_factory=dict)
    seal: bytes = field(default=b"", compare=False, repr=False)
    """The signed bytes this advert arrived as (``capabilities/seal.py``); b"" if unsigned.
    Carried opaquely so a relay forwards the origin's signature, never its own; not part of
    equality, the digest or ``to_wire``."""

    TAG = "caps"

    def __post_init__(self) -> None:
        if not self.peer:
            raise ValueError("device profile: peer must not be empty")
        if self.version < 0:
            raise ValueError(
                f"device profile {self.peer}: version must be >= 0, got {self.version}"
            )
        if self.device_class not in DEVICE_CLASSES:
            raise ValueError(
                f"device profile {self.peer}: device_class must be one of {DEVICE_CLASSES}"
            )
        if self.cores < 1 or self.ram_total < 0 or self.ram_free < 0:
            raise ValueError(
                f"device profile {self.peer}: need cores >= 1, ram_total >= 0 and ram_free >= 0"
            )
        if not 0.0 <= self.cpu_load <= 1.0:
            raise ValueError(
                f"device profile {self.peer}: cpu_load must be within 0..1, got {self.cpu_load}"
            )
        for name in ("battery_percent", "temperature_c", "tokens_per_s", "cost_per_op"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"device profile {self.peer}: {name} must be finite, got {v}")
        if self.tokens_per_s < 0 or self.cost_per_op < 0:
            raise ValueError(
                f"device profile {self.peer}: tokens_per_s and cost_per_op must be >= 0"
            )

    @property
    def mem_used_fraction(self) -> float:
        if self.ram_total <= 0:
            return 1.0
        return min(1.0, max(0.0, 1.0 - self.ram_free / self.ram_total))

    @property
    def on_battery(self) -> bool:
        return self.power_plugged is False

    def has_model(self, name: str) -> bool:
        return any(m.name == name for m in self.models)

    def to_wire(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "t": self.TAG,
            "peer": self.peer,
            "ver": self.version,
            "cls": self.device_class,
            "cores": self.cores,
            "ram": self.ram_total,
            "free": self.ram_free,
            "load": self.cpu_load,
            "be": list(self.backends),
            "models": [m.to_wire() for m in self.models],
            "langs": list(self.repl_languages),
            "tps": self.tokens_per_s,
            "cost": self.cost_per_op,
        }
        if self.battery_percent is not None:
            d["bat"] = self.battery_percent
        if self.power_plugged is not None:
            d["plug"] = self.power_plugged
        if self.temperature_c is not None:
            d["temp"] = self.temperature_c
        if self.extra:
            d["x"] = dict(self.extra)
        return d

    @classmethod
    def from_wire(cls, obj: object) -> DeviceProfile:
        what = "DeviceProfile"
        d = expect_dict(obj, what)
        check_type_tag(d, cls.TAG, what)
        cls_s = get_str(d, "cls", what)
        if cls_s not in DEVICE_CLASSES:
            raise WireError(
                f"{what}.cls: unknown device class {cls_s!r} (expected one of {DEVICE_CLASSES})"
            )
        extra_raw = d.get("x", {})
        if not isinstance(extra_raw, dict) or len(extra_raw) > 64:
            raise WireError(f"{what}.x: expected a dict of at most 64 string pairs")
        extra: dict[str, str] = {}
        for k, v in extra_raw.items():
            if not isinstance(k, str) or not isinstance(v, str) or len(k) > 64 or len(v) > 1024:
                raise WireError(f"{what}.x: keys and values must be short strings")
            extra[k] = v
        ram_total = get_int(d, "ram", what, min_value=0, max_value=2**60)
        ram_free = get_int(d, "free", what, min_value=0, max_value=2**60)
        try:
            return cls(
                peer=get_str(d, "peer", what, max_len=MAX_PEER, allow_empty=False),
                version=get_int(d, "ver", what, min_value=0, max_value=2**62),
                device_class=cls_s,
                cores=get_int(d, "cores", what, min_value=1, max_value=1_000_000),
                ram_total=ram_total,
                ram_free=ram_free,
                cpu_load=get_float(d, "load", what, min_value=0.0, max_value=1.0),
                battery_percent=get_opt_float(d, "bat", what, min_value=0.0, max_value=100.0),
                power_plugged=get_opt_bool(d, "plug", what),
                temperature_c=get_opt_float(d, "temp", what, min_value=-100.0, max_value=200.0),
                backends=tuple(get_str_list(d, "be", what, max_len=32, default=[])),
                models=tuple(
                    ServedModel.from_wire(m)
                    for m in get_list(d, "models", what, max_len=MAX_MODELS, default=[])
                ),
                repl_languages=tuple(get_str_list(d, "langs", what, max_len=32, default=[])),
                tokens_per_s=get_float(d, "tps", what, min_value=0.0, max_value=1e9, default=0.0),
                cost_per_op=get_float(d, "cost", what, min_value=0.0, max_value=1e9, default=0.0),
                extra=extra,
            )
        except WireError:
            raise
        except ValueError as exc:
            raise WireError(f"{what}: {exc}") from exc

    def digest(self) -> bytes:
        """Content hash of the canonical encoding: the deterministic tie-break between adverts."""
        canon = json.dumps(self.to_wire(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.blake2b(canon.encode("ascii"), digest_size=16).digest()


def estimate_cost_per_op(
    device_class: DeviceClass, power_plugged: bool | None, battery_percent: float | None
) -> float:
    """A relative running cost: mains-powered desktops are free, phones on a low battery are dear."""
    base = {"desktop": 0.0, "laptop": 0.3, "constrained": 1.0}[device_class]
    if power_plugged is False:
        base += 1.0
        if battery_percent is not None and battery_percent < 20.0:
            base += 2.0
    return base
