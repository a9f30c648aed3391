"""200 one-stage projects pushed in one commit to a cluster of 5 nodes with 10 slots, against a plain loop.

    python bench/batch_200.py                       # Docker executor, busybox `sleep 2`
    python bench/batch_200.py --executor process    # host processes, `sleep 2`
    python bench/batch_200.py --projects 50 --seconds 1

Five `winslow node` processes share a local bare remote. A node offers its machine's CPU
count and every stage asks for half of it, so each node runs two stages at a time: 10
slots in all. One user commit adds all the
projects at once. Measured from the push until every project is SUCCEEDED on the remote:

- wall time, and the same 200 stages run by a plain 10-wide loop (`docker run` or a
  process, 10 at a time): the floor;
- slot use: the stages' summed run time over (wall time x 10 slots);
- status.yaml writes per stage run: the commits on main that changed each project's
  status, divided by the stages run (the target is at most 3: claim, start, end);
- git history per stage run: the nodes' commits on main per stage run, and the bytes their
  objects take in the remote's pack after `git gc` (the git server's own housekeeping),
  logs aside and logs alone.

Everything it creates (a temp folder, the node processes, their stages) goes at the end.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from reconciler.commands.init import init_repo  # noqa: E402
from reconciler.executors.base import cluster_id  # noqa: E402
from reconciler.gitcmd import IDENTITY  # noqa: E402

ENV = {**os.environ, **IDENTITY}
IMAGE = "winslow-test/busybox:1"
NODES = 5
SLOTS = 10


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=ENV, check=True, capture_output=True, text=True).stdout


def statuses(remote: Path) -> dict[str, dict]:
    listing = git(remote, "ls-tree", "-r", "--name-only", "main", "projects")
    found = {}
    for path in listing.split():
        if path.endswith("/status.yaml"):
            found[path.split("/")[1]] = yaml.safe_load(git(remote, "show", f"main:{path}")) or {}
    return found


def seconds(text: str | None) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else 0.0


def plain_loop(executor: str, count: int, duration: float) -> float:
    """The floor: the same stages, 10 at a time, with nothing around them."""
    def one(_: int) -> None:
        if executor == "docker":
            subprocess.run(["docker", "run", "--rm", IMAGE, "sleep", str(duration)], check=True, capture_output=True)
        else:
            subprocess.run(["sleep", str(duration)], check=True)
    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(SLOTS) as pool:
        list(pool.map(one, range(count)))
    return time.monotonic() - began


def node_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds a node process has used: its own, and the git commands it ran and waited for (its containers
    and stages are not its children: the Docker engine's, or the wrapper's after it left)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    return times.user + times.system, times.children_user + times.children_system


def history_bytes(remote: Path, base: str) -> tuple[int, int]:
    """(all, logs): bytes in the remote's pack, after `git gc`, of the objects the nodes' commits on main added
    after `base` (the user's commit), and of the log blobs among them."""
    git(remote, "gc", "-q")
    listed = [line.split(" ", 1) for line in git(remote, "rev-list", "--objects", f"{base}..main").splitlines()]
    sizes = subprocess.run(["git", "cat-file", "--batch-check=%(objectname) %(objectsize:disk)"], cwd=remote,
                           input="\n".join(parts[0] for parts in listed) + "\n", capture_output=True, text=True,
                           env=ENV, check=True).stdout
    size = {name: int(disk) for name, disk in (line.split() for line in sizes.splitlines())}
    total = sum(size.get(parts[0], 0) for parts in listed)
    logs = sum(size.get(parts[0], 0) for parts in listed if len(parts) > 1 and "/logs/" in parts[1])
    return total, logs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executor", choices=("docker", "process"), default="docker")
    parser.add_argument("--projects", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=2.0, help="how long each stage runs")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (remote, node logs) and say where")
    parser.add_argument("--verbose", action="store_true", help="the nodes log debug detail (each cycle's phases)")
    args = parser.parse_args()
    cpus = (os.cpu_count() or 2) / 2  # each node offers its machine's count: two stages fit on each
    tmp = Path(tempfile.mkdtemp(prefix="winslow-batch-"))
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        clone, remote = tmp / "clone", tmp / "remote.git"
        init_repo(clone, remote)
        image = IMAGE if args.executor == "docker" else "none"
        (clone / "pipelines" / "one.yaml").write_text(
            f"name: one\nstages:\n  - {{name: s, image: '{image}', command: [sleep, '{args.seconds:g}'], "
            f"resources: {{cpus: {cpus:g}, memory: 16MiB}}}}\n")
        git(clone, "add", "-A")
        git(clone, "commit", "-qm", "pipeline")
        git(clone, "push", "-q", "origin", "main")
        for i in range(NODES):
            log = open(tmp / f"node-{i}.log", "wb")
            nodes.append(subprocess.Popen(
                [sys.executable, "-m", "reconciler", *(["-v"] if args.verbose else []), "node", "--repo", str(remote),
                 "--storage", str(tmp / "storage"),
                 "--name", f"n{i}", "--executor", args.executor, "--work", str(tmp / f"work-{i}"),
                 "--heartbeat", "2s"], stdout=log, stderr=subprocess.STDOUT, env=ENV, cwd=REPO))
        time.sleep(6)  # every node has a heartbeat on its branch: each sees the others
        for _ in range(20):  # the nodes write to main too: commit on its tip, push, again if it moved
            git(clone, "fetch", "-q", "origin")
            git(clone, "reset", "-q", "--hard", "origin/main")
            for i in range(args.projects):
                folder = clone / "projects" / f"b{i:03d}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "project.yaml").write_text("pipeline: one\nrun: {request: 1}\n")
            git(clone, "add", "-A")
            git(clone, "commit", "-qm", f"{args.projects} projects")
            before = int(git(remote, "rev-list", "--count", "main"))
            began = time.time()
            if subprocess.run(["git", "push", "-q", "origin", "main"], cwd=clone, env=ENV,
                              capture_output=True).returncode == 0:
                break
        else:
            raise SystemExit("could not push the projects")
        deadline = time.monotonic() + args.timeout
        done: dict[str, dict] = {}
        while time.monotonic() < deadline:
            found = statuses(remote)
            done = {p: s for p, s in found.items() if s.get("state") == "SUCCEEDED"}
            if len(done) == args.projects:
                break
            time.sleep(1)
        ended = max(seconds(s["runs"][-1].get("finished")) for s in done.values()) if done else time.time()
        wall = ended - began
        runs = [r for s in done.values() for r in s.get("runs", [])]
        busy = sum(seconds(r.get("finished")) - seconds(r.get("started")) for r in runs if r.get("started"))
        own, children = map(sum, zip(*(node_cpu(node.pid) for node in nodes)))
        cpu = own + children
        commits = int(git(remote, "rev-list", "--count", "main")) - before
        writes = len(git(remote, "log", "--format=", "--name-only", f"HEAD~{commits}..main", "--",
                         "projects/*/status.yaml").split())
        packed, logs = history_bytes(remote, git(clone, "rev-parse", "HEAD").strip())
        floor = plain_loop(args.executor, args.projects, args.seconds)
        print(f"machine: {os.cpu_count()} cores; executor {args.executor}; {NODES} nodes, {SLOTS} slots; "
              f"{args.projects} projects of one {args.seconds:g} s stage")
        print(f"{'succeeded':<40}{len(done)} of {args.projects}")
        print(f"{'push -> all SUCCEEDED':<40}{wall:8.1f} s")
        print(f"{'floor: a plain 10-wide loop':<40}{floor:8.1f} s")
        print(f"{'ratio to the floor':<40}{wall / floor:8.2f}x")
        print(f"{'slots busy':<40}{100 * busy / (wall * SLOTS):8.0f} %")
        share = 100 * cpu / (wall * (os.cpu_count() or 1))
        print(f"{'CPU used by the nodes and their git':<40}{cpu:8.1f} s = {share:.0f} % of the machine's "
              f"(git: {children:.1f} s)")
        print(f"{'commits on main':<40}{commits:8d}")
        print(f"{'status.yaml writes per stage run':<40}{writes / max(1, len(runs)):8.1f}")
        print(f"{'commits on main per stage run':<40}{commits / max(1, len(runs)):8.2f}")
        print(f"{'packed bytes per stage run, logs aside':<40}{(packed - logs) / max(1, len(runs)):8.0f}")
        print(f"{'packed bytes per stage run, logs':<40}{logs / max(1, len(runs)):8.0f}")
        return 0 if len(done) == args.projects else 1
    finally:
        for node in nodes:
            if node.poll() is None:
                node.send_signal(signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.kill()
        if args.executor == "docker":  # only this cluster's containers, by the label its nodes put on them
            label = f"label=winslow.cluster={cluster_id(str(tmp / 'remote.git'))}"
            left = subprocess.run(["docker", "ps", "-aq", "--filter", label], capture_output=True, text=True).stdout
            if left.split():
                subprocess.run(["docker", "rm", "-f", *left.split()], capture_output=True)
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
