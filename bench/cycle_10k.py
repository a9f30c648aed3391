"""What one node's reconcile cycle costs on a state repo of 10,000 projects, idle and after a push.

    python bench/cycle_10k.py                      # 10,000 paused projects, a table
    python bench/cycle_10k.py --projects 1000      # smaller
    python bench/cycle_10k.py --source DIR         # the reconciler of another checkout (before/after)

It generates a state repo of 10,000 projects on 5 pipelines, each with `run.state: paused`
at request 1, pushes it to a local bare remote, and starts one node in this process
(process executor: no Docker needed). The node's first cycle observes every request (a
lock and a status per project); after that the repo is idle. Then:

- idle cycle: `Node.step()` (fetch, read, decide, commit if needed) with nothing new on
  the remote, the median of --idle runs; the floor is the no-op `git fetch` plus the ref
  listing the node makes in the same cycle;
- memory: the node process's RSS once idle (the interpreter with Winslow imported and no
  repo read is printed as the floor);
- cycle after a push to one project: a user's clone sets one project to `state: running`
  and pushes; the figure is the first `step()` after the push, which claims that
  project's stage (its command is `true`) and pushes the claim, the median of --pushes
  runs. Its floor is a `git push` at this repo size (the user's own push is timed).

Everything it creates (a temp folder, the processes its stages start) is removed at the end.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import logging
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _host import describe  # bench/ is the script's folder: its first import path

ENV = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
       "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
PIPELINES = {"tracking": ["detect", "cleanup", "analyse"], "counting": ["decode", "count"],
             "calibration": ["undistort", "stitch", "detect", "export"], "reidentify": ["embed", "match", "report"],
             "demo": ["detect", "track", "analyse"]}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=ENV, check=True, capture_output=True, text=True).stdout


def pipeline_yaml(name: str, stages: list[str]) -> str:
    lines = [f"name: {name}", "stages:"]
    for i, stage in enumerate(stages):
        lines += [f"  - name: {stage}", "    image: none", "    command: ['true']",
                  f"    env: {{STAGE_MODE: {stage}}}", f"    resources: {{cpus: 0.1, memory: {8 * (i + 1)}MiB}}",
                  f"    pause_after: {'true' if i == 0 else 'false'}"]
    return "\n".join(lines) + "\n"


def project_yaml(i: int, pipeline: str, state: str) -> str:
    return (f"name: Intersection {i}\npipeline: {pipeline}\ntags: [city-{i % 40}, drone]\n"
            f"env: {{VIDEO: flights/{i:05d}/DJI_0001.MP4}}\nrun:\n  request: 1\n  state: {state}\n")


def generate(clone: Path, projects: int) -> None:
    (clone / "pipelines").mkdir(exist_ok=True)
    for name, stages in PIPELINES.items():
        (clone / "pipelines" / f"{name}.yaml").write_text(pipeline_yaml(name, stages))
    names = list(PIPELINES)
    for i in range(projects):
        folder = clone / "projects" / f"p{i:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "project.yaml").write_text(project_yaml(i, names[i % len(names)], "paused"))
    git(clone, "add", "-A")
    git(clone, "commit", "-qm", f"{projects} paused projects")
    git(clone, "push", "-q", "origin", "main")


def add_history(clone: Path, commits: int) -> None:
    """`commits` small commits on main (one file edited each time), made by `git fast-import` and pushed."""
    tip = git(clone, "rev-parse", "HEAD").strip()
    lines = []
    for i in range(commits):
        body = f"{i}\n"
        lines += ["commit refs/heads/main", f"committer bench <bench@localhost> {1700000000 + i} +0000",
                  "data 7", "history"]
        if i == 0:
            lines.append(f"from {tip}")
        lines += ["M 100644 inline notes/history.txt", f"data {len(body)}", body.rstrip("\n")]
    subprocess.run(["git", "fast-import", "--quiet", "--force"], cwd=clone, env=ENV, check=True,
                   input="\n".join(lines) + "\n", text=True, capture_output=True)
    git(clone, "reset", "-q", "--hard", "main")
    git(clone, "push", "-q", "origin", "main")


def push_running(clone: Path, i: int, projects: int) -> float:
    """Set project i running and push; returns how long the push took (a git push at this repo size)."""
    names = list(PIPELINES)
    for _ in range(20):
        git(clone, "fetch", "-q", "origin")
        git(clone, "reset", "-q", "--hard", "origin/main")
        (clone / "projects" / f"p{i:05d}" / "project.yaml").write_text(project_yaml(i, names[i % len(names)], "running"))
        git(clone, "commit", "-qam", f"p{i:05d}: running")
        began = time.perf_counter()
        if subprocess.run(["git", "push", "-q", "origin", "main"], cwd=clone, env=ENV,
                          capture_output=True).returncode == 0:
            return time.perf_counter() - began
    raise SystemExit("could not push")


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--projects", type=int, default=10_000)
    parser.add_argument("--idle", type=int, default=20, help="idle cycles to time")
    parser.add_argument("--pushes", type=int, default=5, help="pushes to one project to time")
    parser.add_argument("--source", type=Path, help="a checkout whose reconciler to measure (default: this one)")
    parser.add_argument("--phases", action="store_true", help="log each cycle's phases (the node's debug log)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the cycles after the pushes")
    parser.add_argument("--history", type=int, default=0,
                        help="commits to put under main first (100000: a repo with a long past)")
    args = parser.parse_args()
    if args.phases:
        logging.basicConfig(level=logging.WARNING, format="%(relativeCreated)8.0f %(name)s %(message)s")
        logging.getLogger("winslow.node").setLevel(logging.DEBUG)
    source = (args.source or Path(__file__).resolve().parent.parent).resolve()
    sys.path.insert(0, str(source))
    floor_rss = rss_mb()
    from reconciler.commands.init import init_repo
    from reconciler.node import Node, NodeOptions
    floor_rss_imported = rss_mb()

    tmp = Path(tempfile.mkdtemp(prefix="winslow-cycle-"))
    node = None
    try:
        clone, remote = tmp / "clone", tmp / "remote.git"
        init_repo(clone, remote)
        shutil.rmtree(clone / "projects", ignore_errors=True)
        git(clone, "rm", "-rq", "--cached", "--ignore-unmatch", "projects")
        if args.history:
            add_history(clone, args.history)
        generate(clone, args.projects)
        print(f"machine: {describe()}")
        print(f"source:  {source} ({git(source, 'rev-parse', '--short', 'HEAD').strip()})")
        print(f"repo:    {args.projects} paused projects on {len(PIPELINES)} pipelines, "
              f"{int(git(clone, 'rev-list', '--count', 'HEAD'))} commits on main")
        node = Node(NodeOptions(name="bench", repo=str(remote), storage=tmp / "storage", work=tmp / "work",
                                executor="process", heartbeat=2.0, lease=60.0, node_timeout=90.0))
        node.start()
        began = time.perf_counter()
        for _ in range(5):  # the first cycle observes every request: one big commit
            node.step()
        print(f"first cycles (observe {args.projects} requests): {time.perf_counter() - began:.1f} s")
        gc.collect()

        idle = []
        for _ in range(args.idle):
            began = time.perf_counter()
            node.step()
            idle.append(time.perf_counter() - began)
        floor = []
        for _ in range(args.idle):
            began = time.perf_counter()
            node.repo.fetch(skip_node=node.name)
            node.repo.reader.refs()
            floor.append(time.perf_counter() - began)
        rss = rss_mb()
        collections = []
        for _ in range(3):  # what a full collection costs the node when the collector decides to run one
            began = time.perf_counter()
            gc.collect()
            collections.append(time.perf_counter() - began)
        tracked = len(gc.get_objects())

        pushed, user_pushes = [], []
        profiler = cProfile.Profile() if args.profile else None
        for k in range(args.pushes):
            i = 1 + k * (args.projects // max(1, args.pushes))
            user_pushes.append(push_running(clone, i, args.projects))
            began = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            node.step()
            if profiler is not None:
                profiler.disable()
            pushed.append(time.perf_counter() - began)
            status = git(remote, "show", f"main:projects/p{i:05d}/status.yaml")
            if "RUNNING" not in status and "SUCCEEDED" not in status and "WAITING" not in status:
                print(f"warning: p{i:05d} did not start in that cycle")

        if profiler is not None:
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)

        def ms(values: list[float]) -> str:
            return f"{statistics.median(values) * 1000:8.0f} ms   (min {min(values) * 1000:.0f}, max {max(values) * 1000:.0f})"

        print(f"{'measure':<44}value")
        print(f"{'idle cycle, median of ' + str(args.idle):<44}{ms(idle)}")
        print(f"{'floor: no-op fetch + ref listing':<44}{ms(floor)}")
        print(f"{'cycle after a push to one project':<44}{ms(pushed)}")
        print(f"{'floor: the user git push at this size':<44}{ms(user_pushes)}")
        print(f"{'node RSS once idle':<44}{rss:8.0f} MB")
        print(f"{'a full garbage collection':<44}{ms(collections)}   ({tracked} objects tracked)")
        print(f"{'floor: interpreter with Winslow imported':<44}{floor_rss_imported:8.0f} MB   "
              f"(bare interpreter {floor_rss:.0f} MB)")
        return 0
    finally:
        if node is not None:
            node.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
