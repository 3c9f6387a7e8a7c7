"""Pipelined inference: one model's decoder layers across peers (docs/inference.md).

- `core`: pure state machines (stage sessions, the leader's generation state, sharding choice).
- `wire`: the SHARD protocol's messages (protocols/README.md, golden vectors in protocols/vectors/).
- `stage`: the stage service (layer ranges, KV caches per session, shard serving).
- `shards`: the encrypted shard cache.
- `pipeline`: `PipelineGenerator`, the leader a router calls: `generate(GenerateRequest)`.
"""

from kowalski_node.inference.errors import (
    InferenceError,
    NoStagePeers,
    ShardCorrupt,
    ShardingUnsupported,
    StageLost,
)
from kowalski_node.inference.pipeline import (
    GenerateRequest,
    GenerateResult,
    GenerationEvent,
    PipelineGenerator,
    PipelineSettings,
)

__all__ = [
    "GenerateRequest",
    "GenerateResult",
    "GenerationEvent",
    "InferenceError",
    "NoStagePeers",
    "PipelineGenerator",
    "PipelineSettings",
    "ShardCorrupt",
    "ShardingUnsupported",
    "StageLost",
]
