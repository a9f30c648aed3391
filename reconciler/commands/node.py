"""`winslow node`: run the reconciler daemon on this machine."""
from __future__ import annotations

import argparse
import os
import signal
import socket
from pathlib import Path

from reconciler.errors import ConfigError
from reconciler.model import SlurmSettings
from reconciler.units import parse_duration


def default_work(name: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "winslow" / name


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("node", help="run a reconciler node (the daemon)",
                            description="Run a reconciler: pull the state repo, claim stages that fit this node, run "
                                        "them, and commit status, logs and results back. Flags override winslow.yaml.")
    parser.add_argument("--repo", required=True, help="URL or path of the state repo's remote")
    parser.add_argument("--storage", type=Path, help="storage root, a local folder or shared mount (default: storage.root "
                                                     "in winslow.yaml)")
    parser.add_argument("--name", default=socket.gethostname().split(".")[0], help="node name (default: host name)")
    parser.add_argument("--executor", choices=("docker", "process", "slurm"), default="docker",
                        help="run stages as Docker containers (default), as host processes, or as Slurm jobs "
                             "(on a cluster's login node; docs/slurm.md)")
    slurm = parser.add_argument_group("Slurm (--executor slurm)", "Where the jobs go; each flag overrides the "
                                      "node's slurm: settings in winslow.yaml.")
    slurm.add_argument("--slurm-partition", metavar="NAME", help="partition of the jobs, whose CPUs, memory and GPUs "
                                                                   "the node reports (default: the cluster's default)")
    slurm.add_argument("--slurm-account", metavar="NAME", help="account the jobs are charged to")
    slurm.add_argument("--slurm-qos", metavar="NAME", help="quality of service of the jobs")
    slurm.add_argument("--slurm-flag", action="append", default=[], metavar="OPTION",
                       help="one more sbatch option, e.g. --slurm-flag=--exclusive (repeatable)")
    slurm.add_argument("--slurm-container", choices=("docker",),
                       help="run the stage's image with `docker run` inside the job (the compute nodes need Docker); "
                            "default: run its command directly")
    parser.add_argument("--work", type=Path, help="node's own folder: repo mirror, journal (default: "
                                                  "$XDG_STATE_HOME/winslow/NAME)")
    parser.add_argument("--secrets", type=Path, help="folder with one file per secret (name = file name)")
    parser.add_argument("--tag", action="append", default=[], help="node tag matched by stages' node_tags (repeatable)")
    parser.add_argument("--heartbeat", help="heartbeat interval (default from winslow.yaml, else 5s)")
    parser.add_argument("--node-timeout", help="a silent node is lost after this (default from winslow.yaml, else 4m)")
    parser.add_argument("--lease", help="stop own stages when no heartbeat could be pushed for this "
                                        "(default from winslow.yaml, else 3m)")
    parser.add_argument("--poll", help="poll interval for remotes that cannot be watched (default 2s)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text for people (default), or one JSON object per line for log shippers")
    parser.add_argument("--metrics-port", type=int, metavar="PORT",
                        help="serve Prometheus metrics on http://HOST:PORT/metrics (default: off; docs/metrics.md)")
    parser.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                        help="address the metrics endpoint listens on (default 127.0.0.1: this machine only)")
    parser.set_defaults(func=run)


def _seconds(value: str | None, flag: str) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    from reconciler import logfmt
    from reconciler.node import Node, NodeOptions

    logfmt.use(args.log_format)
    from reconciler.validation import is_safe_id

    if not is_safe_id(args.name):
        raise ConfigError(f"--name {args.name!r} is not a safe node name (letters, digits, '_', '.', '-')")
    options = NodeOptions(
        name=args.name, repo=args.repo, storage=args.storage.resolve() if args.storage else None,
        work=(args.work or default_work(args.name)).resolve(),
        executor=args.executor, secrets=args.secrets, tags=tuple(args.tag),
        heartbeat=_seconds(args.heartbeat, "--heartbeat"), node_timeout=_seconds(args.node_timeout, "--node-timeout"),
        lease=_seconds(args.lease, "--lease"), poll=_seconds(args.poll, "--poll"),
        slurm=SlurmSettings(partition=args.slurm_partition, account=args.slurm_account, qos=args.slurm_qos,
                            flags=tuple(args.slurm_flag)),
        slurm_container=args.slurm_container)
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ConfigError(f"--metrics-port {args.metrics_port}: a port is a number from 0 to 65535")
    if args.executor == "docker":
        _check_docker()
    if args.executor == "slurm":
        _check_slurm()
    elif args.slurm_partition or args.slurm_account or args.slurm_qos or args.slurm_flag or args.slurm_container:
        raise ConfigError("--slurm-* flags need --executor slurm")
    node = Node(options)
    signal.signal(signal.SIGTERM, lambda *_: node.request_stop("SIGTERM"))
    signal.signal(signal.SIGINT, lambda *_: node.request_stop("SIGINT"))
    metrics = None
    if args.metrics_port is not None:
        from reconciler.metrics import MetricsServer

        metrics = MetricsServer(node.metrics.registry, args.metrics_host, args.metrics_port)
    try:
        node.run_forever()
    finally:
        if metrics is not None:
            metrics.stop()
    return 0


def _check_docker() -> None:
    try:
        import docker

        docker.from_env(timeout=5).ping()
    except Exception as exc:  # noqa: BLE001 - docker-py raises many kinds when no engine answers
        raise ConfigError(f"no Docker engine answers ({type(exc).__name__}); start dockerd or use --executor process") from None


def _check_slurm() -> None:
    import subprocess

    try:
        done = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise ConfigError("sinfo is not installed: a Slurm node needs Slurm's client commands (apt-get install "
                          "slurm-client) and a slurm.conf (docs/slurm.md)") from None
    except subprocess.TimeoutExpired:
        raise ConfigError("no Slurm controller answered sinfo within 30s") from None
    if done.returncode != 0:
        raise ConfigError(f"no Slurm controller answers: sinfo: {' '.join(done.stderr.split())}")
