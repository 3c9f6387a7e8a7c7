"""Fakes for driving the pure cores deterministically: a seeded event-queue network, clocks, a harness.

Independent of trio on purpose: the simulator and unit tests use them directly. The
other fakes live here too, imported by module: `fake_transport` (an in-process libp2p
stand-in for trio tests), `node_cluster` (real `kowalski-node start` processes for tests,
the demo and benchmarks) and the membership harnesses.
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
