"""Pure per-task leader choice: weighted rendezvous ranking over live capable peers.

Public API: :func:`rank_candidates`, :func:`choose_leader`, :func:`successors`,
:func:`home_acceptors` (a task's 3 acceptors), and :func:`leader_weight`, which turns a
capability advert into a rendezvous weight. Leases and fencing epochs are the
coordination core's (`kowalski_node.coordination`, with the ledger's fenced writes in
`kowalski_node.tasks`): this package only ranks.
"""

from kowalski_node.election.hashing import (
    choose_leader,
    home_acceptors,
    hrw_score,
    rank_candidates,
    stable_unit,
    successors,
)
from kowalski_node.election.weights import leader_weight

__all__ = [
    "choose_leader",
    "home_acceptors",
    "hrw_score",
    "leader_weight",
    "rank_candidates",
    "stable_unit",
    "successors",
]
