"""An in-process mesh for pipeline tests: every request goes through a msgpack round trip
(as on the wire), blobs are file copies, and a peer can be killed (later requests to it
raise `ConnectionLost`, like a SIGKILLed libp2p peer)."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from kowalski_node.adapters.libp2p.blob import BlobReceipt
from kowalski_node.adapters.libp2p.errors import ConnectionLost, RemoteError, RequestRejected
from kowalski_node.adapters.libp2p.rpc import Request, RequestHandler
from kowalski_node.identity import ClusterKey
from kowalski_node.inference.pipeline import PipelineGenerator, PipelineSettings
from kowalski_node.inference.shards import ShardCache
from kowalski_node.inference.stage import StageConfig, StageService


def wire_copy(value: Any) -> Any:
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)


@dataclass
class MeshTransport:
    mesh: StageMesh
    peer_id: str
    blob_dir: Path
    handlers: dict[str, RequestHandler] = field(default_factory=dict)

    def register_handler(
        self, protocol: str, handler: RequestHandler, *, types: Collection[str] | None = None
    ) -> None:
        self.handlers[protocol] = handler

    async def request(
        self, peer_id: str, protocol: str, type_: str, payload: Any, *, timeout: float | None = None
    ) -> Any:
        if peer_id in self.mesh.dead or peer_id not in self.mesh.nodes:
            raise ConnectionLost(f"{peer_id} is gone")
        self.mesh.on_request(self.peer_id, peer_id, type_)
        target = self.mesh.nodes[peer_id].transport
        try:
            result = await target.handlers[protocol](
                Request(self.peer_id, protocol, type_, wire_copy(payload), 1, one_way=False)
            )
        except RequestRejected as exc:
            raise RemoteError(exc.code, exc.message, peer_id, protocol) from None
        if peer_id in self.mesh.dead:
            raise ConnectionLost(f"{peer_id} died while answering")
        return wire_copy(result)

    async def send_blob(
        self,
        peer_id: str,
        path: Path,
        *,
        meta: Any = None,
        blob_id: str | None = None,
        timeout: float | None = None,
    ) -> BlobReceipt:
        assert blob_id is not None
        target = self.mesh.nodes[peer_id].transport
        target.blob_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target.blob_dir / blob_id)
        size = path.stat().st_size
        self.mesh.blob_bytes += size
        return BlobReceipt(blob_id, size, 0, size)

    def blob_path(self, blob_id: str) -> Path | None:
        p = self.blob_dir / blob_id
        return p if p.is_file() else None


@dataclass
class MeshNode:
    peer_id: str
    transport: MeshTransport
    stages: StageService
    generator: PipelineGenerator


class StageMesh:
    """In-process inference stage nodes (`StageService` + `PipelineGenerator` each) that
    reach one another through `MeshTransport`: no sockets, no libp2p."""

    def __init__(self, root: Path, key: ClusterKey | None = None) -> None:
        self.root = root
        self.key = key or ClusterKey.generate()
        self.nodes: dict[str, MeshNode] = {}
        self.dead: set[str] = set()
        self.blob_bytes = 0
        self.hooks: list[Callable[[str, str, str], None]] = []

    def on_request(self, src: str, dst: str, type_: str) -> None:
        for hook in self.hooks:
            hook(src, dst, type_)

    def live(self) -> list[str]:
        return [p for p in self.nodes if p not in self.dead]

    def add(
        self,
        peer_id: str,
        models_dir: Path,
        *,
        cap_mb: int | None = None,
        settings: PipelineSettings | None = None,
    ) -> MeshNode:
        transport = MeshTransport(self, peer_id, self.root / peer_id / "blobs")
        stages = StageService(
            transport,  # type: ignore[arg-type]
            peer_id,
            StageConfig(
                models_dir=models_dir,
                memory_cap_bytes=cap_mb * 1024 * 1024 if cap_mb else None,
                stage_timeout_s=30,
            ),
            ShardCache(self.root / peer_id / "shards", self.key.key),
        )
        stages.register()
        generator = PipelineGenerator(
            peer_id, self.live, stages, settings or PipelineSettings(), models_dir=models_dir
        )
        node = self.nodes[peer_id] = MeshNode(peer_id, transport, stages, generator)
        return node

    def kill(self, peer_id: str) -> None:
        self.dead.add(peer_id)


def registry_model_names() -> list[str]:
    """Every model the engine's registry knows: pipeline tests run once per model, so a
    model added there (e.g. qwen2) is covered as soon as it is registered and pulled."""
    from kowalski_node.llm.models import REGISTRY

    return sorted(REGISTRY)


def registry_model_path(name: str) -> Path:
    """The pulled GGUF of a registry model; the default model is pulled, others skip."""
    import pytest
    from engine_fixtures import real_model_path

    from kowalski_node.llm.models import DEFAULT_MODEL, REGISTRY, find_spec, model_path

    spec = find_spec(name) or REGISTRY[name]
    default = find_spec(DEFAULT_MODEL)
    if default is not None and spec.name == default.name:
        return real_model_path()
    path = model_path(spec)
    if not path.is_file():
        pytest.skip(f"model {name} is not pulled (kowalski-node models pull {name})")
    return path
