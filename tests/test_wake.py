"""What wakes a node: a change of main (or any ref but a heartbeat) on the remote, watched on disk or polled.

Other nodes' heartbeats move only their own branches; a node that woke for each of
them fetched and cycled several times a second in a busy cluster for nothing. A log
follower still wakes for them: they carry the live tails.
"""
from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.wake import RemoteWatcher
from tests.cluster import GIT_ENV, GitDaemon, git

QUIET_S = 1.0  # a wake that did not come within this did not come
WAKE_S = 10.0


@pytest.fixture
def remote(tmp_path: Path) -> Path:
    """A bare remote with one commit on main."""
    work = tmp_path / "work"
    git(tmp_path, "init", "-q", "-b", "main", str(work))
    (work / "README").write_text("state\n")
    git(work, "add", "README")
    git(work, "commit", "-qm", "first")
    bare = tmp_path / "remote.git"
    git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))
    return bare


def move(remote: Path, ref: str) -> None:
    """Point `ref` at a new commit, as a push would."""
    tree = git(remote, "rev-parse", "main^{tree}").strip()
    commit = subprocess.run(["git", "commit-tree", tree, "-p", "main", "-m", f"moves {ref}"], cwd=remote,
                            env=GIT_ENV, check=True, capture_output=True, text=True).stdout.strip()
    git(remote, "update-ref", ref, commit)


def watching(url: str, poll: float, heartbeats: bool) -> Iterator[threading.Event]:
    wake = threading.Event()
    watcher = RemoteWatcher(url, wake, poll, heartbeats)
    watcher.start()
    try:
        yield wake
    finally:
        watcher.stop()


def settle(wake: threading.Event) -> None:
    """Past the first look (a poller's first listing wakes once), nothing pending."""
    wake.wait(QUIET_S)
    wake.clear()


@pytest.mark.parametrize("served", ["on disk", "over git://"])
def test_a_heartbeat_does_not_wake_the_node_and_a_change_of_main_does(remote: Path, tmp_path: Path,
                                                                      served: str) -> None:
    daemon = GitDaemon(tmp_path, tmp_path / "daemon.log") if served == "over git://" else None
    try:
        url = daemon.url if daemon else str(remote)
        for wake in watching(url, poll=0.1, heartbeats=False):  # a node's
            settle(wake)
            move(remote, "refs/heads/winslow/nodes/n2")
            move(remote, "refs/heads/winslow/nodes/n3")
            assert not wake.wait(QUIET_S), "another node's heartbeat woke the node"

            move(remote, "refs/heads/main")
            assert wake.wait(WAKE_S), "a change of main did not wake the node"
            wake.clear()

            move(remote, "refs/heads/resume/ulm/2")  # a proposal: a ref the node decides on
            assert wake.wait(WAKE_S), "a new resume branch did not wake the node"
    finally:
        if daemon:
            daemon.close()


def test_who_shows_live_log_tails_is_woken_by_heartbeats(remote: Path) -> None:
    for wake in watching(str(remote), poll=0.1, heartbeats=True):
        settle(wake)
        move(remote, "refs/heads/winslow/nodes/n2")
        assert wake.wait(WAKE_S), "a heartbeat (a new log tail) did not wake `winslow logs --follow`"
