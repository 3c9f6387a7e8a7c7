"""Pure state machines of pipelined generation (no I/O, no clock: `now` is passed in).

* `StageSessions` lives on every stage. It decides whether an activation is applied to a
  session's KV cache, answered from the last reply (a duplicate), or dropped (stale), so a
  message is never applied twice, and it evicts sessions that ended or went idle.
* `GenerationState` lives on the leader. It knows the token prefix (prompt + generated),
  the current epoch and step, and what to feed next: one token while decoding, the whole
  prefix at a new epoch (a failover replays it to rebuild every stage's KV cache).
* `decide_sharding` and `layer_sizes_for_plan` choose between one local stage and a
  memory-weighted pipeline (`placement.layers.plan_layers`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from kowalski_node.inference.errors import ShardingUnsupported

# ---------------------------------------------------------------------------------- stages


class VerdictKind(StrEnum):
    APPLY = "apply"  # run the rows; `reset` means start from an empty KV cache
    DUPLICATE = "duplicate"  # this step was applied already: answer `reply` again
    STALE = "stale"  # older epoch or step: drop, never apply
    REJECT = "reject"  # cannot be applied (gap in positions, broken session): error


@dataclass(frozen=True)
class Verdict:
    kind: VerdictKind
    reason: str = ""
    reset: bool = False
    reply: Any = None
    evicted: tuple[str, ...] = ()


@dataclass
class SessionState:
    epoch: int
    next_pos: int = 0
    last_step: int = -1
    reply: Any = None
    in_flight: bool = False
    broken: bool = False
    last_used: float = 0.0


class StageSessions:
    """Per-session bookkeeping of one stage: epochs, steps, positions, idle eviction."""

    def __init__(self, *, idle_s: float = 300.0, max_sessions: int = 16) -> None:
        if idle_s <= 0 or max_sessions < 1:
            raise ValueError("idle_s must be > 0 and max_sessions >= 1")
        self.idle_s = idle_s
        self.max_sessions = max_sessions
        self.sessions: dict[str, SessionState] = {}
        self.dropped_stale = 0
        self.duplicates = 0

    def admit(
        self, session: str, epoch: int, step: int, pos: int, rows: int, now: float
    ) -> Verdict:
        """Decide what to do with an activation; APPLY claims the step (see `complete`)."""
        state = self.sessions.get(session)
        if state is None or epoch > state.epoch:
            if pos != 0:
                return Verdict(
                    VerdictKind.REJECT,
                    f"session {session} epoch {epoch} must start at position 0 (got {pos}); "
                    "a new epoch replays the whole prefix",
                )
            evicted: tuple[str, ...] = ()
            if state is None and len(self.sessions) >= self.max_sessions:
                oldest = min(self.sessions, key=lambda s: self.sessions[s].last_used)
                del self.sessions[oldest]
                evicted = (oldest,)
            self.sessions[session] = SessionState(
                epoch, next_pos=0, last_step=step, in_flight=True, last_used=now
            )
            return Verdict(VerdictKind.APPLY, reset=True, evicted=evicted)
        state.last_used = now
        if epoch < state.epoch:
            self.dropped_stale += 1
            return Verdict(VerdictKind.STALE, f"epoch {epoch} < current {state.epoch}")
        if step < state.last_step:
            self.dropped_stale += 1
            return Verdict(VerdictKind.STALE, f"step {step} < last applied {state.last_step}")
        if step == state.last_step:
            self.duplicates += 1
            if state.in_flight or state.reply is None:
                return Verdict(VerdictKind.STALE, f"step {step} is already being applied")
            return Verdict(VerdictKind.DUPLICATE, reply=state.reply)
        if state.broken:
            return Verdict(
                VerdictKind.REJECT, f"session {session} failed at epoch {epoch}; start a new epoch"
            )
        if state.in_flight:
            return Verdict(VerdictKind.REJECT, f"step {state.last_step} is still being applied")
        if pos != state.next_pos:
            return Verdict(
                VerdictKind.REJECT,
                f"session {session} holds {state.next_pos} positions, message starts at {pos}",
            )
        state.last_step = step
        state.in_flight = True
        state.reply = None
        return Verdict(VerdictKind.APPLY)

    def complete(
        self, session: str, epoch: int, step: int, end_pos: int, reply: Any, now: float
    ) -> None:
        """The claimed step was applied: remember where the cache ends and the reply."""
        state = self.sessions.get(session)
        if state is None or state.epoch != epoch or state.last_step != step:
            return  # evicted or superseded meanwhile
        state.in_flight = False
        state.next_pos = end_pos
        state.reply = reply
        state.last_used = now

    def fail(self, session: str, epoch: int, step: int) -> None:
        """The claimed step failed halfway: the cache is unusable until a new epoch."""
        state = self.sessions.get(session)
        if state is not None and state.epoch == epoch and state.last_step == step:
            state.in_flight = False
            state.broken = True

    def end(self, session: str, epoch: int | None = None) -> bool:
        """Evict a finished session (only up to `epoch`, when given)."""
        state = self.sessions.get(session)
        if state is None or (epoch is not None and state.epoch > epoch):
            return False
        del self.sessions[session]
        return True

    def expire(self, now: float) -> list[str]:
        """Sessions idle for longer than `idle_s` (not while a step is running): evicted."""
        gone = [
            s
            for s, st in self.sessions.items()
            if not st.in_flight and now - st.last_used > self.idle_s
        ]
        for s in gone:
            del self.sessions[s]
        return gone


# ---------------------------------------------------------------------------------- leader


@dataclass(frozen=True)
class Feed:
    """What the leader sends to the first stage next."""

    epoch: int
    step: int
    pos: int
    tokens: tuple[int, ...]
    splits: tuple[int, ...]


def chunk_rows(n: int, chunk: int) -> list[int]:
    out = [chunk] * (n // chunk)
    if n % chunk:
        out.append(n % chunk)
    return out


@dataclass
class GenerationState:
    """The leader's view of one generation; every stage is rebuilt from `prefix` on replay.

    Replays chunk the prompt exactly as the first prefill did and feed each generated token
    as its own one-row chunk (`exact_replay`), so the rebuilt caches are bitwise those of a
    run without failure and greedy decoding continues with the same tokens.
    """

    session: str
    prompt: tuple[int, ...]
    max_tokens: int
    end_ids: frozenset[int]
    chunk: int = 256
    exact_replay: bool = True
    max_rows: int = 1 << 30  # rows per message (the transport's frame limit)
    epoch: int = 0
    step: int = 0
    generated: list[int] = field(default_factory=list)
    fed: int = 0  # positions the stages hold at this epoch
    finish: str | None = None
    outstanding: Feed | None = None
    replays: int = 0

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("a generation needs at least one prompt token")
        if self.chunk < 1 or self.max_tokens < 0:
            raise ValueError("chunk must be >= 1 and max_tokens >= 0")
        if self.max_rows < self.chunk or self.max_rows % self.chunk:
            raise ValueError("max_rows must be a positive multiple of chunk")
        if self.max_tokens == 0:
            self.finish = "length"

    @property
    def done(self) -> bool:
        return self.finish is not None

    @property
    def prefix(self) -> tuple[int, ...]:
        return self.prompt + tuple(self.generated)

    def _splits(self, start: int, end: int) -> list[int]:
        """Compute chunks for positions [start, end): prompt rows in `chunk`-sized pieces
        aligned to position 0 (as the engine's prefill), generated rows one by one."""
        out: list[int] = []
        pos = start
        n_prompt = len(self.prompt)
        while pos < end:
            if pos < n_prompt:
                stop = min(end, n_prompt, (pos // self.chunk + 1) * self.chunk)
            elif self.exact_replay:
                stop = pos + 1
            else:
                stop = min(end, pos + self.chunk)
            out.append(stop - pos)
            pos = stop
        return out

    def next_feed(self) -> Feed:
        """The next message: the unfed part of the prefix, at most `max_rows` rows (a long
        prefix crosses in several messages; only the last one's reply is a new token)."""
        if self.done:
            raise RuntimeError("the generation is finished")
        self.step += 1
        prefix = self.prefix
        end = min(len(prefix), self.fed + self.max_rows)
        feed = Feed(
            self.epoch,
            self.step,
            self.fed,
            prefix[self.fed : end],
            tuple(self._splits(self.fed, end)),
        )
        self.outstanding = feed
        return feed

    def on_token(self, epoch: int, step: int, token: int) -> str:
        """Take the reply to the outstanding feed: 'stale' (dropped), 'partial' (more of the
        prefix to feed first), 'token' (a new token) or 'end' (an end-of-turn token)."""
        feed = self.outstanding
        if feed is None or epoch != feed.epoch or step != feed.step or self.done:
            return "stale"
        self.outstanding = None
        self.fed = feed.pos + len(feed.tokens)
        if self.fed < len(self.prompt) + len(self.generated):
            return "partial"
        if token in self.end_ids:
            self.finish = "stop"
            return "end"
        self.generated.append(token)
        if len(self.generated) >= self.max_tokens:
            self.finish = "length"
        return "token"

    def restart(self) -> None:
        """A stage was lost: the next feed replays the whole prefix at a new epoch."""
        self.epoch += 1
        self.fed = 0
        self.outstanding = None
        self.replays += 1

    def stop(self, reason: str) -> None:
        if self.finish is None:
            self.finish = reason


# ---------------------------------------------------------------------------------- placement


@dataclass(frozen=True)
class StageOffer:
    """What a peer answered to `shard.offer`: memory it gives to layers, and the model."""

    peer: str
    free_bytes: int
    cap_bytes: int | None
    has_model: bool


def decide_sharding(strategy: str, model_bytes: int, local_usable: int) -> str:
    """'single' (one local stage) or 'pipeline'; 'tensor' is refused with a clear error."""
    strategy = (strategy or "auto").lower()
    if strategy == "tensor":
        raise ShardingUnsupported(strategy)
    if strategy == "pipeline":
        return "pipeline"
    if strategy in ("auto", "none", "single"):
        if strategy == "auto" and model_bytes > local_usable:
            return "pipeline"
        return "single"
    raise ValueError(f"unknown sharding strategy {strategy!r}; use auto, pipeline or tensor")


def layer_sizes_for_plan(
    layer_bytes: Sequence[int], embed_bytes: int, head_bytes: int
) -> list[int]:
    """Per-layer weight bytes, with the embedding charged to layer 0 and the head to the last."""
    sizes = list(layer_bytes)
    if not sizes:
        raise ValueError("a model needs at least one layer")
    sizes[0] += embed_bytes
    sizes[-1] += head_bytes
    return sizes
