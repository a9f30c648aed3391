"""This node's heartbeat: its branch `winslow/nodes/<node>`, kept fresh, and self-fencing.

Every beat commits `nodes/<node>.yaml` (capacity, load, running runs with
their log tails) on top of the previous beat and force-pushes the node's own
branch; every `SQUASH_EVERY` beats the branch restarts from one parentless
commit, so it stays short. A node that cannot renew its heartbeat for the
lease time stops its own containers: by then the others may have declared it
lost and started the work elsewhere.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from reconciler import __version__
from reconciler.errors import GitError
from reconciler.executors.base import utcnow
from reconciler.heartbeat import LoadSampler, Nvml, node_document, read_capacity
from reconciler.model import ClusterConfig, NodeInfo
from reconciler.storage import read_tail
from reconciler.yamlsafe import dump_yaml

if TYPE_CHECKING:
    from reconciler.node import Node, NodeOptions

log = logging.getLogger("winslow.pulse")
SQUASH_EVERY = 60


class Heartbeat:
    def __init__(self, node: Node, options: NodeOptions) -> None:
        self.node = node
        self.options = options
        self.config = ClusterConfig()
        nvml = Nvml()
        self.capacity = read_capacity(nvml)
        self.sampler = LoadSampler(self.config.heartbeat, nvml=nvml)
        self.started = utcnow()
        self.tick = 0
        self._parent: str | None = None
        self._beats_on_branch = 0
        self._last_ok = time.monotonic()
        self._stop = threading.Event()
        self._now = threading.Event()
        self._thread: threading.Thread | None = None
        self.fenced = False

    def info(self) -> NodeInfo:
        settings = self.config.nodes.get(self.node.name)
        return NodeInfo.from_dict({"name": self.node.name, "capacity": self.capacity,
                                   "tags": list(self.options.tags) + list(settings.tags if settings else ()),
                                   "executor": self.node.executor.name, "tick": self.tick})

    def start(self) -> None:
        self.beat()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._now.set()
        if self._thread:
            self._thread.join(timeout=10)

    def soon(self) -> None:
        """Beat now (runs changed) instead of at the next interval."""
        self._now.set()

    def remote_ok(self) -> None:
        self._last_ok = time.monotonic()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._now.wait(self.config.heartbeat)
            self._now.clear()
            if self._stop.is_set():
                return
            self.beat()

    def document(self) -> dict:
        node = self.node
        snapshot = node.reader.last
        runs = []
        for running in node.executor.running():
            entry = snapshot.projects.get(running.project) if snapshot else None
            run = entry.status.run(running.run_id) if entry else None
            runs.append({"project": running.project, "run": running.run_id, "stage": run.stage if run else "",
                         "gpus": list(run.gpus) if run else [], "started": running.started,
                         "log_tail": node.secrets.mask(read_tail(node.storage.log_path(running.project, running.run_id),
                                                                 self.config.live_tail).encode()).decode("utf-8", "replace")})
        settings = self.config.nodes.get(node.name)
        load = self.sampler.sample()
        return node_document(name=node.name, version=__version__, executor=node.executor.name, started=self.started,
                             tick=self.tick, tags=[t for t in self.info().tags], drain=bool(settings and settings.drain),
                             capacity=self.capacity, load=load, history=self.sampler.history(), runs=runs)

    def beat(self) -> None:
        self.tick += 1
        repo = self.node.repo
        name = self.node.name
        try:
            content = dump_yaml(self.document()).encode()
            parent = self._parent if self._beats_on_branch < SQUASH_EVERY else None
            commit = repo.commit(parent, {f"nodes/{name}.yaml": content}, f"{name}: heartbeat {self.tick}")
            repo.push([f"+{commit}:refs/heads/winslow/nodes/{name}"], timeout=max(5.0, self.config.lease / 2))
            self._parent = commit
            self._beats_on_branch = 1 if parent is None else self._beats_on_branch + 1
            self._last_ok = time.monotonic()
            if self.fenced:
                log.info("%s: heartbeat renewed; the node takes work again", name)
            self.fenced = False
        except GitError as exc:
            silent = time.monotonic() - self._last_ok
            log.warning("%s: heartbeat not pushed (%s); %.0fs without one", name, exc, silent)
            if silent >= self.config.lease and not self.fenced:
                self._fence(silent)

    def _fence(self, silent: float) -> None:
        self.fenced = True
        reason = f"fenced: {self.node.name} could not renew its heartbeat for {silent:.0f}s"
        for running in self.node.executor.running():
            log.warning("%s/%s: %s", running.project, running.run_id, reason)
            self.node.executor.stop(running.project, running.run_id, reason)
