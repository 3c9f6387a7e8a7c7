"""Shared helpers for tests/test_remote_*.py: a few real libp2p hosts in one trio run.

`mesh(n)` starts n `Libp2pTransport`s on 127.0.0.1 with one cluster key, connects them
all, and lets a test stop one of them abruptly (`Libp2pMesh.kill(i)`: its host closes, its
connections drop, as when the process dies). `StaticMembership` is a hand-driven live-peer
view: tests mark a peer dead the way membership would.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from kowalski_node.adapters.libp2p.transport import Libp2pTransport, TransportConfig
from kowalski_node.capabilities.profile import DeviceProfile
from kowalski_node.identity import ClusterKey, NodeIdentity
from kowalski_node.remote.placement import SchedulerChooser

GIB = 1024**3


def profile(
    peer: str,
    *,
    load: float = 0.1,
    free_gib: float = 6.0,
    languages: Iterable[str] = ("python",),
    backends: Iterable[str] = ("scripted",),
    tps: float = 0.0,
) -> DeviceProfile:
    return DeviceProfile(
        peer=peer, version=1, cores=2, ram_total=8 * GIB, ram_free=int(free_gib * GIB),
        cpu_load=load, backends=tuple(backends), repl_languages=tuple(languages),
        tokens_per_s=tps,
    )  # fmt: skip


@dataclass
class StaticMembership:
    """What a node's membership would say: who is alive, and their adverts."""

    alive: set[str] = field(default_factory=set)
    adverts: dict[str, DeviceProfile] = field(default_factory=dict)

    def live(self) -> list[str]:
        return sorted(self.alive)

    def profiles(self) -> dict[str, DeviceProfile]:
        return dict(self.adverts)

    def chooser(self, me: str) -> SchedulerChooser:
        return SchedulerChooser(me, self.profiles, self.live)


@dataclass
class Libp2pMesh:
    """Real libp2p hosts on 127.0.0.1, all connected, as `mesh(n)` yields them."""

    transports: list[Libp2pTransport]
    _stops: list[trio.Event]
    _stopped: list[trio.Event]

    @property
    def ids(self) -> list[str]:
        return [t.peer_id for t in self.transports]

    async def kill(self, index: int) -> None:
        """Stop host `index` now (listener and connections close)."""
        self._stops[index].set()
        with trio.fail_after(10):
            await self._stopped[index].wait()


@contextlib.asynccontextmanager
async def mesh(
    n: int, tmp: Path | None = None, idle_timeout_s: float = 60.0
) -> AsyncIterator[Libp2pMesh]:
    key = ClusterKey.generate()
    transports = []
    for i in range(n):
        config = TransportConfig(
            dial_timeout_s=3.0,
            request_timeout_s=5.0,
            idle_timeout_s=idle_timeout_s,
            blob_dir=(tmp / f"blobs{i}") if tmp is not None else None,
        )
        transports.append(Libp2pTransport(NodeIdentity.generate(), key, config))
    stops = [trio.Event() for _ in range(n)]
    stopped = [trio.Event() for _ in range(n)]
    started = [trio.Event() for _ in range(n)]

    async def run(i: int) -> None:
        try:
            async with transports[i].running():
                started[i].set()
                await stops[i].wait()
        finally:
            stopped[i].set()

    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(run, i)
        with trio.fail_after(10):
            for ev in started:
                await ev.wait()
            for i in range(n):
                for j in range(i + 1, n):
                    await transports[i].connect(transports[j].listen_addrs[0])
        try:
            yield Libp2pMesh(transports, stops, stopped)
        finally:
            for ev in stops:
                ev.set()
