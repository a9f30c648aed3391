"""`winslow demo`: a state repo, a remote, storage and a node, and a real pipeline run end to end."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from reconciler import layout
from reconciler.commands.init import init_repo
from reconciler.errors import ConfigError, WinslowError
from reconciler.gitcmd import IDENTITY, git, git_env
from reconciler.model import Status
from reconciler.repoview import RepoView
from reconciler.wake import RemoteWatcher

PROJECT = "demo-traffic"
IMAGE = "winslow-demo/python:3"
PULLABLE = "python:3.12-slim"
NODE_CHECK_S = 1.0  # the longest the demo waits without checking that its node is still alive
MARKER = ".winslow-demo"
PROJECT_YAML = """\
# yaml-language-server: $schema=../../schema/project.schema.json
name: Demo crossing (synthetic drone video)
pipeline: demo
tags: [demo]
env:
  VIDEO: demo/traffic.y4m        # under resources/ in storage
  METRES_PER_PIXEL: "0.375"
run:
  request: 1
  state: running
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="run a small vehicle-tracking pipeline end to end on this machine",
                            description="Create a state repo, a bare remote and a storage folder under DIR, start a "
                                        "node, and run the demo pipeline (detect, a gate approved through the resume "
                                        "branch, track, analyse) on a synthetic traffic video.")
    parser.add_argument("--dir", type=Path, default=Path("winslow-demo"), help="where to put it all (default: ./winslow-demo)")
    parser.add_argument("--executor", choices=("auto", "docker", "process"), default="auto",
                        help="auto: Docker when an engine answers and has a Python image, else host processes")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds (default 600)")
    parser.set_defaults(func=run)


def say(text: str) -> None:
    print(text, flush=True)


def choose_executor(wanted: str) -> tuple[str, str]:
    """The executor to use and a sentence saying why."""
    if wanted == "process":
        return "process", "host processes (--executor process)"
    try:
        import docker

        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:  # noqa: BLE001 - docker-py raises many kinds when no engine answers
        if wanted == "docker":
            raise ConfigError(f"no Docker engine answers ({type(exc).__name__}); try --executor process") from None
        return "process", "host processes: no Docker engine answers here"
    try:
        client.images.get(IMAGE)
        return "docker", f"Docker containers (image {IMAGE})"
    except docker.errors.ImageNotFound:
        pass
    try:
        client.images.pull(PULLABLE).tag(IMAGE)
        return "docker", f"Docker containers (image {IMAGE}, pulled from {PULLABLE})"
    except Exception as exc:  # noqa: BLE001 - a pull fails in many ways; any of them means no image
        if wanted == "docker":
            raise ConfigError(f"Docker answers but has no image {IMAGE} and cannot pull {PULLABLE}: {exc}") from None
        return "process", f"host processes: Docker answers, but has no {IMAGE} image and cannot pull {PULLABLE}"


def prepare(root: Path) -> tuple[Path, Path, Path]:
    if root.exists():
        if not (root / MARKER).exists():
            if any(root.iterdir()):
                raise ConfigError(f"{root} exists and is not an earlier demo; choose another --dir")
        else:
            shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("made by winslow demo; removed by the next one\n")
    repo, remote, storage = root / "repo", root / "remote.git", root / "storage"
    init_repo(repo, remote)
    return repo, remote, storage


def make_video(storage: Path) -> dict:
    import reconciler.demo

    target = storage / layout.RESOURCES / "demo"
    target.mkdir(parents=True, exist_ok=True)
    for name in reconciler.demo.SCRIPTS:
        shutil.copy2(Path(reconciler.demo.__file__).with_name(name), target / name)
    video = target / "traffic.y4m"
    subprocess.run([sys.executable, "-I", str(target / "vehicles.py"), "generate", str(video)], check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads((target / "traffic.y4m.truth.json").read_text())


def push_project(repo: Path) -> None:
    env = git_env(IDENTITY)
    (repo / layout.project_dir(PROJECT)).mkdir(parents=True)
    (repo / layout.project_file(PROJECT)).write_text(PROJECT_YAML)
    git(repo, "add", "-A", env=env)
    git(repo, "commit", "-q", "-m", f"{PROJECT}: a new project on the demo pipeline, request 1", env=env)
    git(repo, "push", "-q", "origin", "main", env=env)


def read_status(view: RepoView) -> Status:
    """The demo project's status on the remote's main, through the same read path as `winslow status`."""
    tip = view.tip(layout.MAIN_REF)
    entry = view.project(PROJECT, tip)[0] if tip else None
    return entry.status if entry is not None else Status()


def start_node(root: Path, remote: Path, storage: Path, executor: str) -> subprocess.Popen[bytes]:
    log = open(root / "node.log", "wb")
    args = [sys.executable, "-m", "reconciler", "node", "--repo", str(remote), "--storage", str(storage),
            "--name", "demo-node", "--executor", executor, "--work", str(root / "node-work"), "--heartbeat", "2s"]
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **IDENTITY})


def approve(repo: Path) -> None:
    from reconciler.commands.verbs import run_approve

    run_approve(argparse.Namespace(project=PROJECT, repo_dir=str(repo)))


def follow(root: Path, repo: Path, remote: Path, node: subprocess.Popen[bytes], deadline: float) -> Status:
    """Print each change of state and run; approve the gate once; return the final status."""
    watcher = RemoteWatcher(str(remote), threading.Event(), poll=1.0)
    watcher.start()
    view = RepoView.of_repository(remote)
    try:
        return _follow(root, repo, view, node, deadline, watcher.wake)
    finally:
        watcher.stop()
        view.close()


def _follow(root: Path, repo: Path, view: RepoView, node: subprocess.Popen[bytes], deadline: float,
            wake: threading.Event) -> Status:
    seen: set[str] = set()
    approved = False
    while time.monotonic() < deadline:
        wake.clear()
        if node.poll() is not None:
            raise WinslowError(f"the node stopped (exit {node.returncode}); see {root / 'node.log'}")
        status = read_status(view)
        for run in status.runs:
            for key, text in ((f"{run.id}:claim", f"  {run.id}: {run.stage} claimed by {run.node}"),
                              (f"{run.id}:{run.state.value}", None)):
                if key in seen or (text is None and not run.done):
                    continue
                seen.add(key)
                if text is None:
                    text = f"  {run.id}: {run.stage} {run.state.value}" + (
                        f" (exit {run.exit_code}, {run.reason})" if run.reason else f" (exit {run.exit_code})")
                say(text)
        if status.state.value == "WAITING" and not approved:
            say(f"  gate after detect: {PROJECT} is WAITING; approving it by merging its resume branch")
            approve(repo)
            approved = True
        elif status.state.value in ("SUCCEEDED", "FAILED", "INVALID") and status.runs and not status.active:
            if status.state.value != "SUCCEEDED" or len(status.runs) >= 3:
                return status
        wake.wait(NODE_CHECK_S)  # every push to the remote wakes it; the bound notices a node that died
    raise WinslowError(f"the demo did not finish in time; see {root / 'node.log'}")


def winslow_command() -> str:
    """How to run this Winslow again from a shell: `winslow` when that is what PATH finds, else its full path
    (installed into a virtualenv that is not activated, as the quick start does)."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    found = shutil.which("winslow")
    if script is not None and script.name == "winslow" and script.is_file():
        return "winslow" if found and Path(found).resolve() == script else str(script)
    if found:
        return "winslow"
    return f"{sys.executable} -m reconciler"


def report(root: Path, storage: Path, status: Status, executor: str) -> None:
    say("")
    for run in status.runs:
        say(f"  {run.id:<14} {run.stage:<8} {run.state.value:<10} on {run.node} ({executor})")
    last = status.runs[-1]
    workspace = storage / last.workspace
    summary = workspace / "summary.json"
    if summary.exists():
        data = json.loads(summary.read_text())
        say(f"\nResult: {data.get('vehicles')} vehicles, mean speed {data.get('mean_speed_kmh', '?')} km/h")
    say(f"\nResults (storage):  {workspace}/")
    for name in ("trajectories.png", "vehicles.csv", "summary.json"):
        if (workspace / name).exists():
            say(f"  {workspace / name}")
    say(f"Logs and status (git): {root / 'repo'}/projects/{PROJECT}/  (git pull there first)")
    say(f"Node log: {root / 'node.log'}")
    winslow = winslow_command()
    say("\nLook around:")
    say(f"  cd {root / 'repo'} && git pull -q && {winslow} status {PROJECT}")
    say(f"  {winslow} logs {PROJECT} --run {status.runs[0].id}")
    say("  git log --oneline     # every claim, start and finish is a commit")


def run(args: argparse.Namespace) -> int:
    root = args.dir.resolve()
    executor, why = choose_executor(args.executor)
    say(f"Winslow demo in {root}")
    repo, remote, storage = prepare(root)
    say(f"  state repo {repo}, remote {remote}, storage {storage}")
    truth = make_video(storage)
    say(f"  synthetic traffic video: storage/resources/demo/traffic.y4m ({truth.get('vehicle_count', '?')} vehicles in it)")
    say(f"  stages run as {why}")
    node = start_node(root, remote, storage, executor)
    try:
        push_project(repo)
        say(f"  pushed projects/{PROJECT}/project.yaml (request 1); node demo-node (pid {node.pid}) takes it")
        status = follow(root, repo, remote, node, time.monotonic() + args.timeout)
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=20)
        except subprocess.TimeoutExpired:
            node.kill()
    report(root, storage, status, executor)
    if status.state.value != "SUCCEEDED":
        say(f"\n{PROJECT} ended {status.state.value}: {status.message}")
        return 1
    say(f"\n{PROJECT} SUCCEEDED.")
    return 0
