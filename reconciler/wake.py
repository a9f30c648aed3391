"""Waking the node: a change on the remote, a container exit, or a timer.

A remote on local disk is watched with watchfiles (its refs change on every
push); any other remote is polled with `git ls-remote`. Container exits set
the same event from the executor's threads.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from reconciler.errors import GitError
from reconciler.gitcmd import git, local_remote

log = logging.getLogger(__name__)


class RemoteWatcher:
    """Sets `wake` whenever the remote's refs may have changed."""

    def __init__(self, url: str, wake: threading.Event, poll: float) -> None:
        self.url = url
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

        git_dir = folder / ".git" if (folder / ".git").is_dir() else folder
        paths = [p for p in (git_dir / "refs", git_dir / "packed-refs") if p.exists()] or [git_dir]
        try:
            for _changes in watchfiles.watch(*paths, stop_event=self._stop, debounce=10, step=5,
                                             rust_timeout=500, raise_interrupt=False):
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
            if refs != self._last:
                self._last = refs
                self.wake.set()
