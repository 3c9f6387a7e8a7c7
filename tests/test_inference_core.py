"""The pure cores of pipelined inference: stage sessions (stale/duplicate activations are
never applied twice, idle sessions are evicted), the leader's feeds and replays, and the
choice of sharding."""

from __future__ import annotations

import numpy as np
import pytest

from kowalski_node.inference import wire
from kowalski_node.inference.core import (
    GenerationState,
    StageSessions,
    VerdictKind,
    chunk_rows,
    decide_sharding,
)
from kowalski_node.inference.errors import BadActivation, ShardingUnsupported


def test_first_message_applies_with_a_fresh_cache() -> None:
    core = StageSessions()
    v = core.admit("s", epoch=0, step=1, pos=0, rows=5, now=0.0)
    assert v.kind is VerdictKind.APPLY and v.reset
    core.complete("s", 0, 1, 5, {"token": 7}, now=0.1)
    v2 = core.admit("s", 0, 2, 5, 1, now=0.2)
    assert v2.kind is VerdictKind.APPLY and not v2.reset


def test_duplicate_is_answered_from_the_last_reply_never_applied_twice() -> None:
    core = StageSessions()
    core.admit("s", 0, 1, 0, 5, 0.0)
    core.complete("s", 0, 1, 5, {"token": 7}, 0.1)
    dup = core.admit("s", 0, 1, 0, 5, 0.2)
    assert dup.kind is VerdictKind.DUPLICATE and dup.reply == {"token": 7}
    assert core.sessions["s"].next_pos == 5  # unchanged: nothing applied
    assert core.duplicates == 1


def test_duplicate_while_in_flight_is_dropped() -> None:
    core = StageSessions()
    core.admit("s", 0, 1, 0, 5, 0.0)
    assert core.admit("s", 0, 1, 0, 5, 0.0).kind is VerdictKind.STALE


def test_older_step_and_older_epoch_are_stale() -> None:
    core = StageSessions()
    core.admit("s", 1, 1, 0, 5, 0.0)
    core.complete("s", 1, 1, 5, "r1", 0.0)
    core.admit("s", 1, 2, 5, 1, 0.0)
    core.complete("s", 1, 2, 6, "r2", 0.0)
    assert core.admit("s", 1, 1, 0, 5, 0.0).kind is VerdictKind.STALE
    assert core.admit("s", 0, 9, 6, 1, 0.0).kind is VerdictKind.STALE
    assert core.sessions["s"].next_pos == 6


def test_new_epoch_resets_and_must_start_at_zero() -> None:
    core = StageSessions()
    core.admit("s", 0, 1, 0, 5, 0.0)
    core.complete("s", 0, 1, 5, "r", 0.0)
    bad = core.admit("s", 1, 2, 5, 1, 0.0)
    assert bad.kind is VerdictKind.REJECT
    ok = core.admit("s", 1, 2, 0, 6, 0.0)
    assert ok.kind is VerdictKind.APPLY and ok.reset


def test_gap_in_positions_is_rejected() -> None:
    core = StageSessions()
    core.admit("s", 0, 1, 0, 5, 0.0)
    core.complete("s", 0, 1, 5, "r", 0.0)
    assert core.admit("s", 0, 2, 7, 1, 0.0).kind is VerdictKind.REJECT


def test_failed_step_breaks_the_epoch_until_a_new_one() -> None:
    core = StageSessions()
    core.admit("s", 0, 1, 0, 5, 0.0)
    core.fail("s", 0, 1)
    assert core.admit("s", 0, 2, 5, 1, 0.0).kind is VerdictKind.REJECT
    assert core.admit("s", 1, 3, 0, 6, 0.0).kind is VerdictKind.APPLY


def test_idle_sessions_expire_and_ended_sessions_are_evicted() -> None:
    core = StageSessions(idle_s=10, max_sessions=2)
    core.admit("a", 0, 1, 0, 1, 0.0)
    core.complete("a", 0, 1, 1, "r", 0.0)
    core.admit("b", 0, 1, 0, 1, 5.0)
    core.complete("b", 0, 1, 1, "r", 5.0)
    assert core.expire(12.0) == ["a"]
    assert core.end("b") and "b" not in core.sessions
    core.admit("c", 0, 1, 0, 1, 20.0)
    core.complete("c", 0, 1, 1, "r", 20.0)
    core.admit("d", 0, 1, 0, 1, 21.0)
    evicting = core.admit("e", 0, 1, 0, 1, 22.0)
    assert evicting.evicted == ("c",)


def test_generation_feeds_prompt_then_single_tokens() -> None:
    st = GenerationState("s", prompt=tuple(range(600)), max_tokens=3, end_ids=frozenset({99}))
    f1 = st.next_feed()
    assert f1.pos == 0 and f1.splits == (256, 256, 88) and len(f1.tokens) == 600
    assert st.on_token(f1.epoch, f1.step, 1000) == "token"
    f2 = st.next_feed()
    assert f2.pos == 600 and f2.tokens == (1000,) and f2.splits == (1,)
    assert st.on_token(f2.epoch, f2.step - 1, 5) == "stale"
    assert st.on_token(f2.epoch, f2.step, 1001) == "token"
    st.restart()  # a stage died: replay everything at epoch 1
    f3 = st.next_feed()
    assert f3.epoch == 1 and f3.pos == 0
    assert f3.tokens == (*range(600), 1000, 1001)
    assert f3.splits == (256, 256, 88, 1, 1)  # exact replay: generated tokens one row each
    assert st.on_token(0, f3.step, 7) == "stale"  # reply from the old epoch
    assert st.on_token(1, f3.step, 99) == "end"
    assert st.done and st.finish == "stop" and st.generated == [1000, 1001]


def test_long_prefix_crosses_in_several_messages_aligned_to_chunks() -> None:
    st = GenerationState(
        "s", prompt=tuple(range(700)), max_tokens=5, end_ids=frozenset(), chunk=256, max_rows=512
    )
    f1 = st.next_feed()
    assert (f1.pos, len(f1.tokens), f1.splits) == (0, 512, (256, 256))
    assert st.on_token(f1.epoch, f1.step, 5) == "partial"  # not the end of the prompt yet
    assert st.generated == []
    f2 = st.next_feed()
    assert (f2.pos, len(f2.tokens), f2.splits) == (512, 188, (188,))
    assert st.on_token(f2.epoch, f2.step, 5) == "token" and st.generated == [5]
    with pytest.raises(ValueError, match="multiple"):
        GenerationState("s", prompt=(1,), max_tokens=1, end_ids=frozenset(), max_rows=300)


def test_generation_stops_at_max_tokens() -> None:
    st = GenerationState("s", prompt=(1, 2), max_tokens=1, end_ids=frozenset())
    f = st.next_feed()
    st.on_token(f.epoch, f.step, 3)
    assert st.done and st.finish == "length"


def test_chunk_rows() -> None:
    assert chunk_rows(5, 2) == [2, 2, 1]
    assert chunk_rows(4, 4) == [4]


def test_decide_sharding() -> None:
    assert decide_sharding("auto", 100, 200) == "single"
    assert decide_sharding("auto", 300, 200) == "pipeline"
    assert decide_sharding("pipeline", 1, 10**9) == "pipeline"
    with pytest.raises(ShardingUnsupported, match="pipeline"):
        decide_sharding("tensor", 1, 1)
    with pytest.raises(ValueError, match="unknown sharding"):
        decide_sharding("ring", 1, 1)


def _msg(hop: int = 1) -> wire.ForwardMsg:
    route = (wire.Stage("A", 0, 10), wire.Stage("B", 10, 30))
    hidden = np.arange(12, dtype=np.float32).reshape(3, 4) if hop else None
    return wire.ForwardMsg(
        "sess", 2, 5, 40, "ab" * 32, route, hop, (2, 1), "token", () if hop else (1, 2, 3), hidden
    )


def test_forward_round_trip_keeps_rows_without_copying() -> None:
    import msgpack

    body = wire.encode_forward(_msg())
    packed = msgpack.packb(body, use_bin_type=True)
    back = wire.decode_forward(msgpack.unpackb(packed, raw=False))
    assert back.hidden is not None and back.hidden.dtype == np.float32
    np.testing.assert_array_equal(back.hidden, _msg().hidden)
    assert back.route == _msg().route and back.splits == (2, 1) and back.epoch == 2
    assert not back.hidden.flags.owndata  # a view on the received bytes


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"route": [["A", 0, 10], ["B", 12, 30]]}, "contiguous"),
        ({"hop": 5}, "hop"),
        ({"splits": [2, 2]}, "rows"),
        ({"dtype": "f16"}, "dtype"),
        ({"hidden": b"\0" * 7}, "bytes"),
        ({"model": "xyz"}, "sha256"),
        ({"epoch": -1}, "epoch"),
        ({"v": 2}, "version"),
    ],
)
def test_malformed_forward_is_refused(change: dict[str, object], error: str) -> None:
    import msgpack

    body = msgpack.unpackb(msgpack.packb(wire.encode_forward(_msg()), use_bin_type=True))
    body.update(change)
    with pytest.raises(BadActivation, match=error):
        wire.decode_forward(body)
