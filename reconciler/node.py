"""The node daemon: sync -> decide -> act -> report, woken by events.

One thread runs the cycle; a second keeps the heartbeat branch fresh; the
executor's threads report exits; a watcher reports remote changes. All of
them only set the `wake` event or write to the journal: the cycle is the one
place that reads the state repo and commits.
"""
from __future__ import annotations

import gc
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from reconciler import buildplan, layout
from reconciler.buildplan import BUILDS_PROJECT, BUILT, BuildClaim
from reconciler.clock import utcnow
from reconciler.decide import Claim, Me, Plan, Resume, World, decide
from reconciler.errors import ConfigError, ExecutorError, GitError, PushRejected, StorageError, WinslowError
from reconciler.executors import LOST_REASON, make_executor
from reconciler.executors.base import ExitInfo, LaunchSpec, StartInfo
from reconciler.facts import EXITED, LISTED, QUEUED, STARTED, Fact
from reconciler.fencing import FENCED, LEASE_FILE, Fence
from reconciler.gitsync import Mirror
from reconciler.heartbeat import Heartbeat
from reconciler.journal import Journal
from reconciler.lister import Lister
from reconciler.liveness import Liveness
from reconciler.manifests import HashCache, build_manifest
from reconciler.memory import DecisionMemory, Inputs
from reconciler.metrics import NodeMetrics
from reconciler.model import ClusterConfig, ProjectState, RunState, SlurmSettings, queued_event
from reconciler.report import changes, message
from reconciler.repoview import RepoView
from reconciler.resume import prune_branches, push_resume
from reconciler.secrets import SecretStore
from reconciler.settings import Settings
from reconciler.snapshot import HeldConfig, Snapshot
from reconciler.storage import LocalStorage, read_tail
from reconciler.wake import RemoteWatcher

log = logging.getLogger("winslow.node")
MAX_CAS_RETRIES = 20
LARGE_READ = 1000  # projects read at once after which the snapshot is kept out of garbage collections
LISTING_GRACE_S = 0.1  # how long an exit waits for its manifest before it is committed without it
LAUNCHERS = 8  # container starts at once: each waits on the engine, not on this process
DEGRADED_AFTER = 3  # cycles failing in a row after which the node's heartbeat says it is degraded
OUTAGE_MAX_WAIT_S = 30.0  # the longest pause between tries while the state repo cannot be reached


class _Clock:
    """Milliseconds spent in each phase of a cycle, for the debug log."""

    def __init__(self) -> None:
        self._last = time.perf_counter()
        self.laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps.append((name, (now - self._last) * 1000))
        self._last = now

    def __str__(self) -> str:
        return " ".join(f"{name} {ms:.0f}ms" for name, ms in self.laps)


@dataclass
class NodeOptions:
    name: str
    repo: str
    storage: Path | None  # None: storage.root of winslow.yaml on main
    work: Path
    executor: str = "process"
    secrets: Path | None = None
    tags: tuple[str, ...] = ()
    heartbeat: float | None = None   # overrides winslow.yaml when given
    node_timeout: float | None = None
    lease: float | None = None
    poll: float | None = None
    slurm: SlurmSettings = SlurmSettings()  # --slurm-* flags, over winslow.yaml's nodes.<name>.slurm
    slurm_container: str | None = None  # --slurm-container: "docker" runs the stage's image inside the job


def _keep_out_of_collections() -> None:
    """After a large read: the snapshot's many long-lived objects leave the cyclic collector's scans.

    They are acyclic and freed by reference counting when a later snapshot replaces them;
    without this, every full collection would walk them all (over 100 ms at 10,000
    projects). The last frozen set is collected once first, so cyclic garbage is kept at
    most from one large read to the next.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _fields(project: str, run_id: str, node: str | None, event: str) -> dict[str, str | None]:
    """The fields a JSON log line (`winslow node --log-format json`) carries beside the message."""
    return {"project": project, "run": run_id, "node": node, "event": event}


def _git_words(exc: GitError) -> str:
    """What git said, without the command and folder this process ran it in."""
    text = str(exc)
    return text.split(": ", 1)[1] if text.startswith("git ") and ": " in text else text


class Node:
    def __init__(self, options: NodeOptions) -> None:
        self.options = options
        self.name = options.name
        options.work.mkdir(parents=True, exist_ok=True)
        identity = {"GIT_AUTHOR_NAME": f"winslow {self.name}", "GIT_AUTHOR_EMAIL": f"{self.name}@winslow",
                    "GIT_COMMITTER_NAME": f"winslow {self.name}", "GIT_COMMITTER_EMAIL": f"{self.name}@winslow"}
        self.repo = Mirror(options.repo, options.work / "state.git", identity)
        self.view = RepoView(git=self.repo.reader)
        self._storage = LocalStorage(options.storage) if options.storage else None  # else settled in start()
        self.journal = Journal(options.work / "journal.jsonl")
        self.secrets = SecretStore(options.secrets, options.name)
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.settings = Settings({"heartbeat": options.heartbeat, "node_timeout": options.node_timeout,
                                  "lease": options.lease, "poll": options.poll})
        self.executor = make_executor(options.executor, self.name, self._on_exit, options.work, options.repo,
                                      slurm=self._slurm_settings, container=options.slurm_container)
        self.executor.on_start = self._on_start
        self._shared_lease: Path | None = None  # the lease on the storage, for supervisors on other machines
        self.liveness = Liveness(self.name)
        self.fence = Fence()
        self.heartbeat = Heartbeat(self.name, self.repo, self.settings, self.fence, self, self.executor.name,
                                   options.tags, nvml=getattr(self.executor, "machine", None),  # a Slurm partition's
                                   lease_file=options.work / LEASE_FILE)
        self.hashes = HashCache(options.work / "hashes.jsonl")
        self.lister = Lister(options.work / "to-list", self._manifest, self.journal, self.wake)
        self.watcher: RemoteWatcher | None = None
        self.memory = DecisionMemory()
        self._launching: set[tuple[str, str]] = set()  # claimed runs whose start is under way
        self._building: set[str] = set()  # "<image>/<source>" builds under way (guarded by _pending_lock)
        self._pending_lock = threading.Lock()  # guards the launches and branch pushes under way
        self._launcher = ThreadPoolExecutor(max_workers=LAUNCHERS, thread_name_prefix="launch")
        self._branches = ThreadPoolExecutor(max_workers=1, thread_name_prefix="branches")
        self._branching: set[str] = set()  # resume branches being pushed or pruned
        self._missing_projects: dict[str, float] = {}
        self._held_config: HeldConfig | None = None  # winslow.yaml is invalid: what this node said about it
        self._refused_root: str | None = None  # a storage.root this node said it does not take
        self._outage: set[str] = set()  # what git said (each message once) since the remote became unreachable
        self._failures = 0  # fetches or pushes in a row that could not reach the remote
        self._stop_reason = "asked to stop"
        self._cycle_failures = 0  # cycles in a row that raised: past DEGRADED_AFTER the heartbeat says so
        self._cycle_error: str | None = None
        self._fetched = 0.0
        self._last_housekeeping = 0.0
        self.cycles = 0
        self.metrics = NodeMetrics(self)  # served by `winslow node --metrics-port`

    def _slurm_settings(self) -> SlurmSettings:
        """Where a Slurm node submits now: its flags over winslow.yaml's settings for it."""
        own = self.settings.current.nodes.get(self.name)
        return self.options.slurm.over(own.slurm if own else None)

    @property
    def storage(self) -> LocalStorage:
        if self._storage is None:
            raise StorageError(f"{self.name} has not settled its storage yet (start() does)")
        return self._storage

    # -- events from other threads ------------------------------------------------------------
    def _on_exit(self, info: ExitInfo) -> None:
        """Record the exit at once; the workspace is listed and hashed afterwards (`lister.py`)."""
        # Ended by fencing, here or by its supervisor while this node was frozen, or stopped because the machine
        # failed it (the reason says so, also to a later life of the node): the node's failure, not the program's.
        info = replace(info, reason=self._masked(info.reason)) if info.reason else info
        lost = self.fence.ended((info.project, info.run_id)) or (info.reason or "").startswith((FENCED, LOST_REASON))
        if info.reason and info.reason.startswith(LOST_REASON):  # an executor's word for it: the state says LOST
            info = replace(info, reason=info.reason.removeprefix(LOST_REASON))
        self.lister.list_later(info.project, info.run_id)  # first: a cycle that sees the exit knows it is being listed
        self.journal.record(Fact(EXITED, info.project, info.run_id, info.finished, info.exit_code, info.reason,
                                 lost=lost))
        log.info("%s/%s on %s: exited %s%s", info.project, info.run_id, self.name, info.exit_code,
                 f" ({info.reason})" if info.reason else "", extra=_fields(info.project, info.run_id, self.name, "exited"))
        self.wake.set()

    def _on_start(self, project: str, run_id: str, info: StartInfo) -> None:
        """A run that waited in its executor's queue (a Slurm job PENDING) waits for a new reason, or has begun."""
        self._record_start(project, run_id, info)
        self.wake.set()
        if info.started is not None:
            log.info("%s/%s on %s: started (it left the queue)", project, run_id, self.name,
                     extra=_fields(project, run_id, self.name, "started"))

    def _record_start(self, project: str, run_id: str, info: StartInfo,
                      inputs: tuple[dict[str, Any], ...] = ()) -> None:
        """The fact of a start, or of a run queued instead: for the next commit."""
        if info.started is None:
            where = queued_event(info.queue or self.executor.name, self.name, info.reason)
            queued = Fact(QUEUED, project, run_id, utcnow(), reason=self._masked(where), inputs=inputs)
            self.memory.started(queued)  # held a moment too: a job that starts at once never shows PENDING
            self.journal.record(queued)
            log.info("%s/%s on %s: %s", project, run_id, self.name, where,
                     extra=_fields(project, run_id, self.name, "queued"))
            return
        fact = Fact(STARTED, project, run_id, info.started, image_digest=info.image_digest, pulled=info.pulled,
                    inputs=inputs)
        self.memory.started(fact)
        self.journal.record(fact)

    def _manifest(self, project: str, run_id: str) -> dict[str, Any]:
        key = layout.workspace(project, run_id)
        as_made = self.storage.root / key  # not resolved: a run that swapped its workspace for a link lists nothing
        folder = as_made if as_made.is_symlink() else self.storage.workspace(project, run_id)
        return build_manifest(folder, key, self.hashes)

    # -- what the heartbeat asks and tells ------------------------------------------------------
    def _masked(self, text: str) -> str:
        """Text that leaves the node (reasons, commit messages), with every secret's value masked."""
        return self.secrets.mask(text.encode("utf-8", "surrogateescape")).decode("utf-8", "surrogateescape")

    def gpus_vanished(self, gpus: list[int]) -> None:
        """Stop the runs on GPUs that vanished; they end LOST (the machine's failure) and are placed again."""
        snapshot = self.view.last
        for running in self.executor.running():
            entry = snapshot.projects.get(running.project) if snapshot else None
            run = entry.status.run(running.run_id) if entry else None
            lost = sorted(set(run.gpus) & set(gpus)) if run else []
            if not lost:
                continue
            reason = f"GPU {', '.join(map(str, lost))} of {self.name} vanished (NVML no longer reports it)"
            log.warning("%s/%s on %s: stopping: %s", running.project, running.run_id, self.name, reason,
                        extra=_fields(running.project, running.run_id, self.name, "gpu vanished"))
            try:
                self.executor.stop(running.project, running.run_id, LOST_REASON + reason)
            except Exception:  # noqa: BLE001 - one run that cannot be stopped does not keep the others going
                log.exception("%s/%s: could not stop", running.project, running.run_id)

    def degraded(self) -> str | None:
        if self._cycle_failures < DEGRADED_AFTER:
            return None
        return self._masked(f"{self._cycle_failures} cycles in a row failed: {self._cycle_error}")

    def _cycle_failed(self, exc: Exception) -> None:
        """Said with its traceback the first time, then once per different error; counted for the heartbeat."""
        self._cycle_failures += 1
        error = f"{type(exc).__name__}: {exc}"
        if error != self._cycle_error:
            log.exception("%s: cycle failed (%s); trying again shortly", self.name, error)
        self._cycle_error = error

    def heartbeat_runs(self) -> list[dict[str, Any]]:
        snapshot = self.view.last
        live_tail = self.settings.current.live_tail
        runs = []
        for running in self.executor.running():
            entry = snapshot.projects.get(running.project) if snapshot else None
            run = entry.status.run(running.run_id) if entry else None
            try:
                tail = read_tail(self.storage.log_path(running.project, running.run_id), live_tail,
                                 self.secrets.mask, self.secrets.longest)
            except StorageError:
                tail = ""
            runs.append({"project": running.project, "run": running.run_id, "stage": run.stage if run else "",
                         "gpus": list(run.gpus) if run else [], "started": running.started,
                         "log_tail": self.secrets.mask(tail.encode()).decode("utf-8", "replace")})
        return runs

    def cut_off(self, silent: float) -> None:
        """Stop every local run: others may have declared this node lost and started them elsewhere."""
        reason = f"fenced: {self.name} could not renew its heartbeat for {silent:.0f}s"
        running = [(r.project, r.run_id) for r in self.executor.running()]
        for project, run_id in self.fence.cut_off(running):
            log.warning("%s/%s on %s: %s", project, run_id, self.name, reason,
                        extra=_fields(project, run_id, self.name, "fenced"))
            try:
                self.executor.stop(project, run_id, reason)
            except Exception:
                log.exception("%s/%s: could not stop", project, run_id)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Reach the state repo, settle where the storage is, adopt runs of an earlier life, start the threads.

        ConfigError when the remote was never reached (a wrong --repo fails at once, with git's own words)
        or no storage is named; a remote that was reached before and is down now is an outage: the node
        carries on with what is local and keeps trying.
        """
        self.repo.open()
        try:
            self.repo.fetch(skip_node=self.name)
        except GitError as exc:
            if self.repo.reader.resolve(layout.ORIGIN_MAIN) is None:
                raise ConfigError(f"cannot reach the state repo {self.options.repo}: {_git_words(exc)}") from None
            log.warning("%s: the state repo is unreachable (%s); carrying on with what is local", self.name,
                        _git_words(exc))
            self._outage.add(_git_words(exc))
        if self._storage is None:
            self._storage = LocalStorage(self._storage_from_settings())
        self.storage.prepare()
        if getattr(self.executor, "shared_lease", False):  # its runs' supervisors (Slurm jobs) run on other machines
            self._shared_lease = self.storage.root / layout.storage_lease(self.name)
            self.heartbeat.shared_lease = self._shared_lease
        self.heartbeat.renew_lease(time.time())  # this node is alive now: the supervisors of its runs may go on
        self.executor.running()  # adopt the containers of an earlier life of this node
        self.lister.start()
        self.heartbeat.start()
        self.watcher = RemoteWatcher(self.options.repo, self.wake, self._config().poll, heartbeats=False)
        self.watcher.start()
        log.info("node %s up: repo %s, storage %s, executor %s", self.name, self.options.repo,
                 self.storage.root, self.executor.name)

    def request_stop(self, why: str) -> None:
        """From a signal handler: the loop ends after its cycle; `stop()` says why."""
        self._stop_reason = why
        self.stopping.set()
        self.wake.set()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        if self.watcher:
            self.watcher.stop()
        self._launcher.shutdown(wait=True, cancel_futures=False)  # a start under way ends with its fact recorded
        self._say_stopping()
        self._branches.shutdown(wait=True, cancel_futures=True)
        self.heartbeat.stop()
        self.lister.stop()
        self.hashes.close()
        self.executor.close()
        self.repo.close()

    def run_forever(self) -> None:
        self.start()
        try:
            while not self.stopping.is_set():
                self.wake.clear()
                timeout = self.step()
                self.wake.wait(timeout)
        finally:
            self.stop()

    # -- the cycle ----------------------------------------------------------------------------
    def _config(self) -> ClusterConfig:  # the cluster config of the last snapshot, with flags on top
        return self.settings.current

    def step(self) -> float:
        """Fetch, then cycle until the plan lands; returns how long to sleep at most."""
        began = time.monotonic()
        try:
            with self.metrics.fetch_seconds.time():
                self.repo.fetch(skip_node=self.name)
            log.debug("fetch %.0fms", (time.monotonic() - began) * 1000)
            self._fetched = began  # the view is as fresh as the remote was when the fetch began
            self.liveness.clock.fetched(True, began)
            self._reachable()
        except GitError as exc:
            self.liveness.clock.fetched(False, began)
            self._unreachable(exc)
        for attempt in range(MAX_CAS_RETRIES):
            try:
                landed = self.cycle()
            except PushRejected:
                log.debug("claim race lost: main moved on; deciding again on the new tip")
                self.metrics.claim_conflicts.inc()
                landed = False
            except GitError as exc:
                return self._unreachable(exc)
            except Exception as exc:  # noqa: BLE001 - a bug must not take the node (and its running stages' reports) down
                self._cycle_failed(exc)
                return 2.0
            if landed:
                self._cycle_failures, self._cycle_error = 0, None
                break
            # The race was lost: back off a little (a stop ends the wait), then fetch the winner's tip.
            if self.stopping.wait(random.uniform(0, 0.02 * (attempt + 1))):
                return 0.0
            began = time.monotonic()
            try:
                with self.metrics.fetch_seconds.time():
                    self.repo.fetch(skip_node=self.name)
            except GitError as exc:
                self.liveness.clock.fetched(False, began)
                return self._unreachable(exc)
            self.liveness.clock.fetched(True, began)
        else:
            log.warning("main kept moving: %d pushes in a row were rejected; deciding again soon", MAX_CAS_RETRIES)
        try:
            self._housekeeping()
        except Exception:
            log.exception("housekeeping failed; trying again later")
        return self._sleep_budget()

    def _unreachable(self, exc: GitError) -> float:
        """An outage: each different message said once (git's own words, whole), retried with a growing pause."""
        self._failures += 1
        words = _git_words(exc)
        if words not in self._outage:
            log.warning("%s: the state repo is unreachable: %s; facts stay in the journal, retrying", self.name, words)
            self._outage.add(words)
        return min(OUTAGE_MAX_WAIT_S, self._config().poll * 2 ** min(self._failures - 1, 5))

    def _reachable(self) -> None:
        if self._outage:
            log.info("%s: the state repo is reachable again (after %d failed tries)", self.name, self._failures)
        self._outage, self._failures = set(), 0

    def _storage_from_settings(self) -> Path:
        tip = self.repo.reader.resolve(layout.ORIGIN_MAIN)
        config = self.view.snapshot(tip).config if tip else None
        if config is None or not config.storage_root:
            where = f"{layout.CONFIG} on {layout.MAIN}" if tip else f"{layout.CONFIG} ({self.options.repo} has no " \
                                                                     f"{layout.MAIN} yet)"
            raise ConfigError(f"no storage: pass --storage DIR, or set storage.root in {where}")
        return Path(config.storage_root)

    def _has_input(self, path: str) -> bool:
        try:
            return self.storage.inside(f"{layout.RESOURCES}/{path}").exists()
        except StorageError:
            return False  # a path that leaves the pool never appears in it

    def _say_stopping(self) -> None:
        try:
            running = sorted(f"{r.project}/{r.run_id}" for r in self.executor.running())
        except Exception as exc:  # noqa: BLE001 - the engine may be the reason for stopping
            log.warning("%s: stopping (%s); cannot list its runs: %s", self.name, self._stop_reason, exc)
            return
        if running:
            log.info("%s: stopping (%s); its %s keep running and %s adopted when %s starts again with this work "
                     "folder: %s", self.name, self._stop_reason, "run" if len(running) == 1 else f"{len(running)} runs",
                     "is" if len(running) == 1 else "are", self.name, ", ".join(running))
        else:
            log.info("%s: stopping (%s); no runs here", self.name, self._stop_reason)

    def _say_events(self, plan: Plan, snapshot: Snapshot) -> None:
        """What this commit recorded, one line per run: claimed here, finished here, or marked LOST by this node."""
        for claim in plan.claims:
            gpus = f", GPU {','.join(map(str, claim.run.gpus))}" if claim.run.gpus else ""
            log.info("%s/%s on %s: claimed (stage %s%s)", claim.project, claim.run.id, self.name, claim.stage.name,
                     gpus, extra=_fields(claim.project, claim.run.id, self.name, "claimed"))
        finished = set()
        for project, run, _ in plan.finished:
            finished.add((project, run.id))
            why = f": {run.reason}" if run.reason else ""
            log.info("%s/%s on %s: %s (exit %s)%s", project, run.id, run.node or self.name, run.state.value,
                     run.exit_code, why, extra=_fields(project, run.id, run.node or self.name, run.state.value.lower()))
        for project, status in plan.statuses.items():
            before = snapshot.projects.get(project)
            for run in status.runs:
                old = before.status.run(run.id) if before else None
                if run.state is RunState.LOST and old is not None and old.state is not RunState.LOST \
                        and (project, run.id) not in finished:
                    log.warning("%s/%s on %s: LOST, marked by %s: %s", project, run.id, run.node, self.name,
                                run.reason, extra=_fields(project, run.id, run.node, "lost"))

    def _say_invalid(self, plan: Plan, snapshot: Snapshot) -> None:
        """A project this node has just recorded as INVALID: one line that says which and why."""
        for project, status in plan.statuses.items():
            entry = snapshot.projects.get(project)
            if status.state is ProjectState.INVALID and (entry is None or entry.status.message != status.message):
                active = ", ".join(run.id for run in status.active)
                log.warning("%s: INVALID, recorded by %s: %s%s", project, self.name,
                            entry.problems[0] if entry and entry.problems else status.message,
                            f" (run {active} goes on; nothing new starts)" if active else "")

    def _say_held(self, held: HeldConfig | None) -> None:
        if held is not None:
            log.warning("%s: %s", self.name, held.describe())
        else:
            log.info("%s: %s is valid again; its settings are in force", self.name, layout.CONFIG)
        self._held_config = held

    def cycle(self) -> bool:
        """One decide-and-commit pass on the fetched tip; False when the push lost the race."""
        clock = _Clock()
        refs = self.repo.refs()
        tip = refs.get(layout.ORIGIN_MAIN)
        if tip is None:
            return True
        read_before = self.view.projects_read
        snapshot = self.view.snapshot(tip)
        if self.view.projects_read - read_before >= LARGE_READ:
            _keep_out_of_collections()
        clock.lap("read")
        self.settings.update(snapshot.config, snapshot.held_config.describe() if snapshot.held_config else None)
        if snapshot.held_config != self._held_config:
            self._say_held(snapshot.held_config)
        root = snapshot.config.storage_root
        if root and Path(root).resolve() != self.storage.root and root != self._refused_root:
            self._refused_root = root
            log.warning("%s: %s sets storage.root to %s; this node keeps %s (%s)", self.name, layout.CONFIG, root,
                        self.storage.root, "its --storage flag" if self.options.storage else "until it is restarted")
        node_tips = {ref[len(layout.ORIGIN_NODES):]: sha for ref, sha in refs.items()
                     if ref.startswith(layout.ORIGIN_NODES)}
        nodes, lost = self.liveness.observe(self.view, node_tips, snapshot, self.heartbeat.info(),
                                            self._config().node_timeout)
        local, facts = self._local_runs_and_facts()
        clock.lap("observe")
        resumes = frozenset(ref[len(layout.ORIGIN):] for ref in refs if ref.startswith(layout.ORIGIN_RESUMES))
        may_claim = self.heartbeat.may_claim
        basis = (frozenset((n.name, n.cpus, n.memory, n.gpus, n.tags) for n in nodes.values()), frozenset(lost),
                 may_claim)
        inputs = Inputs(tip, basis, frozenset(f.key for f in facts), local, resumes)
        if self.memory.unchanged(inputs):
            return True  # nothing a decision depends on has changed: the plan would be empty
        world = World(snapshot, nodes, utcnow(), lost, self.memory.waited(), resumes, self._has_input)
        quiet = self.memory.quiet(snapshot, inputs)
        held = self.memory.fresh_starts(facts)
        with self._pending_lock:
            building = frozenset(self._building)
        plan = decide(world, Me(self.name, local, tuple(f for f in facts if f.key not in held), may_claim,
                                self.executor.images, building), quiet)
        joining = {key for key in held if key[1] in plan.statuses}  # their project's status is written anyway
        if joining:
            held -= joining
            plan = decide(world, Me(self.name, local, tuple(f for f in facts if f.key not in held), may_claim,
                                    self.executor.images, building), quiet)
        clock.lap("decide")
        self.memory.remember(plan, snapshot, inputs, held)
        self.cycles += 1
        for stop in plan.stops:
            log.info("%s/%s on %s: stopping (%s)", stop.project, stop.run_id, self.name, stop.reason,
                     extra=_fields(stop.project, stop.run_id, self.name, "stopping"))
            try:
                self.executor.stop(stop.project, stop.run_id, stop.reason)
            except Exception:
                log.exception("%s/%s: could not stop", stop.project, stop.run_id)
        launches = [(claim, self._spec(claim)) for claim in plan.claims]
        if plan.commit_needed:
            # Containers are created while the claim is written and travels; none starts before it landed.
            preparing = threading.Thread(target=self._prepare, args=(launches,), name="prepare", daemon=True)
            preparing.start()
            try:
                commit = self.repo.commit(tip, changes(plan, self.storage, self._config(), self.name, tip,
                                                       self.secrets.mask, self.secrets.longest),
                                          self._masked(message(plan, self.name)))
                clock.lap("commit")
                with self.metrics.push_seconds.time():
                    self.repo.push_main(commit)
            except BaseException:  # the claim did not land (a lost race, git, a bug): nothing prepared may stay
                preparing.join(timeout=60)
                for claim, _ in launches:
                    self.executor.discard(claim.project, claim.run.id)
                raise
            clock.lap("push")
            preparing.join(timeout=60)
            clock.lap("prepared")
            log.info("pushed %s: %s", commit[:10], message(plan, self.name).splitlines()[0])
            self.metrics.landed(plan)
            self._say_invalid(plan, snapshot)
            self._say_events(plan, snapshot)
            tip = commit
        self.journal.settle(plan.settled)
        for claim, spec in launches:  # started beside the cycle: exits and new claims need not wait for them
            key = (claim.project, claim.run.id)
            with self._pending_lock:
                self._launching.add(key)
            self._launcher.submit(self._launch_beside, key, claim, spec)
        for build in plan.build_claims:
            with self._pending_lock:
                self._building.add(buildplan.key(build.name, build.source))
            threading.Thread(target=self._build, args=(build,), name=f"build-{build.name}", daemon=True).start()
        clock.lap("launch")
        self._propose(tip, plan)
        if plan.commit_needed or plan.claims:
            log.debug("cycle %d on %s: %s", self.cycles, tip[:10], clock)
        return True

    def _build(self, claim: BuildClaim) -> None:
        """Build and push an image this node claimed; its outcome is a fact the next cycle commits."""
        from reconciler.executors.builder import BuildFailed, build_and_push  # Docker's client, for Docker nodes only

        key = buildplan.key(claim.name, claim.source)
        log_path = self.storage.root / layout.build_log_path(claim.name, claim.source)
        log.info("image %s (%s): building %s on %s", claim.name, claim.source[:12], claim.image, self.name)
        try:
            digest = build_and_push(self.repo.path, claim.commit, claim.name, claim.image, log_path,
                                    self.options.work / "builds", self.name)
            fact = Fact(BUILT, BUILDS_PROJECT, key, utcnow(), 0, None, image_digest=digest)
            log.info("image %s (%s): built %s", claim.name, claim.source[:12], digest)
        except BuildFailed as exc:
            fact = Fact(BUILT, BUILDS_PROJECT, key, utcnow(), 1, self._masked(str(exc)))
            log.warning("image %s (%s): %s", claim.name, claim.source[:12], fact.reason)
        except Exception as exc:  # noqa: BLE001 - a bug must not leave the build RUNNING forever
            log.exception("image %s (%s): the build failed", claim.name, claim.source[:12])
            fact = Fact(BUILT, BUILDS_PROJECT, key, utcnow(), 1, self._masked(f"{type(exc).__name__}: {exc}"))
        self.journal.record(fact)  # before it leaves _building: the next cycle sees one or the other
        with self._pending_lock:
            self._building.discard(key)
        self.wake.set()

    def _propose(self, tip: str, plan: Plan) -> None:
        """Push resume branches and prune stale ones beside the cycle, one branch push at a time.

        Both are idempotent: what is still missing next cycle is asked for again, unless under way.
        """
        work: list[tuple[str, Resume | None]] = [(layout.resume_branch(r.project, r.request), r) for r in plan.resumes]
        work += [(branch, None) for branch in plan.stale_branches]
        for branch, resume in work:
            with self._pending_lock:
                if branch in self._branching:
                    continue
                self._branching.add(branch)
            self._branches.submit(self._push_branch, branch, tip, resume)

    def _push_branch(self, branch: str, tip: str, resume: Resume | None) -> None:
        try:
            if resume is not None:
                push_resume(self.repo, tip, resume)
            else:
                prune_branches(self.repo, [branch])
        finally:
            with self._pending_lock:
                self._branching.discard(branch)

    def _local_runs_and_facts(self) -> tuple[frozenset[tuple[str, str]], tuple[Fact, ...]]:
        """The runs alive on this node (being started included) and the facts not yet on main."""
        with self._pending_lock:  # read before the executor: a launch that ends meanwhile is in one or the other
            launching = frozenset(self._launching)
        alive = launching | frozenset((r.project, r.run_id) for r in self.executor.running())
        facts = self.journal.pending()  # read after `alive`: a run gone from it has its exit here
        listing = {(f.project, f.run_id) for f in facts if f.kind == EXITED}
        listing -= {(f.project, f.run_id) for f in facts if f.kind == LISTED}
        if listing:  # a small workspace's manifest is ready in milliseconds: one commit instead of two
            self.lister.wait_for(listing, LISTING_GRACE_S)
            facts = self.journal.pending()
        ended = {(f.project, f.run_id) for f in facts if f.kind == EXITED}
        return alive - ended, facts

    def _spec(self, claim: Claim) -> LaunchSpec | str:
        """What the executor needs to start a claimed run, or why it cannot be started."""
        run, stage = claim.run, claim.stage
        try:
            spec = LaunchSpec(
                project=claim.project, run_id=run.id, stage=stage.name, node=self.name, image=run.image or stage.image,
                command=stage.command, env=claim.env, resources_dir=self.storage.resources,
                workspace_dir=self.storage.workspace(claim.project, run.id),
                input_dir=self.storage.inside(run.input) if run.input else None,
                log_path=self.storage.log_path(claim.project, run.id), gpus=run.gpus, cpus=stage.resources.cpus,
                memory=stage.resources.memory, timeout=stage.timeout, secrets=self.secrets.get(stage.secrets),
                node_tags=stage.node_tags, lease_file=self._shared_lease)
            if spec.workspace_dir.is_dir() and any(spec.workspace_dir.iterdir()):
                # A run id names one attempt forever; files here are another run's (a project deleted and
                # created again before the nodes cleaned its storage up). They are never mixed into this one.
                return (f"its workspace {layout.workspace(claim.project, run.id)} already holds files of an "
                        f"earlier run of that name (a deleted project of the same name?); move them away and "
                        f"start again")
            spec.workspace_dir.mkdir(parents=True, exist_ok=True)
            spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        except (ExecutorError, StorageError, OSError) as exc:
            return str(exc) if isinstance(exc, WinslowError) else f"could not prepare the run: {exc}"
        return spec

    def _prepare(self, launches: list[tuple[Claim, LaunchSpec | str]]) -> None:
        for _, spec in launches:
            if not isinstance(spec, str):
                try:
                    self.executor.prepare(spec)
                except Exception as exc:  # noqa: BLE001 - start() tries again and reports it
                    log.debug("%s/%s: prepare failed: %s", spec.project, spec.run_id, exc)

    def _launch_beside(self, key: tuple[str, str], claim: Claim, spec: LaunchSpec | str) -> None:
        try:
            self._launch(claim, spec)
        except Exception:  # noqa: BLE001 - _launch records every failure it knows; this is a bug, logged
            log.exception("%s/%s: launch failed", *key)
        finally:  # after its fact or its run is there: the cycle sees it in one place or another
            with self._pending_lock:
                self._launching.discard(key)

    def _launch(self, claim: Claim, spec: LaunchSpec | str) -> None:
        run, stage = claim.run, claim.stage
        try:
            if isinstance(spec, str):
                raise ExecutorError(spec)
            inputs = self._inputs(stage.inputs_for(claim.env))
            waits = self.executor.waits_for(spec)
            if waits:  # a pull of minutes shows as the project PENDING with why; a quick one lands with the start
                self._record_start(claim.project, run.id, StartInfo(None, queue=self.executor.name.capitalize(),
                                                                    reason=waits), inputs)
            started = self.executor.start(spec)
        except Exception as exc:  # noqa: BLE001 - whatever it was, the run did not start: say so, do not lose the claim
            reason = str(exc) if isinstance(exc, ExecutorError) else f"could not start: {type(exc).__name__}: {exc}"
            reason = self._masked(reason)
            log.warning("%s/%s on %s: could not start: %s", claim.project, run.id, self.name, reason,
                        extra=_fields(claim.project, run.id, self.name, "not started"))
            self.journal.record(Fact(EXITED, claim.project, run.id, utcnow(), None, reason))
            self.wake.set()
            return
        self._record_start(claim.project, run.id, started, inputs)
        self.wake.set()
        if started.started is not None:
            log.info("%s/%s on %s: started (stage %s%s)", claim.project, run.id, self.name, stage.name,
                     f", GPU {','.join(map(str, run.gpus))}" if run.gpus else "",
                     extra=_fields(claim.project, run.id, self.name, "started"))

    def _inputs(self, paths: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
        """Size and sha256 of each input the run reads, as they are now (a hash `winslow upload` recorded is
        reused; otherwise the file is hashed once and the hash kept beside it)."""
        found = []
        for path in paths:
            try:
                entry = self.storage.stat(f"{layout.RESOURCES}/{path}", hash=True)
            except StorageError as exc:
                found.append({"path": path, "size": 0, "reason": f"could not be read: {exc}"})
                continue
            if entry.sha256 is None:
                found.append({"path": path, "size": entry.size, "reason": f"a {entry.kind}, not hashed"})
            else:
                found.append({"path": path, "size": entry.size, "sha256": entry.sha256})
        return tuple(found)

    def _sleep_budget(self) -> float:
        return self.memory.sleep_budget(self._config())

    def _housekeeping(self) -> None:
        """Remove the storage of projects deleted from the repo, after the cleanup grace period."""
        now = time.monotonic()
        if now - self._last_housekeeping < min(10.0, self._config().cleanup):
            return
        self._last_housekeeping = now
        snapshot = self.view.last
        if snapshot is None or snapshot.commit is None or now - self._fetched > self._config().node_timeout:
            return  # never delete on a stale view of the repo
        known = {pid for pid, entry in snapshot.projects.items() if entry.exists}
        on_disk = self.storage.projects_on_disk()
        self._missing_projects = {p: self._missing_projects.get(p, now) for p in on_disk - known}
        busy = {r.project for r in self.executor.running()}
        for project, since in list(self._missing_projects.items()):
            if now - since >= self._config().cleanup and project not in busy:
                removed = self.storage.remove_project(project)
                for folder in removed:
                    self.hashes.forget(folder)
                log.info("%s: deleted from the repo; removed %s", project, ", ".join(map(str, removed)) or "nothing")
                del self._missing_projects[project]
