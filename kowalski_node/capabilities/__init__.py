"""Device capability adverts and their deterministic, versioned merge.

Public API: :class:`DeviceProfile`, :class:`ServedModel`, :func:`estimate_cost_per_op`,
:class:`CapabilityTable` (merge/forget/snapshot/digest) and :func:`newer`;
:class:`CapabilityGossip` (push + version-vector pull dissemination, same driving contract
as membership) with its messages and effects. The psutil probe
is in :mod:`kowalski_node.capabilities.probe` (not imported here: it is not pure).
"""

from kowalski_node.capabilities.gossip import (
    AdvertChanged,
    AdvertDigest,
    AdvertPush,
    CapabilityGossip,
    GossipConfig,
    GossipEffect,
    GossipMessage,
    GossipSend,
    decode_gossip,
)
from kowalski_node.capabilities.profile import (
    DEVICE_CLASSES,
    DeviceClass,
    DeviceProfile,
    ServedModel,
    estimate_cost_per_op,
)
from kowalski_node.capabilities.table import CapabilityTable, newer

__all__ = [
    "DEVICE_CLASSES",
    "AdvertChanged",
    "AdvertDigest",
    "AdvertPush",
    "CapabilityGossip",
    "CapabilityTable",
    "DeviceClass",
    "DeviceProfile",
    "GossipConfig",
    "GossipEffect",
    "GossipMessage",
    "GossipSend",
    "ServedModel",
    "decode_gossip",
    "estimate_cost_per_op",
    "newer",
]
