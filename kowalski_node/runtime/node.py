"""The `Node` actor: one trio task tree that wires the pure cores to the ports.

    node = Node(peer_id, transport, store, options, metadata=store)   # store: SqliteLedgerStore
    async with transport.running():
        info = await nursery.start(node.run)      # NodeInfo(peer_id, listen_addrs, api_url)
        ...
        node.request_stop()                       # SIGTERM: drain, leave, return

What runs inside `run()`:

* membership (SWIM core, probes over `/kowalski/membership/1.0.0`),
* capability adverts (the CapabilityGossip core: sealed adverts pushed to a few peers,
  to every new member at once, and repaired by anti-entropy syncs),
* discovery (bootstrap dials, mDNS, peer exchange through membership),
* the task engine (owner/leader/replica roles of the coordination core, the RLM runs),
* the HTTP API (`NodeService`), when an API address is configured,
* a tokens/s measurement of the builtin engine (optional, in the background).

Stopping drains: new submissions are refused, tasks this node leads are handed over
(their owners re-offer them at epoch + 1 from the last checkpoint), owned tasks get a
bounded time to finish, membership announces the leave, then everything is cancelled.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from kowalski_node.adapters.libp2p.api import TransportPort
from kowalski_node.capabilities import DeviceProfile, GossipConfig
from kowalski_node.capabilities.probe import collect_profile
from kowalski_node.capabilities.profile import ServedModel
from kowalski_node.capabilities.seal import Signer
from kowalski_node.config import Settings
from kowalski_node.membership import (
    MemberInfo,
    Membership,
    MembershipEvent,
    MemberUp,
)
from kowalski_node.runtime.capabilities_driver import GOSSIP_TYPES, CapabilityDriver
from kowalski_node.runtime.contexts import ContextConfig, ContextStore
from kowalski_node.runtime.discovery import Discovery
from kowalski_node.runtime.execution import ExecutionEnv
from kowalski_node.runtime.loopwatch import LoopLagProbe
from kowalski_node.runtime.membership_driver import MembershipDriver
from kowalski_node.runtime.ports import TaskMetadataStore
from kowalski_node.runtime.profiles import NodeProfile
from kowalski_node.runtime.tasks_engine import TaskEngine
from kowalski_node.tasks import LedgerStore

if TYPE_CHECKING:
    from trio_typing import TaskStatus

    from kowalski_node.inference.install import InferenceServices
    from kowalski_node.remote.completions import ClusterCompletionRouter
    from kowalski_node.remote.install import RemoteServices
    from kowalski_node.runtime.loopwatch import SlowStepWatch

log = logging.getLogger("kowalski_node.runtime.node")

VERSION = "0.1"


@dataclass
class NodeOptions:
    """Everything `kowalski-node start` decides before the node runs."""

    data_dir: Path
    settings: Settings
    profile: NodeProfile
    bootstrap: list[str] = field(default_factory=list)
    mdns: bool = False
    mdns_interfaces: list[str] | None = None
    api_host: str | None = "127.0.0.1"  # None: no HTTP API
    api_port: int = 0
    api_token: str | None = None
    drain_timeout_s: float = 10.0
    measure_tokens: bool = False
    cluster_fingerprint: str | None = None
    repl_languages: tuple[str, ...] = ("python",)
    remote: bool = True  # serve REPL jobs / sub-calls for peers, send ours to the best peer
    remote_local_weight: float = 1.0  # < 1 prefers peers over this node for code blocks


@dataclass(frozen=True)
class NodeInfo:
    """What `start` prints: who we are and where to reach us."""

    peer_id: str
    listen_addrs: list[str]
    api_url: str | None


def advertised_addr(addrs: list[str]) -> str:
    """The address other members should dial: a non-loopback one if there is one."""
    for a in addrs:
        if not a.startswith(("/ip4/127.", "/ip6/::1/")):
            return a
    return addrs[0] if addrs else ""


class Node:
    """One mesh node. Not reusable: `run()` once."""

    def __init__(
        self,
        peer_id: str,
        transport: TransportPort,
        store: LedgerStore,
        options: NodeOptions,
        *,
        metadata: TaskMetadataStore,
        execution: ExecutionEnv | None = None,
        rng: random.Random | None = None,
        sign_adverts: Signer | None = None,
    ) -> None:
        """`sign_adverts` signs our capability adverts (the identity key, in production);
        without it they travel unsigned and peers accept them only first-hand."""
        self.peer_id = peer_id
        self.transport = transport
        self.options = options
        self.settings = options.settings
        self.profile = options.profile
        self.rng = rng or random.Random(secrets.randbits(64))
        self.execution = execution or ExecutionEnv(self.settings)
        self.execution.me = peer_id
        self.started_at = time.time()
        self.draining = False
        self.tokens_per_s: float = 0.0
        self.api_url: str | None = None
        self.info: NodeInfo | None = None
        self.first_seen: dict[str, float] = {}
        self._stop = trio.Event()
        self.stopped = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.membership: MembershipDriver | None = None
        self.caps = CapabilityDriver(
            peer_id,
            transport,
            self._profile_now,
            live_peers=self.live_peers,
            rng=random.Random(self.rng.getrandbits(64)),
            refresh_s=self.profile.advert_refresh_s,
            config=GossipConfig.wan() if self.profile.timing == "wan" else GossipConfig.lan(),
            sign=sign_adverts,
        )
        # large task contexts travel as blobs, not inside coordination messages
        self.contexts = ContextStore(
            peer_id,
            transport,
            options.data_dir / "contexts",
            self.live_peers,
            ContextConfig(replicas=self.profile.coord.replicas),
        )
        self.loop_lag = LoopLagProbe()
        self.tasks = TaskEngine(
            peer_id,
            # one database behind two ports: the ledger's records and the node's read model
            ledger_store=store,
            metadata=metadata,
            transport=transport,
            adverts=self.caps,
            execution=self.execution,
            contexts=self.contexts,
            coord_config=self.profile.coord,
            max_runs=self.profile.max_runs,
            default_max_iterations=self.settings.rlm.max_iterations,
            trajectories_dir=self.settings.paths.trajectories_dir,
            rng=self.rng,
            draining=lambda: self.draining,
        )
        self.discovery: Discovery | None = None
        self.remote: RemoteServices | None = None
        self.completions: ClusterCompletionRouter | None = None  # made with the API
        if options.remote:
            from kowalski_node.remote import RemoteConfig, install_remote

            self.remote = install_remote(
                self, RemoteConfig(local_weight=options.remote_local_weight)
            )
            self.tasks.runs.wrap_sub = self.remote.fanout  # sub-calls fan out to peers
        self.loop_watch: SlowStepWatch | None = None  # when the command installed one
        self.inference: InferenceServices = self._install_inference()

    def _install_inference(self) -> InferenceServices:
        """The SHARD service (pipeline stages) and the generation leader (docs/inference.md)."""
        from kowalski_node.identity import load_cluster_key
        from kowalski_node.inference.install import install_inference

        try:
            key: bytes | None = load_cluster_key(self.options.data_dir).key
        except Exception:  # noqa: BLE001 - no swarm.key (in-process tests): no encrypted shard cache
            key = None
        return install_inference(self, self.options.data_dir, key)

    # -------------------------------------------------------------- adverts

    def _models(self) -> tuple[ServedModel, ...]:
        from kowalski_node.llm.factory import LOCAL_KINDS, parse_backend_spec
        from kowalski_node.llm.models import DEFAULT_MODEL

        llm = self.settings.llm
        try:
            spec = parse_backend_spec(llm.backend)
        except Exception:  # noqa: BLE001 - a bad spec fails where the backend is built, with its own error
            spec = None
        name = llm.model or (spec.model if spec is not None else None)
        if name is None and spec is not None and spec.kind in LOCAL_KINDS:
            name = DEFAULT_MODEL  # what the local engines load when no model is named
        if name is None:
            name = llm.backend.split(":", 1)[0]
        return (ServedModel(name, 0, 0, -1),) if name else ()

    def _profile_now(self, version: int) -> DeviceProfile:
        backend = self.settings.llm.backend.split(":", 1)[0]
        profile = collect_profile(
            self.peer_id,
            version,
            backends=(backend,),
            models=self._models(),
            repl_languages=self.options.repl_languages,
            tokens_per_s=self.tokens_per_s,
            device_class=self.profile.device_class,
        )
        return profile

    # -------------------------------------------------------------- lifecycle

    def request_stop(self) -> None:
        """Begin the drain (SIGTERM/SIGINT); `run()` returns when it is done.

        New submissions are refused from this moment on."""
        self.draining = True
        self._stop.set()

    async def run(self, *, task_status: TaskStatus[NodeInfo] = trio.TASK_STATUS_IGNORED) -> None:
        listen = self.transport.listen_addrs
        core = Membership(
            self.peer_id,
            config=self.profile.swim,
            rng=random.Random(self.rng.getrandbits(64)),
            now=trio.current_time(),
            addr=advertised_addr(listen),
        )
        membership = self.membership = MembershipDriver(core, self.transport)
        for type_ in GOSSIP_TYPES:
            membership.add_type(type_, self.caps.handle_message)
        membership.on_event(self._on_member_event)
        membership.install()
        self.tasks.install()
        self.contexts.install()
        self.discovery = Discovery(
            self.peer_id,
            self.transport,
            membership,
            bootstrap=self.options.bootstrap,
            mdns=self.options.mdns,
            cluster=self.options.cluster_fingerprint,
            mdns_interfaces=self.options.mdns_interfaces,
        )
        preloaded = await self._preload_llm()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if preloaded is not None:
                    nursery.start_soon(self._warm_root_prompt, preloaded)
                await self.caps.start()
                nursery.start_soon(membership.run)
                nursery.start_soon(self.caps.run)
                nursery.start_soon(self.tasks.run)
                nursery.start_soon(self.loop_lag.run)
                nursery.start_soon(self.discovery.run)
                nursery.start_soon(self.inference.run)
                if self.options.api_host is not None:
                    await self._start_api(nursery)
                if self.options.measure_tokens:
                    nursery.start_soon(self._measure_tokens)
                self.info = NodeInfo(self.peer_id, listen, self.api_url)
                log.info(
                    "event=node_started peer=%s listen=%s api=%s profile=%s timing=%s",
                    self.peer_id,
                    ",".join(listen),
                    self.api_url or "-",
                    self.profile.name,
                    self.profile.timing,
                )
                task_status.started(self.info)
                await self._stop.wait()
                await self._drain()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if self.remote is not None:
                    try:
                        await self.remote.aclose()
                    except Exception as exc:  # noqa: BLE001 - shutdown goes on whatever the remote services raise
                        log.warning("event=remote_close_failed reason=%r", str(exc)[:200])
                await self.execution.aclose()
            self.stopped.set()

    async def _start_api(self, nursery: trio.Nursery) -> None:
        from kowalski_node.adapters.http import serve_api
        from kowalski_node.runtime.node_service import NodeServiceImpl

        service = NodeServiceImpl(self.tasks, self, inference=self.inference)
        assert self.options.api_host is not None
        endpoint = await nursery.start(
            partial(
                serve_api,
                max_body_bytes=self.settings.node.api.max_body_bytes,
                spool_dir=self.options.data_dir / "tmp",
                completions=self.completion_router(),
            ),
            service,
            self.options.api_host,
            self.options.api_port,
            self.options.api_token,
        )
        self.api_url = endpoint.url

    def completion_router(self) -> ClusterCompletionRouter | None:
        """The `CompletionRouter` behind the OpenAI-compatible API (None without the mesh's
        remote services); `self.completions.set_pipeline(...)` adds the layer pipeline."""
        if self.remote is None:
            return None
        if self.completions is None:
            from kowalski_node.remote.completions import ClusterCompletionRouter

            self.completions = ClusterCompletionRouter(
                self.peer_id,
                self.transport,
                self.remote.chooser,
                self.profiles,
                self.live_peers,
                lambda: self.execution.backends().root,
            )
            if self.inference is not None:
                from kowalski_node.inference.route import PipelineRoute

                inf = self.settings.inference
                self.completions.set_pipeline(
                    PipelineRoute(
                        self.inference.generator,
                        sharding=inf.sharding,
                        memory_cap_mb=inf.memory_cap_mb,
                    )
                )
        return self.completions

    async def _drain(self) -> None:
        started = trio.current_time()
        self.draining = True
        log.info("event=drain_started peer=%s", self.peer_id)
        with trio.move_on_after(self.options.drain_timeout_s):
            await self.tasks.drain()
        if self.membership is not None:
            self.membership.leave()
            with trio.move_on_after(max(1.0, self.profile.swim.leave_drain * 3)):
                await self.membership.left.wait()
        log.info(
            "event=drain_finished peer=%s took_ms=%.0f",
            self.peer_id,
            (trio.current_time() - started) * 1000,
        )

    # -------------------------------------------------------------- membership events

    def _on_member_event(self, event: MembershipEvent) -> None:
        if isinstance(event, MemberUp):
            self.first_seen.setdefault(event.peer, time.time())
        self.caps.member_event(event)
        self.tasks.member_event(event)

    def live_peers(self) -> list[str]:
        """Alive and suspect members, this node included (suspects are members until down)."""
        if self.membership is None:
            return [self.peer_id]
        return sorted(self.membership.core.live_peers(include_self=not self.draining))

    def profiles(self) -> dict[str, DeviceProfile]:
        return self.caps.table.profiles()

    def members(self) -> list[MemberInfo]:
        """Every member membership knows of, this node included ([] before `run`)."""
        return [] if self.membership is None else self.membership.core.members()

    def listen_addrs(self) -> list[str]:
        return self.transport.listen_addrs

    def profile_name(self) -> str:
        return self.profile.name

    # -------------------------------------------------------------- tokens/s

    async def _preload_llm(self) -> Any:
        """Load an in-process llama.cpp model before this node joins the mesh.

        xllamacpp holds the GIL while its server loads the GGUF (measured: one 7-8 s
        event-loop stall for Qwen2.5-Coder-0.5B on a busy 2-core machine), so a load done
        on first use stalls membership probes and lease renewals mid-task: peers suspect
        the node and its leases move. Loaded here, before any probe is sent, the stall
        costs nothing; every later request shares this server.
        """
        backends = getattr(self.execution, "backends", None)
        if backends is None:
            return
        try:
            root = backends().root
        except Exception as exc:  # noqa: BLE001 - a bad backend spec fails where the task runs, clearly
            log.debug("event=llm_preload_skipped reason=%r", str(exc)[:200])
            return
        load = getattr(root, "load", None)
        if getattr(root, "name", "") != "llamacpp" or load is None:
            return None
        started = time.perf_counter()
        try:
            await load()
        except Exception as exc:  # noqa: BLE001 - preloading is an optimisation: the first task loads it anyway
            log.warning("event=llm_preload_failed reason=%r", str(exc)[:300])
            return None
        log.info("event=llm_preloaded took_ms=%.0f", (time.perf_counter() - started) * 1000)
        return root

    async def _warm_root_prompt(self, root: Any) -> None:
        """Have the root system prompt's prefill ready before the first task (restored from
        disk in milliseconds, or computed once per machine; see llm/llamacpp_prefix.py), so
        a task's first turn prefills only its own part. Failure only costs that speed."""
        warm = getattr(root, "warm_prefix", None)
        prompt_for = getattr(self.execution, "default_root_prompt", None)
        if warm is None or prompt_for is None:
            return
        started = time.perf_counter()
        try:
            outcome = await warm(prompt_for("str"))
        except Exception as exc:  # noqa: BLE001 - warming the prompt cache is an optimisation; tasks work without it
            log.warning("event=prompt_warm_failed reason=%r", str(exc)[:300])
            return
        log.info(
            "event=prompt_warmed outcome=%s took_ms=%.0f",
            outcome,
            (time.perf_counter() - started) * 1000,
        )

    async def _measure_tokens(self) -> None:
        """A short local decode: the tokens/s figure in our advert (0 when unknown)."""
        spec = self.settings.llm.backend.split(":", 1)[0]
        if spec not in ("builtin", "llamacpp"):
            return
        from kowalski_node.llm.base import ChatMessage, LlmRequest

        try:
            backend = self.execution.backends().root
            request = LlmRequest(
                messages=(ChatMessage("user", "Count from one to twenty."),),
                max_tokens=24,
                task_id="tokens-per-second",
            )
            started = time.perf_counter()
            response = await backend.complete(request)
            elapsed = time.perf_counter() - started
        except Exception as exc:  # noqa: BLE001 - measuring tokens/s is optional: the advert says 0
            log.warning("event=tokens_measure_failed reason=%r", str(exc)[:300])
            return
        decode_s = max(1e-6, elapsed)
        self.tokens_per_s = round(response.tokens_out / decode_s, 2)
        log.info(
            "event=tokens_measured tokens_per_s=%.2f tokens=%d took_ms=%.0f",
            self.tokens_per_s,
            response.tokens_out,
            elapsed * 1000,
        )
        self.caps.poke()

    # -------------------------------------------------------------- status helpers

    def uptime(self) -> float:
        return max(0.0, time.time() - self.started_at)

    def latency_ms(self, peer: str) -> float | None:
        if self.membership is None:
            return None
        value = self.membership.latency_ms.get(peer)
        return None if value is None or not math.isfinite(value) else round(value, 3)

    def diagnostics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.membership is not None:
            out["membership_dropped_sends"] = self.membership.dropped_sends
            out["membership_bad_messages"] = self.membership.bad_messages
        out["adverts_rejected"] = self.caps.rejected
        stats = trio.lowlevel.current_statistics()
        out["trio_tasks_living"] = stats.tasks_living
        out["trio_tasks_runnable"] = stats.tasks_runnable
        out.update(self.tasks.diagnostics())
        if self.remote is not None:
            out["remote"] = self.remote.stats()
        out.update(self.contexts.stats())
        out["max_loop_lag_ms"] = round(self.loop_lag.worst_ms, 1)
        out["inference"] = self.inference.stats()
        if self.loop_watch is not None:
            out["slow_loop_steps"] = self.loop_watch.slow_steps
            out["worst_loop_step_ms"] = round(self.loop_watch.worst_ms, 1)
        return out
