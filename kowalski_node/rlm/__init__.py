"""The Recursive Language Model loop: a pure state machine (`machine`) and its trio driver (`runner`).

Entry point for other layers::

    from kowalski_node.rlm import RlmConfig, TaskControl, run_rlm
    result = await run_rlm(prompt, context, root=backend, repl=executor, config=RlmConfig())
"""

from kowalski_node.rlm.config import RlmConfig
from kowalski_node.rlm.machine import RlmMachine, SnapshotError
from kowalski_node.rlm.runner import RlmRunner, TaskControl, run_rlm
from kowalski_node.rlm.trajectory import TrajectoryError, read_trajectory
from kowalski_node.rlm.types import (
    BlockRecord,
    ProgressEvent,
    RlmResult,
    StopReason,
    SubCallRecord,
    Timings,
)

__all__ = [
    "BlockRecord",
    "ProgressEvent",
    "RlmConfig",
    "RlmMachine",
    "RlmResult",
    "RlmRunner",
    "SnapshotError",
    "StopReason",
    "SubCallRecord",
    "TaskControl",
    "Timings",
    "TrajectoryError",
    "read_trajectory",
    "run_rlm",
]
