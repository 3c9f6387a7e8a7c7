"""Errors of pipelined inference, each with a message a user can act on."""

from __future__ import annotations

from kowalski_node.errors import KowalskiError, NoCapableDevice


class InferenceError(KowalskiError):
    """A pipelined generation could not be done."""


class ShardingUnsupported(InferenceError):
    """A sharding strategy this node does not implement (tensor parallelism)."""

    def __init__(self, strategy: str) -> None:
        super().__init__(
            f"sharding strategy {strategy!r} is not supported: kowalski-node shards a model "
            "across peers with 'pipeline' (contiguous layer ranges), use --sharding pipeline "
            "or auto"
        )
        self.strategy = strategy


class NoStagePeers(NoCapableDevice):
    """No live peer offered memory (or the model) for a pipeline stage."""


class StageLost(InferenceError):
    """A stage of the pipeline stopped answering (died, left or was unreachable)."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"pipeline stage {peer} was lost: {reason}")
        self.peer = peer
        self.reason = reason


class ShardCorrupt(InferenceError):
    """A cached or fetched shard failed its integrity check (tampered or truncated)."""


class BadActivation(InferenceError):
    """A stage message that does not follow the schema in protocols/README.md."""
