"""Wiring pipelined inference into a running node, in one call (like `remote.install`).

inference = install_inference(node)     # registers the SHARD handler
nursery.start_soon(inference.run)       # idle-session eviction, background cleanups
result = await inference.generator.generate(GenerateRequest(...))
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

import trio

from kowalski_node.adapters.libp2p.api import TransportPort
from kowalski_node.config import Settings
from kowalski_node.inference.pipeline import PipelineGenerator, PipelineSettings
from kowalski_node.inference.shards import ShardCache
from kowalski_node.inference.stage import StageConfig, StageService

log = logging.getLogger("kowalski_node.inference")
MB = 1024 * 1024


class InferenceHost(Protocol):
    peer_id: str
    transport: TransportPort
    settings: Settings

    def live_peers(self) -> list[str]: ...


class InferenceServices:
    """The node's stage service and generation leader."""

    def __init__(self, stages: StageService, generator: PipelineGenerator) -> None:
        self.stages = stages
        self.generator = generator

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.generator._nursery = nursery
            nursery.start_soon(self.stages.run)

    def stats(self) -> dict[str, Any]:
        s = self.stages.stats
        return {
            "stage_forwards": s.forwards,
            "stage_rows": s.rows,
            "stage_duplicates": s.duplicates,
            "stage_stale": s.stale,
            "stage_sessions": len(self.stages.caches),
            "stage_evicted_sessions": s.evicted_sessions,
            "stage_parts": [f"{k[0][:12]}:{k[1]}-{k[2]}" for k in self.stages.parts],
            "stage_fetched_tensors": s.fetched_tensors,
            "stage_corrupt_refetches": s.corrupt_refetches,
            **{f"leader_{k}": v for k, v in self.generator.stats.items()},
        }


def pipeline_settings(settings: Settings) -> PipelineSettings:
    inf = settings.inference
    return PipelineSettings(
        sharding=inf.sharding,
        reserve_fraction=inf.reserve_fraction,
        max_stages=inf.max_stages,
        max_failovers=inf.max_failovers,
        stage_timeout_s=inf.stage_timeout_s,
        exact_replay=inf.exact_replay,
    )


def install_inference(
    host: InferenceHost, data_dir: Path | None, cluster_key: bytes | None
) -> InferenceServices:
    """Register the SHARD handler on the host's transport; returns the services."""
    settings = host.settings
    inf = settings.inference
    models_dir = settings.paths.models_dir
    shards = (
        ShardCache(data_dir / "shards", cluster_key)
        if data_dir is not None and cluster_key is not None
        else None
    )
    stages = StageService(
        host.transport,
        host.peer_id,
        StageConfig(
            models_dir=models_dir,
            memory_cap_bytes=inf.memory_cap_mb * MB if inf.memory_cap_mb else None,
            session_idle_s=inf.session_idle_s,
            stage_timeout_s=inf.stage_timeout_s,
        ),
        shards,
    )
    stages.register()
    generator = PipelineGenerator(
        host.peer_id, host.live_peers, stages, pipeline_settings(settings), models_dir=models_dir
    )
    return InferenceServices(stages, generator)
