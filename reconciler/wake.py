"""Waking the node: a change on the remote, a container exit, or a timer.

A remote on local disk is watched with watchfiles (its refs change on every
push); any other remote is polled with `git ls-remote`. Container exits set
the same event from the executor's threads.

A node asks not to be woken by heartbeats (`heartbeats=False`): each beat moves
only its node's branch, and nothing the node decides waits on it. Liveness reads
those branches' tips at every fetch, and the node's timers (no longer than a
third of the node timeout) bring the next fetch when nothing else does. Whoever
shows live log tails (`winslow logs --follow`) wants them.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from reconciler import layout
from reconciler.errors import GitError
from reconciler.gitcmd import git, local_remote

log = logging.getLogger(__name__)

HEARTBEATS = f"refs/heads/{layout.NODE_BRANCHES}"


class RemoteWatcher:
    """Sets `wake` whenever the remote's refs may have changed."""

    def __init__(self, url: str, wake: threading.Event, poll: float, heartbeats: bool = True) -> None:
        self.url = url
        self.heartbeats = heartbeats  # whether a move of a node's branch alone wakes
        self.wake = wake
        self.poll = poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: str | None = None

    def start(self) -> None:
        local = local_remote(self.url)
        target = self._watch if local else self._poll
        self._thread = threading.Thread(target=target, args=(local,) if local else (), name="remote-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self, folder: Path) -> None:
        import watchfiles

        git_dir = (folder / ".git" if (folder / ".git").is_dir() else folder).resolve()
        paths = [p for p in (git_dir / "refs", git_dir / "packed-refs") if p.exists()] or [git_dir]
        try:
            for changes in watchfiles.watch(*paths, stop_event=self._stop, debounce=10, step=5,
                                            rust_timeout=500, raise_interrupt=False):
                if self.heartbeats or any(not _heartbeat(Path(path), git_dir) for _, path in changes):
                    log.debug("remote refs changed")
                    self.wake.set()
        except Exception as exc:  # noqa: BLE001 - an unwatchable file system: fall back to polling
            log.warning("cannot watch %s (%s); polling every %.1fs instead", folder, exc, self.poll)
            self._poll()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                refs = git(".", "ls-remote", self.url, timeout=max(10.0, self.poll * 5))
            except GitError as exc:
                log.debug("ls-remote failed: %s", exc)
                self.wake.set()  # let the loop notice the outage (and keep heartbeats honest)
                continue
            if not self.heartbeats:
                refs = "\n".join(line for line in refs.splitlines()
                                  if not line.partition("\t")[2].startswith(HEARTBEATS))
            if refs != self._last:
                self._last = refs
                self.wake.set()


def _heartbeat(path: Path, git_dir: Path) -> bool:
    """The changed file is a node's heartbeat branch (or its lock file), or a folder made for the first of them."""
    try:
        name = path.resolve().relative_to(git_dir).as_posix()
    except ValueError:
        return False
    return name.startswith(HEARTBEATS) or HEARTBEATS.startswith(f"{name}/")
