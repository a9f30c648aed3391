"""The node's mirror: commits written straight to the object store, and push as compare-and-swap."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from reconciler.commands.init import init_repo
from reconciler.errors import PushRejected
from reconciler.gitsync import Mirror
from reconciler.layout import ORIGIN_MAIN


@pytest.fixture
def mirror(tmp_path: Path) -> Mirror:
    init_repo(tmp_path / "clone", tmp_path / "remote.git")
    repo = Mirror(str(tmp_path / "remote.git"), tmp_path / "mirror.git")
    repo.open()
    repo.fetch()
    yield repo
    repo.close()


def test_commit_changes_exactly_the_given_paths_and_passes_fsck(mirror: Mirror) -> None:
    tip = mirror.reader.resolve(ORIGIN_MAIN)
    before = set(mirror.reader.tree(tip).entries())
    commit = mirror.commit(tip, {"projects/p/status.yaml": b"state: IDLE\n", "pipelines/demo.yaml": None,
                                 "projects/q/logs/1-a-1.log": b"hello\n"}, "p: status\n\nbody")
    changed = subprocess.run(["git", "diff", "--name-status", tip, commit], cwd=mirror.path, capture_output=True,
                             text=True, check=True).stdout.split("\n")
    assert sorted(filter(None, changed)) == ["A\tprojects/p/status.yaml", "A\tprojects/q/logs/1-a-1.log",
                                             "D\tpipelines/demo.yaml"]
    assert mirror.reader.read(commit, "projects/q/logs/1-a-1.log") == b"hello\n"
    assert "pipelines/demo.yaml" in before
    fsck = subprocess.run(["git", "fsck", "--strict", "--no-dangling"], cwd=mirror.path, capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    message = subprocess.run(["git", "log", "-1", "--format=%an|%s|%b", commit], cwd=mirror.path, capture_output=True,
                             text=True).stdout.strip()
    assert message == "Winslow|p: status|body"


def test_a_push_on_a_stale_tip_is_rejected_and_leaves_the_remote_alone(mirror: Mirror, tmp_path: Path) -> None:
    tip = mirror.reader.resolve(ORIGIN_MAIN)
    first = mirror.commit(tip, {"a.txt": b"1\n"}, "first")
    second = mirror.commit(tip, {"b.txt": b"2\n"}, "second, on the same parent")
    mirror.push_main(first)
    with pytest.raises(PushRejected):
        mirror.push_main(second)
    remote_main = subprocess.run(["git", "--git-dir", str(tmp_path / "remote.git"), "rev-parse", "main"],
                                 capture_output=True, text=True).stdout.strip()
    assert remote_main == first
