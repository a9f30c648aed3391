"""Never silently wrong: an invalid winslow.yaml loosens nothing, a dead node shows as dead, every state says why.

Real remotes and clones; `winslow status` as a user runs it.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from reconciler.repoview import RepoView
from tests.cluster import GIT_ENV, NodeProcess, StateRemote, git, wait_for
from tests.test_repoview import NODE_DOC, push_node

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINE = "name: cpu\nstages:\n  - {name: a, image: none, command: ['true']}\n  - {name: b, image: none, command: ['true']}\n"
DRAINED = "version: 1\nnodes:\n  ws-1: {drain: true}\n"
BROKEN = "version: 1\ntimeouts:\n  heartbeat: [5s\n"


def winslow(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**GIT_ENV, "PYTHONPATH": str(REPO_ROOT)})


def snapshot_of(remote: StateRemote) -> RepoView:
    git(remote.clone, "fetch", "-q", "origin")
    return RepoView.of_repository(remote.clone)


# -- an invalid winslow.yaml keeps the last valid settings ---------------------------------------------

def test_a_broken_winslow_yaml_keeps_the_last_valid_settings_and_says_which(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    remote.write({"winslow.yaml": DRAINED}, "drain ws-1")
    valid = git(remote.remote, "rev-parse", "main").strip()
    remote.write({"winslow.yaml": BROKEN}, "a typo")

    view = snapshot_of(remote)  # a reader that never saw the valid version finds it in main's history
    snapshot = view.snapshot()
    view.close()
    assert snapshot.config.nodes["ws-1"].drain
    held = snapshot.held_config
    assert held is not None and held.source == valid
    assert held.problems and held.problems[0].path == "winslow.yaml" and held.problems[0].line == 4
    assert "winslow.yaml:4" in held.describe() and valid[:10] in held.describe()

    remote.write({"winslow.yaml": "version: 1\n"}, "undrain")
    view = snapshot_of(remote)
    snapshot = view.snapshot()
    view.close()
    assert snapshot.held_config is None and "ws-1" not in snapshot.config.nodes


def test_a_winslow_yaml_invalid_since_it_was_added_keeps_the_defaults_and_says_so(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    remote.write({"winslow.yaml": None}, "no settings")
    remote.write({"winslow.yaml": BROKEN}, "broken from the start")
    view = snapshot_of(remote)
    snapshot = view.snapshot()
    view.close()
    assert snapshot.held_config is not None and snapshot.held_config.absent
    assert "defaults" in snapshot.held_config.describe()


def test_a_drained_node_stays_drained_when_winslow_yaml_breaks_and_says_so(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    remote.write({"winslow.yaml": DRAINED, "pipelines/cpu.yaml": PIPELINE}, "drain ws-1")
    node = NodeProcess("ws-1", remote.remote, tmp_path / "storage", tmp_path / "work")
    try:
        wait_for(lambda: "ws-1" in "".join(remote.refs("refs/heads/winslow/nodes/")), 30, "the node's heartbeat")
        remote.write({"winslow.yaml": BROKEN, "projects/p/project.yaml": "pipeline: cpu\nrun: {request: 1}\n"},
                     "a typo, and a new request")
        wait_for(lambda: "winslow.yaml:4" in node.log(), 30, "the node to say winslow.yaml is invalid")
        wait_for(lambda: remote.status("p").get("observed_request") == 1, 30, "the request to be observed")
        time.sleep(3)  # a few more cycles: a node that fell back to the defaults would claim by now
        assert not remote.status("p").get("runs"), remote.status("p")
        assert "last valid version" in node.log()

        out = winslow(remote.clone, "status")
        assert out.returncode == 0, out.stderr
        first = out.stdout.splitlines()[0]
        assert first.startswith("warning: winslow.yaml:4") and "last valid version" in first
        data = json.loads(winslow(remote.clone, "status", "--json").stdout)
        assert "winslow.yaml:4" in data["settings"]["held"]
        heartbeat = wait_for(lambda: yaml.safe_load(remote.read("nodes/ws-1.yaml", ref="winslow/nodes/ws-1") or "{}")
                             .get("settings_held"), 30, "the heartbeat to carry it")
        assert isinstance(heartbeat, str) and "winslow.yaml:4" in heartbeat and "last valid version" in heartbeat
    finally:
        node.stop()


# -- a dead node shows as dead ---------------------------------------------------------------------

def _running_on_ws1(remote: StateRemote) -> None:
    status = {"state": "RUNNING", "message": "a running on ws-1", "observed_request": 1,
              "request": {"number": 1, "from": "a", "until": "b"},
              "runs": [{"id": "1-a-1", "request": 1, "stage": "a", "attempt": 1, "state": "RUNNING", "node": "ws-1",
                        "claimed": "2026-11-30T08:00:00Z", "started": "2026-11-30T08:00:01Z"}]}
    remote.write({"pipelines/cpu.yaml": PIPELINE, "projects/p/project.yaml": "pipeline: cpu\nrun: {request: 1}\n",
                  "projects/p/status.yaml": yaml.safe_dump(status)}, "p runs on ws-1")


@pytest.mark.parametrize("age_s, lost", [(600, True), (0, False)])
def test_status_shows_whether_the_node_of_a_running_run_is_alive(tmp_path: Path, age_s: int, lost: bool) -> None:
    remote = StateRemote(tmp_path)
    _running_on_ws1(remote)
    push_node(remote, tmp_path, dict(NODE_DOC, drain=False), age_s=age_s)

    out = winslow(remote.clone, "status")
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("p "))
    assert ("LOST: last heard 10m" in row) is lost, row
    detail = winslow(remote.clone, "status", "p")
    assert ("ws-1 (LOST: last heard 10m" in detail.stdout) is lost, detail.stdout
    data = json.loads(winslow(remote.clone, "status", "--json").stdout)
    live = data["projects"][0]["node_liveness"]
    assert live["state"] == ("lost" if lost else "alive")
    assert (live["heard_seconds_ago"] >= 590) is lost


def test_status_says_a_running_runs_node_was_never_heard_from(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    _running_on_ws1(remote)
    out = winslow(remote.clone, "status")
    assert "ws-1 (never heard from)" in out.stdout, out.stdout


# -- an invalid project says what and where, once --------------------------------------------------

def test_an_invalid_project_shows_its_name_pipeline_and_the_pipelines_own_error_once(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    remote.write({"pipelines/cpu.yaml": "name: cpu\nstages: []\n",
                  "projects/p/project.yaml": "name: Ulm crossing\npipeline: cpu\nrun: {request: 1}\n"}, "broken")
    out = winslow(remote.clone, "status", "p")
    assert out.returncode == 0, out.stderr
    header, *rest = out.stdout.splitlines()
    assert header.startswith("p (Ulm crossing)") and "pipeline cpu" in header and "INVALID" in header, header
    errors = [line for line in rest if line.startswith("error: ")]
    assert any(e.startswith("error: projects/p/project.yaml") for e in errors), errors
    assert any(e.startswith("error: pipelines/cpu.yaml:2") for e in errors), errors
    first = errors[0].removeprefix("error: ").split(": ", 1)[1]
    assert out.stdout.count(first) == 1, out.stdout


def test_a_plain_non_zero_exit_and_a_process_run_record_what_is_true(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    remote.write({"pipelines/fails.yaml": "name: fails\nstages:\n  - {name: a, image: busybox, command: [sh, -c, 'exit 3']}\n",
                  "projects/p/project.yaml": "pipeline: fails\nrun: {request: 1}\n"}, "a stage that exits 3")
    node = NodeProcess("ws-1", remote.remote, tmp_path / "storage", tmp_path / "work")
    try:
        wait_for(lambda: remote.status("p").get("state") == "FAILED", 60, "the project to fail")
    finally:
        node.stop()
    (run,) = remote.status("p")["runs"]
    assert run["exit_code"] == 3 and run["reason"] == "the program exited with code 3"
    assert "image" not in run  # the process executor ran the command on the host, not busybox
    assert os.path.exists(tmp_path / "storage")


# -- where the node finds its remote and its storage -----------------------------------------------

def node_command(tmp_path: Path, repo: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", "node", "--repo", repo, "--name", "ws-1",
                           "--executor", "process", "--work", str(tmp_path / "work"), *extra],
                          capture_output=True, text=True, timeout=60, env={**GIT_ENV, "PYTHONPATH": str(REPO_ROOT)})


def test_a_wrong_repo_is_a_one_line_error_at_start_up(tmp_path: Path) -> None:
    out = node_command(tmp_path, str(tmp_path / "nonexistent" / "x.git"), "--storage", str(tmp_path / "storage"))
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.startswith("winslow: ")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "cannot reach the state repo" in errors[0] and "does not appear to be a git repository" in errors[0]


def test_without_storage_anywhere_the_node_says_how_to_set_it(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    out = node_command(tmp_path, str(remote.remote))
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == \
        "winslow: no storage: pass --storage DIR, or set storage.root in winslow.yaml on main"
    assert "Traceback" not in out.stderr


def test_the_storage_root_in_winslow_yaml_is_used_without_the_flag(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    root = tmp_path / "from-settings"
    remote.write({"winslow.yaml": f"version: 1\nstorage:\n  root: {root}\n", "pipelines/cpu.yaml": PIPELINE,
                  "projects/p/project.yaml": "pipeline: cpu\nrun: {request: 1}\n"}, "storage in winslow.yaml")
    args = [sys.executable, "-m", "reconciler", "node", "--repo", str(remote.remote), "--name", "ws-1",
            "--executor", "process", "--work", str(tmp_path / "work"), "--heartbeat", "1s", "--poll", "1s"]
    log = open(tmp_path / "node.log", "wb")
    node = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=GIT_ENV)
    try:
        wait_for(lambda: remote.status("p").get("state") == "SUCCEEDED", 60, "the project to succeed")
        assert (root / "workspaces" / "p" / "1-a-1").is_dir()
        assert (root / "logs").is_dir()
    finally:
        node.terminate()
        node.wait(timeout=15)
        log.close()


def test_an_outage_is_said_once_and_its_end_too(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    node = NodeProcess("ws-1", remote.remote, tmp_path / "storage", tmp_path / "work")
    moved = tmp_path / "elsewhere.git"
    try:
        wait_for(lambda: "ws-1" in "".join(remote.refs("refs/heads/winslow/nodes/")), 30, "the node's heartbeat")
        remote.remote.rename(moved)
        try:
            wait_for(lambda: "unreachable" in node.log(), 30, "the node to say the remote is unreachable")
            time.sleep(4)  # several more tries, each failing the same way
        finally:
            moved.rename(remote.remote)
        wait_for(lambda: "reachable again" in node.log(), 60, "the node to say the remote is back")
    finally:
        node.stop()
    log = node.log()
    during = log[:log.index("reachable again")]  # one outage: from the first failure to its end
    said = [line.split("unreachable: ", 1)[1] for line in during.splitlines() if "state repo is unreachable: " in line]
    assert said and len(said) == len(set(said)) <= 3, said  # once per different message, not once per try
    # git's own words: a fetch's, or (a remote on this disk, whose refs are read directly) for-each-ref's
    assert any(re.search(r"(does not appear to be|not) a git repository", words) for words in said), said


# -- the node says what it does --------------------------------------------------------------------

def test_the_node_says_in_one_line_each_what_is_invalid_and_what_keeps_running_when_it_stops(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    remote.write({"pipelines/cpu.yaml": "name: cpu\nstages:\n  - {name: a, image: none, command: [sleep, '30']}\n",
                  "projects/p/project.yaml": "pipeline: cpu\nrun: {request: 1}\n",
                  "projects/bad/project.yaml": "pipeline: nope\nrun: {request: 1}\n"}, "one good, one bad")
    node = NodeProcess("ws-1", remote.remote, tmp_path / "storage", tmp_path / "work")
    try:
        wait_for(lambda: remote.status("bad").get("state") == "INVALID", 30, "bad to be recorded INVALID")
        wait_for(lambda: (remote.status("p").get("runs") or [{}])[0].get("started"), 30, "p's stage to start")
    finally:
        node.stop()
    lines = node.log().splitlines()
    invalid = [line for line in lines if "bad: INVALID" in line]
    assert len(invalid) == 1 and "ws-1" in invalid[0] and "pipeline 'nope' does not exist" in invalid[0], invalid
    stopping = [line for line in lines if "stopping (SIGTERM)" in line]
    assert len(stopping) == 1 and "ws-1" in stopping[0] and "p/1-a-1" in stopping[0], stopping
    assert "keep running" in stopping[0] or "keeps running" in stopping[0]
    # It did keep running: a node started again with the same work folder adopts it.
    again = NodeProcess("ws-1", remote.remote, tmp_path / "storage", tmp_path / "work")
    try:
        wait_for(lambda: "adopt" in again.log().lower(), 30, "the restarted node to adopt the run")
        assert remote.status("p")["runs"][0]["state"] == "RUNNING"
        remote.write({"projects/p/project.yaml": "pipeline: cpu\nrun: {request: 1, state: aborted}\n"}, "abort p")
        wait_for(lambda: remote.status("p").get("state") == "FAILED", 30, "the adopted run to be stopped")
    finally:
        again.stop()


def test_a_run_never_writes_into_files_another_run_of_the_same_name_left(tmp_path: Path) -> None:
    """A project deleted and created again before the cleanup: its old run's files are not mixed into the new one."""
    remote = StateRemote(tmp_path)
    old = tmp_path / "storage" / "workspaces" / "p" / "1-a-1"
    old.mkdir(parents=True)
    (old / "tracks.csv").write_text("from the deleted project\n")
    remote.write({"pipelines/cpu.yaml": PIPELINE, "projects/p/project.yaml": "pipeline: cpu\nrun: {request: 1}\n"},
                 "p again")
    node = NodeProcess("ws-1", remote.remote, tmp_path / "storage", tmp_path / "work")
    try:
        wait_for(lambda: remote.status("p").get("state") == "FAILED", 60, "the run to be refused")
    finally:
        node.stop()
    (run,) = remote.status("p")["runs"]
    assert run["state"] == "FAILED" and "already holds files of an earlier run" in run["reason"]
    assert (old / "tracks.csv").read_text() == "from the deleted project\n" and len(list(old.iterdir())) == 1


def test_a_node_whose_cycles_keep_failing_says_so_once_and_reports_itself_degraded(tmp_path: Path, caplog) -> None:
    from reconciler.node import DEGRADED_AFTER, Node, NodeOptions

    remote = StateRemote(tmp_path)
    node = Node(NodeOptions(name="ws-1", repo=str(remote.remote), storage=tmp_path / "storage",
                            work=tmp_path / "work", executor="process"))
    try:
        with caplog.at_level("INFO", logger="winslow.node"):
            for _ in range(DEGRADED_AFTER + 5):
                assert node.degraded() is None or node._cycle_failures >= DEGRADED_AFTER
                try:
                    raise OSError(40, "Too many levels of symbolic links")
                except OSError as exc:
                    node._cycle_failed(exc)
        assert node.degraded() == f"{DEGRADED_AFTER + 5} cycles in a row failed: OSError: [Errno 40] Too many levels " \
                                  f"of symbolic links"
        assert sum("cycle failed" in r.getMessage() for r in caplog.records) == 1  # not a traceback a second
    finally:
        node.executor.close()
        node.repo.close()


def test_status_says_a_broken_status_yaml_is_unreadable_and_how_to_restore_it(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    remote.write({"pipelines/cpu.yaml": PIPELINE, "projects/p/project.yaml": "pipeline: cpu\nrun: {request: 1}\n",
                  "projects/p/status.yaml": "state: RUNNING\nobserved_request: 3\x00\n"}, "a hand edit gone wrong")
    out = winslow(remote.clone, "status")
    row = next(line for line in out.stdout.splitlines() if line.startswith("p "))
    assert " INVALID " in row and "projects/p/status.yaml is unreadable" in row and "git checkout" in row, row
    assert " IDLE " not in row
    detail = winslow(remote.clone, "status", "p").stdout
    assert "the nodes have seen request 0" not in detail and "status cannot be read" in detail, detail


def test_status_names_the_last_readable_version_of_a_broken_status_yaml(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    good = "state: IDLE\nobserved_request: 0\nruns: []\n"
    remote.write({"pipelines/cpu.yaml": PIPELINE, "projects/p/project.yaml": "pipeline: cpu\nrun: {request: 0}\n",
                  "projects/p/status.yaml": good}, "a readable status")
    readable = git(remote.clone, "rev-parse", "HEAD").strip()
    remote.write({"projects/p/status.yaml": good.replace("IDLE", "IDLE\x00")}, "a hand edit gone wrong")
    detail = winslow(remote.clone, "status", "p").stdout
    assert f"git checkout {readable[:12]} -- projects/p/status.yaml" in detail, detail


def test_a_run_that_swaps_its_workspace_for_a_link_into_storage_lists_nothing_of_storage(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    swap = "name: swap\nstages:\n  - {name: s, image: none, command: [sh, -c, 'cd /; rm -rf \"$WINSLOW_WORKSPACE\"; " \
           "ln -s ../.. \"$WINSLOW_WORKSPACE\"']}\n"
    remote.write({"pipelines/swap.yaml": swap, "projects/p/project.yaml": "pipeline: swap\nrun: {request: 1}\n"}, "p")
    node = NodeProcess("ws-1", remote.remote, tmp_path / "storage", tmp_path / "work")
    try:
        run = wait_for(lambda: (remote.status("p").get("runs") or [{}])[0].get("result"), 30, "the result manifest")
    finally:
        node.stop()
    manifest = yaml.safe_load(remote.read(str(run)) or "{}")
    assert manifest["files"] == [] and manifest["unlisted"][0]["path"] == "."
    assert remote.status("p")["runs"][0]["exit_code"] == 0
