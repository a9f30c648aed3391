"""Executors run one stage each, behind the small interface in `base.py`."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from reconciler.executors.base import STOP_NOTES, Executor, ExitInfo, LaunchSpec, RunningInfo, StartInfo, cluster_id
from reconciler.fencing import LEASE_FILE
from reconciler.model import SlurmSettings

__all__ = ["LOST_REASON", "Executor", "ExitInfo", "LaunchSpec", "RunningInfo", "StartInfo", "make_executor"]

LOST_REASON = "lost: "  # an exit whose reason begins so was the machine's failure, not the program's: the run is LOST


def make_executor(kind: str, name: str, on_exit: Callable[[ExitInfo], None], work: Path, repo: str,
                  slurm: Callable[[], SlurmSettings] = SlurmSettings, container: str | None = None) -> Executor:
    """The executor of a node: `slurm` gives the Slurm settings in force when a job is submitted."""
    if kind == "docker":
        from reconciler.executors.docker import DockerExecutor
        return DockerExecutor(name, on_exit, cluster=cluster_id(repo), work=work)
    if kind == "slurm":
        from reconciler.executors.slurm import SlurmExecutor
        return SlurmExecutor(name, on_exit, work / "slurm", cluster=cluster_id(repo), settings=slurm,
                             container=container, notes=work / STOP_NOTES)
    from reconciler.executors.process import ProcessExecutor
    return ProcessExecutor(name, on_exit, work / "processes", lease_file=work / LEASE_FILE, notes=work / STOP_NOTES)
