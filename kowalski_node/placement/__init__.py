"""Pure placement: SmartScheduler scoring/filtering and memory-weighted layer partitioning.

Public API: :class:`SmartScheduler` (``place``/``choose``/``observe_*``) with
:class:`SchedulerConfig`, :class:`Weights`, :class:`Requirement`, :class:`Placement`,
:class:`ScoreBreakdown`, :func:`disqualification`; layer planning with :func:`plan_layers`,
:func:`replan_layers`, :class:`PeerMemory`, :class:`LayerPlan`, :class:`LayerAssignment`,
:class:`LayerPlanError`, :func:`uniform_layer_sizes`, :func:`model_bytes`.
"""

from kowalski_node.placement.layers import (
    LayerAssignment,
    LayerPlan,
    LayerPlanError,
    PeerMemory,
    model_bytes,
    plan_layers,
    replan_layers,
    uniform_layer_sizes,
)
from kowalski_node.placement.scheduler import (
    Placement,
    Requirement,
    SchedulerConfig,
    ScoreBreakdown,
    SmartScheduler,
    Weights,
    disqualification,
)

__all__ = [
    "LayerAssignment",
    "LayerPlan",
    "LayerPlanError",
    "PeerMemory",
    "Placement",
    "Requirement",
    "SchedulerConfig",
    "ScoreBreakdown",
    "SmartScheduler",
    "Weights",
    "disqualification",
    "model_bytes",
    "plan_layers",
    "replan_layers",
    "uniform_layer_sizes",
]
