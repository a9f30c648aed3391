"""What every executor does around its runs, whatever runs them.

An engine knows one way to run a stage: a Docker container, a process on the
node, a Slurm job. It spawns a run, waits for its end, stops it and lists the
runs it holds. The `RunTracker` around it makes it an `Executor`:

- it follows each run from start (or adoption) to its exit report, one thread
  per run, and refuses a second start of a run it follows;
- it stops a run whose timeout is up; an adopted run keeps its deadline;
- a run the engine queues (spawn's StartInfo has no `started`: a Slurm job
  PENDING) is followed from its submission, but its timeout counts from when
  it begins: the engine's wait() says so through `report_start`, which also
  tells the node (`on_start`) of each new reason to wait and of the start;
- it hands each exit to `on_exit` exactly once, at once, from the run's thread;
  a stop's reason wins over the reason the engine saw ("aborted", not "killed
  by signal SIGTERM"). The reason is written down (`notes`) before the engine
  is asked, so a node killed between the stop and the end records it too: the
  next life adopts the ended run with the reason it was stopped for;
- a run stays in `running()` until `on_exit` has returned. When `on_exit` fails,
  the engine keeps what makes the run findable (its container, its record), so
  a later `running()` adopts the run again and reports it again;
- `running()` adopts what the engine holds and the tracker does not know: the
  runs of an earlier life of this node, including those that ended meanwhile.
  It asks the engine (a Docker API call, `squeue`) on its first call, after a
  watcher or an exit report failed, and every RELIST_S besides; between those,
  every run the engine holds is one the tracker follows;
- after `close()` the runs go on; the next tracker on the node adopts them.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from reconciler.clock import seconds_between, utcnow
from reconciler.errors import ExecutorError
from reconciler.executors.base import ExitCallback, ExitInfo, LaunchSpec, RunningInfo, StartCallback, StartInfo
from reconciler.units import format_duration

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0  # from TERM to KILL, as `docker stop` gives a container
WAKE_S = 1.0  # the longest an engine's wait blocks before it looks whether the executor closes
_JOIN_TIMEOUT_S = 2.0
RELIST_S = 30.0  # how often running() asks the engine what it holds when nothing says it must

H = TypeVar("H")
Key = tuple[str, str]  # (project, run_id)


@dataclass(frozen=True)
class Ended:
    """How a run ended, as the engine saw it."""

    exit_code: int | None
    finished: str
    reason: str | None = None
    started: str | None = None  # a queued run that began and ended between two looks: when it began


@dataclass(frozen=True)
class Found(Generic[H]):
    """A run the engine holds that this tracker did not start: from an earlier life of the node."""

    handle: H
    started: str | None
    state: str  # what the engine says of it ("running", "exited"), for the log line
    timeout: float | None = None  # None also for a run that has already ended
    elapsed: float = 0.0  # seconds since it started: the timeout counts from then, not from adoption
    queued: bool = False  # it has not begun yet: its timeout counts from the start the engine reports


class Engine(Protocol[H]):
    """One way to run a stage. Calls raise ExecutorError with a reason a person understands.

    A handle is whatever the engine needs to reach its run again; its str()
    names it in log lines (`container=...`, `pid=...`).
    """

    name: str  # the executor's name: "docker", "process"
    images: bool  # the stage's image is what runs

    def prepare(self, spec: LaunchSpec) -> None:
        """Make spawn() quick (create a container) while the claim is pushed; never runs the stage."""

    def discard(self, project: str, run_id: str) -> None:
        """Undo prepare() for a claim that did not land."""

    def spawn(self, spec: LaunchSpec) -> tuple[H, StartInfo]:
        """Start the run; once this returns, runs() and adopt() find it until release().

        A StartInfo without `started` queues it: wait() then calls the tracker's `report_start`
        when the queue gives a new reason and when the run begins.
        """

    def wait(self, handle: H, closing: threading.Event) -> Ended | None:
        """Block until the run ended; None soon after `closing` is set (no wait may be unbounded)."""

    def stop(self, handle: H, grace: float) -> None:
        """TERM the run now and KILL it when it has not ended after `grace` seconds."""

    def runs(self) -> list[Key]:
        """Every run of this node the engine holds, alive or ended, not yet released."""

    def adopt(self, project: str, run_id: str) -> Found[H] | None:
        """A handle on a run this tracker did not start; None when the engine holds no such run."""

    def release(self, handle: H) -> None:
        """The exit reached on_exit: remove what keeps the run findable."""

    def interrupt(self, handle: H) -> None:
        """The executor closes: make a wait() on this handle return soon."""


def already_running(project: str, run_id: str, node: str) -> ExecutorError:
    return ExecutorError(f"run {run_id} of {project} is already running on {node}")


@dataclass(eq=False)
class _Run(Generic[H]):
    """One run the tracker follows, from start (or adoption) to its exit report."""

    project: str
    run_id: str
    handle: H
    started: str | None
    queued: bool = False  # waits in the engine's queue: no timer yet, and the node hears of its start later
    timeout: float | None = None
    stop_reason: str | None = None
    stopping: bool = False
    timer: threading.Timer | None = None
    thread: threading.Thread | None = None
    done: threading.Event = field(default_factory=threading.Event)  # its end was seen: stops are late
    reported: bool = False  # on_exit returned: from now on it is not running

    @property
    def key(self) -> Key:
        return (self.project, self.run_id)


class RunTracker(Generic[H]):
    """An Executor made of an engine: the bookkeeping of the runs it follows."""

    def __init__(self, node: str, on_exit: ExitCallback, engine: Engine[H], notes: Path | None = None) -> None:
        self.node = node
        self._notes = notes  # a stop's reason per run, kept until its exit is reported: outlives the node process
        self.name = engine.name
        self.images = engine.images
        self.engine = engine
        self._on_exit = on_exit
        self.on_start: StartCallback | None = None  # the node's: see Executor.on_start
        self._lock = threading.Lock()
        self._runs: dict[Key, _Run[H] | None] = {}  # None: being prepared or started, not to be adopted
        self._prepared: set[Key] = set()
        self._closing = threading.Event()
        self._listed_at: float | None = None  # when running() last asked the engine; None: ask at the next call

    # -- the Executor interface ------------------------------------------------

    def waits_for(self, spec: LaunchSpec) -> str | None:
        ask = getattr(self.engine, "waits_for", None)  # an engine that may wait before it starts a run says so
        return ask(spec) if ask is not None else None

    def prepare(self, spec: LaunchSpec) -> None:
        key = (spec.project, spec.run_id)
        with self._lock:
            if key in self._runs or self._closing.is_set():
                return
            self._runs[key] = None
            self._prepared.add(key)
        try:
            self.engine.prepare(spec)
        except BaseException:
            self._unreserve(key)  # start() spawns from scratch and says what is wrong
            raise

    def discard(self, project: str, run_id: str) -> None:
        key = (project, run_id)
        with self._lock:
            if key not in self._prepared:
                return
        self.engine.discard(project, run_id)  # first: until it is gone, running() must not adopt it
        self._unreserve(key)

    def start(self, spec: LaunchSpec) -> StartInfo:
        key = (spec.project, spec.run_id)
        with self._lock:
            if self._closing.is_set():
                raise ExecutorError(f"cannot start run {spec.run_id} of {spec.project}: the executor is closed")
            if key in self._runs and key not in self._prepared:
                raise already_running(spec.project, spec.run_id, self.node)
            self._prepared.discard(key)
            self._runs[key] = None  # keeps running() from adopting the half-started run
        try:
            handle, info = self.engine.spawn(spec)
        except BaseException:
            self._unreserve(key)
            raise
        run = _Run(spec.project, spec.run_id, handle, info.started, queued=info.started is None)
        log.info("%s: %s", "queued" if run.queued else "started", self._describe(run))
        self._follow(run, spec.timeout, 0.0)
        return info

    def stop(self, project: str, run_id: str, reason: str) -> None:
        with self._lock:
            known = (project, run_id) in self._runs
            run = self._runs.get((project, run_id))
        if not known:
            run = self._adopt(project, run_id)
        if run is not None:
            self._stop(run, reason)

    def running(self) -> list[RunningInfo]:
        now = time.monotonic()
        if self._listed_at is None or now - self._listed_at >= RELIST_S:
            self._listed_at = now
            held = self.engine.runs()
            self._prune_notes(set(held))
            for key in held:
                with self._lock:
                    known = key in self._runs
                if not known:
                    self._adopt(*key)
        with self._lock:
            runs = [r for r in self._runs.values() if r is not None and not r.reported]
        return sorted((RunningInfo(r.project, r.run_id, r.started) for r in runs),
                      key=lambda info: (info.project, info.run_id))

    def report_start(self, project: str, run_id: str, info: StartInfo) -> bool:
        """From an engine's wait(): a queued run waits for a new reason (`started` None) or has begun.

        A start arms the run's timeout, counted from `info.started`. The node hears of both
        through `on_start`; False when that failed, for the engine to report it again later.
        """
        with self._lock:
            run = self._runs.get((project, run_id))
        if run is None or not run.queued:
            return True
        if not self._tell(run, info):
            return False
        if info.started is None:
            return True
        with self._lock:
            if not run.queued:  # reported twice at once
                return True
            run.queued, run.started = False, info.started
        elapsed = max(0.0, seconds_between(info.started, utcnow()) or 0.0)
        log.info("began: %s after its queue%s", self._describe(run),
                 f", {format_duration(elapsed)} ago" if elapsed >= 1 else "")
        self._arm(run, elapsed)
        return True

    def close(self) -> None:
        """Stop following; the runs go on, and the next executor on this node adopts them."""
        self._closing.set()
        with self._lock:
            runs = [r for r in self._runs.values() if r is not None]
        for run in runs:
            if run.timer is not None:
                run.timer.cancel()
            try:
                self.engine.interrupt(run.handle)
            except Exception:  # closing is best effort: the threads are daemons
                log.exception("cannot interrupt the watcher: %s", self._describe(run))
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        for run in runs:
            if run.thread is not None and run.thread is not threading.current_thread():
                run.thread.join(timeout=max(0.0, deadline - time.monotonic()))

    # -- following ---------------------------------------------------------------

    def _adopt(self, project: str, run_id: str) -> _Run[H] | None:
        if self._closing.is_set():
            return None
        found = self.engine.adopt(project, run_id)
        if found is None:
            return None
        run = _Run(project, run_id, found.handle, found.started, queued=found.queued,
                   stop_reason=self._noted(project, run_id))
        with self._lock:
            if run.key in self._runs:  # another thread got there first, or a start is under way
                return self._runs[run.key]
            self._runs[run.key] = run
        log.info("adopting: %s state=%s%s", self._describe(run), found.state,
                 f" stopped for: {run.stop_reason}" if run.stop_reason else "")
        self._follow(run, found.timeout, found.elapsed)
        return run

    def _follow(self, run: _Run[H], timeout: float | None, elapsed: float) -> None:
        run.timeout = timeout
        with self._lock:
            self._runs[run.key] = run
        if not run.queued:  # a queued run's timeout counts from its start (report_start)
            self._arm(run, elapsed)
        run.thread = threading.Thread(target=self._watch, args=(run,), daemon=True,
                                      name=f"winslow-{self.name}-{run.run_id}")
        run.thread.start()

    def _arm(self, run: _Run[H], elapsed: float) -> None:
        if run.timeout is None or self._closing.is_set():
            return
        run.timer = threading.Timer(max(0.0, run.timeout - elapsed), self._expire, args=(run, run.timeout))
        run.timer.daemon = True
        run.timer.start()

    def _tell(self, run: _Run[H], info: StartInfo) -> bool:
        if self.on_start is None:
            return True
        try:
            self.on_start(run.project, run.run_id, info)
        except Exception:  # the engine reports it again on a later look
            log.exception("on_start failed: %s", self._describe(run))
            return False
        return True

    def _watch(self, run: _Run[H]) -> None:
        try:
            ended = self.engine.wait(run.handle, self._closing)
        except Exception:  # a watcher must never die silently; the next running() adopts the run afresh
            log.exception("watcher failed: %s", self._describe(run))
            self._forget(run)
            self._listed_at = None
            return
        if ended is None or self._closing.is_set():
            return  # the run goes on, or its end stays with the engine for the next executor to report
        if run.timer is not None:
            run.timer.cancel()
        if run.queued and ended.started is not None:  # it began and ended between two looks: its start comes first
            self._tell(run, StartInfo(started=ended.started))
        with self._lock:
            run.done.set()
            reason = run.stop_reason or ended.reason
        self._report(run, ExitInfo(run.project, run.run_id, ended.exit_code, ended.finished, reason))
        self._forget(run)

    def _report(self, run: _Run[H], info: ExitInfo) -> None:
        log.info("exited: %s exit_code=%s reason=%s", self._describe(run), info.exit_code, info.reason)
        try:
            self._on_exit(info)
        except Exception:  # the engine keeps the run: a later running() reports it again
            log.exception("on_exit failed, keeping the run: %s", self._describe(run))
            self._listed_at = None
            return
        run.reported = True
        try:
            self.engine.release(run.handle)
        except Exception:
            log.exception("cannot release the run: %s", self._describe(run))
        self._unnote(run)

    # -- stopping ----------------------------------------------------------------

    def _expire(self, run: _Run[H], timeout: float) -> None:
        if run.done.is_set() or self._closing.is_set():
            return
        log.info("timeout: %s after=%s", self._describe(run), format_duration(timeout))
        try:
            self._stop(run, f"timeout after {format_duration(timeout)}")
        except ExecutorError as exc:
            log.error("cannot stop after the timeout: %s: %s", self._describe(run), exc)
        except Exception:  # a timer must never die silently either
            log.exception("cannot stop after the timeout: %s", self._describe(run))

    def _stop(self, run: _Run[H], reason: str) -> None:
        """The first reason stays; the engine is asked once, again only when asking failed."""
        with self._lock:
            if run.done.is_set() or run.stopping:
                return
            run.stopping = True
            if run.stop_reason is None:
                run.stop_reason = reason
            reason = run.stop_reason
        self._note(run, reason)
        log.info("stopping: %s reason=%s", self._describe(run), reason)
        try:
            self.engine.stop(run.handle, STOP_GRACE_S)
        except BaseException:
            with self._lock:
                run.stopping = False
            raise

    # -- the stop notes ------------------------------------------------------------

    def _note_path(self, project: str, run_id: str) -> Path | None:
        return None if self._notes is None else self._notes / project / f"{run_id}.stop"

    def _note(self, run: _Run[H], reason: str) -> None:
        """Written whole (a temporary file renamed) before the engine is asked to stop the run."""
        path = self._note_path(run.project, run.run_id)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{os.getpid()}")
            partial.write_text(reason, encoding="utf-8")
            os.replace(partial, path)
        except OSError as exc:  # the stop matters more: a later life would report the engine's reason
            log.error("cannot note why the run stops: %s: %s", self._describe(run), exc)

    def _noted(self, project: str, run_id: str) -> str | None:
        path = self._note_path(project, run_id)
        if path is None:
            return None
        try:
            return path.read_text(encoding="utf-8") or None
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            log.error("cannot read why run %s of %s was stopped: %s", run_id, project, exc)
            return None

    def _prune_notes(self, held: set[Key]) -> None:
        """Remove the notes of runs the engine no longer holds (removed by hand while the node was down)."""
        if self._notes is None or not self._notes.is_dir():
            return
        with self._lock:
            known = held | set(self._runs)
        for folder in self._notes.iterdir():
            try:  # each folder on its own: a report may remove one meanwhile
                for path in folder.glob("*.stop"):
                    if (folder.name, path.name.removesuffix(".stop")) not in known:
                        path.unlink(missing_ok=True)
            except OSError as exc:
                log.debug("cannot prune the stop notes in %s: %s", folder, exc)

    def _unnote(self, run: _Run[H]) -> None:
        path = self._note_path(run.project, run.run_id)
        if path is None:
            return
        try:
            path.unlink(missing_ok=True)
            path.parent.rmdir()  # the project's folder, once it holds no other note
        except OSError:
            pass

    # -- the registry ------------------------------------------------------------

    def _forget(self, run: _Run[H]) -> None:
        with self._lock:
            if self._runs.get(run.key) is run:
                del self._runs[run.key]

    def _unreserve(self, key: Key) -> None:
        with self._lock:
            self._prepared.discard(key)
            if key in self._runs and self._runs[key] is None:
                del self._runs[key]

    def _describe(self, run: _Run[H]) -> str:
        return f"node={self.node} project={run.project} run={run.run_id} {run.handle}"
