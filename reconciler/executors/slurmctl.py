"""Slurm's commands as a Slurm node runs them, their answers parsed, and the partition as the node's machine.

Every command runs with the node's environment (`SLURM_CONF` names the cluster where no DNS
record does) and a timeout; a failure is an ExecutorError in Slurm's own words.
"""
from __future__ import annotations

import datetime as _dt
import logging
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reconciler.clock import format_time
from reconciler.errors import ExecutorError
from reconciler.machine import Nvml
from reconciler.model import SlurmSettings

__all__ = ["COMMAND_TIMEOUT_S", "JobView", "Slurm", "SlurmMachine", "SlurmNode", "gone"]

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_S = 30.0  # the longest one Slurm command may take (a busy slurmctld answers slowly)
CAPACITY_EVERY_S = 30.0  # how long the partition's size is taken as known
_FIELD = re.compile(r"(?:^|\s)([A-Za-z/:_]+)=(\S*)")
_GPUS = re.compile(r"(?:^|,)gpu(?::[^:,(]+)?:(\d+)")


@dataclass(frozen=True)
class JobView:
    """What scontrol says of a job."""

    state: str  # JobState: PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL, ...
    reason: str  # why it is pending: Resources, Priority, ... ("None": not looked at yet)
    exit_code: int | None
    signal: int
    restarts: int  # how often Slurm requeued it
    nodes: str
    start: str | None  # when it began running (PENDING: when Slurm expects it to)
    end: str | None
    log: str | None


@dataclass(frozen=True)
class SlurmNode:
    name: str
    cpus: int
    memory: int  # MiB
    gpus: int
    features: frozenset[str]


class Slurm:
    """The Slurm commands a node runs; ExecutorError in words when one fails."""

    def __init__(self, node: str) -> None:
        self.node = node

    def run(self, *args: str, pass_fds: tuple[int, ...] = ()) -> str:
        try:
            done = subprocess.run(list(args), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                                  pass_fds=pass_fds, stdin=subprocess.DEVNULL)
        except FileNotFoundError:
            raise ExecutorError(f"{args[0]} is not installed on {self.node} (the Slurm client commands)") from None
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ExecutorError(f"{args[0]} did not answer on {self.node}: {exc}") from exc
        if done.returncode != 0:
            words = " ".join((done.stderr or done.stdout).split()) or f"exit code {done.returncode}"
            raise ExecutorError(f"{args[0]} failed on {self.node}: {words}")
        return done.stdout

    def job(self, job_id: str) -> JobView | None:
        """The job as slurmctld knows it; None once it has left slurmctld's memory (MinJobAge after its end)."""
        try:
            text = self.run("scontrol", "-o", "show", "job", job_id).strip()
        except ExecutorError as exc:
            if "Invalid job id" in str(exc):
                return None
            raise
        fields = dict(_FIELD.findall(text.splitlines()[0] if text else ""))
        if "JobState" not in fields:
            return None
        code, _, signal = fields.get("ExitCode", "").partition(":")
        return JobView(state=fields["JobState"], reason=fields.get("Reason", "None"),
                       exit_code=int(code) if code.isdigit() else None, signal=int(signal) if signal.isdigit() else 0,
                       restarts=_int(fields.get("Restarts", "0")), nodes=fields.get("NodeList", ""),
                       start=_slurm_time(fields.get("StartTime")), end=_slurm_time(fields.get("EndTime")),
                       log=fields.get("StdOut") or None)

    def accounted(self, job_id: str) -> tuple[str, int | None, int] | None:
        """(state, exit code, signal) from Slurm's accounting; None where none answers (no slurmdbd)."""
        try:
            text = self.run("sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,ExitCode")
        except ExecutorError:
            return None
        for line in text.splitlines():
            state, _, exit_code = line.partition("|")
            code, _, signal = exit_code.partition(":")
            if state and code.isdigit():
                return state.split()[0], int(code), int(signal) if signal.isdigit() else 0  # "CANCELLED by 0"
        return None

    def queued(self) -> dict[str, tuple[str, str]]:
        """This user's jobs that Slurm still runs or queues: comment -> (job id, state)."""
        text = self.run("squeue", "--me", "--noheader", "--format=%i|%T|%k")
        jobs = {}
        for line in text.splitlines():
            job_id, state, comment = (line.split("|", 2) + ["", ""])[:3]
            if job_id and comment:
                jobs[comment.strip()] = (job_id.strip(), state.strip())
        return jobs

    def nodes(self, partition: str | None) -> list[SlurmNode]:
        """Each node of the partition (the default one if None), whatever its state: the partition as configured."""
        text = self.run("sinfo", "--noheader", "--Node", "--format=%N|%P|%c|%m|%G|%f")
        found: dict[str, SlurmNode] = {}
        for line in text.splitlines():
            parts = [part.strip() for part in line.split("|")]
            if len(parts) != 6:
                continue
            name, part, cpus, memory, gres, features = parts
            if (part.rstrip("*") != partition) if partition else not part.endswith("*"):
                continue
            found[name] = SlurmNode(name, _int(cpus), _int(memory), sum(int(n) for n in _GPUS.findall(gres)),
                                    frozenset(f for f in features.split(",") if f and f != "(null)"))
        return list(found.values())


class SlurmMachine(Nvml):
    """The partition as the node's machine: its CPUs, memory and GPUs (GRES), summed over its nodes.

    Read at most every CAPACITY_EVERY_S; when Slurm does not answer, the last answer stands (a capacity
    that dropped to nothing would stop runs whose GPUs seem to have vanished). The GPUs get indexes
    0..N-1: Winslow counts them, and Slurm picks the devices (`CUDA_VISIBLE_DEVICES` in the job).
    """

    def __init__(self, slurm: Slurm, settings: Callable[[], SlurmSettings]) -> None:
        super().__init__()
        self.slurm = slurm
        self.settings = settings
        self._last: tuple[float, dict[str, Any]] | None = None

    @property
    def available(self) -> bool:
        return True

    def host(self) -> dict[str, int]:
        capacity = self._read()
        return {"cpus": capacity["cpus"], "memory": capacity["memory"]}

    def devices(self) -> list[dict[str, Any]]:
        return list(self._read()["gpus"])

    def load(self) -> list[dict[str, Any]]:
        return []  # a compute node's GPU load is not the login node's to read

    def close(self) -> None:
        """Nothing to close."""

    def _read(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < CAPACITY_EVERY_S:
            return self._last[1]
        partition = self.settings().partition
        try:
            nodes = self.slurm.nodes(partition)
        except ExecutorError as exc:
            if self._last is None:
                log.warning("cannot read the partition's capacity, reporting this machine's for now: %s", exc)
                return {**Nvml.host(self), "gpus": []}
            log.warning("cannot read the partition's capacity, keeping the last: %s", exc)
            return self._last[1]
        where = f"Slurm gres/gpu, partition {partition or '(default)'}"
        capacity = {"cpus": sum(n.cpus for n in nodes) or 1, "memory": sum(n.memory for n in nodes) * 2**20,
                    "gpus": [{"index": i, "model": where} for i in range(sum(n.gpus for n in nodes))]}
        self._last = (now, capacity)
        return capacity


def gone(exc: ExecutorError) -> bool:
    """scancel's words for a job that has already ended."""
    words = str(exc)
    return "Invalid job id" in words or "already completing or completed" in words


def _slurm_time(text: str | None) -> str | None:
    """Slurm's times are the controller's local time without a zone; this node is taken to share it."""
    if not text or text in ("Unknown", "None", "N/A"):
        return None
    try:
        return format_time(_dt.datetime.fromisoformat(text).astimezone())
    except ValueError:
        return None


def _int(text: str) -> int:
    digits = re.match(r"\d+", text)
    return int(digits.group(0)) if digits else 0
