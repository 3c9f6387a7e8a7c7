"""Messages of the SHARD protocol (`/kowalski/shard/1.0.0`): schema, encode, strict decode.

Each message is the `payload` of an envelope (protocols/README.md). Activations travel as
one msgpack `bin` of little-endian float32 rows (the engine's dtype), packed straight from
the array's buffer; the receiver wraps the bytes with `numpy.frombuffer` (no copy).
Decoding untrusted payloads raises only `BadActivation`, with a one-line reason.

Types (request -> reply):

    act.forward   ForwardMsg            -> ForwardReply (token id, or a logits row)
    act.end       {session, epoch}      -> {evicted}
    shard.offer   {model}               -> ShardOffer
    shard.load    LoadRequest           -> {loaded, fetched, load_s}
    shard.manifest {model, start, end, embed, head} -> {config, tensors: [TensorEntry]}
    shard.push    {model, names}        -> {blobs: [TensorEntry + blob]}
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from kowalski_node.inference.errors import BadActivation

WIRE_VERSION = 1
F32_LE = np.dtype("<f4")
MAX_SESSION_LEN = 128
MAX_ROUTE = 64
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
WANT_TOKEN = "token"  # noqa: S105 - a message field name, not a secret
WANT_LOGITS = "logits"

T_FORWARD = "act.forward"
T_END = "act.end"
T_OFFER = "shard.offer"
T_LOAD = "shard.load"
T_MANIFEST = "shard.manifest"
T_PUSH = "shard.push"
ALL_TYPES = (T_FORWARD, T_END, T_OFFER, T_LOAD, T_MANIFEST, T_PUSH)


@dataclass(frozen=True)
class Stage:
    """One hop of the route: `peer` runs decoder layers [start, end)."""

    peer: str
    start: int
    end: int


@dataclass(frozen=True)
class ForwardMsg:
    """Rows for layers of one stage; `tokens` at hop 0, `hidden` after it."""

    session: str
    epoch: int
    step: int
    pos: int
    model: str
    route: tuple[Stage, ...]
    hop: int
    splits: tuple[int, ...]
    want: str = WANT_TOKEN
    tokens: tuple[int, ...] = ()
    hidden: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return sum(self.splits)

    @property
    def stage(self) -> Stage:
        return self.route[self.hop]

    @property
    def last(self) -> bool:
        return self.hop == len(self.route) - 1

    def next_hop(self, hidden: np.ndarray) -> ForwardMsg:
        """The message for the following stage, carrying `hidden` instead of tokens."""
        return ForwardMsg(
            self.session,
            self.epoch,
            self.step,
            self.pos,
            self.model,
            self.route,
            self.hop + 1,
            self.splits,
            self.want,
            (),
            hidden,
        )


@dataclass(frozen=True)
class ForwardReply:
    session: str
    epoch: int
    step: int
    token: int | None = None
    logits: np.ndarray | None = None
    stage_ms: tuple[float, ...] = ()  # each stage's compute time, in route order


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise BadActivation(what)


def _int(body: dict[str, Any], key: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    value = body.get(key)
    _need(
        isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi,
        f"{key} must be an integer in [{lo}, {hi}], got {value!r}",
    )
    assert isinstance(value, int)
    return value


def _str(body: dict[str, Any], key: str, max_len: int = MAX_SESSION_LEN) -> str:
    value = body.get(key)
    _need(
        isinstance(value, str) and 0 < len(value) <= max_len,
        f"{key} must be a non-empty string of at most {max_len} characters",
    )
    assert isinstance(value, str)
    return value


def _map(payload: Any) -> dict[str, Any]:
    _need(isinstance(payload, dict), f"payload must be a map, got {type(payload).__name__}")
    assert isinstance(payload, dict)
    version = payload.get("v", WIRE_VERSION)
    _need(version == WIRE_VERSION, f"shard message version {version!r} is not {WIRE_VERSION}")
    return payload


def model_id(body: dict[str, Any]) -> str:
    value = body.get("model")
    _need(isinstance(value, str) and bool(SHA256_RE.match(value)), "model must be a sha256 hex")
    assert isinstance(value, str)
    return value


def rows_to_bytes(hidden: np.ndarray) -> memoryview:
    """The activation's own buffer as bytes (a copy only if it is not contiguous f32 LE)."""
    arr = np.ascontiguousarray(hidden, dtype=F32_LE)
    return arr.data.cast("B")


def encode_forward(msg: ForwardMsg) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": WIRE_VERSION,
        "session": msg.session,
        "epoch": msg.epoch,
        "step": msg.step,
        "pos": msg.pos,
        "model": msg.model,
        "route": [[s.peer, s.start, s.end] for s in msg.route],
        "hop": msg.hop,
        "splits": list(msg.splits),
        "want": msg.want,
    }
    if msg.hidden is not None:
        body["rows"], body["dim"] = int(msg.hidden.shape[0]), int(msg.hidden.shape[1])
        body["dtype"] = "f32"
        body["hidden"] = rows_to_bytes(msg.hidden)
    else:
        body["tokens"] = list(msg.tokens)
    return body


def decode_forward(payload: Any) -> ForwardMsg:
    body = _map(payload)
    route_raw = body.get("route")
    _need(
        isinstance(route_raw, list) and 0 < len(route_raw) <= MAX_ROUTE,
        f"route must be a list of 1..{MAX_ROUTE} stages",
    )
    assert isinstance(route_raw, list)
    route: list[Stage] = []
    for item in route_raw:
        _need(
            isinstance(item, list)
            and len(item) == 3
            and isinstance(item[0], str)
            and all(isinstance(x, int) and not isinstance(x, bool) for x in item[1:])
            and 0 <= item[1] < item[2],
            "each route stage must be [peer, start, end] with 0 <= start < end",
        )
        route.append(Stage(item[0], item[1], item[2]))
    for a, b in itertools.pairwise(route):
        _need(a.end == b.start, "route stages must be contiguous layer ranges")
    _need(route[0].start == 0, "the route must start at layer 0")
    hop = _int(body, "hop", 0, len(route) - 1)
    splits_raw = body.get("splits")
    _need(
        isinstance(splits_raw, list)
        and 0 < len(splits_raw) <= 1 << 16
        and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in splits_raw),
        "splits must be a non-empty list of positive row counts",
    )
    assert isinstance(splits_raw, list)
    splits = tuple(splits_raw)
    rows = sum(splits)
    want = body.get("want", WANT_TOKEN)
    _need(want in (WANT_TOKEN, WANT_LOGITS), f"want must be token or logits, got {want!r}")
    tokens: tuple[int, ...] = ()
    hidden: np.ndarray | None = None
    if hop == 0:
        raw = body.get("tokens")
        _need(
            isinstance(raw, list)
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in raw),
            "hop 0 needs tokens: a list of non-negative token ids",
        )
        assert isinstance(raw, list)
        _need(len(raw) == rows, f"{len(raw)} tokens but splits sum to {rows}")
        tokens = tuple(raw)
    else:
        data = body.get("hidden")
        dim = _int(body, "dim", 1, 1 << 20)
        _need(body.get("dtype") == "f32", "dtype must be f32 (little-endian float32)")
        _need(_int(body, "rows", 1, 1 << 24) == rows, "rows must equal the sum of splits")
        _need(isinstance(data, bytes), "hidden must be bytes")
        assert isinstance(data, bytes)
        _need(
            len(data) == rows * dim * 4,
            f"hidden holds {len(data)} bytes, expected {rows * dim * 4}",
        )
        hidden = np.frombuffer(data, dtype=F32_LE).reshape(rows, dim)
    return ForwardMsg(
        session=_str(body, "session"),
        epoch=_int(body, "epoch"),
        step=_int(body, "step"),
        pos=_int(body, "pos"),
        model=model_id(body),
        route=tuple(route),
        hop=hop,
        splits=splits,
        want=str(want),
        tokens=tokens,
        hidden=hidden,
    )


def encode_reply(reply: ForwardReply) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": WIRE_VERSION,
        "session": reply.session,
        "epoch": reply.epoch,
        "step": reply.step,
    }
    if reply.logits is not None:
        body["logits"] = rows_to_bytes(reply.logits.reshape(1, -1))
    else:
        body["token"] = reply.token
    return body


def decode_reply(payload: Any) -> ForwardReply:
    body = _map(payload)
    token = body.get("token")
    logits: np.ndarray | None = None
    if "logits" in body:
        data = body["logits"]
        _need(isinstance(data, bytes) and len(data) % 4 == 0 and len(data) > 0, "bad logits")
        logits = np.frombuffer(data, dtype=F32_LE)
        token = None
    else:
        _need(isinstance(token, int) and not isinstance(token, bool) and token >= 0, "bad token")
    raw_ms = body.get("stage_ms")
    stage_ms = (
        tuple(float(x) for x in raw_ms if isinstance(x, int | float) and not isinstance(x, bool))
        if isinstance(raw_ms, list)
        else ()
    )
    return ForwardReply(
        _str(body, "session"), _int(body, "epoch"), _int(body, "step"), token, logits, stage_ms
    )
