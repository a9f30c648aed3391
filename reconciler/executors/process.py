"""Runs each stage as a process on the node itself: for nodes without Docker, and the demo.

The stage runs under a tiny wrapper (`_wrap.py`) that leads its own process group,
relays TERM to the group and leaves the program's exit code in a file. The stage's
output goes straight to its log file, so logs keep flowing if the reconciler dies.

Per run, a JSON record in `state_dir/<project>/<run>.json` (pid, process group,
process create time, log path, timeout) lets a restarted reconciler find its runs
again: `running()` adopts those still alive and reports those that ended while
nobody watched, each with the real exit code from the wrapper's exit-code file.

The process executor does not enforce a stage's `cpus` or `memory`, and it ignores
`image`: the program runs with the node's own environment plus the stage's. GPUs
reach it through `CUDA_VISIBLE_DEVICES` (with `CUDA_DEVICE_ORDER=PCI_BUS_ID`, so CUDA
counts GPUs in the same order as NVML); a stage without GPUs sees none.
"""
from __future__ import annotations

import datetime as _dt
import errno
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from reconciler.errors import ExecutorError
from reconciler.executors.base import (
    ExitCallback,
    ExitInfo,
    LaunchSpec,
    RunningInfo,
    StartInfo,
    expand,
    stage_env,
    utcnow,
)
from reconciler.units import format_duration

log = logging.getLogger(__name__)

STOP_GRACE_S = 5.0
READY_TIMEOUT_S = 10.0
ADOPTED_POLL_S = 0.5  # only for processes of an earlier reconciler: they cannot be waited for
UNKNOWN_EXIT = "exit code unknown (the stage outlived a reconciler restart)"
_JOIN_TIMEOUT_S = 2.0
_CREATE_TIME_TOLERANCE_S = 0.05
_WRAPPER = Path(__file__).resolve().with_name("_wrap.py")


@dataclass(eq=False)
class _Watch:
    """One run this executor follows, from start (or adoption) to its exit report."""

    project: str
    run_id: str
    pid: int
    pgid: int
    started: str | None
    record: Path
    exit_file: Path
    popen: subprocess.Popen[bytes] | None = None  # a child of this executor
    process: psutil.Process | None = None  # adopted: started by an earlier reconciler
    gone: bool = False  # adopted after it had already ended
    stop_reason: str | None = None
    stopping: bool = False
    timer: threading.Timer | None = None
    thread: threading.Thread | None = None
    done: threading.Event = field(default_factory=threading.Event)
    reported: bool = False  # the exit reached on_exit: until then the run counts as running

    @property
    def key(self) -> tuple[str, str]:
        return (self.project, self.run_id)

    def describe(self) -> str:
        return f"project={self.project} run={self.run_id} pid={self.pid}"


class ProcessExecutor:
    name = "process"

    def __init__(self, node: str, on_exit: ExitCallback, state_dir: Path) -> None:
        self.node = node
        self._on_exit = on_exit
        self._state_dir = Path(state_dir)
        self._lock = threading.Lock()
        self._watches: dict[tuple[str, str], _Watch | None] = {}  # None: being started
        self._closing = threading.Event()

    # -- the Executor interface ------------------------------------------------

    def prepare(self, spec: LaunchSpec) -> None:
        """Nothing to prepare: a process starts in a few milliseconds."""

    def discard(self, project: str, run_id: str) -> None:
        """Nothing was prepared."""

    def start(self, spec: LaunchSpec) -> StartInfo:
        if self._closing.is_set():
            raise ExecutorError(f"cannot start run {spec.run_id} of {spec.project}: the executor is closed")
        record = self._record_path(spec.project, spec.run_id)
        key = (spec.project, spec.run_id)
        with self._lock:
            if key in self._watches or record.exists():
                raise ExecutorError(f"run {spec.run_id} of {spec.project} is already running on {self.node}")
            self._watches[key] = None  # keeps running() from adopting the half-started run
        try:
            watch = self._launch(spec, record)
        except BaseException:
            with self._lock:
                self._watches.pop(key, None)
            raise
        log.info("process started: node=%s %s command=%s", self.node, watch.describe(), spec.command[0])
        self._follow(watch, spec.timeout, time.monotonic())
        return StartInfo(started=watch.started or utcnow())

    def stop(self, project: str, run_id: str, reason: str) -> None:
        with self._lock:
            watch = self._watches.get((project, run_id))
        if watch is None:
            watch = self._adopt_run(project, run_id)
        if watch is None:
            return
        self._terminate(watch, reason)

    def running(self) -> list[RunningInfo]:
        for record in self._records():
            data = _load_record(record)
            if data is None:
                continue
            with self._lock:
                known = (data["project"], data["run_id"]) in self._watches
            if not known:
                self._adopt(data, record)
        with self._lock:
            watches = [w for w in self._watches.values() if w is not None]
        return [RunningInfo(w.project, w.run_id, w.started)
                for w in watches if not w.reported]

    def close(self) -> None:
        """Stop watching; the processes keep running and a later executor adopts them."""
        self._closing.set()
        with self._lock:
            watches = [w for w in self._watches.values() if w is not None]
        for watch in watches:
            if watch.timer is not None:
                watch.timer.cancel()
        # Watchers of children stay blocked in wait() (daemon threads) and only reap; pollers end now.
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        for watch in watches:
            if watch.thread is not None and watch.popen is None:
                watch.thread.join(timeout=max(0.0, deadline - time.monotonic()))

    # -- starting ----------------------------------------------------------------

    def _launch(self, spec: LaunchSpec, record: Path) -> _Watch:
        env = self._environment(spec)
        command = expand(spec.command, env)
        if not command:
            raise ExecutorError(f"run {spec.run_id} of {spec.project} has an empty command")
        workspace = Path(spec.workspace_dir).absolute()
        log_path = Path(spec.log_path).absolute()
        exit_file = record.with_name(f"{spec.run_id}.exit")
        self._prepare(spec, workspace, log_path, record, exit_file)
        read_fd, write_fd = os.pipe()
        try:
            popen = self._spawn(spec, command, env, workspace, log_path, exit_file, write_fd)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        started = utcnow()
        watch = _Watch(spec.project, spec.run_id, popen.pid, popen.pid, started, record, exit_file, popen=popen)
        try:
            _write_record(record, {
                "project": spec.project, "run_id": spec.run_id, "stage": spec.stage, "node": self.node,
                "pid": popen.pid, "pgid": popen.pid, "create_time": psutil.Process(popen.pid).create_time(),
                "started": started, "started_epoch": time.time(), "timeout": spec.timeout,
                "log": str(log_path), "exit_file": str(exit_file),
            })
            answer = _read_ready(read_fd, READY_TIMEOUT_S)
        except BaseException:
            self._abandon(watch)
            raise
        finally:
            os.close(read_fd)
        if not answer.startswith("ok "):
            self._abandon(watch)
            raise ExecutorError(self._start_failure(answer, command[0], popen, log_path))
        return watch

    def _environment(self, spec: LaunchSpec) -> dict[str, str]:
        input_dir = str(Path(spec.input_dir).absolute()) if spec.input_dir is not None else None
        stage = stage_env(spec, str(Path(spec.resources_dir).absolute()), input_dir,
                          str(Path(spec.workspace_dir).absolute()))
        if spec.gpus:
            stage.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA's indices = NVML's indices
        else:
            stage.setdefault("CUDA_VISIBLE_DEVICES", "")  # GPUs are never shared with a run that got none
        env = dict(os.environ)
        env.update(stage)
        return env

    def _prepare(self, spec: LaunchSpec, workspace: Path, log_path: Path, record: Path, exit_file: Path) -> None:
        if spec.input_dir is not None and not Path(spec.input_dir).is_dir():
            raise ExecutorError(
                f"input folder {Path(spec.input_dir).absolute()} of run {spec.run_id} does not exist on {self.node}"
            )
        try:
            workspace.mkdir(parents=True, exist_ok=True)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            record.parent.mkdir(parents=True, exist_ok=True)
            exit_file.unlink(missing_ok=True)
        except OSError as exc:
            raise ExecutorError(f"cannot prepare the folders of run {spec.run_id} on {self.node}: {exc}") from exc

    def _spawn(self, spec: LaunchSpec, command: list[str], env: dict[str, str], workspace: Path,
               log_path: Path, exit_file: Path, ready_fd: int) -> subprocess.Popen[bytes]:
        wrapper = [sys.executable, "-I", "-S", str(_WRAPPER), "--ready-fd", str(ready_fd), str(exit_file), "--"]
        try:
            with open(log_path, "ab") as out:
                # The log's handle goes to the process: output keeps flowing without the reconciler.
                return subprocess.Popen(
                    wrapper + command, cwd=workspace, env=env, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True, pass_fds=(ready_fd,),
                )
        except OSError as exc:
            raise ExecutorError(f"cannot start run {spec.run_id} of {spec.project} on {self.node}: {exc}") from exc

    def _start_failure(self, answer: str, program: str, popen: subprocess.Popen[bytes], log_path: Path) -> str:
        parts = answer.split(" ", 2)
        if parts[0] == "error" and len(parts) == 3 and parts[1].isdigit():
            code, text = int(parts[1]), parts[2]
            if code == errno.ENOENT:
                return f"program '{program}' not found on {self.node}"
            if code == errno.EACCES:
                return f"program '{program}' is not executable on {self.node}"
            return f"program '{program}' cannot run on {self.node}: {text}"
        if answer == "timeout":
            return f"program '{program}' did not start within {READY_TIMEOUT_S:.0f}s on {self.node}"
        return (f"program '{program}' could not be started on {self.node}: the wrapper ended "
                f"(exit code {popen.returncode}); see {log_path}")

    def _abandon(self, watch: _Watch) -> None:
        """Undo a start that failed: nothing may stay behind, neither a process nor a record."""
        assert watch.popen is not None
        _kill_group(watch.pgid, signal.SIGKILL)
        try:
            watch.popen.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("wrapper did not end after SIGKILL: node=%s %s", self.node, watch.describe())
        _remove(watch.record, watch.exit_file)

    # -- adopting ----------------------------------------------------------------

    def _records(self) -> list[Path]:
        try:
            return sorted(self._state_dir.glob("*/*.json"))
        except OSError as exc:
            raise ExecutorError(f"cannot read the run records in {self._state_dir} on {self.node}: {exc}") from exc

    def _adopt_run(self, project: str, run_id: str) -> _Watch | None:
        record = self._record_path(project, run_id)
        data = _load_record(record)
        return self._adopt(data, record) if data is not None else None

    def _adopt(self, data: dict[str, Any], record: Path) -> _Watch | None:
        """Follow a run started before this executor existed; one that already ended gets reported."""
        if self._closing.is_set():
            return None
        process = _same_process(int(data["pid"]), float(data["create_time"]))
        exit_file = Path(data.get("exit_file") or record.with_name(f"{data['run_id']}.exit"))
        watch = _Watch(data["project"], data["run_id"], int(data["pid"]), int(data.get("pgid", data["pid"])),
                       data.get("started"), record, exit_file, process=process, gone=process is None)
        with self._lock:
            if watch.key in self._watches:
                return self._watches[watch.key]
            self._watches[watch.key] = watch
        log.info("adopting process: node=%s %s state=%s", self.node, watch.describe(),
                 "ended" if watch.gone else "running")
        timeout = data.get("timeout")
        elapsed = max(0.0, time.time() - float(data.get("started_epoch") or time.time()))
        self._follow(watch, None if watch.gone or timeout is None else float(timeout), time.monotonic() - elapsed)
        return watch

    # -- watching ----------------------------------------------------------------

    def _follow(self, watch: _Watch, timeout: float | None, began: float) -> None:
        with self._lock:
            self._watches[watch.key] = watch
        if timeout is not None:
            remaining = max(0.0, timeout - (time.monotonic() - began))
            watch.timer = threading.Timer(remaining, self._expire, args=(watch, timeout))
            watch.timer.daemon = True
            watch.timer.start()
        target = self._watch_child if watch.popen is not None else self._watch_adopted
        watch.thread = threading.Thread(target=target, args=(watch,), daemon=True,
                                        name=f"winslow-process-{watch.run_id}")
        watch.thread.start()

    def _watch_child(self, watch: _Watch) -> None:
        assert watch.popen is not None
        try:
            returncode = watch.popen.wait()  # blocks until the exit: reported at once
            self._finish(watch, returncode, utcnow())
        except Exception:  # noqa: BLE001 - a watcher must never die silently
            log.exception("watcher failed: node=%s %s", self.node, watch.describe())

    def _watch_adopted(self, watch: _Watch) -> None:
        try:
            if not watch.gone:
                while not self._closing.wait(ADOPTED_POLL_S):
                    if not _alive(watch.process):
                        break
                finished = utcnow()
            else:
                finished = _mtime_iso(watch.exit_file) or utcnow()
            self._finish(watch, None, finished)
        except Exception:  # noqa: BLE001 - a watcher must never die silently
            log.exception("watcher failed: node=%s %s", self.node, watch.describe())

    def _finish(self, watch: _Watch, returncode: int | None, finished: str) -> None:
        if self._closing.is_set():
            return  # the record stays: the next executor reports this run
        if watch.timer is not None:
            watch.timer.cancel()
        watch.done.set()
        recorded = _read_exit_code(watch.exit_file)
        info = _exit_info(watch, recorded if recorded is not None else returncode, finished)
        if self._report(watch, info):
            _remove(watch.record, watch.exit_file)
        with self._lock:
            if self._watches.get(watch.key) is watch:
                del self._watches[watch.key]

    def _report(self, watch: _Watch, info: ExitInfo) -> bool:
        log.info("process exited: node=%s %s exit_code=%s reason=%s",
                 self.node, watch.describe(), info.exit_code, info.reason)
        try:
            self._on_exit(info)
            watch.reported = True
        except Exception:  # noqa: BLE001 - keep the record so a later running() reports it again
            log.exception("on_exit failed, keeping the record: node=%s %s", self.node, watch.describe())
            return False
        return True

    # -- stopping ----------------------------------------------------------------

    def _expire(self, watch: _Watch, timeout: float) -> None:
        if watch.done.is_set() or self._closing.is_set():
            return
        log.info("timeout: node=%s %s after=%ss", self.node, watch.describe(), timeout)
        self._terminate(watch, f"timeout after {format_duration(timeout)}")

    def _terminate(self, watch: _Watch, reason: str) -> None:
        """TERM through the wrapper, which relays it to the group once; KILL the group after the grace."""
        with self._lock:
            if watch.done.is_set() or watch.gone or watch.stopping:
                return
            watch.stopping = True
            watch.stop_reason = reason
        log.info("stopping process: node=%s %s reason=%s", self.node, watch.describe(), reason)
        try:
            if watch.popen is not None:
                watch.popen.send_signal(signal.SIGTERM)  # a no-op once reaped: no stray pid is hit
            elif watch.process is not None:
                watch.process.send_signal(signal.SIGTERM)  # psutil checks the pid was not reused
        except (psutil.NoSuchProcess, ProcessLookupError):
            return
        except (psutil.AccessDenied, PermissionError) as exc:
            with self._lock:
                watch.stopping = False  # a later stop() may try again
            raise ExecutorError(f"cannot stop run {watch.run_id} of {watch.project} on {self.node}: {exc}") from exc
        escalate = threading.Timer(STOP_GRACE_S, _kill_group, args=(watch.pgid, signal.SIGKILL))
        escalate.daemon = True
        escalate.start()

    # -- records -----------------------------------------------------------------

    def _record_path(self, project: str, run_id: str) -> Path:
        for part in (project, run_id):
            if not part or part in (".", "..") or "/" in part or "\0" in part:
                raise ExecutorError(f"'{part}' cannot name a run record on {self.node}")
        return self._state_dir / project / f"{run_id}.json"


def _exit_info(watch: _Watch, returncode: int | None, finished: str) -> ExitInfo:
    if returncode is None:
        return ExitInfo(watch.project, watch.run_id, None, finished, watch.stop_reason or UNKNOWN_EXIT)
    if returncode < 0:
        reason = watch.stop_reason or f"killed by signal {_signal_name(-returncode)}"
        return ExitInfo(watch.project, watch.run_id, 128 - returncode, finished, reason)
    return ExitInfo(watch.project, watch.run_id, returncode, finished, watch.stop_reason)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def _read_ready(fd: int, timeout: float) -> str:
    """The wrapper's first line: `ok <pid>`, `error <errno> <text>`; `timeout` or `` (it died)."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", "replace").strip()


def _same_process(pid: int, create_time: float) -> psutil.Process | None:
    """The process with this pid if it is still the one recorded (pids get reused) and alive."""
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - create_time) > _CREATE_TIME_TOLERANCE_S:
            return None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return process if _alive(process) else None


def _alive(process: psutil.Process | None) -> bool:
    if process is None:
        return False
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _write_record(path: Path, data: dict[str, Any]) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    try:
        temp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(temp, path)
    except OSError as exc:
        raise ExecutorError(f"cannot write the run record {path}: {exc}") from exc


def _load_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        int(data["pid"]), float(data["create_time"]), str(data["project"]), str(data["run_id"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring an unreadable run record %s: %s", path, exc)
        return None
    return data


def _read_exit_code(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _mtime_iso(path: Path) -> str | None:
    try:
        stamp = _dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.timezone.utc)
    except OSError:
        return None
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _remove(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove %s: %s", path, exc)
