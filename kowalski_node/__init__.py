"""kowalski-node: Recursive Language Model workflows across a home cluster, no coordinator.

The public API is imported lazily (PEP 562), so `import kowalski_node` stays cheap for
sandbox workers and CLI commands that need none of it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "BatchCompletion",
    "BatchConfig",
    "BlockResult",
    "ClusterConfig",
    "DeviceFilter",
    "ExecutionResult",
    "KowalskiRLM",
    "KowalskiRLMBuilder",
    "LocalExecutor",
    "NodeExecutor",
    "ProgressSubscription",
    "ProgressUpdate",
    "QueueStrategy",
    "Settings",
    "ShardingStrategy",
    "Task",
    "TaskExecutor",
    "__version__",
    "load_settings",
    "run",
]
_CONFIG_NAMES = ("Settings", "load_settings")
_LAZY: dict[str, str] = {
    name: "kowalski_node.config" if name in _CONFIG_NAMES else "kowalski_node.api"
    for name in __all__
    if name != "__version__"
}

if TYPE_CHECKING:
    from kowalski_node.api import (
        BatchCompletion,
        BatchConfig,
        BlockResult,
        ClusterConfig,
        DeviceFilter,
        ExecutionResult,
        KowalskiRLM,
        KowalskiRLMBuilder,
        LocalExecutor,
        NodeExecutor,
        ProgressSubscription,
        ProgressUpdate,
        QueueStrategy,
        ShardingStrategy,
        Task,
        TaskExecutor,
        run,
    )
    from kowalski_node.config import Settings, load_settings


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kowalski_node' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
