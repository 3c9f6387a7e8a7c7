"""Exception hierarchy shared by every layer, so callers can catch by meaning, not by module."""

from __future__ import annotations


class KowalskiError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(KowalskiError):
    """A configuration value is missing or invalid; the message names the key."""


class LlmError(KowalskiError):
    """A model call failed."""


class BackendUnavailable(LlmError):
    """The backend could not be reached; names the backend and the address tried."""

    def __init__(self, backend: str, address: str, detail: str) -> None:
        super().__init__(f"{backend} backend at {address} is unreachable: {detail}")
        self.backend = backend
        self.address = address
        self.detail = detail


class ModelNotFound(LlmError):
    """The backend is up but does not have the requested model."""


class ScriptExhausted(LlmError):
    """A scripted backend ran out of recorded responses."""


class SandboxError(KowalskiError):
    """The REPL sandbox could not run a block (not: the block itself raised)."""


class TaskError(KowalskiError):
    """A task could not be accepted, placed or completed."""


class ContextNotReplicated(TaskError):
    """A large context could not be copied to any other live peer, so the submission was
    not accepted (it would not survive this node's death); retrying is safe."""


class NoCapableDevice(TaskError):
    """No live device can run the task; the message says which requirement failed."""


class NoQuorum(TaskError):
    """A submission cannot be made safe now (too few of its acceptors reachable): retry later."""


class TaskCancelled(TaskError):
    """The task was cancelled by its submitter."""


class NodeUnreachable(TaskError):
    """No kowalski node answers at the configured HTTP API address (DeviceFilter.NETWORK)."""

    def __init__(self, address: str, detail: str) -> None:
        super().__init__(
            f"no local kowalski node is reachable at {address} ({detail}); start one with "
            "`kowalski-node start`, set node.api.host/port, or use DeviceFilter.LOCAL"
        )
        self.address = address
        self.detail = detail
