"""Device capability adverts and their deterministic, versioned merge.

Public API: :class:`DeviceProfile`, :class:`ModelInfo`, :func:`estimate_cost_per_op`,
:class:`CapabilityTable` (merge/forget/snapshot/digest) and :func:`newer`. The psutil probe
is in :mod:`kowalski_node.capabilities.probe` (not imported here: it is not pure).
"""

from kowalski_node.capabilities.profile import (
    DEVICE_CLASSES,
    DeviceClass,
    DeviceProfile,
    ModelInfo,
    estimate_cost_per_op,
)
from kowalski_node.capabilities.table import CapabilityTable, newer

__all__ = [
    "DEVICE_CLASSES",
    "CapabilityTable",
    "DeviceClass",
    "DeviceProfile",
    "ModelInfo",
    "estimate_cost_per_op",
    "newer",
]
