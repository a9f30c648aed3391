"""Runs each stage as a process on the node itself: for nodes without Docker, and the demo.

The stage runs under a tiny wrapper (`_wrap.py`) that leads its own process group,
relays TERM to the group and leaves the program's exit code in a file. The stage's
output goes straight to its log file, so logs keep flowing if the reconciler dies.

Per run, a JSON record in `state_dir/<project>/<run>.json` (pid, process group,
process create time, log path, timeout) lets a restarted reconciler find its runs
again: it adopts those still alive and reports those that ended while nobody
watched, each with the real exit code from the wrapper's exit-code file.

The process executor does not enforce a stage's `cpus` or `memory`, and it ignores
`image`: the program runs with the node's own environment plus the stage's. GPUs
reach it through `CUDA_VISIBLE_DEVICES` (with `CUDA_DEVICE_ORDER=PCI_BUS_ID`, so CUDA
counts GPUs in the same order as NVML); a stage without GPUs sees none.
"""
from __future__ import annotations

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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil

from reconciler.clock import utcnow
from reconciler.errors import ExecutorError
from reconciler.executors.base import (
    ExitCallback,
    LaunchSpec,
    StartInfo,
    expand,
    make_folders,
    mtime_iso,
    remove_files,
    stage_env,
    write_record,
)
from reconciler.executors.tracker import STOP_GRACE_S, WAKE_S, Ended, Found, RunTracker, already_running
from reconciler.fencing import FENCED

__all__ = ["POLL_S", "READY_TIMEOUT_S", "STOP_GRACE_S", "UNKNOWN_EXIT", "ProcessEngine", "ProcessExecutor"]

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 10.0
POLL_S = 0.5  # how often a process is looked at where the kernel gives no pidfd to wait on
UNKNOWN_EXIT = "exit code unknown (the stage outlived a reconciler restart)"
_CREATE_TIME_TOLERANCE_S = 0.05
_WRAPPER = Path(__file__).resolve().with_name("_wrap.py")


@dataclass(eq=False)
class _Process:
    """One run's wrapper process: a child of this executor, or one adopted from an earlier reconciler."""

    project: str
    run_id: str
    pid: int
    pgid: int
    record: Path
    exit_file: Path
    popen: subprocess.Popen[bytes] | None = None  # a child: waited for, reaped
    process: psutil.Process | None = None  # adopted: not our child, watched through its pidfd
    # Neither: adopted after it had already ended.

    def __str__(self) -> str:
        return f"pid={self.pid}"

    def ended(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is not None  # reaps it
        return not _alive(self.process)


class ProcessEngine:
    """Starts, waits for, stops and lists the stage processes of one node."""

    name = "process"
    images = False

    def __init__(self, node: str, state_dir: Path, lease_file: Path | None = None) -> None:
        self.node = node
        self._state_dir = Path(state_dir)
        self._lease_file = lease_file  # each wrapper ends its stage once the node's lease in it has passed

    def prepare(self, spec: LaunchSpec) -> None:
        """Nothing to prepare: a process starts in a few milliseconds."""

    def discard(self, project: str, run_id: str) -> None:
        """Nothing was prepared."""

    def spawn(self, spec: LaunchSpec) -> tuple[_Process, StartInfo]:
        record = self._record_path(spec.project, spec.run_id)
        if record.exists():  # an earlier reconciler's run, not adopted yet
            raise already_running(spec.project, spec.run_id, self.node)
        return self._launch(spec, record)

    def wait(self, run: _Process, closing: threading.Event) -> Ended | None:
        if run.popen is None and run.process is None:
            finished = mtime_iso(run.exit_file) or utcnow()
        elif _await_end(run, closing):
            finished = utcnow()
        else:
            return None
        returncode = _read_exit_code(run.exit_file)  # the program's own, where the wrapper could leave it
        if returncode is None and run.popen is not None:
            returncode = run.popen.returncode
        ended = _ended(returncode, finished)
        lapsed = _read_text(_lapsed_file(run.exit_file))
        return replace(ended, reason=f"{FENCED}{lapsed}") if lapsed else ended

    def stop(self, run: _Process, grace: float) -> None:
        """TERM through the wrapper, which relays it to the group once; KILL the group after the grace."""
        try:
            if run.popen is not None:
                run.popen.send_signal(signal.SIGTERM)  # a no-op once reaped: no stray pid is hit
            elif run.process is not None:
                run.process.send_signal(signal.SIGTERM)  # psutil checks the pid was not reused
            else:
                return
        except (psutil.NoSuchProcess, ProcessLookupError):
            return
        except (psutil.AccessDenied, PermissionError) as exc:
            raise ExecutorError(f"cannot stop run {run.run_id} of {run.project} on {self.node}: {exc}") from exc
        escalate = threading.Timer(grace, _kill_group, args=(run.pgid, signal.SIGKILL))
        escalate.daemon = True
        escalate.start()

    def runs(self) -> list[tuple[str, str]]:
        try:
            return [(record.parent.name, record.stem) for record in sorted(self._state_dir.glob("*/*.json"))]
        except OSError as exc:
            raise ExecutorError(f"cannot read the run records in {self._state_dir} on {self.node}: {exc}") from exc

    def adopt(self, project: str, run_id: str) -> Found[_Process] | None:
        record = self._record_path(project, run_id)
        data = _load_record(record)
        if data is None:
            return None
        pid = int(data["pid"])
        process = _same_process(pid, float(data["create_time"]))
        exit_file = Path(data.get("exit_file") or record.with_name(f"{run_id}.exit"))
        run = _Process(project, run_id, pid, int(data.get("pgid", pid)), record, exit_file, process=process)
        timeout = data.get("timeout")
        elapsed = max(0.0, time.time() - float(data.get("started_epoch") or time.time()))
        if process is None:
            return Found(run, data.get("started"), "ended")
        return Found(run, data.get("started"), "running", None if timeout is None else float(timeout), elapsed)

    def release(self, run: _Process) -> None:
        remove_files(run.record, run.exit_file, _lapsed_file(run.exit_file))

    def interrupt(self, run: _Process) -> None:
        """Nothing to do: a wait looks at `closing` at least every WAKE_S."""

    # -- starting ----------------------------------------------------------------

    def _launch(self, spec: LaunchSpec, record: Path) -> tuple[_Process, StartInfo]:
        env = self._environment(spec)
        command = expand(spec.command, env)
        if not command:
            raise ExecutorError(f"run {spec.run_id} of {spec.project} has an empty command")
        workspace = Path(spec.workspace_dir).absolute()
        log_path = Path(spec.log_path).absolute()
        exit_file = record.with_name(f"{spec.run_id}.exit")
        make_folders(spec, self.node, record.parent)
        try:
            _lapsed_file(exit_file).unlink(missing_ok=True)
            exit_file.unlink(missing_ok=True)  # an earlier attempt's exit code must not pass for this one's
        except OSError as exc:
            raise ExecutorError(f"cannot remove {exit_file} on {self.node}: {exc}") from exc
        read_fd, write_fd = os.pipe()
        try:
            popen = self._popen(spec, command, env, workspace, log_path, exit_file, write_fd)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        started = utcnow()
        run = _Process(spec.project, spec.run_id, popen.pid, popen.pid, record, exit_file, popen=popen)
        try:
            write_record(record, {
                "project": spec.project, "run_id": spec.run_id, "stage": spec.stage, "node": self.node,
                "pid": popen.pid, "pgid": popen.pid, "create_time": psutil.Process(popen.pid).create_time(),
                "started": started, "started_epoch": time.time(), "timeout": spec.timeout,
                "log": str(log_path), "exit_file": str(exit_file),
            })
            answer = _read_ready(read_fd, READY_TIMEOUT_S)
        except BaseException:
            self._abandon(run)
            raise
        finally:
            os.close(read_fd)
        if not answer.startswith("ok "):
            self._abandon(run)
            raise ExecutorError(self._start_failure(answer, command[0], popen, log_path))
        return run, StartInfo(started=started)

    def _environment(self, spec: LaunchSpec) -> dict[str, str]:
        input_dir = str(Path(spec.input_dir).absolute()) if spec.input_dir is not None else None
        stage = stage_env(spec, str(Path(spec.resources_dir).absolute()), input_dir,
                          str(Path(spec.workspace_dir).absolute()))
        if spec.gpus:
            stage.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # CUDA's indices = NVML's indices
        else:
            stage.setdefault("CUDA_VISIBLE_DEVICES", "")  # GPUs are never shared with a run that got none
        return {**os.environ, **stage}

    def _popen(self, spec: LaunchSpec, command: list[str], env: dict[str, str], workspace: Path,
               log_path: Path, exit_file: Path, ready_fd: int) -> subprocess.Popen[bytes]:
        lease = ["--lease-file", str(self._lease_file)] if self._lease_file is not None else []
        wrapper = [sys.executable, "-I", "-S", str(_WRAPPER), "--ready-fd", str(ready_fd), *lease, str(exit_file), "--"]
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

    def _abandon(self, run: _Process) -> None:
        """Undo a start that failed: nothing may stay behind, neither a process nor a record."""
        assert run.popen is not None
        _kill_group(run.pgid, signal.SIGKILL)
        try:
            run.popen.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning("wrapper did not end after SIGKILL: node=%s project=%s run=%s %s",
                        self.node, run.project, run.run_id, run)
        remove_files(run.record, run.exit_file, _lapsed_file(run.exit_file))

    def _record_path(self, project: str, run_id: str) -> Path:
        for part in (project, run_id):
            if not part or part in (".", "..") or "/" in part or "\0" in part:
                raise ExecutorError(f"'{part}' cannot name a run record on {self.node}")
        return self._state_dir / project / f"{run_id}.json"


class ProcessExecutor(RunTracker[_Process]):
    """The Executor of a node whose stages run as its own processes."""

    def __init__(self, node: str, on_exit: ExitCallback, state_dir: Path, lease_file: Path | None = None,
                 notes: Path | None = None) -> None:
        super().__init__(node, on_exit, ProcessEngine(node, state_dir, lease_file), notes)


def _await_end(run: _Process, closing: threading.Event) -> bool:
    """Block until the process ended (True) or the executor closes (False), woken by its pidfd."""
    pidfd = _pidfd(run.pid)  # opened before the first look: the pid cannot be reused under it then
    poller = select.poll()
    if pidfd is not None:
        poller.register(pidfd, select.POLLIN)  # readable once the process has ended
    try:
        while not run.ended():
            if closing.is_set():
                return False
            if pidfd is None:
                closing.wait(POLL_S)
            else:
                poller.poll(WAKE_S * 1000)
        return True
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when the process ends; None where the kernel has none."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux 5.3+, not allowed, or the process is gone already
        return None


def _lapsed_file(exit_file: Path) -> Path:
    """Where the wrapper says why it ended the stage itself: the node's lease lapsed."""
    return exit_file.with_name(exit_file.name + ".lapsed")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip() or None
    except OSError:
        return None


def _ended(returncode: int | None, finished: str) -> Ended:
    if returncode is None:
        return Ended(None, finished, UNKNOWN_EXIT)
    if returncode < 0:
        return Ended(128 - returncode, finished, f"killed by signal {_signal_name(-returncode)}")
    return Ended(returncode, finished)


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


def _load_record(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
        int(data["pid"]), float(data["create_time"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring an unreadable run record %s: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def _read_exit_code(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
