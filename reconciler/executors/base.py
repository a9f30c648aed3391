"""The interface every executor implements, and what they share.

An executor starts a stage, tells when it exited (through the `on_exit`
callback, from its own thread, at once), stops it on request, and lists the
runs it has going so that a restarted node can adopt them.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from reconciler.clock import format_time
from reconciler.errors import ExecutorError
from reconciler.model import fill

log = logging.getLogger(__name__)

LABEL_PROJECT = "winslow.project"
LABEL_RUN = "winslow.run"
LABEL_NODE = "winslow.node"
LABEL_STAGE = "winslow.stage"
LABEL_CLUSTER = "winslow.cluster"  # which state repo: two clusters may share one engine
STOP_NOTES = "stops"  # in a node's work folder: why each run it stops was stopped, until its exit is reported


def cluster_id(repo_url: str) -> str:
    """A short, stable name for a state repo, to tell its containers from another cluster's."""
    import hashlib
    import os

    local = repo_url[len("file://"):] if repo_url.startswith("file://") else repo_url
    if "://" not in local and os.path.exists(local):
        local = os.path.realpath(local)
    return hashlib.sha256(local.rstrip("/").encode()).hexdigest()[:16]


@dataclass(frozen=True)
class LaunchSpec:
    """Everything an executor needs to start one run; paths are on the node."""

    project: str
    run_id: str
    stage: str
    node: str
    image: str
    command: tuple[str, ...]
    env: Mapping[str, str]
    resources_dir: Path
    workspace_dir: Path
    input_dir: Path | None
    log_path: Path
    gpus: tuple[int, ...] = ()
    cpus: float | None = None
    memory: int | None = None
    timeout: float | None = None
    secrets: Mapping[str, str] = field(default_factory=dict)
    node_tags: tuple[str, ...] = ()  # the stage's: a Slurm node turns those that name features into --constraint
    # Where a supervisor on another machine (a Slurm job's script) reads the node's lease: on the shared storage.
    lease_file: Path | None = None


@dataclass(frozen=True)
class StartInfo:
    """How a run started; `started` None: it waits in a queue (a Slurm job PENDING), and the start comes later.

    An executor whose runs start at once (docker, process) always sets `started`. One that queues
    them reports through `on_start`, with another StartInfo: a new reason to wait, or the start.
    """

    started: str | None
    image_digest: str | None = None
    pulled: str | None = None  # what was pulled for it, and how much in how long
    queue: str | None = None  # started None: whose queue the run waits in ("Slurm")
    reason: str | None = None  # ... and why, in the queue's own words ("Resources", "Priority"), once it says


@dataclass(frozen=True)
class ExitInfo:
    """A fact observed on the node: a run's program ended."""

    project: str
    run_id: str
    exit_code: int | None
    finished: str
    reason: str | None = None


@dataclass(frozen=True)
class RunningInfo:
    project: str
    run_id: str
    started: str | None = None


ExitCallback = Callable[[ExitInfo], None]
StartCallback = Callable[[str, str, StartInfo], None]  # (project, run id, how it stands): a queued run waits or began


class Executor(Protocol):
    name: str
    images: bool  # a stage's `image` is what runs (recorded with the claim); False: the command runs on the host
    # Set by the node: hears, from the executor's threads, of each run that start() left queued (a Slurm job
    # PENDING) when it waits for a new reason and when it begins. Never called for a run that started at once.
    on_start: StartCallback | None

    def prepare(self, spec: LaunchSpec) -> None:
        """Get ready to start (create a container) while the claim is pushed; never runs the stage."""

    def discard(self, project: str, run_id: str) -> None:
        """Undo `prepare` for a claim that did not land."""

    def waits_for(self, spec: LaunchSpec) -> str | None:
        """What starting the run will wait for first, said before the wait begins ("pulling IMAGE"); None: nothing."""

    def start(self, spec: LaunchSpec) -> StartInfo:
        """Start (or queue) the run; ExecutorError with a reason a person understands when it cannot."""

    def stop(self, project: str, run_id: str, reason: str) -> None:
        """Stop the run now (TERM, then KILL after a short grace); its exit is still reported."""

    def running(self) -> list[RunningInfo]:
        """Runs of this node that are alive, including ones started before a restart.

        A run stays in this list until its exit has been handed to `on_exit`, so
        a caller that reads this list first and the journal second never sees a
        run that is neither running nor reported.
        """

    def close(self) -> None:
        """Stop watching (containers keep running)."""


def stage_env(spec: LaunchSpec, resources: str, input_dir: str | None, workspace: str) -> dict[str, str]:
    """The environment a stage sees: Winslow's variables, then the stage env and secrets."""
    env = {
        "WINSLOW_PROJECT": spec.project,
        "WINSLOW_STAGE": spec.stage,
        "WINSLOW_RUN": spec.run_id,
        "WINSLOW_NODE": spec.node,
        "WINSLOW_RESOURCES": resources,
        "WINSLOW_INPUT": input_dir or "",
        "WINSLOW_WORKSPACE": workspace,
    }
    env.update(spec.env)
    env.update(spec.secrets)
    if spec.gpus:
        visible = ",".join(str(g) for g in spec.gpus)
        env.setdefault("NVIDIA_VISIBLE_DEVICES", visible)
        env.setdefault("CUDA_VISIBLE_DEVICES", visible)
    return env


SHELLS = {"sh", "bash", "dash", "ash", "zsh", "ksh"}


def expand(command: tuple[str, ...], env: Mapping[str, str]) -> list[str]:
    """Replace `${VAR}` in each argument from the stage's environment (unknown names stay).

    A value always stays data: it becomes (part of) one argument, never code. The script
    of a shell (`sh -c SCRIPT`) is left as written — the shell expands `${VAR}` itself from
    the environment the stage gets, as a value — so `VIDEO="x; id"` cannot run `id`.
    """
    script = _shell_script_index(command)
    return [arg if i == script else fill(arg, env) for i, arg in enumerate(command)]


def _shell_script_index(command: tuple[str, ...]) -> int | None:
    """Where the script of `sh -c SCRIPT ...` (or `bash -ec SCRIPT`) is, if the command is one."""
    if not command or command[0].rsplit("/", 1)[-1] not in SHELLS:
        return None
    for i, arg in enumerate(command[1:], start=1):
        if not arg.startswith("-") or arg in ("-", "--"):
            return None  # a script file, not -c
        if "c" in arg[1:] and not arg.startswith("--"):
            return i + 1 if i + 1 < len(command) else None
    return None


def make_folders(spec: LaunchSpec, node: str, *more: Path) -> None:
    """Create the run's workspace and log folder (and `more`) on the node; its input must exist already."""
    if spec.input_dir is not None and not Path(spec.input_dir).is_dir():
        raise ExecutorError(
            f"input folder {Path(spec.input_dir).absolute()} of run {spec.run_id} does not exist on {node}"
        )
    try:
        for folder in (Path(spec.workspace_dir), Path(spec.log_path).parent, *more):
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExecutorError(f"cannot prepare the folders of run {spec.run_id} on {node}: {exc}") from exc


def mtime_iso(path: Path) -> str | None:
    """When a file (an exit file) was last written, as Winslow records times; None when it is not there."""
    try:
        return format_time(_dt.datetime.fromtimestamp(path.stat().st_mtime, _dt.timezone.utc))
    except OSError:
        return None


def remove_files(*paths: Path) -> None:
    """Remove a run's own files (records, exit files), saying which could not be removed."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove %s: %s", path, exc)


def write_record(path: Path, data: dict[str, Any]) -> None:
    """A run's own record (JSON), replaced whole: a reader never sees half of it."""
    temp = path.with_name(f".{path.name}.tmp")
    try:
        temp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(temp, path)
    except OSError as exc:
        raise ExecutorError(f"cannot write the run record {path}: {exc}") from exc
