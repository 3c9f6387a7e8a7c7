"""Remote work over the mesh: REPL jobs on peers, sub-calls fanned out, context folding.

Peer side: `register_repl_service`, `register_llm_service`, `register_fold_service`.
Leader side: `RemoteReplExecutor` (a ReplExecutor), `FanoutBackend` (an LlmBackend),
`FoldClient`; all place work with a `PeerChooser` (`SchedulerChooser` over the
SmartScheduler). `install_remote(node)` wires everything into a runtime Node.
See docs/remote.md.
"""

from kowalski_node.remote.fold import FoldClient, FoldService, register_fold_service
from kowalski_node.remote.install import RemoteConfig, RemoteServices, install_remote
from kowalski_node.remote.llm_service import (
    FanoutBackend,
    FanoutConfig,
    LlmService,
    LlmServiceConfig,
    register_llm_service,
)
from kowalski_node.remote.placement import PeerChooser, SchedulerChooser
from kowalski_node.remote.remote_repl import BlockRun, RemoteReplConfig, RemoteReplExecutor
from kowalski_node.remote.repl_service import ReplService, ReplServiceConfig, register_repl_service

__all__ = [
    "BlockRun",
    "FanoutBackend",
    "FanoutConfig",
    "FoldClient",
    "FoldService",
    "LlmService",
    "LlmServiceConfig",
    "PeerChooser",
    "RemoteConfig",
    "RemoteReplConfig",
    "RemoteReplExecutor",
    "RemoteServices",
    "ReplService",
    "ReplServiceConfig",
    "SchedulerChooser",
    "install_remote",
    "register_fold_service",
    "register_llm_service",
    "register_repl_service",
]
