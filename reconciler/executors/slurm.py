"""Runs each stage as a Slurm job: a node on a cluster's login node uses the cluster's scheduler.

spawn is `sbatch` of one fixed job script (`JOB_SCRIPT`, the same for every run). The stage's
command reaches it as the script's arguments and its environment as an `--export-file` read
from a pipe, so neither is ever part of shell code, and a value such as `x; id` stays a value.
The script runs the command (or `docker run` of the stage's image, with `--slurm-container
docker`), relays TERM to it, removes the container when the job is cancelled, and leaves the
exit code in a file beside the log, on the shared storage, for a node that was down when the
job ended. The job writes its output to the run's log (`--output`), so the node's live tail
and capped log work as for the other executors.

wait polls `scontrol -o show job` (there is no event to wait on); a job that has left
slurmctld's memory is judged by `sacct` where accounting answers, else by its exit file.
stop is `scancel` (Slurm's TERM, then KILL after its KillWait), with a KILL of our own after
the grace. Each job's comment names Winslow's cluster, the node, the project and the run, and
a record per run in `state_dir/<project>/<run>.json` keeps its job id, so a restarted node
adopts its jobs (`squeue` finds a live one whose record is missing) and reports those that
ended while it was down.

States: a submitted job is queued, not started (spawn's StartInfo has no `started`); while it is
PENDING, each new reason of Slurm's goes to the tracker (`report_start`, and so to the node, whose
project shows PENDING with it) and to the run's log; once it runs, its start (Slurm's StartTime)
does, and the stage's timeout counts from then. TIMEOUT is a timeout; NODE_FAIL, PREEMPTED,
BOOT_FAIL and a requeued job end LOST (the reason begins with `LOST_REASON`), for Winslow, not
Slurm, to place a new attempt. A job that ended its stage because the node's lease ran out (the
job script watches it on the shared storage: `slurmjob.py`) leaves a note, and ends LOST too
(`FENCED`). `SlurmMachine` reports the partition's CPUs, memory and GPUs (GRES) as the node's
capacity.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from reconciler.clock import parse_time, utcnow
from reconciler.errors import ExecutorError
from reconciler.executors import LOST_REASON
from reconciler.executors.base import (
    ExitCallback,
    LaunchSpec,
    StartInfo,
    make_folders,
    mtime_iso,
    remove_files,
    write_record,
)
from reconciler.executors.slurmctl import COMMAND_TIMEOUT_S, JobView, Slurm, SlurmMachine, gone
from reconciler.executors.slurmjob import (
    JOB_SCRIPT,
    exit_file,
    export_file,
    job_environment,
    lapsed_file,
    sbatch_options,
)
from reconciler.executors.tracker import Ended, Found, RunTracker, already_running
from reconciler.fencing import FENCED
from reconciler.model import SlurmSettings
from reconciler.units import format_duration

__all__ = ["POLL_S", "SlurmEngine", "SlurmExecutor"]

log = logging.getLogger(__name__)

POLL_S = 1.0  # how often a job's state is asked for at first, and after a stop: Slurm has no event to wait on
SLOW_POLL_S = 5.0  # ... and once it has run a while: each look is a request to slurmctld, which the cluster shares
FAST_FOR_S = 60.0
QUEUE_EVERY_S = 60.0  # how often the queue is searched for jobs whose record is gone
UNKNOWN_EXIT = "exit code unknown: the job ended while nobody watched and left no exit file"
QUEUE = "Slurm"  # whose queue a PENDING job waits in, for the run's events: "queued in Slurm on hpc: Resources"
# Job states (scontrol's JobState): those that go on, and those in which Slurm, not the program, ended the job.
_LIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING",
         "STAGE_OUT", "RESV_DEL_HOLD", "REQUEUE_HOLD", "REQUEUED", "REQUEUE_FED", "SPECIAL_EXIT"}
_LOST = {"NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "REQUEUE_HOLD", "REQUEUED", "REQUEUE_FED"}


@dataclass(eq=False)
class _Job:
    """One run's Slurm job, and what its watcher has said of it so far."""

    project: str
    run_id: str
    job_id: str
    record: Path
    log_path: Path
    timeout: float | None = None
    began: bool = False  # its start was reported: it left Slurm's queue
    said: str | None = None  # the last PENDING reason written to the log
    told: str | None = None  # ... and reported to the tracker
    fast_until: float = field(default_factory=lambda: time.monotonic() + FAST_FOR_S)
    nudge: threading.Event = field(default_factory=threading.Event)  # a stop, or the executor closes: look now

    def __str__(self) -> str:
        return f"job={self.job_id}"

    @property
    def exit_file(self) -> Path:
        return exit_file(self.log_path)


Report = Callable[[str, str, StartInfo], bool]  # the tracker's report_start


class SlurmEngine:
    """Submits, watches, cancels and lists the Slurm jobs of one node.

    `report`: told of each new reason a PENDING job waits for, and of its start; False when that
    could not be passed on, for the next look to try again.
    """

    name = "slurm"

    def __init__(self, node: str, state_dir: Path, cluster: str = "",
                 settings: Callable[[], SlurmSettings] = SlurmSettings, container: str | None = None,
                 report: Report | None = None) -> None:
        if container not in (None, "docker"):
            raise ExecutorError(f"unknown Slurm container '{container}' (known: docker)")
        self.node = node
        self.cluster = cluster
        self.container = container
        self.images = container == "docker"  # the stage's image is what runs, so the claim records it
        self._state_dir = Path(state_dir)
        self._settings = settings
        self._report: Report = report or (lambda project, run_id, info: True)
        self.slurm = Slurm(node)
        self._script = self._state_dir / "winslow-job.sh"
        self._script_lock = threading.Lock()
        self._queue_due = 0.0  # when runs() searches the queue next
        self._released: set[str] = set()  # reported jobs: one still in the queue (requeued, cancelled) is not adopted

    def prepare(self, spec: LaunchSpec) -> None:
        """Nothing to prepare: sbatch takes a moment, and Slurm's queue is where a job waits."""

    def discard(self, project: str, run_id: str) -> None:
        """Nothing was prepared."""

    def spawn(self, spec: LaunchSpec) -> tuple[_Job, StartInfo]:
        record = self._record_path(spec.project, spec.run_id)
        if record.exists():  # an earlier life's job, not adopted yet
            raise already_running(spec.project, spec.run_id, self.node)
        if not spec.command:
            raise ExecutorError(f"run {spec.run_id} of {spec.project} has an empty command")
        make_folders(spec, self.node, record.parent, *([Path(spec.resources_dir)] if self.container else []))
        log_path = Path(spec.log_path).absolute()
        # An earlier attempt's exit code, or its note of a lapsed lease, must not pass for this one's.
        remove_files(exit_file(log_path), lapsed_file(exit_file(log_path)))
        settings = self._settings()
        # Written before sbatch: a node that dies in between finds the job again by its comment.
        write_record(record, {"project": spec.project, "run_id": spec.run_id, "stage": spec.stage, "job_id": None,
                               "log": str(log_path), "timeout": spec.timeout, "submitted": utcnow(), "started": None,
                               "started_epoch": None})
        try:
            job_id = self._submit(spec, settings, log_path)
        except BaseException:
            remove_files(record)
            raise
        write_record(record, {**json.loads(record.read_text()), "job_id": job_id})
        # Queued: it starts when Slurm says so, and the watcher reports it then.
        return _Job(spec.project, spec.run_id, job_id, record, log_path, spec.timeout), StartInfo(None, queue=QUEUE)

    def wait(self, job: _Job, closing: threading.Event) -> Ended | None:
        unreachable: str | None = None
        while not closing.is_set():
            try:
                ended = self._judge(job, self.slurm.job(job.job_id))
                unreachable = None
            except ExecutorError as exc:
                if str(exc) != unreachable:
                    log.warning("cannot see the job, trying again: node=%s project=%s run=%s %s: %s",
                                self.node, job.project, job.run_id, job, exc)
                unreachable, ended = str(exc), None
            if ended is not None:
                return ended
            job.nudge.wait(POLL_S if time.monotonic() < job.fast_until else SLOW_POLL_S)
            job.nudge.clear()
        return None

    def stop(self, job: _Job, grace: float) -> None:
        """scancel: Slurm sends TERM, and KILL after its KillWait; a KILL of ours follows after `grace`."""
        try:
            self.slurm.run("scancel", job.job_id)
        except ExecutorError as exc:
            if not gone(exc):
                raise ExecutorError(f"cannot cancel {job} of run {job.run_id} of {job.project}: {exc}") from exc
            return
        job.fast_until = time.monotonic() + FAST_FOR_S
        job.nudge.set()
        escalate = threading.Timer(grace, self._kill, args=(job,))
        escalate.daemon = True
        escalate.start()

    def runs(self) -> list[tuple[str, str]]:
        try:
            keys = {(record.parent.name, record.stem) for record in self._state_dir.glob("*/*.json")}
        except OSError as exc:
            raise ExecutorError(f"cannot read the job records in {self._state_dir} on {self.node}: {exc}") from exc
        queued = self._queued() if time.monotonic() >= self._queue_due else {}
        for comment, (job_id, _) in queued.items():  # a live job whose record is gone (a wiped work folder)
            key = self._key(comment)
            if key is not None and job_id not in self._released:
                keys.add(key)
        return sorted(keys)

    def adopt(self, project: str, run_id: str) -> Found[_Job] | None:
        record = self._record_path(project, run_id)
        data = _load_record(record) or {}
        job_id = data.get("job_id") or self._find(project, run_id)
        if job_id is None:
            if record.exists() and not data.get("job_id"):
                remove_files(record)  # never submitted: the node died before sbatch
            return None
        try:
            seen = self.slurm.job(str(job_id))
            state = seen.state if seen is not None else "ENDED"
        except ExecutorError as exc:  # slurmctld is down: the watcher asks again until it answers
            log.warning("cannot see job %s of run %s of %s yet: %s", job_id, run_id, project, exc)
            seen, state = None, "UNKNOWN"
        log_text = data.get("log") or (seen.log if seen is not None else None)
        if not log_text:
            return None
        timeout = data.get("timeout")
        job = _Job(project, run_id, str(job_id), record, Path(log_text), None if timeout is None else float(timeout),
                   began=data.get("started") is not None)
        if not data:
            write_record(record, {"project": project, "run_id": run_id, "job_id": job.job_id, "log": log_text,
                                   "timeout": None, "started": None, "started_epoch": None})
        if state not in _LIVE and state != "UNKNOWN":
            return Found(job, data.get("started"), state.lower())
        if not job.began:  # still queued, or it began while nobody watched: the watcher reports its start
            return Found(job, None, state.lower(), job.timeout, queued=True)
        elapsed = max(0.0, time.time() - float(data.get("started_epoch") or time.time()))
        return Found(job, data.get("started"), state.lower(), job.timeout, elapsed)

    def release(self, job: _Job) -> None:
        self._released.add(job.job_id)
        remove_files(job.record, job.exit_file, lapsed_file(job.exit_file))

    def interrupt(self, job: _Job) -> None:
        """The executor closes: the wait looks at `closing` now."""
        job.nudge.set()

    # -- submitting ----------------------------------------------------------------

    def _submit(self, spec: LaunchSpec, settings: SlurmSettings, log_path: Path) -> str:
        """sbatch the job script; the environment goes through a pipe, so no secret is ever written to a file here."""
        self._write_script()
        container = self._container_name(spec) if self.container else None
        env, arguments = job_environment(spec, container, self.node)
        content = export_file(env, spec)
        features = self._features(settings, spec)
        where = f" to partition {settings.partition}" if settings.partition else ""
        _log_line(log_path, f"winslow: submitting to Slurm{where} from {self.node}" +
                  (f" (image {spec.image} in Docker)" if self.container else ""))
        read_fd, write_fd = os.pipe()
        writer = threading.Thread(target=_write_all, args=(write_fd, content), daemon=True)  # more than a pipe holds
        writer.start()
        try:
            options = sbatch_options(spec, settings, self._comment(spec.project, spec.run_id), features, read_fd)
            answer = self.slurm.run("sbatch", *options, str(self._script), *arguments, pass_fds=(read_fd,))
        finally:
            os.close(read_fd)  # a writer still blocked gets EPIPE and ends
            writer.join(timeout=COMMAND_TIMEOUT_S)
        job_id = answer.strip().split(";")[0]
        if not job_id.isdigit():
            raise ExecutorError(f"sbatch on {self.node} gave no job id: {answer.strip()!r}")
        log.info("submitted: node=%s project=%s run=%s job=%s", self.node, spec.project, spec.run_id, job_id)
        return job_id

    def _container_name(self, spec: LaunchSpec) -> str:
        from reconciler.executors.docker import container_name

        return container_name(self.node, spec.project, spec.run_id, self.cluster)

    def _features(self, settings: SlurmSettings, spec: LaunchSpec) -> frozenset[str]:
        if not spec.node_tags:
            return frozenset()
        try:
            return frozenset().union(*(node.features for node in self.slurm.nodes(settings.partition)))
        except ExecutorError as exc:
            log.warning("cannot read the partition's features, no --constraint: node=%s: %s", self.node, exc)
            return frozenset()

    def _write_script(self) -> None:
        with self._script_lock:  # launches run in parallel
            self._write_script_once()

    def _write_script_once(self) -> None:
        try:
            if self._script.exists() and self._script.read_text() == JOB_SCRIPT:
                return
            self._script.parent.mkdir(parents=True, exist_ok=True)
            temp = self._script.with_name(f".{self._script.name}.tmp")
            temp.write_text(JOB_SCRIPT)
            temp.chmod(0o755)
            os.replace(temp, self._script)
        except OSError as exc:
            raise ExecutorError(f"cannot write the job script {self._script} on {self.node}: {exc}") from exc

    # -- following -------------------------------------------------------------------

    def _judge(self, job: _Job, seen: JobView | None) -> Ended | None:
        """How the job ended, or None while it goes on; reports its queue's reasons and its start on the way."""
        if seen is None:
            return _fenced(job, self._aged_out(job))
        if seen.restarts > 0 or seen.state in _LOST:
            if seen.state in _LIVE:  # requeued: Winslow, not Slurm, places a new attempt
                self._cancel_quietly(job)
            return Ended(None, seen.end or utcnow(),
                         f"{LOST_REASON}Slurm job {job.job_id} {_lost_words(seen)}")
        if seen.state == "PENDING":
            self._pending(job, seen.reason)
            return None
        if not job.began and seen.state in _LIVE:
            self._began(job, seen.start or utcnow())
        if seen.state in _LIVE:
            return None
        ended = _ended(job, seen.state, seen.exit_code, seen.signal, seen.end or utcnow())
        if not job.began and seen.start and seen.nodes not in ("", "(null)"):  # it ran between two looks
            ended = replace(ended, started=seen.start)
        return _fenced(job, ended)

    def _pending(self, job: _Job, reason: str) -> None:
        """Each new reason goes to the run's log and to the tracker ("None": the scheduler has not looked yet)."""
        if reason != job.said:
            job.said = reason
            why = f" ({reason})" if reason != "None" else ""
            _log_line(job.log_path, f"winslow: Slurm job {job.job_id} is pending in Slurm's queue{why}")
        if reason not in ("None", job.told) and self._report(job.project, job.run_id, StartInfo(None, queue=QUEUE,
                                                                                                 reason=reason)):
            job.told = reason

    def _began(self, job: _Job, started: str) -> None:
        """The job left the queue: its start is reported, then kept in its record for a node that adopts it."""
        if not self._report(job.project, job.run_id, StartInfo(started=started)):
            return  # the next look reports it again
        job.began = True
        job.fast_until = time.monotonic() + FAST_FOR_S
        when = parse_time(started)
        data = _load_record(job.record) or {}
        try:
            write_record(job.record, {**data, "started": started,
                                       "started_epoch": when.timestamp() if when else time.time()})
        except ExecutorError as exc:  # an adopting node then takes the start from Slurm again
            log.warning("%s: node=%s project=%s run=%s", exc, self.node, job.project, job.run_id)

    def _aged_out(self, job: _Job) -> Ended:
        """The job has left slurmctld's memory: accounting, where it answers, else the exit file."""
        accounted = self.slurm.accounted(job.job_id)
        if accounted is not None:
            return _ended(job, *accounted, mtime_iso(job.exit_file) or utcnow())
        try:
            code = int(job.exit_file.read_text().strip())
        except (OSError, ValueError):
            return Ended(None, utcnow(), UNKNOWN_EXIT)
        return _ended(job, "COMPLETED" if code == 0 else "FAILED", code, 0, mtime_iso(job.exit_file) or utcnow())

    def _kill(self, job: _Job) -> None:
        try:
            seen = self.slurm.job(job.job_id)
            if seen is not None and seen.state in _LIVE:
                self.slurm.run("scancel", "--signal=KILL", "--full", job.job_id)
        except ExecutorError as exc:
            log.debug("no KILL after the grace: %s: %s", job, exc)

    def _cancel_quietly(self, job: _Job) -> None:
        try:
            self.slurm.run("scancel", job.job_id)
        except ExecutorError as exc:
            log.warning("cannot cancel the requeued %s: %s", job, exc)

    def _find(self, project: str, run_id: str) -> str | None:
        """The job of a run whose record does not name it, from the queue; None when it is not there."""
        found = self._queued().get(self._comment(project, run_id))
        return found[0] if found and found[0] not in self._released else None

    def _queued(self) -> dict[str, tuple[str, str]]:
        """The queue, searched at most every QUEUE_EVERY_S by runs(): the records name the jobs, this is a fallback."""
        self._queue_due = time.monotonic() + QUEUE_EVERY_S
        try:
            return self.slurm.queued()
        except ExecutorError as exc:  # slurmctld is down: the records say which jobs there are
            log.warning("cannot search the queue, going by the job records: node=%s: %s", self.node, exc)
            return {}

    def _comment(self, project: str, run_id: str) -> str:
        return f"winslow:{self.cluster}:{self.node}:{project}:{run_id}"

    def _key(self, comment: str) -> tuple[str, str] | None:
        parts = comment.split(":")
        if len(parts) != 5 or parts[:3] != ["winslow", self.cluster, self.node] or not all(parts[3:]):
            return None
        return parts[3], parts[4]

    def _record_path(self, project: str, run_id: str) -> Path:
        for part in (project, run_id):
            if not part or part in (".", "..") or "/" in part or "\0" in part:
                raise ExecutorError(f"'{part}' cannot name a job record on {self.node}")
        return self._state_dir / project / f"{run_id}.json"


class SlurmExecutor(RunTracker[_Job]):
    """The Executor of a node whose stages run as Slurm jobs; `machine` is what its heartbeat reports.

    Its runs' supervisors are the job scripts on the compute nodes: they read the node's lease from
    the shared storage (`shared_lease`), where the node then renews it too.
    """

    shared_lease = True

    def __init__(self, node: str, on_exit: ExitCallback, state_dir: Path, cluster: str = "",
                 settings: Callable[[], SlurmSettings] = SlurmSettings, container: str | None = None,
                 notes: Path | None = None) -> None:
        engine = SlurmEngine(node, state_dir, cluster, settings, container, report=self.report_start)
        super().__init__(node, on_exit, engine, notes)
        self.machine = SlurmMachine(engine.slurm, settings)


def _ended(job: _Job, state: str, exit_code: int | None, signal: int, finished: str) -> Ended:
    if state == "TIMEOUT":
        limit = f" after {format_duration(job.timeout)}" if job.timeout else ""
        return Ended(exit_code, finished, f"timeout{limit} (Slurm's time limit of job {job.job_id})")
    if state == "OUT_OF_MEMORY":
        return Ended(exit_code, finished, f"out of memory (Slurm ended job {job.job_id} at its --mem)")
    if state == "DEADLINE":
        return Ended(exit_code, finished, f"Slurm's deadline for job {job.job_id} passed")
    if state == "CANCELLED":  # by Winslow, whose stop gives the reason, or by someone else
        return Ended(128 + signal if signal else exit_code, finished, f"Slurm job {job.job_id} was cancelled")
    if signal:
        return Ended(128 + signal, finished, f"killed by signal {signal} (Slurm job {job.job_id})")
    return Ended(exit_code, finished)


def _fenced(job: _Job, ended: Ended) -> Ended:
    """A job that ended its stage because the node's lease ran out says so in a note: the node's failure, LOST."""
    try:
        note = lapsed_file(job.exit_file).read_text(errors="replace").strip()
    except OSError:
        return ended
    return replace(ended, reason=f"{FENCED}{note}") if note else ended


def _lost_words(seen: JobView) -> str:
    where = f" on {seen.nodes}" if seen.nodes and seen.nodes != "(null)" else ""
    if seen.restarts > 0 and seen.state not in ("NODE_FAIL", "PREEMPTED", "BOOT_FAIL"):
        return f"was requeued by Slurm{where} ({seen.reason}); Winslow places a new attempt instead"
    words = {"NODE_FAIL": "ended because its node failed", "PREEMPTED": "was preempted",
             "BOOT_FAIL": "could not boot its node"}
    return f"{words.get(seen.state, seen.state)}{where} ({seen.state})"


def _write_all(fd: int, content: bytes) -> None:
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(content)
    except OSError:  # sbatch ended without reading it all: its error says why
        pass


def _log_line(path: Path, line: str) -> None:
    """One line of Winslow's own into the run's log (only while the job does not write there)."""
    try:
        with open(path, "ab") as out:
            out.write(line.encode() + b"\n")
    except OSError as exc:
        log.warning("cannot write log file %s: %s", path, exc)


def _load_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring an unreadable job record %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None
