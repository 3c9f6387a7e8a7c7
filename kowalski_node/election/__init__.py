"""Pure per-task leader election: weighted rendezvous ranking, leases, fencing epochs.

Public API: :func:`rank_candidates`, :func:`choose_leader`, :func:`successors`,
:class:`LeaderElection` with :class:`ElectionConfig` and the decisions
(:class:`Lead`, :class:`Follow`, :class:`Await`, :class:`NoCandidate`), :class:`Lease`,
and :class:`FencingGuard` (with :class:`FenceVerdict`, :class:`StaleEpochError`);
:func:`leader_weight` turns a capability advert into a rendezvous weight.
"""

from kowalski_node.election.fencing import EpochClaim, FenceVerdict, FencingGuard, StaleEpochError
from kowalski_node.election.hashing import (
    choose_leader,
    home_acceptors,
    hrw_score,
    rank_candidates,
    stable_unit,
    successors,
)
from kowalski_node.election.lease import (
    Await,
    Decision,
    ElectionConfig,
    Follow,
    Lead,
    LeaderElection,
    Lease,
    NoCandidate,
)
from kowalski_node.election.weights import leader_weight

__all__ = [
    "Await",
    "Decision",
    "ElectionConfig",
    "EpochClaim",
    "FenceVerdict",
    "FencingGuard",
    "Follow",
    "Lead",
    "LeaderElection",
    "Lease",
    "NoCandidate",
    "StaleEpochError",
    "choose_leader",
    "home_acceptors",
    "hrw_score",
    "leader_weight",
    "rank_candidates",
    "stable_unit",
    "successors",
]
