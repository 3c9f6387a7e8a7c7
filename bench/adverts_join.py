"""Adverts reaching a joiner and from it, with real `kowalski-node start` processes.

    python bench/adverts_join.py [--rounds 3]

Per round: a mesh of 3 nodes (scripted backend) converges, a 4th starts bootstrapping
through the first, and the clock runs from its `ready` until all 4 nodes list all 4
alive with an advert (`NodeCluster.wait_converged`, polling /v1/peers). Prints the
seconds per round as JSON. Run it on two trees to compare their advert paths.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from kowalski_node.testing.node_cluster import NodeCluster, write_script


def one_round() -> float:
    tmp = Path(tempfile.mkdtemp(prefix="adverts-join-"))
    script = write_script(tmp / "script.json", {"responses": ["FINAL(1)"]})
    cluster = NodeCluster(tmp)
    try:
        nodes = cluster.start_mesh(3, backend=f"scripted:{script}")
        cluster.wait_converged(nodes, timeout=60)
        joiner = cluster.start("d", backend=f"scripted:{script}", bootstrap=[nodes[0].addr])
        started = time.monotonic()
        cluster.wait_converged([*nodes, joiner], timeout=60)
        return round(time.monotonic() - started, 2)
    finally:
        cluster.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps({"joiner_ready_to_all_adverts_s": [one_round() for _ in range(args.rounds)]}))


if __name__ == "__main__":
    main()
