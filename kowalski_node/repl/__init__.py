"""Sandboxed code execution for RLM blocks (see `base.ReplExecutor`).

Names are imported lazily (PEP 562) so the sandbox worker, which imports submodules of
this package, does not pull in trio or the executor.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "SubprocessReplExecutor": "kowalski_node.repl.executor",
    "SandboxConfig": "kowalski_node.repl.config",
    "SandboxCapabilities": "kowalski_node.repl.capabilities",
    "ReplNamespace": "kowalski_node.repl.namespace",
}

__all__ = ["ReplNamespace", "SandboxCapabilities", "SandboxConfig", "SubprocessReplExecutor"]

if TYPE_CHECKING:
    from kowalski_node.repl.capabilities import SandboxCapabilities
    from kowalski_node.repl.config import SandboxConfig
    from kowalski_node.repl.executor import SubprocessReplExecutor
    from kowalski_node.repl.namespace import ReplNamespace


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kowalski_node.repl' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
