"""The one read path: a real clone of a real remote, read as the typed model."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from reconciler.gitsync import Mirror
from reconciler.layout import ORIGIN_MAIN
from reconciler.repoview import RepoView
from tests.cluster import GIT_ENV, StateRemote, git

PIPELINE = "name: cpu\nstages:\n  - {name: a, image: none, command: ['true']}\n"
PROJECT = "pipeline: cpu\nrun: {{request: {request}, state: {state}}}\n"
NODE_DOC = {
    "name": "ws-1", "version": "0.1.0", "executor": "process", "started": "2026-11-30T08:00:00.000Z",
    "tags": ["gpu"], "drain": True,
    "capacity": {"cpus": 16, "memory": 64 * 2**30, "gpus": [{"index": 0, "uuid": "GPU-1", "model": "H200",
                                                              "memory": 141 * 2**30}]},
    "load": {"time": "2026-11-30T08:00:05.000Z", "cpu_percent": 12.5, "memory_used": 2**30, "net_rx": 10,
             "net_tx": 20, "gpus": [{"index": 0, "utilization": 97, "memory_used": 2**33, "temperature": 71}]},
    "history": [{"time": "2026-11-30T08:00:00.000Z", "cpu_percent": 3.0, "gpus": []}],
    "runs": [{"project": "p", "run": "1-a-1", "stage": "a", "gpus": [0], "started": "2026-11-30T08:00:01.000Z",
              "log_tail": "frame 1000 of 30000\n"}],
}


@pytest.fixture
def remote(tmp_path: Path) -> StateRemote:
    remote = StateRemote(tmp_path)
    remote.write({"pipelines/cpu.yaml": PIPELINE, "projects/p/project.yaml": PROJECT.format(request=1, state="running")},
                 "p: start request 1")
    remote.write({"projects/p/project.yaml": PROJECT.format(request=2, state="paused")}, "p: request 2, paused")
    remote.write({"projects/p/results/1-a-1.yaml": yaml.safe_dump(
        {"project": "p", "run": "1-a-1", "stage": "a", "node": "ws-1", "created": "2026-11-30T08:01:00Z",
         "workspace": "workspaces/p/1-a-1", "total_size": 3, "truncated": False,
         "files": [{"path": "out.txt", "size": 3, "sha256": "ab" * 32}],
         "unlisted": [{"path": "loop", "reason": "a symbolic link loop"}]})}, "p: results")
    return remote


def push_node(remote: StateRemote, tmp_path: Path, document: dict, age_s: int = 0) -> None:
    """A heartbeat commit on winslow/nodes/<name>, dated `age_s` seconds ago, as that node pushes it."""
    mirror = Mirror(str(remote.remote), tmp_path / f"node-{document['name']}.git")
    mirror.open()
    commit = mirror.commit(None, {f"nodes/{document['name']}.yaml": yaml.safe_dump(document).encode()}, "heartbeat")
    if age_s:  # rewrite the commit with an old committer date, as a node that stopped long ago left it
        env = {**GIT_ENV, "GIT_COMMITTER_DATE": f"@{int(time.time()) - age_s} +0000"}
        tree = git(mirror.path, "rev-parse", f"{commit}^{{tree}}").strip()
        commit = subprocess.run(["git", "commit-tree", tree, "-m", "heartbeat"], cwd=mirror.path, env=env,
                                capture_output=True, text=True, check=True).stdout.strip()
    mirror.push([f"+{commit}:refs/heads/winslow/nodes/{document['name']}"])
    mirror.close()


def view_of(remote: StateRemote) -> RepoView:
    git(remote.clone, "fetch", "-q", "origin", "+refs/heads/*:refs/remotes/origin/*")
    return RepoView.of_repository(remote.clone)


def test_a_node_document_reads_back_typed_with_load_history_runs_and_drain(remote: StateRemote, tmp_path: Path) -> None:
    push_node(remote, tmp_path, NODE_DOC)
    view = view_of(remote)
    (node,) = view.nodes(timeout=30).values()
    info = node.info
    assert info is not None and (node.name, node.lost, node.state) == ("ws-1", False, "draining")
    assert (info.cpus, info.gpus[0].model, info.version, info.drain, info.tags) == (16.0, "H200", "0.1.0", True, ("gpu",))
    assert info.load is not None and info.load.cpu_percent == 12.5 and info.load.gpus[0].utilization == 97
    assert [s.cpu_percent for s in info.history] == [3.0]
    run = info.run("p", "1-a-1")
    assert run is not None and (run.gpus, run.log_tail) == ((0,), "frame 1000 of 30000\n")
    view.close()


def test_a_node_silent_past_the_timeout_is_lost_on_the_readers_clock(remote: StateRemote, tmp_path: Path) -> None:
    push_node(remote, tmp_path, {**NODE_DOC, "name": "old"}, age_s=600)
    push_node(remote, tmp_path, {**NODE_DOC, "name": "new"})
    view = view_of(remote)
    nodes = view.nodes(timeout=30)
    assert nodes["old"].lost and nodes["old"].heard_ago is not None and nodes["old"].heard_ago >= 599
    assert not nodes["new"].lost and nodes["new"].heard_ago is not None and nodes["new"].heard_ago < 30
    # A reader deciding on its own monotonic clock gives a branch seen for the first time the benefit of the doubt.
    fresh = view_of(remote)
    assert not fresh.nodes(timeout=30, trust_commit_time=False)["old"].lost
    view.close()
    fresh.close()


def test_history_says_who_asked_for_which_request_and_when(remote: StateRemote) -> None:
    view = view_of(remote)
    changes = view.history("p")
    assert [(c.subject, c.request, c.state) for c in changes] == [("p: request 2, paused", 2, "paused"),
                                                                  ("p: start request 1", 1, "running")]
    assert all(c.author and c.time for c in changes)
    view.close()


def test_a_result_manifest_reads_back_typed_with_what_could_not_be_listed(remote: StateRemote) -> None:
    view = view_of(remote)
    tip = view.tip()
    assert tip is not None
    result = view.result(tip, "p", "1-a-1")
    assert result is not None and [(f.path, f.size) for f in result.files] == [("out.txt", 3)]
    assert result.unlisted == (("loop", "a symbolic link loop"),)
    assert view.result(tip, "p", "9-a-1") is None
    view.close()


def test_one_project_is_read_without_the_others_and_matches_the_whole_snapshot(remote: StateRemote) -> None:
    remote.write({"projects/q/project.yaml": PROJECT.format(request=0, state="running")}, "q")
    view = view_of(remote)
    entry, small = view.project("p")
    whole = view.snapshot()
    assert entry == whole.projects["p"] and set(small.projects) == {"p"} and {"p", "q"} < set(whole.projects)
    assert view.project("nope")[0] is None and view.project_ids() == sorted(whole.projects)
    view.close()


def test_a_folder_and_its_commit_read_as_the_same_snapshot(remote: StateRemote) -> None:
    os.makedirs(remote.clone / "pipelines" / "nested", exist_ok=True)  # misplaced YAML is reported both ways
    (remote.clone / "pipelines" / "nested" / "x.yaml").write_text(PIPELINE)
    git(remote.clone, "add", "-A")
    git(remote.clone, "commit", "-qm", "misplaced")
    git(remote.clone, "push", "-q", "origin", "main")
    from_git = view_of(remote).snapshot()
    from_folder = RepoView(folder=remote.clone).snapshot()
    assert from_git.commit == git(remote.clone, "rev-parse", ORIGIN_MAIN).strip()
    assert from_git.projects == from_folder.projects and from_git.problems == from_folder.problems
    assert any("not read" in p.message for p in from_git.problems)


def test_reading_only_what_changed_gives_the_snapshot_a_full_read_gives(remote: StateRemote) -> None:
    """Edits, new and deleted projects, a broken file, a misplaced one: the incremental read keeps up."""
    view = view_of(remote)
    view.snapshot()
    steps: list[dict[str, str | None]] = [
        {"projects/q/project.yaml": PROJECT.format(request=1, state="running")},
        {"projects/p/status.yaml": "state: [broken\n"},
        {"projects/q/project.yaml": PROJECT.format(request=3, state="aborted"), "projects/stray.yaml": "a: 1\n"},
        {"projects/p/status.yaml": None, "projects/q/project.yaml": None},
        {"projects/a-first/project.yaml": PROJECT.format(request=0, state="running")},
    ]
    for files in steps:
        before = view.last
        remote.write(files, "edit")
        git(remote.clone, "fetch", "-q", "origin", "+refs/heads/*:refs/remotes/origin/*")
        incremental = view.snapshot()
        full = RepoView.of_repository(remote.clone).snapshot()
        assert list(incremental.projects) == list(full.projects)
        assert incremental.projects == full.projects and incremental.problems == full.problems
        untouched = {p for p in full.projects if not any(path.startswith(f"projects/{p}/") for path in files)}
        assert before is not None
        assert all(incremental.projects[p] is before.projects[p] for p in untouched if p in before.projects)
    view.close()


def test_silence_counts_only_while_the_observer_reaches_the_remote(remote: StateRemote, tmp_path: Path) -> None:
    """A git outage for everyone makes nobody lost: the node's clock stands still across failed fetches."""
    from reconciler.liveness import ConnectedClock

    clock = ConnectedClock()
    clock.fetched(True, 0.0)
    clock.fetched(True, 10.0)
    assert clock() == 10.0
    clock.fetched(False, 20.0)   # the remote is down from here ...
    clock.fetched(True, 80.0)    # ... to here: those 70 s are nobody's silence
    assert clock() == 10.0
    clock.fetched(True, 85.0)
    assert clock() == 15.0

    push_node(remote, tmp_path, dict(NODE_DOC, drain=False))
    view = view_of(remote)
    try:
        seen = view.nodes(20.0, trust_commit_time=False, clock=clock)["ws-1"]
        assert not seen.lost and seen.heard_ago == 0.0
        clock.fetched(False, 90.0)
        clock.fetched(True, 200.0)  # a long outage: the branch could not move, and counts as silent for 0 s
        assert not view.nodes(20.0, trust_commit_time=False, clock=clock)["ws-1"].lost
        clock.fetched(True, 225.0)  # 25 s in touch with the remote and the branch did not move: lost
        assert view.nodes(20.0, trust_commit_time=False, clock=clock)["ws-1"].lost
    finally:
        view.close()
