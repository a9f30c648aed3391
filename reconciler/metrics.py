"""Prometheus metrics: a node's own view of its work, and the viewer's view of the whole cluster.

`NodeMetrics` is what `winslow node --metrics-port` serves: its claims, lost claim
races, fetch and push latencies, stage durations, journal backlog, its load and GPUs,
and the runs main records on it. `ClusterCollector` is what the viewer's `/metrics`
serves: projects and runs by state over all projects, the PENDING queue, and every
node's liveness, load and GPUs from its heartbeat. docs/metrics.md lists every name.

Each process keeps its own `CollectorRegistry`, never the library's global one, so
several can live in one process (the tests start a few). State is read when Prometheus
scrapes (the last snapshot, the journal, the last load sample); only events (a fetch,
a push, a lost race, a run that ended) are counted as they happen, by the node's cycle.
"""
from __future__ import annotations

import enum
import logging
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from reconciler import __version__
from reconciler.clock import parse_time, seconds_between
from reconciler.errors import ConfigError
from reconciler.facts import EXITED
from reconciler.model import LoadSample, NodeInfo, ProjectState, Run, RunState
from reconciler.snapshot import ProjectEntry, Snapshot

if TYPE_CHECKING:
    from reconciler.decide import Plan
    from reconciler.heartbeat import Heartbeat
    from reconciler.journal import Journal
    from reconciler.repoview import NodeView, RepoView

log = logging.getLogger("winslow.metrics")
T = TypeVar("T")
GIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
STAGE_BUCKETS = (1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 43200.0, 86400.0, 172800.0)


# -- what every machine reports: CPU, memory, GPUs -------------------------------------------------------------
class _Machines:
    """Load and GPU gauges of one machine (a node's own, no labels) or of many (the viewer's, by `node`)."""

    def __init__(self, prefix: str, labels: Sequence[str]) -> None:
        gpu = [*labels, "gpu"]
        self.cpu = GaugeMetricFamily(f"{prefix}_cpu_percent", "CPU use of the whole machine, percent, as last "
                                                              "sampled for the heartbeat", labels=labels)
        self.memory_used = GaugeMetricFamily(f"{prefix}_memory_used_bytes", "Memory in use on the machine, as last "
                                                                            "sampled for the heartbeat", labels=labels)
        self.memory_total = GaugeMetricFamily(f"{prefix}_memory_total_bytes", "Memory of the machine", labels=labels)
        self.gpu_utilization = GaugeMetricFamily(f"{prefix}_gpu_utilization_percent", "GPU utilisation, percent, "
                                                 "by NVML index, as last sampled for the heartbeat", labels=gpu)
        self.gpu_memory_used = GaugeMetricFamily(f"{prefix}_gpu_memory_used_bytes", "GPU memory in use, by NVML "
                                                 "index, as last sampled for the heartbeat", labels=gpu)
        self.gpu_memory_total = GaugeMetricFamily(f"{prefix}_gpu_memory_total_bytes", "GPU memory, by NVML index",
                                                  labels=gpu)

    def add(self, values: Sequence[str], info: NodeInfo, load: LoadSample | None) -> None:
        values = list(values)
        if info.memory:
            self.memory_total.add_metric(values, info.memory)
        for gpu in info.gpus:
            self.gpu_memory_total.add_metric([*values, str(gpu.index)], gpu.memory)
        if load is None:
            return
        if load.cpu_percent is not None:
            self.cpu.add_metric(values, load.cpu_percent)
        if load.memory_used is not None:
            self.memory_used.add_metric(values, load.memory_used)
        for reading in load.gpus:
            if reading.utilization is not None:
                self.gpu_utilization.add_metric([*values, str(reading.index)], reading.utilization)
            if reading.memory_used is not None:
                self.gpu_memory_used.add_metric([*values, str(reading.index)], reading.memory_used)

    def families(self) -> list[Metric]:
        return [self.cpu, self.memory_used, self.memory_total, self.gpu_utilization, self.gpu_memory_used,
                self.gpu_memory_total]


def _by_state(name: str, documentation: str, counts: Mapping[str, int], states: Iterable[enum.Enum]) -> Metric:
    """One gauge per state, every state present (0 when none is in it), so a state that empties reads 0."""
    family = GaugeMetricFamily(name, documentation, labels=["state"])
    for state in states:
        family.add_metric([state.value], counts.get(state.value, 0))
    return family


def _durations(name: str, documentation: str, runs: Iterable[Run]) -> HistogramMetricFamily:
    """A histogram of how long finished runs ran (started to finished), by stage and end state."""
    seen: dict[tuple[str, str], list[float]] = {}
    for run in runs:
        seconds = seconds_between(run.started, run.finished) if run.state is not RunState.RUNNING else None
        if seconds is not None:
            seen.setdefault((run.stage, run.state.value), []).append(max(0.0, seconds))
    family = HistogramMetricFamily(name, documentation, labels=["stage", "state"])
    for labels, values in sorted(seen.items()):
        buckets = [(floatToGoString(bound), float(sum(v <= bound for v in values))) for bound in STAGE_BUCKETS]
        family.add_metric(list(labels), [*buckets, ("+Inf", float(len(values)))], sum(values))
    return family


class _PerSnapshot(Generic[T]):
    """One value computed per snapshot: a snapshot never changes, and scrapes come far more often than commits."""

    def __init__(self, compute: Callable[[Snapshot], T]) -> None:
        self._compute = compute
        self._lock = threading.Lock()
        self._last: tuple[Snapshot, T] | None = None

    def __call__(self, snapshot: Snapshot) -> T:
        with self._lock:
            if self._last is None or self._last[0] is not snapshot:
                self._last = (snapshot, self._compute(snapshot))
            return self._last[1]


# -- the node: its own process ---------------------------------------------------------------------------------
class NodeSide(Protocol):
    """What the node's collector reads at scrape time."""

    name: str
    journal: Journal
    view: RepoView
    heartbeat: Heartbeat


class NodeMetrics:
    """A node's registry: event counters its cycle feeds, and a collector that reads the node when scraped."""

    def __init__(self, node: NodeSide) -> None:
        self.registry = CollectorRegistry()
        self.fetch_seconds = Histogram("winslow_node_fetch_seconds", "Fetches of the state repo, failed ones included",
                                       buckets=GIT_BUCKETS, registry=self.registry)
        self.push_seconds = Histogram("winslow_node_push_seconds", "Pushes of this node's commits to main, rejected "
                                      "ones included", buckets=GIT_BUCKETS, registry=self.registry)
        self.claim_conflicts = Counter("winslow_node_claim_conflicts", "Pushes to main rejected because main moved "
                                       "on (lost claim races); the node decides again on the new tip",
                                       registry=self.registry)
        self.claims = Counter("winslow_node_claims", "Runs this node claimed, counted when the claim landed on main",
                              registry=self.registry)
        self.stage_seconds = Histogram("winslow_node_stage_duration_seconds", "How long the runs this node finished "
                                       "ran, counted when their end landed on main", ["stage", "state"],
                                       buckets=STAGE_BUCKETS, registry=self.registry)
        self.registry.register(_NodeCollector(node))
        ProcessCollector(registry=self.registry)

    def landed(self, plan: Plan) -> None:
        """A commit carrying `plan` is on main: count its claims and the runs it finished."""
        self.claims.inc(len(plan.claims))
        for _, run, fact in plan.finished:
            if fact.kind != EXITED:
                continue  # a result listing added to a run that ended before: counted when its end landed
            seconds = seconds_between(run.started, run.finished)
            if seconds is not None:
                self.stage_seconds.labels(run.stage, run.state.value).observe(max(0.0, seconds))


class _NodeCollector:
    def __init__(self, node: NodeSide) -> None:
        self._node = node
        self._runs = _PerSnapshot(lambda snapshot: _runs_on(snapshot, node.name))

    def collect(self) -> Iterator[Metric]:
        node = self._node
        info = node.heartbeat.info()
        about = InfoMetricFamily("winslow_node", "This node: its name, executor and Winslow version")
        about.add_metric([], {"node": node.name, "executor": info.executor, "version": __version__})
        yield about
        snapshot = node.view.last
        yield _by_state("winslow_node_runs", "Runs main records on this node, by state, as of the node's last read "
                        "of main", self._runs(snapshot) if snapshot is not None else {}, RunState)
        yield from _journal(node.journal)
        yield GaugeMetricFamily("winslow_node_may_claim", "1 while the node's lease holds and it may claim work; "
                                "0 while fenced", value=1 if node.heartbeat.may_claim else 0)
        history = node.heartbeat.sampler.history()
        machine = _Machines("winslow_node", [])
        machine.add([], info, LoadSample.from_dict(history[-1]) if history else None)
        yield from machine.families()


def _runs_on(snapshot: Snapshot, node: str) -> Tally[str]:
    return Tally(run.state.value for entry in snapshot.projects.values() if entry.exists
                 for run in entry.status.runs if run.node == node)


def _journal(journal: Journal) -> Iterator[Metric]:
    facts = journal.pending()
    yield GaugeMetricFamily("winslow_node_journal_backlog", "Facts (starts, exits, result listings) recorded in the "
                                                            "node's journal and not yet on main", value=len(facts))
    now = datetime.now(timezone.utc)
    times = [t for t in (parse_time(f.time) for f in facts) if t is not None]
    yield GaugeMetricFamily("winslow_node_journal_oldest_seconds", "Age of the oldest fact not yet on main; 0 when "
                            "none waits", value=max(0.0, (now - min(times)).total_seconds()) if times else 0.0)


class MetricsServer:
    """`/metrics` of a registry on a thread of its own (prometheus_client's WSGI server), until `stop()`."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        try:
            self._server, self._thread = start_http_server(port, host, registry)
        except OSError as exc:
            raise ConfigError(f"--metrics-port {port}: cannot listen on {host}: {exc.strerror or exc}") from None
        self.host, self.port = host, int(self._server.server_port)
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# -- the cluster: what the viewer sees ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterView:
    """What one scrape of the viewer reads: main, the nodes as judged now, and when the viewer last fetched."""

    snapshot: Snapshot
    nodes: Mapping[str, NodeView]
    fetched: float  # time.time() of the fetch the snapshot came from


def pending_since(entry: ProjectEntry) -> datetime | None:
    """When the project's wanted stage began to wait: its request was observed, or its last run ended."""
    status = entry.status
    times = [parse_time(status.request.since if status.request else None)]
    times += [parse_time(run.finished) for run in status.runs]
    known = [t for t in times if t is not None]
    return max(known) if known else parse_time(status.updated)


@dataclass(frozen=True)
class _Main:
    """What one snapshot of main says, counted once per snapshot."""

    projects: Tally[str]
    runs: Tally[str]
    pending: tuple[datetime | None, ...]  # when each PENDING project began to wait
    durations: HistogramMetricFamily

    @classmethod
    def of(cls, snapshot: Snapshot) -> _Main:
        entries = [entry for entry in snapshot.projects.values() if entry.exists]
        runs = [run for entry in entries for run in entry.status.runs]
        return cls(projects=Tally(ProjectState.INVALID.value if e.invalid else e.status.state.value for e in entries),
                   runs=Tally(run.state.value for run in runs),
                   pending=tuple(pending_since(e) for e in entries
                                 if not e.invalid and e.status.state is ProjectState.PENDING),
                   durations=_durations("winslow_cluster_stage_duration_seconds", "How long finished runs on main "
                                        "ran (started to finished)", runs))


class ClusterCollector:
    """Projects, runs, the queue and the nodes, read from `read()` at every scrape."""

    def __init__(self, read: Callable[[], ClusterView]) -> None:
        self._read = read
        self._main = _PerSnapshot(_Main.of)

    def collect(self) -> Iterator[Metric]:
        view = self._read()
        main = self._main(view.snapshot)
        yield _by_state("winslow_cluster_projects", "Projects on main by state", main.projects, ProjectState)
        yield _by_state("winslow_cluster_runs", "Stage runs on main by state", main.runs, RunState)
        now = datetime.now(timezone.utc)
        ages = [(now - since).total_seconds() for since in main.pending if since is not None]
        yield GaugeMetricFamily("winslow_cluster_queue_length", "PENDING projects: a stage is wanted and no node has "
                                                                "claimed it", value=len(main.pending))
        yield GaugeMetricFamily("winslow_cluster_queue_oldest_seconds", "How long the longest-waiting PENDING project "
                                "has waited; 0 when none waits", value=max([0.0, *ages]))
        yield main.durations
        yield from _nodes(view.nodes)
        yield GaugeMetricFamily("winslow_cluster_fetched_timestamp_seconds", "When the viewer last fetched the state "
                                "repo (Unix time)", value=view.fetched)


def _nodes(nodes: Mapping[str, NodeView]) -> Iterator[Metric]:
    up = GaugeMetricFamily("winslow_cluster_node_up", "1 while the node's heartbeat branch keeps moving, 0 once "
                                                      "it is lost", labels=["node"])
    heard = GaugeMetricFamily("winslow_cluster_node_heard_seconds", "Seconds since the node's heartbeat branch last "
                                                                    "moved, on the viewer's clock", labels=["node"])
    going = GaugeMetricFamily("winslow_cluster_node_runs", "Runs going on a live node, as its heartbeat says",
                              labels=["node"])
    machines = _Machines("winslow_cluster_node", ["node"])
    for name, node in sorted(nodes.items()):
        up.add_metric([name], 0 if node.lost else 1)
        if node.heard_ago is not None:
            heard.add_metric([name], node.heard_ago)
        if node.info is not None and not node.lost:  # a lost node's last load and runs are history, not now
            going.add_metric([name], len(node.info.runs))
            machines.add([name], node.info, node.info.load)
    yield from (up, heard, going, *machines.families())


def cluster_registry(read: Callable[[], ClusterView]) -> CollectorRegistry:
    """The viewer's registry: the cluster as `read()` returns it at each scrape, and the viewer's own process."""
    registry = CollectorRegistry()
    registry.register(ClusterCollector(read))
    ProcessCollector(registry=registry)
    return registry
