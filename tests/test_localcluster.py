"""`winslow cluster up|down|status`: a whole cluster on this machine, started and stopped by recorded pids.

`up` runs as its own process, as a user would run it; the project is pushed to the URL it
prints, through its git daemon. `down` must stop every process `up` recorded and nothing
else: a bystander started here survives, and so does a process that inherited a recorded pid.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import yaml

from tests.cluster import GIT_ENV, git, wait_for

PIPELINE = "name: hello\nstages:\n  - name: greet\n    image: none\n    command: [sh, -c, 'echo hello from $WINSLOW_RUN']\n"
PROJECT = "name: Hello\npipeline: hello\nrun:\n  request: 1\n  state: running\n"
NODES = ("node-1", "node-2", "node-3")


def winslow(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", *map(str, args)], capture_output=True, text=True,
                          env=GIT_ENV, timeout=timeout)


@pytest.fixture
def cluster_dir(tmp_path: Path) -> Iterator[Path]:
    """Where the cluster lives; whatever a failed test left running there is stopped by `down`."""
    root = tmp_path / "cluster"
    yield root
    if (root / "cluster.json").exists():
        winslow("cluster", "down", "--dir", root, "--grace", "5")


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A process of our own that no `down` may touch."""
    sleeper = subprocess.Popen(["sleep", "300"])
    yield sleeper
    sleeper.kill()
    sleeper.wait(timeout=10)


def gone(entry: dict) -> bool:
    """The recorded process has ended (its pid free, a zombie, or now naming a later process)."""
    try:
        process = psutil.Process(entry["pid"])
        return abs(process.create_time() - entry["create_time"]) > 0.05 or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def printed(pattern: str, text: str) -> str:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in:\n{text}"
    return found.group(1)


def push_project(url: str, clone: Path) -> None:
    git(clone.parent, "clone", "-q", url, clone.name)
    (clone / "pipelines" / "hello.yaml").write_text(PIPELINE)
    (clone / "projects" / "hello").mkdir(parents=True)
    (clone / "projects" / "hello" / "project.yaml").write_text(PROJECT)
    git(clone, "add", "-A")
    git(clone, "commit", "-qm", "hello: a one-stage project, request 1")
    # The nodes commit too (the template's example project gets its status as they start),
    # so the push may be rejected as any user's would be: rebase onto theirs and push again.
    for _ in range(10):
        pushed = subprocess.run(["git", "push", "-q", "origin", "main"], cwd=clone, capture_output=True, text=True,
                                env=GIT_ENV)
        if pushed.returncode == 0:
            return
        git(clone, "pull", "-q", "--rebase", "origin", "main")
    raise AssertionError(f"the push was rejected ten times: {pushed.stderr}")


def remote_state(clone: Path) -> str | None:
    """The project's state on the remote's main, fetched through the git daemon."""
    git(clone, "fetch", "-q", "origin")
    shown = subprocess.run(["git", "show", "origin/main:projects/hello/status.yaml"], cwd=clone, capture_output=True,
                           text=True, env=GIT_ENV)
    return yaml.safe_load(shown.stdout).get("state") if shown.returncode == 0 else None


@pytest.mark.cluster
def test_up_runs_a_pushed_project_and_down_stops_exactly_what_up_started(
        tmp_path: Path, cluster_dir: Path, bystander: subprocess.Popen[bytes]) -> None:
    up = winslow("cluster", "up", "--nodes", "3", "--dir", cluster_dir, "--executor", "process")
    assert up.returncode == 0, up.stdout + up.stderr
    url = printed(r"state repo:\s+(git://127\.0\.0\.1:\d+/\S+)", up.stdout)
    viewer = printed(r"viewer:\s+(http://127\.0\.0\.1:\d+/)", up.stdout)
    assert f"cluster down --dir {cluster_dir.resolve()}" in up.stdout
    recorded = json.loads((cluster_dir / "cluster.json").read_text())["processes"]
    assert [p["name"] for p in recorded] == ["git-daemon", *NODES, "viewer"]
    assert not any(gone(p) for p in recorded)

    push_project(url, tmp_path / "clone")
    wait_for(lambda: remote_state(tmp_path / "clone") == "SUCCEEDED", 90, "hello to succeed", interval=0.5)
    heads = git(tmp_path, "ls-remote", url, "refs/heads/winslow/nodes/*")
    assert {line.rsplit("/", 1)[1] for line in heads.splitlines()} >= set(NODES)
    with urllib.request.urlopen(viewer, timeout=10) as response:
        assert response.status == 200

    status = winslow("cluster", "status", "--dir", cluster_dir)
    assert status.returncode == 0 and "5 of 5 running" in status.stdout, status.stdout + status.stderr
    again = winslow("cluster", "up", "--dir", cluster_dir, "--executor", "process")
    assert again.returncode == 1 and again.stderr.count("\n") == 1 and "already runs" in again.stderr, again.stderr

    down = winslow("cluster", "down", "--dir", cluster_dir)
    assert down.returncode == 0, down.stdout + down.stderr
    for entry in recorded:
        assert f"stopped {entry['name']} (pid {entry['pid']})" in down.stdout, down.stdout
        assert gone(entry), f"{entry['name']} (pid {entry['pid']}) still runs"
    assert bystander.poll() is None
    assert not (cluster_dir / "cluster.json").exists()


def test_down_where_no_cluster_was_started_says_so_in_one_line(tmp_path: Path) -> None:
    down = winslow("cluster", "down", "--dir", tmp_path / "empty")
    assert down.returncode == 1
    assert down.stdout == "" and down.stderr.count("\n") == 1 and down.stderr.startswith("winslow: no cluster in ")


def test_down_leaves_alone_a_process_that_now_has_a_recorded_pid(
        tmp_path: Path, bystander: subprocess.Popen[bytes]) -> None:
    started = psutil.Process(bystander.pid).create_time()
    record = {"dir": str(tmp_path), "executor": "process", "repo_url": "git://127.0.0.1:1/remote.git",
              "viewer_url": "http://127.0.0.1:2/", "storage": str(tmp_path / "storage"),
              "processes": [{"name": "node-1", "pid": bystander.pid, "create_time": started - 100,
                             "log": str(tmp_path / "node-1.log"), "argv": ["python", "-m", "reconciler", "node"]}]}
    (tmp_path / "cluster.json").write_text(json.dumps(record))

    status = winslow("cluster", "status", "--dir", tmp_path)
    assert status.returncode == 1 and "not running" in status.stdout, status.stdout + status.stderr
    down = winslow("cluster", "down", "--dir", tmp_path, "--grace", "1")
    assert down.returncode == 0, down.stdout + down.stderr
    assert "left alone" in down.stdout
    assert bystander.poll() is None


def test_up_refuses_a_folder_that_holds_something_else(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine\n")
    up = winslow("cluster", "up", "--dir", tmp_path, "--executor", "process")
    assert up.returncode == 1 and up.stderr.count("\n") == 1 and "not a Winslow cluster folder" in up.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
