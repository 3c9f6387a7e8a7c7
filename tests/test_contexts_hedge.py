"""`ContextStore.push` is hedged: a peer that accepts a copy and then stalls (SIGSTOPped,
overloaded) does not hold the submission's acknowledgement for the blob layer's idle
timeouts. CI once saw a retried 4 MiB submission wait over 100 s behind such a copy.

A fake transport and trio's MockClock make the timing exact: stalled sends never
finish, and the others take a fixed time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from kowalski_node.errors import ContextNotReplicated
from kowalski_node.runtime.contexts import ContextConfig, ContextStore, rank_peers
from kowalski_node.runtime.payload import ContextRef

SHA = "ab" * 32
SIZE = 4 << 20


@dataclass
class Receipt:
    size: int
    sent_bytes: int


class StallingTransport:
    """send_blob: `stalled` peers answer nothing until the send's own timeout (as the
    blob layer's idle timeouts do), `refusing` ones fail at once, others take 0.3 s."""

    def __init__(self, stalled: set[str], refusing: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.stalled, self.refusing = stalled, set(refusing)
        self.started: list[str] = []
        self.cancelled: list[str] = []

    def blob_path(self, sha256: str) -> Path | None:
        return None

    async def send_blob(self, peer: str, path: Path, *, timeout: float, **_: Any) -> Receipt:
        self.started.append(peer)
        if peer in self.refusing:
            raise ConnectionError(f"{peer} refused")
        try:
            if peer in self.stalled:
                await trio.sleep(timeout)
                raise TimeoutError(f"{peer} accepted nothing for {timeout} s")
            await trio.sleep(0.3)
        except trio.Cancelled:
            self.cancelled.append(peer)
            raise
        return Receipt(SIZE, SIZE)


def _store(tmp_path: Path, transport: StallingTransport, peers: list[str]) -> ContextStore:
    (tmp_path / SHA).write_bytes(b"x")  # push only needs the local file to exist
    config = ContextConfig(
        replicas=2, push_timeout_s=30.0, hedge_after_s=2.0, hedge_rate_bytes_s=20e6
    )
    return ContextStore("me", transport, tmp_path, lambda: ["me", *peers], config)  # type: ignore[arg-type]


PEERS = [f"peer-{i}" for i in range(5)]
RANKED = rank_peers(SHA, PEERS)


async def test_a_stalled_peer_costs_one_hedge_delay_not_its_timeouts(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    transport = StallingTransport(stalled={RANKED[0]})
    store = _store(tmp_path, transport, PEERS)
    ref = ContextRef(SHA, SIZE)
    started = trio.current_time()
    done = await store.push(ref)
    took = trio.current_time() - started
    assert sorted(done) == sorted([RANKED[1], RANKED[2]])
    assert took == pytest.approx(store.hedge_delay(ref) + 0.3)
    assert sorted(transport.started[:2]) == sorted(RANKED[:2])
    assert transport.started[2:] == [RANKED[2]]  # one hedge, no more
    assert transport.cancelled == [RANKED[0]]  # the straggler is stopped once enough copies exist


async def test_quick_copies_start_no_hedge(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    transport = StallingTransport(stalled=set())
    store = _store(tmp_path, transport, PEERS)
    done = await store.push(ContextRef(SHA, SIZE))
    assert sorted(done) == sorted(RANKED[:2])
    assert sorted(transport.started) == sorted(RANKED[:2]) and transport.cancelled == []


async def test_refusals_move_on_at_once_and_hedges_are_bounded(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # two refuse at once (each replaced right away), every other peer stalls: one hedge
    # starts the last candidate, and when the last stalled copy times out the push fails
    # with a clear error (nothing acknowledged)
    transport = StallingTransport(stalled=set(RANKED[2:]), refusing=set(RANKED[:2]))
    store = _store(tmp_path, transport, PEERS)
    ref = ContextRef(SHA, SIZE)
    started = trio.current_time()
    with pytest.raises(ContextNotReplicated, match="could not be copied to any of 5"):
        await store.push(ref)
    assert trio.current_time() - started == pytest.approx(store.hedge_delay(ref) + 30.0)
    assert sorted(transport.started) == sorted(RANKED)  # every candidate tried, none twice


async def test_one_live_holder_is_enough_when_the_rest_refuse(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    transport = StallingTransport(stalled=set(), refusing=set(RANKED[1:]))
    store = _store(tmp_path, transport, PEERS)
    done = await store.push(ContextRef(SHA, SIZE))
    assert done == [RANKED[0]]
