"""Prometheus metrics of one API app, in its own registry (several nodes per process work).

Node counters come from `NodeService.status()` at scrape time, so they are exactly what
the node reports; HTTP latency and acceptance counts are observed by the API itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kowalski_node.runtime.service import NodeStatus, TaskStatus

PEER_STATES = ("alive", "suspect", "dead", "left")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _NodeCollector(Collector):
    """Renders the latest `NodeStatus` snapshot as metric families."""

    def __init__(self) -> None:
        self.snapshot: NodeStatus | None = None

    def describe(self) -> Iterable[Metric]:
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self.snapshot)

    def _families(self, s: NodeStatus | None) -> Iterator[Metric]:
        tasks = GaugeMetricFamily(
            "kowalski_tasks", "Tasks known to this node by status", labels=["status"]
        )
        peers = GaugeMetricFamily("kowalski_peers", "Cluster members by state", labels=["state"])
        queue = GaugeMetricFamily("kowalski_task_queue_depth", "Owned tasks waiting for a leader")
        uptime = GaugeMetricFamily("kowalski_node_uptime_seconds", "Seconds since the node started")
        info = GaugeMetricFamily(
            "kowalski_node_info", "Identity of this node", labels=["peer_id", "version"]
        )
        counters = {
            "commits": CounterMetricFamily(
                "kowalski_task_commits", "Results committed (once per task)"
            ),
            "executions": CounterMetricFamily(
                "kowalski_task_executions", "RLM loop starts, repeats included"
            ),
            "failovers": CounterMetricFamily(
                "kowalski_task_failovers", "Leader changes after a failure"
            ),
            "stale": CounterMetricFamily(
                "kowalski_task_stale_rejections", "Checkpoints or commits refused for an old epoch"
            ),
        }
        if s is not None:
            for status in TaskStatus:
                tasks.add_metric([status.value], float(s.tasks_by_status.get(status.value, 0)))
            for state in sorted(set(PEER_STATES) | set(s.peers_by_state)):
                peers.add_metric([state], float(s.peers_by_state.get(state, 0)))
            queue.add_metric([], float(s.queue_depth))
            uptime.add_metric([], float(s.uptime_s))
            info.add_metric([s.peer_id, s.version], 1.0)
            counters["commits"].add_metric([], float(s.commits_total))
            counters["executions"].add_metric([], float(s.executions_total))
            counters["failovers"].add_metric([], float(s.failovers_total))
            counters["stale"].add_metric([], float(s.stale_rejections_total))
        yield from (tasks, peers, queue, uptime, info, *counters.values())


class ApiMetrics:
    """The registry behind GET /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._node = _NodeCollector()
        self.registry.register(self._node)
        self.request_seconds = Histogram(
            "kowalski_http_request_duration_seconds",
            "HTTP API request latency (event streams excluded)",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tasks_accepted = Counter(
            "kowalski_api_tasks_accepted",
            "Tasks accepted through the HTTP API (duplicate = matched an earlier submission)",
            ["outcome"],
            registry=self.registry,
        )
        self.scrape_errors = Counter(
            "kowalski_api_status_errors",
            "Scrapes for which the node could not report its status",
            registry=self.registry,
        )

    def render(self, status: NodeStatus | None) -> bytes:
        """Exposition text; without a status the node families are empty, not stale."""
        self._node.snapshot = status
        return generate_latest(self.registry)
