"""The viewer's projects page (its first screen) at 1,000 projects, against reading the same snapshot alone.

    python bench/viewer_projects.py                    # 1,000 projects, a table
    python bench/viewer_projects.py --projects 10000   # 10,000: paging keeps the page small
    python bench/viewer_projects.py --requests 200     # more requests per median

It generates a state repo of --projects projects on 3 pipelines in every state a person
sees (a tenth WAITING at a gate, each with its resume branch; FAILED, RUNNING on one of 8
nodes, SUCCEEDED, PAUSED, IDLE), each status with one to three runs, pushes it to a local
bare remote, and opens the viewer's `Source` on it (its own mirror, as `winslow viewer`
does). Then, all in this process:

- snapshot alone: `RepoView.snapshot()` of a fresh reader over the same mirror: what
  any reader of this repo pays once (the floor the page is compared with);
- the page: `GET /` through the ASGI app (Starlette's TestClient, no network), the
  median of --requests; it is what a person waits for, minus the network;
- the page over HTTP: the same through uvicorn on 127.0.0.1 and urllib (a real socket);
- after a push to one project: the viewer's refresh (fetch, read only what changed) and
  the first `GET /` that follows;
- other views: a later page, a state filter, a search, and /api/projects.

Everything it creates goes at the end.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _host import describe  # bench/ is the script's folder: its first import path

ENV = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
       "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
PIPELINES = {"tracking": ["detect", "cleanup", "analyse"], "counting": ["decode", "count"],
             "demo": ["detect", "track", "analyse"]}
STATES = ["WAITING", "FAILED", "RUNNING", "SUCCEEDED", "SUCCEEDED", "PAUSED", "IDLE", "SUCCEEDED", "RUNNING",
          "SUCCEEDED"]
T0 = "2026-11-30T08:00:00.000Z"


def git(cwd: Path, *args: str, input: str | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=ENV, check=True, capture_output=True, text=True,
                          input=input).stdout


def pipeline_yaml(name: str, stages: list[str]) -> str:
    lines = [f"name: {name}", "stages:"]
    for i, stage in enumerate(stages):
        lines += [f"  - name: {stage}", "    image: none", "    command: ['true']",
                  f"    resources: {{cpus: 0.1, memory: {8 * (i + 1)}MiB}}",
                  f"    pause_after: {'true' if i == 0 else 'false'}"]
    return "\n".join(lines) + "\n"


def project_yaml(i: int, pipeline: str, request: int) -> str:
    return (f"name: Intersection {i}\npipeline: {pipeline}\ntags: [city-{i % 40}, drone]\n"
            f"env: {{VIDEO: flights/{i:05d}/DJI_0001.MP4}}\nrun:\n  request: {request}\n  state: running\n")


def status_files(pid: str, state: str, pipeline: str, stages: list[str], i: int) -> dict[str, bytes]:
    """status.yaml and pipeline.lock.yaml as a node writes them."""
    from reconciler.model import Event, Pipeline, ProjectState, RequestProgress, Run, RunState, Status
    from reconciler.report import lock_file, status_file
    from reconciler.yamlsafe import parse_yaml

    if state == "IDLE":
        return {}
    count = 1 + i % 3 if state != "WAITING" else 1
    runs = []
    for k in range(count):
        stage = stages[min(k, len(stages) - 1)]
        last = k == count - 1
        run_state = {"FAILED": RunState.FAILED, "RUNNING": RunState.RUNNING}.get(state, RunState.SUCCEEDED) \
            if last else RunState.SUCCEEDED
        done = run_state is not RunState.RUNNING
        runs.append(Run(id=Run.make_id(1, stage, 1), request=1, stage=stage, attempt=1, state=run_state,
                        node=f"node-{i % 8}", gpus=(i % 4,) if k == 0 else (), cpus=0.1, memory=8 << 20,
                        claimed=T0, started=T0, finished=T0 if done else None,
                        exit_code=(3 if run_state is RunState.FAILED else 0) if done else None,
                        reason="the program exited with code 3" if run_state is RunState.FAILED else None,
                        image="none", env={"VIDEO": f"flights/{i:05d}/DJI_0001.MP4"},
                        workspace=f"workspaces/{pid}/{Run.make_id(1, stage, 1)}",
                        events=(Event(T0, f"claimed by node-{i % 8}"), Event(T0, "started"))))
    progress = RequestProgress(1, stages[0], stages[-1], since=T0, waiting_since=T0 if state == "WAITING" else None,
                               proposed=state == "WAITING", next=stages[1] if state == "WAITING" else None)
    status = Status(state=ProjectState(state), message=f"{state.lower()} for the benchmark", observed_request=1,
                    request=progress, updated=T0, runs=tuple(runs))
    locked = Pipeline.from_dict(parse_yaml(pipeline_yaml(pipeline, stages).encode(), "p.yaml").data)
    return {f"projects/{pid}/status.yaml": status_file(status),
            f"projects/{pid}/pipeline.lock.yaml": lock_file(1, locked, "c0ffee")}


def generate(clone: Path, projects: int) -> list[str]:
    """Write the repo into `clone`, commit and push; returns the WAITING projects."""
    shutil.rmtree(clone / "projects", ignore_errors=True)
    (clone / "pipelines").mkdir(exist_ok=True)
    for name, stages in PIPELINES.items():
        (clone / "pipelines" / f"{name}.yaml").write_text(pipeline_yaml(name, stages))
    names = list(PIPELINES)
    waiting = []
    for i in range(projects):
        pid, pipeline = f"p{i:05d}", names[i % len(names)]
        state = STATES[i % len(STATES)]
        folder = clone / "projects" / pid
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "project.yaml").write_text(project_yaml(i, pipeline, 0 if state == "IDLE" else 1))
        for path, data in status_files(pid, state, pipeline, PIPELINES[pipeline], i).items():
            (clone / path).write_bytes(data)
        if state == "WAITING":
            waiting.append(pid)
    git(clone, "add", "-A")
    git(clone, "commit", "-qm", f"{projects} projects")
    git(clone, "push", "-q", "origin", "main")
    return waiting


def resume_branches(clone: Path, waiting: list[str]) -> None:
    """resume/<p>/1 for every waiting project, as the first live node proposes them (git fast-import, one pass)."""
    tip = git(clone, "rev-parse", "HEAD").strip()
    names = list(PIPELINES)
    lines = []
    for pid in waiting:
        i = int(pid[1:])
        pipeline = names[i % len(names)]
        body = project_yaml(i, pipeline, 2).replace("  state: running", f"  from: {PIPELINES[pipeline][1]}\n  state: running")
        lines += [f"commit refs/heads/resume/{pid}/1", f"committer bench <bench@localhost> {1700000000} +0000",
                  "data 7", "approve", f"from {tip}", f"M 100644 inline projects/{pid}/project.yaml",
                  f"data {len(body.encode())}", body.rstrip("\n")]
    git(clone, "fast-import", "--quiet", input="\n".join(lines) + "\n")
    git(clone, "push", "-q", "origin", *(f"refs/heads/resume/{pid}/1" for pid in waiting))


def median_ms(work: Callable[[], Any], runs: int) -> tuple[float, float, float]:
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        work()
        times.append((time.perf_counter() - began) * 1000)
    return statistics.median(times), min(times), max(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--projects", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=100, help="requests per median")
    parser.add_argument("--source", type=Path, help="a checkout whose viewer to measure (default: this one)")
    args = parser.parse_args()
    source_dir = (args.source or Path(__file__).resolve().parent.parent).resolve()
    sys.path.insert(0, str(source_dir))
    logging.basicConfig(level=logging.WARNING)
    import uvicorn
    from starlette.testclient import TestClient

    from reconciler.commands.init import init_repo
    from reconciler.repoview import RepoView
    from viewer.app import create_app
    from viewer.source import Source

    tmp = Path(tempfile.mkdtemp(prefix="winslow-viewer-bench-"))
    source = None
    server = None
    try:
        clone, remote = tmp / "clone", tmp / "remote.git"
        init_repo(clone, remote)
        waiting = generate(clone, args.projects)
        resume_branches(clone, waiting)
        print(f"machine: {describe()}")
        print(f"source:  {source_dir} ({git(source_dir, 'rev-parse', '--short', 'HEAD').strip()})")
        print(f"repo:    {args.projects} projects ({len(waiting)} waiting with resume branches), "
              f"{len(git(clone, 'ls-files').splitlines())} files")

        source = Source(str(remote), tmp / "viewer-work")
        began = time.perf_counter()
        source.open()
        opened = (time.perf_counter() - began) * 1000
        mirror = source.mirror.path

        def fresh_snapshot() -> None:
            view = RepoView.of_repository(mirror)
            view.snapshot()
            view.close()

        alone = median_ms(fresh_snapshot, 5)
        client = TestClient(create_app(source, None))
        first = median_ms(lambda: client.get("/"), 1)
        page = median_ms(lambda: client.get("/"), args.requests)
        assert client.get("/").status_code == 200

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(client.app, host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)

        def over_http(path: str = "/") -> None:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}") as reply:
                reply.read()

        http = median_ms(over_http, args.requests)

        pushes, refreshes, after = [], [], []
        for k in range(5):
            i = 1 + k * (args.projects // 5)
            (clone / "projects" / f"p{i:05d}" / "project.yaml").write_text(project_yaml(i, list(PIPELINES)[i % 3], 1)
                                                                          .replace("drone", f"drone, edit-{k}"))
            git(clone, "commit", "-qam", f"p{i:05d}: a tag")
            began = time.perf_counter()
            git(clone, "push", "-q", "origin", "main")
            pushes.append((time.perf_counter() - began) * 1000)
            began = time.perf_counter()
            source.refresh()
            refreshes.append((time.perf_counter() - began) * 1000)
            began = time.perf_counter()
            client.get("/")
            after.append((time.perf_counter() - began) * 1000)
        later = median_ms(lambda: client.get("/?page=5"), args.requests)
        failed = median_ms(lambda: client.get("/?state=FAILED"), args.requests)
        search = median_ms(lambda: client.get("/?q=Intersection%2099"), args.requests)
        api = median_ms(lambda: client.get("/api/projects"), args.requests)
        size = len(client.get("/").content)

        def row(name: str, figures: tuple[float, float, float]) -> None:
            print(f"{name:<52}{figures[0]:8.1f} ms   (min {figures[1]:.1f}, max {figures[2]:.1f})")

        def of(values: list[float]) -> tuple[float, float, float]:
            return statistics.median(values), min(values), max(values)

        print(f"{'measure':<52}value")
        row("viewer start: mirror, fetch, first read", (opened, opened, opened))
        row("floor: the snapshot read alone (fresh reader)", alone)
        row("GET / the first time (gate diffs read)", first)
        row(f"GET / (ASGI, median of {args.requests})", page)
        row(f"GET / over HTTP (uvicorn, median of {args.requests})", http)
        row("after a push to one project: refresh (fetch+read)", of(refreshes))
        row("after a push to one project: the next GET /", of(after))
        row("reference: the user's git push", of(pushes))
        row("GET /?page=5", later)
        row("GET /?state=FAILED", failed)
        row("GET /?q=Intersection 99", search)
        row("GET /api/projects", api)
        print(f"{'page size':<52}{size / 1024:8.1f} KiB")
        print(f"{'GET / against the snapshot read alone':<52}{page[0] / alone[0]:8.2f} x")
        return 0
    finally:
        if server is not None:
            server.should_exit = True
        if source is not None:
            source.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
