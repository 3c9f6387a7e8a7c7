"""The Recursive Language Model loop as a pure state machine (`machine`): no trio, no clock.

Its trio driver and the trajectory writer live in the runtime::

    from kowalski_node.rlm import RlmConfig
    from kowalski_node.runtime.rlm_runner import TaskControl, run_rlm
    result = await run_rlm(prompt, context, root=backend, repl=executor, config=RlmConfig())
"""

from kowalski_node.rlm.config import RlmConfig
from kowalski_node.rlm.machine import RlmMachine, SnapshotError
from kowalski_node.rlm.types import (
    BlockResult,
    ExecutionResult,
    ProgressEvent,
    StopReason,
    SubCallRecord,
)

__all__ = [
    "BlockResult",
    "ExecutionResult",
    "ProgressEvent",
    "RlmConfig",
    "RlmMachine",
    "SnapshotError",
    "StopReason",
    "SubCallRecord",
]
