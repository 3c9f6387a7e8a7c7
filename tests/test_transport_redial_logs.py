"""After a peer leaves: redials back off (0.2 s doubling to 60 s, jitter) and logs stay quiet.

* a fake-clock check of the backoff itself (60 simulated seconds of a peer wanted 2.6
  times a second, the rate measured before the backoff existed);
* two real transports in one process with a shortened backoff: the lines logged while
  requests keep asking for the gone peer are counted, and none is a library dump;
* (slow) two real `kowalski-node start` processes for the full 60 s after one dies.
"""

from __future__ import annotations

import itertools
import logging
import random
import re
import time
from pathlib import Path

import pytest
import trio

from kowalski_node.adapters.libp2p import protocol_ids as P
from kowalski_node.adapters.libp2p.backoff import RedialBackoff
from kowalski_node.adapters.libp2p.errors import DialError, TransportError
from kowalski_node.adapters.libp2p.liblog import LibraryLogHandler
from kowalski_node.adapters.libp2p.rpc import Request
from kowalski_node.adapters.libp2p.transport import Libp2pTransport, TransportConfig
from kowalski_node.identity import ClusterKey, NodeIdentity

WANT_EVERY_S = 1 / 2.6  # how often a gone peer was dialled before (measured: ~2.6/s)


def simulate(seconds: float, rng_seed: int) -> list[float]:
    """Fake clock: the peer is wanted every WANT_EVERY_S; each allowed dial fails."""
    backoff = RedialBackoff(rng=random.Random(rng_seed))
    logged: list[float] = []
    now = 0.0
    while now <= seconds:
        if backoff.wait_s("peer", now) == 0 and backoff.failed("peer", now) is not None:
            logged.append(now)
        now += WANT_EVERY_S
    return logged


@pytest.mark.parametrize("seed", range(5))
def test_one_line_per_backoff_step_in_60_simulated_seconds(seed: int) -> None:
    logged = simulate(60.0, seed)
    # 0.2 s doubling with ±20 % jitter and a 0.385 s want period: 8-10 steps in 60 s
    # (without the backoff: 157 dials, each with library error lines)
    assert 7 <= len(logged) <= 10, logged
    gaps = [b - a for a, b in itertools.pairwise(logged)]
    assert all(later >= earlier * 0.9 for earlier, later in itertools.pairwise(gaps))


def test_backoff_caps_at_60_s_with_jitter_and_resets_on_success() -> None:
    backoff = RedialBackoff(rng=random.Random(1))
    delays = []
    now = 0.0
    for _ in range(14):
        step = backoff.failed("p", now)
        assert step is not None
        delays.append(step.retry_in_s)
        assert backoff.failed("p", now + step.retry_in_s / 2) is None  # inside the window
        now += step.retry_in_s
    assert 0.16 <= delays[0] <= 0.24
    assert all(48.0 <= d <= 60.0 for d in delays[-4:]), delays
    assert len({round(d, 3) for d in delays[-4:]}) > 1  # jittered, not in lockstep
    assert backoff.succeeded("p") == 14 and backoff.wait_s("p", now) == 0


async def test_gone_peer_is_logged_once_per_step_without_library_dumps(
    caplog: pytest.LogCaptureFixture,
) -> None:
    key = ClusterKey.generate()
    config = TransportConfig(
        dial_timeout_s=1.0, request_timeout_s=1.0, redial_min_s=0.1, redial_max_s=0.8
    )
    a = Libp2pTransport(NodeIdentity.generate(), key, config)
    b = Libp2pTransport(NodeIdentity.generate(), key, config)

    async def echo(req: Request) -> object:
        return req.payload

    b.register_handler(P.TASK, echo, types={"echo"})
    caplog.set_level(logging.INFO)
    async with a.running():
        async with b.running():
            peer = await a.connect(b.listen_addrs[0])
            assert await a.request(peer, P.TASK, "echo", 1) == 1
        # b has left; a keeps wanting it at 10 Hz for 4 s (a busy membership/task layer)
        with trio.fail_after(3):
            while a.is_connected(peer):
                await trio.sleep(0.02)
        caplog.clear()
        dialled = refused_fast = 0
        deadline = trio.current_time() + 4.0
        while trio.current_time() < deadline:
            try:
                await a.request(peer, P.TASK, "echo", 2, timeout=1.0)
            except DialError as exc:
                if exc.reason == DialError.REASON_BACKOFF:
                    refused_fast += 1
                else:
                    dialled += 1
            except TransportError:
                dialled += 1
            await trio.sleep(0.1)
    lines = [r for r in caplog.records if "event=peer_unreachable" in r.getMessage()]
    # steps 0.1, 0.2, 0.4, 0.8, 0.8, ... s: about 7 in 4 s, never one per request
    assert 4 <= len(lines) <= 10, [r.getMessage() for r in lines]
    assert refused_fast > dialled  # most wants were answered from the backoff, no dial
    assert all(r.name.startswith("kowalski_node") for r in caplog.records), [
        (r.name, r.getMessage()) for r in caplog.records
    ]
    assert all("\n" not in r.getMessage() for r in caplog.records)
    for r in lines:
        assert re.search(r"attempt=\d+ retry_in_s=[\d.]+ reason=\w+ detail='", r.getMessage())


def test_library_records_are_dropped_below_debug_and_unsupported_protocols_reported_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = LibraryLogHandler()
    caplog.set_level(logging.INFO)
    logging.getLogger().setLevel(logging.INFO)
    dump = logging.LogRecord(
        "libp2p.host.basic_host", logging.ERROR, __file__, 1,
        "Failed to open stream to peer 12D3KooWabc:\n  Error: protocols not supported\n"
        "  Protocols: ['/meshsub/1.1.0', '/meshsub/1.0.0']\n  Timeout: 5s", None, None,
    )  # fmt: skip
    tcp = logging.LogRecord(
        "libp2p.transport.tcp.tcp", logging.ERROR, __file__, 1,
        "Failed to open TCP stream: %s", ("all attempts to connect to 127.0.0.1:1 failed",), None,
    )  # fmt: skip
    for _ in range(5):
        handler.emit(dump)
        handler.emit(tcp)
    reports = [r.getMessage() for r in caplog.records]
    assert len(reports) == 1 and "event=peer_protocol_unsupported peer=12D3KooWabc" in reports[0]
    assert handler.dropped == 10


@pytest.mark.slow
def test_real_nodes_log_lines_in_60_s_after_a_peer_dies(tmp_path: Path) -> None:
    """~75 s: two real processes, one SIGKILLed, the survivor's stderr counted for 60 s."""
    from kowalski_node.testing.node_cluster import NodeCluster

    with NodeCluster(tmp_path) as cluster:
        a, b = cluster.start_mesh(2)
        cluster.wait_converged([a, b])
        mark = len(b.log_path.read_text().splitlines())
        a.kill()
        time.sleep(60.0)
        lines = b.log_path.read_text().splitlines()[mark:]
    assert all(line.startswith("ts=") for line in lines), lines
    unreachable = [line for line in lines if "event=peer_unreachable" in line]
    assert 6 <= len(unreachable) <= 11, lines  # measured: 9 (was ~156 unstructured)
    assert len(lines) <= 16, lines
