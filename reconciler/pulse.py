"""This node's heartbeat: its branch `winslow/nodes/<node>`, kept fresh, and self-fencing.

Every beat commits `nodes/<node>.yaml` (capacity, load, running runs with
their log tails) on top of the previous beat and force-pushes the node's own
branch; every `SQUASH_EVERY` beats the branch restarts from one parentless
commit, so it stays short. Each beat changes only a tiny tick file; the node
file itself is rewritten when runs, log tails or capacity change, and for a
fresh load sample every `LOAD_EVERY` beats, so a quiet node adds a few
hundred bytes to the remote per beat. A node that cannot renew its heartbeat for the
lease time stops its own containers: by then the others may have declared it
lost and started the work elsewhere.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from reconciler import __version__, layout
from reconciler.errors import GitError
from reconciler.clock import utcnow
from reconciler.heartbeat import LoadSampler, Nvml, node_document, read_capacity
from reconciler.model import ClusterConfig, NodeInfo
from reconciler.storage import read_tail
from reconciler.yamlsafe import dump_yaml

if TYPE_CHECKING:
    from reconciler.node import Node, NodeOptions

log = logging.getLogger("winslow.pulse")
SQUASH_EVERY = 120
LOAD_EVERY = 6  # beats between load samples on the branch (the viewer's charts): 30 s at the default 5 s


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
        self._last_beat = 0.0
        self._beats_since_sample = LOAD_EVERY
        self._load: dict = {}
        self._content = b""
        self._stop = threading.Event()
        self._now = threading.Event()
        self._thread: threading.Thread | None = None
        self.fenced = False

    def info(self) -> NodeInfo:
        settings = self.config.nodes.get(self.node.name)
        return NodeInfo.from_dict({"name": self.node.name, "capacity": self.capacity,
                                   "tags": list(self.options.tags) + list(settings.tags if settings else ()),
                                   "executor": self.node.executor.name, "tick": self.tick})

    @property
    def may_claim(self) -> bool:
        """False while fenced: others may already have declared this node lost."""
        return not self.fenced and time.monotonic() - self._last_ok < self.config.lease

    def start(self) -> None:
        self.beat()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._now.set()
        if self._thread:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._now.wait(min(self.config.heartbeat, max(0.5, self.config.lease / 4)))
            self._now.clear()
            if self._stop.is_set():
                return
            try:
                if time.monotonic() - self._last_beat >= self.config.heartbeat:
                    self.beat()
                self._check_lease()
            except Exception:  # the heartbeat must outlive any one failure, or the node is declared lost
                log.exception("%s: heartbeat failed", self.node.name)

    def _check_lease(self) -> None:
        silent = time.monotonic() - self._last_ok
        if silent >= self.config.lease:
            self._fence(silent)

    def document(self) -> dict:
        """What others read about this node; it changes only when something changed."""
        node = self.node
        snapshot = node.view.last
        runs = []
        for running in node.executor.running():
            entry = snapshot.projects.get(running.project) if snapshot else None
            run = entry.status.run(running.run_id) if entry else None
            tail = read_tail(node.storage.log_path(running.project, running.run_id), self.config.live_tail)
            runs.append({"project": running.project, "run": running.run_id, "stage": run.stage if run else "",
                         "gpus": list(run.gpus) if run else [], "started": running.started,
                         "log_tail": node.secrets.mask(tail.encode()).decode("utf-8", "replace")})
        settings = self.config.nodes.get(node.name)
        return node_document(name=node.name, version=__version__, executor=node.executor.name, started=self.started,
                             tick=None, tags=list(self.info().tags), drain=bool(settings and settings.drain),
                             capacity=self.capacity, load=self._load, history=self.sampler.history(), runs=runs)

    def beat(self) -> None:
        """Push the tick (always) and the node file (when it changed, or its load is a minute old)."""
        self.tick += 1
        self._last_beat = time.monotonic()
        repo = self.node.repo
        name = self.node.name
        began = time.monotonic()
        self._beats_since_sample += 1
        if self._beats_since_sample >= LOAD_EVERY:
            self._load = self.sampler.sample()
            self._beats_since_sample = 0
        changes = {layout.node_tick(name): f"{self.tick}\n".encode()}
        content = dump_yaml(self.document()).encode()
        if content != self._content:
            changes[layout.node_file(name)] = content
        parent = self._parent if self._beats_on_branch < SQUASH_EVERY else None
        if parent is None:  # a fresh branch carries the whole node file
            changes[layout.node_file(name)] = content
        try:
            commit = repo.commit(parent, changes, f"{name}: heartbeat {self.tick}")
            repo.push([f"+{commit}:refs/heads/{layout.node_branch(name)}"], timeout=max(2.0, self.config.lease / 4))
        except GitError as exc:
            log.warning("%s: heartbeat not pushed (%s); %.0fs without one", name, exc, time.monotonic() - self._last_ok)
            return
        self._parent, self._content = commit, content
        self._beats_on_branch = 1 if parent is None else self._beats_on_branch + 1
        self._last_ok = began  # the lease counts from when the push began, not when it ended
        if self.fenced:
            log.info("%s: heartbeat renewed; the node takes work again", name)
        self.fenced = False

    def _fence(self, silent: float) -> None:
        """Stop every local run; others may have started them elsewhere by now."""
        reason = f"fenced: {self.node.name} could not renew its heartbeat for {silent:.0f}s"
        self.fenced = True
        for running in self.node.executor.running():
            if (running.project, running.run_id) in self.node.fenced_runs:
                continue
            log.warning("%s/%s: %s", running.project, running.run_id, reason)
            self.node.fenced_runs.add((running.project, running.run_id))
            try:
                self.node.executor.stop(running.project, running.run_id, reason)
            except Exception:
                log.exception("%s/%s: could not stop", running.project, running.run_id)
