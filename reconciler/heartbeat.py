"""This node's heartbeat: its branch `winslow/nodes/<node>`, kept fresh, and the lease that fences it.

Every beat commits `nodes/<node>.yaml` (capacity, load, running runs with their log
tails; shaped by `node_document` exactly as `schema/node.schema.json` says) on top
of the previous beat and force-pushes the node's own branch; every `SQUASH_EVERY`
beats the branch restarts from one parentless commit, so it stays short. Each beat
changes only a tiny tick file; the node file itself is rewritten when runs, log
tails or capacity change, and for a fresh load sample every `LOAD_EVERY` beats, so
a quiet node adds a few hundred bytes to the remote per beat.

A run's log tail is looked at every `TAIL_CHECK` seconds while runs are going; when it
changed, the beat comes early (at most once per `TAIL_EVERY` seconds), so `winslow logs
--follow` shows output within about a second, not in heartbeat-sized bursts. A run that
prints nothing costs nothing extra: its beats stay at the heartbeat interval.

The heartbeat asks the node for one thing (its runs, as `NodeSide.heartbeat_runs`)
and tells it one thing (`NodeSide.cut_off`: the lease ran out, stop everything).
The lease is checked on its own, whether or not the beat before it succeeded.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from reconciler import __version__, layout
from reconciler.clock import utcnow
from reconciler.errors import GitError
from reconciler.fencing import Fence, write_lease, write_shared_lease
from reconciler.gitsync import Mirror
from reconciler.machine import LoadSampler, Nvml, read_capacity
from reconciler.model import NodeInfo
from reconciler.settings import Settings
from reconciler.yamlsafe import dump_yaml

log = logging.getLogger("winslow.heartbeat")
SQUASH_EVERY = 120
LOAD_EVERY = 6  # beats between load samples on the branch (the viewer's charts): 30 s at the default 5 s
TAIL_EVERY = 1.0   # the most often a changed log tail is pushed ahead of its beat: bounds the remote's growth
TAIL_CHECK = 0.25  # how often running runs' tails are looked at (TAIL_EVERY while none run, to see one start)
_CAPACITY_GPU_KEYS = ("index", "uuid", "model", "memory")
_RUN_KEYS = ("project", "run", "stage", "gpus", "started", "log_tail")


class NodeSide(Protocol):
    """What the heartbeat needs from the node it beats for."""

    def heartbeat_runs(self) -> list[dict[str, Any]]:
        """The node's running runs: project, run, stage, gpus, started and the masked tail of the log."""

    def cut_off(self, silent: float) -> None:
        """The heartbeat has not got through for `silent` seconds, past the lease: stop every run."""

    def degraded(self) -> str | None:
        """Why its cycles keep failing, or None while they work."""

    def gpus_vanished(self, gpus: list[int]) -> None:
        """These GPUs are gone from the node: the runs on them cannot go on."""


class Heartbeat:
    def __init__(self, name: str, mirror: Mirror, settings: Settings, fence: Fence, node: NodeSide,
                 executor: str, tags: Iterable[str] = (), nvml: Nvml | None = None,
                 lease_file: Path | None = None) -> None:
        self.name = name
        self.lease_file = lease_file  # where the stages' supervisors read until when the lease holds
        self.shared_lease: Path | None = None  # ... and those on other machines (Slurm jobs), on the shared storage
        self.mirror = mirror
        self.settings = settings
        self.fence = fence
        self.node = node
        self.executor = executor
        self.flag_tags = tuple(tags)
        nvml = nvml if nvml is not None else Nvml()
        self.nvml = nvml
        self.capacity = read_capacity(nvml)
        self.sampler = LoadSampler(settings.current.heartbeat, nvml=nvml)
        self.started = utcnow()
        self.tick = 0
        self._parent: str | None = None
        self._beats_on_branch = 0
        self._last_ok = time.monotonic()
        self._last_beat = 0.0
        self._beats_since_sample = LOAD_EVERY
        self._load: dict[str, Any] = {}
        self._content = b""
        self._runs: list[dict[str, Any]] | None = None  # the runs of the last beat pushed; None after a failed one
        self._stop = threading.Event()
        self._now = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def tags(self) -> tuple[str, ...]:
        own = self.settings.current.nodes.get(self.name)
        return self.flag_tags + (own.tags if own else ())

    def info(self) -> NodeInfo:
        """This node as the others see it, for this node's own decisions."""
        return NodeInfo.from_dict({"name": self.name, "capacity": self.capacity, "tags": list(self.tags),
                                   "executor": self.executor, "tick": self.tick})

    def _detect_gpus(self) -> None:
        """GPUs are looked for at every regular beat: one that appears (a driver installed later) or vanishes
        (fell off the bus, an NVML error) changes the capacity this beat carries; runs on a vanished one end."""
        capacity = read_capacity(self.nvml)
        if capacity["gpus"] == self.capacity["gpus"]:
            return
        before = {g.get("uuid") or g["index"]: g["index"] for g in self.capacity["gpus"]}
        now = {g.get("uuid") or g["index"] for g in capacity["gpus"]}
        gone = sorted(index for key, index in before.items() if key not in now)
        log.warning("%s: GPUs changed: %d before, %d now%s", self.name, len(before), len(capacity["gpus"]),
                    f"; GPU {', '.join(map(str, gone))} vanished" if gone else "")
        self.capacity = capacity
        if gone:
            self.node.gpus_vanished(gone)

    def renew_lease(self, since: float) -> None:
        """The lease holds for `lease` seconds from `since` (wall clock): tell the stages' supervisors."""
        expires = since + self.settings.current.lease
        for path, write in ((self.lease_file, write_lease), (self.shared_lease, write_shared_lease)):
            if path is None:
                continue
            try:
                write(path, expires)
            except OSError as exc:
                log.warning("%s: cannot write the lease file %s: %s", self.name, path, exc)

    @property
    def may_claim(self) -> bool:
        """False while fenced, or once the lease ran out: others may already have declared this node lost."""
        return not self.fence.fenced and time.monotonic() - self._last_ok < self.settings.current.lease

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
            config = self.settings.current
            look = TAIL_CHECK if self._runs else TAIL_EVERY
            self._now.wait(min(config.heartbeat, max(0.5, config.lease / 4), look))
            self._now.clear()
            if self._stop.is_set():
                return
            try:
                since = time.monotonic() - self._last_beat
                if since >= config.heartbeat:
                    self.beat()
                elif since >= TAIL_EVERY and self._runs_changed():
                    self.beat(early=True)
            except Exception:  # the heartbeat must outlive any one failure, or the node is declared lost
                log.exception("%s: heartbeat failed", self.name)
            try:  # on its own: fencing must not depend on the beat having worked
                self._check_lease()
            except Exception:
                log.exception("%s: lease check failed", self.name)

    def _runs_changed(self) -> bool:
        """A run started, ended or printed since the last beat got through (after a failed one, wait for the next)."""
        if self._runs is None:
            return False
        try:
            runs = self.node.heartbeat_runs()
        except Exception:  # noqa: BLE001 - an early beat is a courtesy; the regular one reports the failure
            return False
        return [_run_entry(run) for run in runs] != self._runs

    def _check_lease(self) -> None:
        silent = time.monotonic() - self._last_ok
        if silent >= self.settings.current.lease:
            self.node.cut_off(silent)

    def document(self) -> dict[str, Any]:
        """What others read about this node; it changes only when something changed."""
        own = self.settings.current.nodes.get(self.name)
        return node_document(name=self.name, version=__version__, executor=self.executor, started=self.started,
                             tick=None, tags=list(self.tags), drain=bool(own and own.drain), capacity=self.capacity,
                             load=self._load, history=self.sampler.history(), runs=self.node.heartbeat_runs(),
                             fenced=not self.may_claim, settings_held=self.settings.held,
                             degraded=self.node.degraded())

    def beat(self, early: bool = False) -> None:
        """Push the tick (always) and the node file (when it changed, or its load is a minute old).

        An early beat (a log tail changed) leaves the load samples on their heartbeat-paced schedule.
        """
        self.tick += 1
        self._last_beat = time.monotonic()
        if not early:
            self._detect_gpus()
        began = time.monotonic()
        self._beats_since_sample += 0 if early else 1
        if self._beats_since_sample >= LOAD_EVERY:
            self._load = self.sampler.sample()
            self._beats_since_sample = 0
        changes = {layout.node_tick(self.name): f"{self.tick}\n".encode()}
        document = self.document()
        content = dump_yaml(document).encode()
        parent = self._parent if self._beats_on_branch < SQUASH_EVERY else None
        if content != self._content or parent is None:  # a fresh branch carries the whole node file
            changes[layout.node_file(self.name)] = content
        try:
            commit = self.mirror.commit(parent, changes, f"{self.name}: heartbeat {self.tick}")
            self.mirror.push_heartbeat(layout.node_branch(self.name), commit,
                                       timeout=max(2.0, self.settings.current.lease / 4))
        except GitError as exc:
            log.warning("%s: heartbeat not pushed (%s); %.0fs without one", self.name, exc,
                        time.monotonic() - self._last_ok)
            self._runs = None
            return
        self._parent, self._content, self._runs = commit, content, document["runs"]
        self._beats_on_branch = 1 if parent is None else self._beats_on_branch + 1
        self._last_ok = began  # the lease counts from when the push began, not when it ended
        self.renew_lease(time.time() - (time.monotonic() - began))
        if self.fence.renewed():
            log.info("%s: heartbeat renewed; the node takes work again", self.name)


def node_document(
    name: str,
    version: str,
    executor: str,
    started: str,
    tick: int | None,
    tags: Iterable[str],
    drain: bool,
    capacity: Mapping[str, Any],
    load: Mapping[str, Any] | None,
    history: Iterable[Mapping[str, Any]],
    runs: Iterable[Mapping[str, Any]],
    heartbeat: str | None = None,
    fenced: bool = False,
    settings_held: str | None = None,
    degraded: str | None = None,
) -> dict[str, Any]:
    """`nodes/<node>.yaml`: keys and shapes exactly as `schema/node.schema.json` allows."""
    document: dict[str, Any] = {
        "name": name,
        "version": version,
        "executor": executor,
        "started": started,
    }
    if tick is not None:  # the node branch keeps its tick in nodes/<node>.tick instead
        document["tick"] = int(tick)
    if heartbeat is not None:
        document["heartbeat"] = heartbeat
    document["tags"] = list(tags)
    document["drain"] = bool(drain)
    if fenced:
        document["fenced"] = True
    if settings_held is not None:
        document["settings_held"] = settings_held
    if degraded is not None:
        document["degraded"] = degraded
    document["capacity"] = {
        "cpus": capacity.get("cpus", 1),
        "memory": int(capacity.get("memory", 0)),
        "gpus": [{k: g[k] for k in _CAPACITY_GPU_KEYS if k in g} for g in capacity.get("gpus", ())],
    }
    if load is not None:
        document["load"] = dict(load)
    document["history"] = [dict(sample) for sample in history]
    document["runs"] = [_run_entry(run) for run in runs]
    return document


def _run_entry(run: Mapping[str, Any]) -> dict[str, Any]:
    entry = {k: run[k] for k in _RUN_KEYS if k in run}
    if "gpus" in entry:
        entry["gpus"] = [int(g) for g in entry["gpus"]]
    return entry
