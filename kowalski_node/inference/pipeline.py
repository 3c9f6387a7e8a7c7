"""The leader of a pipelined generation: plan stages, feed tokens, fail over by replay.

    generator = PipelineGenerator(host, stages, settings)
    result = await generator.generate(GenerateRequest(messages=[("user", "hi")]))
    async for event in generator.stream(request): ...      # text deltas, then the result

This is the entry point a router (the OpenAI-compatible API) calls when no single peer
should hold the whole model. The node that receives the request leads: it asks live peers
for memory (`shard.offer`), plans contiguous layer ranges in proportion to it
(`placement.layers.plan_layers`), has every stage load its range (`shard.load`, fetching
from a peer that holds the model when it does not), then sends the prompt to stage 0. The
hidden states go from stage to stage; the last stage returns the next token (or, when
sampling, its logits row: the leader samples, so a replay never re-draws a token).

When a stage is lost mid-generation the leader re-plans over the survivors
(`replan_layers`), loads the moved ranges, and replays the token prefix at epoch + 1 to
rebuild the KV caches, then continues. Under greedy decoding the text equals that of a run
without failure (the replay is bitwise the original computation: see `GenerationState`).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio

from kowalski_node.adapters.libp2p.errors import RemoteError, TransportError
from kowalski_node.adapters.libp2p.framing import DEFAULT_MAX_FRAME
from kowalski_node.inference import wire
from kowalski_node.inference.core import GenerationState, decide_sharding
from kowalski_node.inference.errors import InferenceError, NoStagePeers, StageLost
from kowalski_node.inference.modelinfo import LeaderModel
from kowalski_node.inference.stage import CODE_STAGE_LOST, StageService, lost_peer
from kowalski_node.llm.builtin.sampling import Sampler, SamplingParams
from kowalski_node.placement.layers import (
    LayerAssignment,
    LayerPlan,
    LayerPlanError,
    PeerMemory,
    plan_layers,
    replan_layers,
)

log = logging.getLogger("kowalski_node.inference.pipeline")


@dataclass(frozen=True)
class PipelineSettings:
    sharding: str = "auto"
    reserve_fraction: float = 0.1
    max_stages: int | None = None
    max_failovers: int = 3
    exact_replay: bool = True
    offer_timeout_s: float = 10.0
    stage_timeout_s: float = 60.0
    load_timeout_s: float = 600.0
    prefill_chunk: int = 256
    max_message_rows: int | None = None  # None: as many as fit one transport frame


@dataclass(frozen=True)
class GenerateRequest:
    """One generation. Give exactly one of `messages`, `prompt_tokens` or `prompt` (raw)."""

    model: str | None = None
    messages: Sequence[tuple[str, str]] | None = None
    prompt_tokens: Sequence[int] | None = None
    prompt: str | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    sharding: str | None = None
    stages: int | None = None  # at most this many stages (None: settings.max_stages)
    exclude: tuple[str, ...] = ()  # peers not to use as stages
    exact_replay: bool | None = None  # None: settings.exact_replay


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    tokens_in: int
    tokens_out: int
    finish_reason: str
    model: str
    stages: list[dict[str, Any]]
    failovers: int = 0
    epochs: int = 1
    timings: dict[str, float] = field(default_factory=dict)
    replays_s: list[float] = field(default_factory=list)
    failover_detail: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "finish_reason": self.finish_reason,
            "model": self.model,
            "stages": self.stages,
            "failovers": self.failovers,
            "epochs": self.epochs,
            "timings": self.timings,
            "replays_s": self.replays_s,
            "failover_detail": self.failover_detail,
        }


@dataclass(frozen=True)
class GenerationEvent:
    """A streamed piece of text; the last event has `result` set."""

    text: str = ""
    result: GenerateResult | None = None


def max_rows_per_message(d_model: int, chunk: int, frame_bytes: int = DEFAULT_MAX_FRAME) -> int:
    """Hidden rows that fit one frame (with room for the rest of the message), rounded down
    to whole prefill chunks so message boundaries never change the arithmetic."""
    budget = (frame_bytes - 64 * 1024) // (d_model * 4)
    return max(chunk, budget // chunk * chunk)


class PipelineGenerator:
    """Leads pipelined generations from this node (see module docstring)."""

    def __init__(
        self,
        peer_id: str,
        live_peers: Callable[[], list[str]],
        stages: StageService,
        settings: PipelineSettings,
        *,
        models_dir: Any = None,
    ) -> None:
        self.peer_id = peer_id
        self.live_peers = live_peers
        self.stages = stages
        self.settings = settings
        self.models_dir = models_dir
        self._models: dict[str | None, LeaderModel] = {}
        self.stats = {"generations": 0, "failovers": 0, "tokens": 0}

    async def model(self, name: str | None) -> LeaderModel:
        cached = self._models.get(name)
        if cached is None:
            cached = await trio.to_thread.run_sync(LeaderModel.open, name, self.models_dir)
            self._models[name] = cached
        return cached

    # ----------------------------------------------------------------------- planning

    async def _offers(self, model: LeaderModel, exclude: set[str]) -> dict[str, dict[str, Any]]:
        peers = [p for p in dict.fromkeys([self.peer_id, *self.live_peers()]) if p not in exclude]
        offers: dict[str, dict[str, Any]] = {}

        async def ask(peer: str) -> None:
            try:
                with trio.fail_after(self.settings.offer_timeout_s):
                    reply = await self.stages.call(
                        peer,
                        wire.T_OFFER,
                        {
                            "v": wire.WIRE_VERSION,
                            "model": model.sha256,
                            "name": model.name,
                            "path": str(model.path),
                        },
                        timeout=self.settings.offer_timeout_s,
                    )
                if isinstance(reply, dict) and isinstance(reply.get("free_bytes"), int):
                    offers[peer] = reply
            except (TransportError, trio.TooSlowError) as exc:
                log.info("event=stage_offer_failed peer=%s reason=%r", peer, str(exc)[:200])

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(ask, peer)
        return offers

    @staticmethod
    def _memories(offers: dict[str, dict[str, Any]]) -> list[PeerMemory]:
        return [
            PeerMemory(peer, int(o["free_bytes"]), o.get("cap_bytes")) for peer, o in offers.items()
        ]

    async def plan(
        self,
        model: LeaderModel,
        strategy: str,
        max_stages: int | None,
        exclude: set[str],
        old: LayerPlan | None = None,
    ) -> tuple[LayerPlan, dict[str, dict[str, Any]]]:
        """Stages for `model` over live peers (a repair of `old` after a failure)."""
        sizes = model.plan_sizes()
        offers = await self._offers(model, exclude)
        if not offers:
            raise NoStagePeers("no live peer answered the shard offer; is the mesh up?")
        reserve = self.settings.reserve_fraction
        mine = offers.get(self.peer_id)
        local_usable = (
            PeerMemory(self.peer_id, int(mine["free_bytes"]), mine.get("cap_bytes")).usable(reserve)
            if mine is not None
            else 0
        )
        total = sum(sizes)
        mode = decide_sharding(strategy, total, local_usable)
        if old is None and mode == "single" and mine is not None and mine.get("has_model"):
            cap = max(local_usable, total)
            plan = LayerPlan(
                len(sizes),
                total,
                (
                    LayerAssignment(
                        self.peer_id, 0, len(sizes), total, cap, int(mine["free_bytes"])
                    ),
                ),
            )
            return plan, offers
        memories = self._memories(offers)
        if not any(o.get("has_model") for o in offers.values()):
            raise NoStagePeers(f"no live peer holds model {model.name} to fetch shards from")
        try:
            if old is not None:
                plan = replan_layers(old, sizes, memories, reserve_fraction=reserve)
            else:
                plan = plan_layers(sizes, memories, reserve_fraction=reserve, max_peers=max_stages)
        except LayerPlanError as exc:
            raise NoStagePeers(
                f"cannot place {model.name} over {len(offers)} peers: {exc}"
            ) from None
        return plan, offers

    async def load(
        self, model: LeaderModel, plan: LayerPlan, offers: dict[str, dict[str, Any]]
    ) -> float:
        """Every stage loads its range (fetching shards from a holder); returns seconds."""
        holders = [p for p, o in offers.items() if o.get("has_model")]
        source = self.peer_id if self.peer_id in holders else (holders[0] if holders else None)
        failed: list[tuple[str, str]] = []
        started = time.perf_counter()

        async def load_one(a: LayerAssignment) -> None:
            try:
                await self.stages.call(
                    a.peer,
                    wire.T_LOAD,
                    {
                        "v": wire.WIRE_VERSION,
                        "model": model.sha256,
                        "name": model.name,
                        "start": a.start,
                        "end": a.end,
                        "source": source,
                    },
                    timeout=self.settings.load_timeout_s,
                )
            except (TransportError, RemoteError) as exc:
                failed.append((a.peer, str(exc)[:300]))

        async with trio.open_nursery() as nursery:
            for a in plan.assignments:
                nursery.start_soon(load_one, a)
        if failed:
            peer, reason = failed[0]
            raise StageLost(peer, f"could not load its layers: {reason}")
        return time.perf_counter() - started

    # ----------------------------------------------------------------------- generation

    async def generate(self, request: GenerateRequest) -> GenerateResult:
        result: GenerateResult | None = None
        async for event in self.stream(request):
            if event.result is not None:
                result = event.result
        assert result is not None
        return result

    async def stream(self, request: GenerateRequest) -> AsyncIterator[GenerationEvent]:
        """Text deltas as tokens arrive, then one event carrying the `GenerateResult`."""
        t0 = time.perf_counter()
        strategy = request.sharding or self.settings.sharding
        decide_sharding(strategy, 0, 0)  # refuses tensor / unknown strategies before any work
        model = await self.model(request.model)
        ids = self._prompt_ids(model, request)
        if len(ids) + request.max_tokens > model.config.context_length:
            raise InferenceError(
                f"prompt of {len(ids)} tokens + max_tokens {request.max_tokens} exceeds the "
                f"context of {model.config.context_length}"
            )
        max_stages = request.stages or self.settings.max_stages
        exclude = set(request.exclude)
        plan, offers = await self.plan(model, strategy, max_stages, exclude)
        plan_s = time.perf_counter() - t0
        load_s = await self._load_with_failover(model, plan, offers, exclude, strategy)
        plan = self._plan
        greedy = request.temperature == 0.0
        sampler = (
            None
            if greedy
            else Sampler(
                SamplingParams(request.temperature, request.top_p),
                np.random.default_rng(request.seed),
            )
        )
        state = GenerationState(
            session=uuid.uuid4().hex,
            prompt=tuple(ids),
            max_tokens=request.max_tokens,
            end_ids=frozenset(model.tokenizer.end_ids),
            chunk=self.settings.prefill_chunk,
            exact_replay=(
                self.settings.exact_replay if request.exact_replay is None else request.exact_replay
            ),
            max_rows=self.settings.max_message_rows
            or max_rows_per_message(model.config.d_model, self.settings.prefill_chunk),
        )
        self.stats["generations"] += 1
        log.info(
            "event=pipeline_start session=%s model=%s stages=%s prompt_tokens=%d",
            state.session,
            model.name,
            ",".join(f"{a.peer[-6:]}:{a.start}-{a.end}" for a in plan.assignments),
            len(ids),
        )
        text, emitted = "", 0
        max_stop = max((len(s) for s in request.stop), default=0)
        first_token_at: float | None = None
        gen_started = time.perf_counter()
        replay_started: float | None = None
        replays: list[float] = []
        failover_detail: list[dict[str, Any]] = []
        failovers = 0
        decode_wall = decode_compute = 0.0
        decode_steps = 0
        used_routes: list[LayerPlan] = [plan]
        try:
            while not state.done:
                feed = state.next_feed()
                msg = wire.ForwardMsg(
                    state.session,
                    feed.epoch,
                    feed.step,
                    feed.pos,
                    model.sha256,
                    tuple(wire.Stage(a.peer, a.start, a.end) for a in plan.assignments),
                    0,
                    feed.splits,
                    wire.WANT_TOKEN if greedy else wire.WANT_LOGITS,
                    feed.tokens,
                )
                step_started = time.perf_counter()
                try:
                    payload = await self.stages.call(
                        plan.assignments[0].peer,
                        wire.T_FORWARD,
                        wire.encode_forward(msg),
                        timeout=self.settings.stage_timeout_s,
                    )
                except (RemoteError, TransportError) as exc:
                    lost = self._lost_stage(exc, plan)
                    failovers += 1
                    self.stats["failovers"] += 1
                    if failovers > self.settings.max_failovers:
                        raise StageLost(
                            lost, f"gave up after {failovers - 1} failovers: {exc}"
                        ) from None
                    log.warning(
                        "event=stage_lost session=%s peer=%s step=%d epoch=%d reason=%r action=replan",
                        state.session,
                        lost,
                        feed.step,
                        feed.epoch,
                        str(exc)[:200],
                    )
                    exclude.add(lost)
                    replay_started = time.perf_counter()
                    plan, offers = await self.plan(model, strategy, max_stages, exclude, old=plan)
                    replan_s = time.perf_counter() - replay_started
                    reload_s = await self._load_with_failover(
                        model, plan, offers, exclude, strategy
                    )
                    plan = self._plan
                    failover_detail.append({"lost": lost, "replan_s": replan_s, "load_s": reload_s})
                    used_routes.append(plan)
                    self._end_session(state.session, feed.epoch, used_routes[-2], skip=exclude)
                    state.restart()
                    continue
                reply = wire.decode_reply(payload)
                if feed.pos > 0 and len(feed.tokens) == 1:  # a decode step: where its time went
                    step_wall = time.perf_counter() - step_started
                    decode_wall += step_wall
                    decode_compute += sum(reply.stage_ms) / 1000
                    decode_steps += 1
                if greedy:
                    assert reply.token is not None
                    token = reply.token
                else:
                    assert sampler is not None and reply.logits is not None
                    token = sampler(np.asarray(reply.logits, dtype=np.float32))
                outcome = state.on_token(reply.epoch, reply.step, token)
                if outcome in ("stale", "partial"):
                    continue  # stale cannot happen with one request in flight
                if replay_started is not None:
                    replays.append(time.perf_counter() - replay_started)
                    failover_detail[-1]["total_s"] = replays[-1]
                    log.info(
                        "event=failover_done session=%s lost=%s replan_ms=%.0f load_ms=%.0f "
                        "replayed_tokens=%d total_ms=%.0f",
                        state.session,
                        failover_detail[-1]["lost"],
                        failover_detail[-1]["replan_s"] * 1000,
                        failover_detail[-1]["load_s"] * 1000,
                        feed.pos + len(feed.tokens),
                        replays[-1] * 1000,
                    )
                    replay_started = None
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                if outcome == "end":
                    break  # an end-of-turn token: nothing to show
                text = model.tokenizer.decode(state.generated)
                if request.stop:
                    window = max(0, emitted - max_stop)
                    hits = [i for i in (text.find(s, window) for s in request.stop) if i >= 0]
                    if hits:
                        text = text[: min(hits)]
                        state.stop("stop")
                        break
                safe = len(text)
                while safe > emitted and text[safe - 1] == "\ufffd":
                    safe -= 1
                for s in request.stop:  # hold back a suffix that may begin a stop string
                    for k in range(min(len(s) - 1, safe - emitted), 0, -1):
                        if text[:safe].endswith(s[:k]):
                            safe -= k
                            break
                if safe > emitted:
                    yield GenerationEvent(text=text[emitted:safe])
                    emitted = safe
        finally:
            self._end_session(state.session, state.epoch, plan, skip=exclude)
        if emitted < len(text):
            yield GenerationEvent(text=text[emitted:])
        done_at = time.perf_counter()
        decode_tokens = max(0, len(state.generated) - 1)
        decode_s = done_at - (first_token_at or done_at)
        self.stats["tokens"] += len(state.generated)
        timings = {
            "plan_s": plan_s,
            "load_s": load_s,
            "ttft_s": (first_token_at or done_at) - gen_started,
            "decode_s": decode_s,
            "decode_tok_s": decode_tokens / decode_s if decode_s > 0 else 0.0,
            "total_s": done_at - t0,
            # per decode step: wall at the leader minus the stages' own compute = what the
            # hops cost (messages, codec, network, thread hand-offs), split per stage hop
            "step_overhead_ms": 1000 * (decode_wall - decode_compute) / max(1, decode_steps),
            "hop_overhead_ms": 1000
            * (decode_wall - decode_compute)
            / max(1, decode_steps)
            / max(1, len(plan.assignments)),
        }
        result = GenerateResult(
            text=text,
            token_ids=list(state.generated),
            tokens_in=len(ids),
            tokens_out=len(state.generated),
            finish_reason=state.finish or "length",
            model=model.name,
            stages=[{"peer": a.peer, "start": a.start, "end": a.end} for a in plan.assignments],
            failovers=failovers,
            epochs=state.epoch + 1,
            timings=timings,
            replays_s=replays,
            failover_detail=failover_detail,
        )
        log.info(
            "event=pipeline_done session=%s tokens=%d failovers=%d decode_tok_s=%.1f",
            state.session,
            result.tokens_out,
            failovers,
            timings["decode_tok_s"],
        )
        yield GenerationEvent(result=result)

    async def _load_with_failover(
        self,
        model: LeaderModel,
        plan: LayerPlan,
        offers: dict[str, dict[str, Any]],
        exclude: set[str],
        strategy: str,
    ) -> float:
        """Load `plan`; a stage that fails to load is excluded and the plan repaired."""
        total = 0.0
        for _attempt in range(self.settings.max_failovers + 1):
            try:
                total += await self.load(model, plan, offers)
                self._plan = plan
                return total
            except StageLost as exc:
                log.warning("event=stage_load_failed peer=%s reason=%r", exc.peer, exc.reason[:200])
                exclude.add(exc.peer)
                plan, offers = await self.plan(model, strategy, None, exclude, old=plan)
        raise NoStagePeers("stages kept failing to load their layers")

    def _lost_stage(self, exc: Exception, plan: LayerPlan) -> str:
        first = plan.assignments[0].peer
        if isinstance(exc, RemoteError):
            if exc.code == CODE_STAGE_LOST:
                peer = lost_peer(exc.remote_message)
                if peer is not None:
                    return peer
            if exc.code in ("bad_request", "unknown_type"):
                raise InferenceError(f"a stage refused the activation: {exc}") from None
            # not_loaded / bad_sequence / no_model: that stage cannot go on; replace it
            return exc.peer_id or first
        return first

    def _end_session(self, session: str, epoch: int, plan: LayerPlan, skip: set[str]) -> None:
        """Tell the stages to drop the session's KV caches (best effort, in the background)."""
        peers = [a.peer for a in plan.assignments if a.peer not in skip]

        async def end_all() -> None:
            with trio.move_on_after(5):
                async with trio.open_nursery() as nursery:
                    for peer in peers:
                        nursery.start_soon(self._end_one, peer, session, epoch)

        nursery = self._nursery
        if nursery is not None:
            nursery.start_soon(end_all)

    async def _end_one(self, peer: str, session: str, epoch: int) -> None:
        with contextlib.suppress(TransportError, RemoteError):
            await self.stages.call(
                peer,
                wire.T_END,
                {"v": wire.WIRE_VERSION, "session": session, "epoch": epoch},
                timeout=3.0,
            )

    _nursery: trio.Nursery | None = None
    _plan: LayerPlan

    def _prompt_ids(self, model: LeaderModel, request: GenerateRequest) -> list[int]:
        given = [x is not None for x in (request.messages, request.prompt_tokens, request.prompt)]
        if sum(given) != 1:
            raise InferenceError("give exactly one of messages, prompt_tokens or prompt")
        if request.prompt_tokens is not None:
            ids = [int(t) for t in request.prompt_tokens]
            if any(t < 0 or t >= model.config.vocab_size for t in ids):
                raise InferenceError(f"token ids must lie in [0, {model.config.vocab_size})")
        elif request.messages is not None:
            ids = model.encode_chat(request.messages)
        else:
            assert request.prompt is not None
            ids = model.tokenizer.encode(request.prompt)
        if not ids:
            raise InferenceError("the prompt has no tokens")
        return ids
