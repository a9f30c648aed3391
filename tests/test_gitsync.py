"""The node's mirror: commits written straight to the object store, and push as compare-and-swap."""
from __future__ import annotations

import os
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


def test_a_large_tree_edited_in_place_is_the_tree_git_builds(mirror: Mirror, tmp_path: Path) -> None:
    """Thousands of project folders: changes, deletions and additions give exactly git's own tree."""
    tip = mirror.reader.resolve(ORIGIN_MAIN)
    many = {f"projects/p{i:04d}/project.yaml": f"pipeline: demo\nname: {i}\n".encode() for i in range(1500)}
    many["projects/p0007.txt"] = b"a file beside the folders\n"
    base = mirror.commit(tip, many, "many projects")
    edits: dict[str, bytes | None] = {
        "projects/p0003/status.yaml": b"state: IDLE\n",         # a new file in an existing folder: in place
        "projects/p0004/project.yaml": b"pipeline: other\n",    # a changed file: in place
        "projects/p0005/project.yaml": None,                    # a folder emptied: its entry goes
        "projects/p0007.txt": None,                             # a file deleted at this level
        "projects/p0007-new/project.yaml": b"pipeline: demo\n",  # a new folder: the tree is rebuilt
    }
    for step in ({k: v for k, v in edits.items() if k != "projects/p0007-new/project.yaml"}, edits):
        ours = mirror.commit(base, step, "edit")
        clone = tmp_path / f"check-{len(step)}"
        subprocess.run(["git", "clone", "-q", str(mirror.path), str(clone)], check=True, capture_output=True)
        subprocess.run(["git", "checkout", "-q", base], cwd=clone, check=True, capture_output=True)
        for path, content in step.items():
            if content is None:
                subprocess.run(["git", "rm", "-q", path], cwd=clone, check=True, capture_output=True)
            else:
                (clone / path).parent.mkdir(parents=True, exist_ok=True)
                (clone / path).write_bytes(content)
                subprocess.run(["git", "add", path], cwd=clone, check=True, capture_output=True)
        expected = subprocess.run(["git", "write-tree"], cwd=clone, capture_output=True, text=True,
                                  check=True).stdout.strip()
        got = subprocess.run(["git", "rev-parse", f"{ours}^{{tree}}"], cwd=mirror.path, capture_output=True,
                             text=True, check=True).stdout.strip()
        assert got == expected
    fsck = subprocess.run(["git", "fsck", "--strict", "--no-dangling"], cwd=mirror.path, capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_a_mirror_of_a_remote_on_this_disk_borrows_its_objects_instead_of_copying_them(mirror: Mirror,
                                                                                     tmp_path: Path) -> None:
    alternates = mirror.path / "objects" / "info" / "alternates"
    assert alternates.read_text().strip() == str((tmp_path / "remote.git" / "objects").resolve())
    clone = tmp_path / "clone"
    (clone / "projects" / "new").mkdir(parents=True, exist_ok=True)
    (clone / "projects" / "new" / "project.yaml").write_text("pipeline: demo\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "u", "GIT_AUTHOR_EMAIL": "u@x", "GIT_COMMITTER_NAME": "u",
           "GIT_COMMITTER_EMAIL": "u@x"}
    for args in (["add", "-A"], ["commit", "-qm", "new"], ["push", "-q", "origin", "HEAD:main"]):
        subprocess.run(["git", *args], cwd=clone, env=env, check=True, capture_output=True)
    mirror.fetch()
    tip = mirror.reader.resolve(ORIGIN_MAIN)
    assert tip is not None and mirror.reader.read(tip, "projects/new/project.yaml") == b"pipeline: demo\n"
    alternates.unlink()  # without the remote's store, the fetched commit is not in the mirror's own
    missing = subprocess.run(["git", "cat-file", "-e", f"{tip}:projects/new/project.yaml"], cwd=mirror.path,
                             capture_output=True)
    assert missing.returncode != 0
    mirror.open()  # opening again lends the store again
    assert alternates.exists()


def test_a_mirror_of_a_network_remote_keeps_its_own_objects(tmp_path: Path) -> None:
    far = Mirror("http://127.0.0.1:9/state.git", tmp_path / "far.git")
    far.open()
    assert not (far.path / "objects" / "info" / "alternates").exists()
    far.close()


def _remote_fsck(remote: Path) -> None:
    fsck = subprocess.run(["git", "--git-dir", str(remote), "fsck", "--strict", "--no-dangling"], capture_output=True,
                          text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_a_same_disk_remote_is_moved_by_compare_and_swap_with_every_object_it_needs(mirror: Mirror,
                                                                                   tmp_path: Path) -> None:
    remote = tmp_path / "remote.git"
    tip = mirror.reader.resolve(ORIGIN_MAIN)
    first = mirror.commit(tip, {"projects/p/status.yaml": b"state: IDLE\n", "projects/p/logs/1-a-1.log": b"x\n"}, "1")
    second = mirror.commit(tip, {"projects/q/status.yaml": b"state: IDLE\n"}, "2, on the same parent")
    mirror.push_main(first)
    assert mirror._direct_pushes == 1  # no `git push`: its objects copied, main swapped under git's lock
    with pytest.raises(PushRejected):
        mirror.push_main(second)
    assert subprocess.run(["git", "--git-dir", str(remote), "rev-parse", "main"], capture_output=True,
                          text=True).stdout.strip() == first
    _remote_fsck(remote)  # the remote holds every object main needs, on its own


def test_a_remote_with_hooks_gets_a_real_push_so_that_its_hooks_run(mirror: Mirror, tmp_path: Path) -> None:
    remote = tmp_path / "remote.git"
    hook = remote / "hooks" / "post-receive"
    hook.write_text(f"#!/bin/sh\ncat >> {tmp_path / 'received'}\n")
    hook.chmod(0o755)
    tip = mirror.reader.resolve(ORIGIN_MAIN)
    commit = mirror.commit(tip, {"a.txt": b"1\n"}, "first")
    mirror.push_main(commit)
    assert mirror._direct_pushes == 0
    assert commit in (tmp_path / "received").read_text()
    _remote_fsck(remote)


def _remote_git(remote: Path, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", str(remote), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_same_disk_remote_s_heartbeat_branch_is_moved_with_every_object_it_needs(mirror: Mirror,
                                                                                  tmp_path: Path) -> None:
    remote = tmp_path / "remote.git"
    first = mirror.commit(None, {"nodes/n1.yaml": b"tick: 1\n"}, "n1: heartbeat 1")
    mirror.push_heartbeat("winslow/nodes/n1", first)
    again = mirror.commit(None, {"nodes/n1.yaml": b"tick: 2\n"}, "n1: heartbeat 2, a fresh branch")
    mirror.push_heartbeat("winslow/nodes/n1", again)  # forced, as a heartbeat's push is

    assert mirror._direct_pushes == 2
    assert _remote_git(remote, "rev-parse", "winslow/nodes/n1") == again
    _remote_fsck(remote)


def test_a_fetch_from_a_same_disk_remote_moves_adds_and_prunes_tracking_refs_but_not_the_node_s_own(
        mirror: Mirror, tmp_path: Path) -> None:
    remote = tmp_path / "remote.git"
    tip = mirror.reader.resolve(ORIGIN_MAIN)
    commit = _remote_git(remote, "commit-tree", f"{tip}^{{tree}}", "-p", tip, "-m", "a user's commit")
    for ref in ("refs/heads/winslow/nodes/n1", "refs/heads/winslow/nodes/n2", "refs/heads/resume/p/2"):
        _remote_git(remote, "update-ref", ref, tip)
    mirror.fetch(skip_node="n1")
    assert set(mirror.reader.refs()) == {ORIGIN_MAIN, "refs/remotes/origin/winslow/nodes/n2",
                                         "refs/remotes/origin/resume/p/2"}

    _remote_git(remote, "update-ref", "refs/heads/main", commit)
    _remote_git(remote, "update-ref", "-d", "refs/heads/resume/p/2")
    _remote_git(remote, "update-ref", "refs/heads/other", commit)  # not a branch Winslow follows
    mirror.fetch(skip_node="n1")

    assert mirror.reader.refs() == {ORIGIN_MAIN: commit, "refs/remotes/origin/winslow/nodes/n2": tip}
    assert mirror.reader.resolve(ORIGIN_MAIN) == commit  # its object borrowed from the remote's store
    assert mirror.refs() == mirror.reader.refs()  # as the mirror knows them, without asking git

    ours = mirror.commit(commit, {"b.txt": b"2\n"}, "a node's commit")
    mirror.push_main(ours)
    mirror.push_branch("resume/p/3", ours)
    mirror.set_tracking_ref("refs/remotes/origin/winslow/nodes/n2", None)
    assert mirror.refs() == mirror.reader.refs() == {ORIGIN_MAIN: ours, "refs/remotes/origin/resume/p/3": ours}
