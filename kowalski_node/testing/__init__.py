"""Fakes for driving the pure cores deterministically: a seeded event-queue network, clocks, a harness.

Independent of trio on purpose: the simulator and unit tests use them directly, and a trio
adapter can be layered on top later.
"""

from kowalski_node.testing.clock import FakeClock, NodeClock
from kowalski_node.testing.harness import CoreHarness, DrivenCore, StuckCoreError
from kowalski_node.testing.network import Delivery, FakeNetwork, LinkProfile, NetworkStats

__all__ = [
    "CoreHarness",
    "Delivery",
    "DrivenCore",
    "FakeClock",
    "FakeNetwork",
    "LinkProfile",
    "NetworkStats",
    "NodeClock",
    "StuckCoreError",
]
