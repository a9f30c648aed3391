"""What a Slurm job of Winslow's is made of: one fixed script, sbatch's options, the environment, the arguments.

The script (`JOB_SCRIPT`) is the same for every run. A stage's command reaches it as its
arguments and the stage's environment as sbatch's `--export-file` (NAME=value pairs ended
by NUL, read from a pipe), so neither is ever pasted into shell code: a value such as
`x; id` stays a value. The job's output goes to the run's log (`--output`), and the script
leaves the exit code beside it (`exit_file`), on the storage both the login node and the
compute nodes see. With the node's lease on that storage (`LaunchSpec.lease_file`), the script
also ends the stage once the lease has run out: the node is dead or frozen (`JOB_SCRIPT`).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from reconciler.errors import ExecutorError
from reconciler.executors.base import LaunchSpec, expand, stage_env
from reconciler.model import SlurmSettings

__all__ = ["JOB_SCRIPT", "exit_file", "export_file", "job_environment", "lapsed_file", "sbatch_options"]

_HIDDEN_ENV = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")  # the node's own Slurm variables would steer the job

JOB_SCRIPT = r"""#!/bin/sh
# Winslow's Slurm job script, the same for every run: its arguments are data, never code.
#   winslow-job.sh EXIT_FILE CONTAINER LEASE_FILE -- PROGRAM [ARGS...]
# It runs PROGRAM (with CONTAINER set: `docker run --name CONTAINER ARGS...`), relays TERM to it,
# removes the container when the job is cancelled (the Docker daemon, not the job, owns it), and
# leaves the exit code in EXIT_FILE for a node that was down when the job ended.
# With LEASE_FILE set it supervises the stage for its node: every second it reads until when the
# node's lease holds (renewed with each heartbeat the node pushes). Once that has passed, the node
# is dead or frozen and cannot stop its own work: the script TERMs the job's processes, KILLs them
# after a grace, and says why in EXIT_FILE.lapsed, before another node may take the run over.
exit_file=$1 container=$2 lease_file=$3
shift 4
grace=10
echo "winslow: Slurm job ${SLURM_JOB_ID:-?} runs on ${SLURMD_NODENAME:-$(hostname)}${SLURM_JOB_GPUS:+ with GPU $SLURM_JOB_GPUS}"
expires=
lapsed() {
    # The lease's end in ms; a line not read whole (a write caught half-way, a file gone) keeps the last one.
    if read -r line < "$lease_file" 2>/dev/null; then
        case $line in
            *[!0-9.]* | *.*.* | .*) ;;
            *.[0-9][0-9][0-9]) expires=${line%.*}${line#*.} ;;
        esac
    fi
    [ -n "$expires" ] || return 1
    now=$(date +%s%N 2>/dev/null)
    case $now in
        '' | *[!0-9]*) now=$(date +%s)000 ;;
        *) now=${now%??????} ;;
    esac
    [ "$now" -gt "$expires" ]
}
note() {
    echo "winslow: $1"
    printf '%s\n' "$1" > "$exit_file.lapsed.tmp" && mv -f "$exit_file.lapsed.tmp" "$exit_file.lapsed"
}
leave() {
    printf '%s\n' "$1" > "$exit_file.tmp.$$" && mv -f "$exit_file.tmp.$$" "$exit_file"
    exit "$1"
}
if [ -n "$lease_file" ]; then
    if [ ! -r "$lease_file" ]; then
        echo "winslow: cannot read the node's lease in $lease_file; the stage runs unsupervised until it can"
    elif lapsed; then
        note "the node's lease had run out when the job started (the node stopped or froze); the stage did not run"
        leave 1
    fi
fi
if [ -n "$container" ]; then
    if [ -n "${SLURM_JOB_GPUS:-}" ]; then
        set -- --gpus "\"device=$SLURM_JOB_GPUS\"" "$@"
    fi
    set -- docker run --rm --name "$container" "$@"
fi
child= stopped= watcher=
end() {
    stopped=1
    if [ -n "$container" ]; then docker rm -f "$container" >/dev/null 2>&1; fi
    # After a lapse the TERM went to the whole job already: the stage gets one.
    if [ -n "$child" ] && [ ! -e "$exit_file.lapsed" ]; then kill -TERM "$child" 2>/dev/null; fi
}
supervise() {
    trap '' TERM INT  # the TERM below is for the stage and what it started, not for the supervisor
    while kill -0 "$child" 2>/dev/null; do
        if lapsed; then
            at=$(date -u -d "@${expires%???}" +%H:%M:%S 2>/dev/null) && at=" at $at UTC" || at=
            note "the node's lease ran out$at (the node stopped or froze); its job ended the stage before another node \
may take it over"
            kill -TERM 0
            waited=0
            while [ "$waited" -lt "$grace" ] && kill -0 "$child" 2>/dev/null; do
                sleep 1
                waited=$((waited + 1))
            done
            if kill -0 "$child" 2>/dev/null; then
                echo "winslow: the stage did not end within ${grace}s of TERM: KILL"
                kill -KILL 0
            fi
            return
        fi
        sleep 1
    done
}
trap end TERM INT
"$@" &
child=$!
if [ -n "$stopped" ]; then end; fi
if [ -n "$lease_file" ]; then
    supervise &
    watcher=$!
fi
wait "$child"
code=$?
while kill -0 "$child" 2>/dev/null; do
    wait "$child"
    code=$?
done
if [ -n "$watcher" ]; then kill -KILL "$watcher" 2>/dev/null; fi
leave "$code"
"""


def exit_file(log_path: Path) -> Path:
    """Where the job script leaves the exit code: beside the log, on storage both ends see."""
    return log_path.with_name(log_path.stem + ".exit")


def lapsed_file(exit_path: Path) -> Path:
    """Where the job script says why it ended the stage itself: the node's lease ran out."""
    return exit_path.with_name(exit_path.name + ".lapsed")


def sbatch_options(spec: LaunchSpec, settings: SlurmSettings, comment: str, features: frozenset[str] = frozenset(),
                   export_fd: int | None = None) -> list[str]:
    """sbatch's options for a run: its resources as Slurm's, where it goes, and how it is found again."""
    options = ["--parsable", f"--job-name={f'winslow-{spec.project}-{spec.run_id}'[:100]}", f"--comment={comment}",
               "--nodes=1", "--ntasks=1", "--no-requeue", f"--output={Path(spec.log_path).absolute()}",
               "--open-mode=append", f"--chdir={Path(spec.workspace_dir).absolute()}"]
    if export_fd is not None:
        options.append(f"--export-file={export_fd}")
    if spec.gpus:
        options.append(f"--gres=gpu:{len(spec.gpus)}")
    if spec.cpus:
        options.append(f"--cpus-per-task={max(1, math.ceil(spec.cpus - 1e-9))}")
    if spec.memory:
        options.append(f"--mem={max(1, math.ceil(spec.memory / 2**20))}M")
    if spec.timeout:
        options.append(f"--time={max(1, math.ceil(spec.timeout / 60))}")  # minutes; the tracker stops it on time
    constraints = [tag for tag in spec.node_tags if tag in features]  # the others only route stages to this node
    if constraints:
        options.append(f"--constraint={'&'.join(constraints)}")
    for flag, value in (("partition", settings.partition), ("account", settings.account), ("qos", settings.qos)):
        if value:
            options.append(f"--{flag}={value}")
    return options + list(settings.flags)


def job_environment(spec: LaunchSpec, container: str | None, node: str) -> tuple[dict[str, str], list[str]]:
    """The job's environment (the node's, less its Slurm variables, then the stage's) and the script's arguments.

    `container`: the name of the container the job runs the stage's image in; None: the command runs as it is.
    """
    host = {k: v for k, v in os.environ.items() if not k.startswith(_HIDDEN_ENV)}
    script = [str(exit_file(Path(spec.log_path).absolute())), container or "",
              str(Path(spec.lease_file).absolute()) if spec.lease_file is not None else "", "--"]
    if container is None:
        input_dir = str(Path(spec.input_dir).absolute()) if spec.input_dir is not None else None
        stage = _without_gpu_indexes(spec, stage_env(spec, str(Path(spec.resources_dir).absolute()), input_dir,
                                                     str(Path(spec.workspace_dir).absolute())))
        return {**host, **stage}, [*script, *expand(spec.command, {**host, **stage})]
    stage = _without_gpu_indexes(spec, stage_env(spec, "/resources", "/input" if spec.input_dir else None, "/workspace"))
    return {**host, **stage}, [*script, *_docker_arguments(spec, stage, node)]


def export_file(env: Mapping[str, str], spec: LaunchSpec) -> bytes:
    """sbatch's --export-file: NAME=value pairs, each ended by NUL, so any value stays one value."""
    entries = []
    for name, value in env.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise ExecutorError(f"run {spec.run_id} of {spec.project}: the variable {name!r} cannot be passed to Slurm "
                                f"(a NUL character, or '=' in its name)")
        entries.append(f"{name}={value}\0".encode("utf-8", "surrogateescape"))
    return b"".join(entries)


def _docker_arguments(spec: LaunchSpec, env: Mapping[str, str], node: str) -> list[str]:
    """`docker run`'s arguments after `run --rm --name NAME`: the stage's image, mounts, env names and command."""
    mounts = [(spec.resources_dir, "/resources", ":ro"), (spec.workspace_dir, "/workspace", "")]
    if spec.input_dir is not None:
        mounts.append((spec.input_dir, "/input", ":ro"))
    arguments = ["--init", "--workdir", "/workspace", "--label", f"winslow.project={spec.project}",
                 "--label", f"winslow.run={spec.run_id}", "--label", f"winslow.node={node}"]
    for source, target, mode in mounts:
        path = str(Path(source).absolute())
        if ":" in path:
            raise ExecutorError(f"{path} cannot be mounted into a container: its name holds ':'")
        arguments += ["--volume", f"{path}:{target}{mode}"]
    for name in env:  # the value comes from the docker client's environment: the job's, from the export file
        arguments += ["--env", name]
    if spec.cpus:  # the container runs under the Docker daemon, outside the job's limits
        arguments += ["--cpus", f"{spec.cpus:g}"]
    if spec.memory:
        arguments += ["--memory", str(int(spec.memory))]
    return arguments + [spec.image, *expand(spec.command, env)]


def _without_gpu_indexes(spec: LaunchSpec, env: dict[str, str]) -> dict[str, str]:
    """Slurm picks the job's GPUs and says which in CUDA_VISIBLE_DEVICES: the node's indexes would mislead."""
    own = {**spec.env, **spec.secrets}
    for name in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"):
        if name not in own:
            env.pop(name, None)
    return env
