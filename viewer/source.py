"""The viewer's own mirror of the state repo, fetched whenever the remote changes, read through `RepoView`.

The viewer keeps a bare mirror like a node does (`gitsync.Mirror`: main, the node
branches and the resume branches), is woken like a node is (`wake.RemoteWatcher`:
a watch on a local remote's refs, `ls-remote` polls of any other) and reads it
through the one read path (`repoview.RepoView`). One thread fetches and reads; a
request only takes the `Current` that thread left, so a page never waits for git.

Everything a page shows comes from one `Current`: main as a `Snapshot`, the tips of
the node and resume branches, when it was fetched. Node liveness is judged when it
is asked for, on this process's monotonic clock, as `winslow status` does.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from reconciler import layout
from reconciler.errors import GitError
from reconciler.gitsync import Mirror
from reconciler.repoview import NodeView, RepoView
from reconciler.snapshot import Snapshot
from reconciler.wake import RemoteWatcher

log = logging.getLogger("winslow.viewer")
T = TypeVar("T")
QUIET_FETCH_S = 30.0  # the longest the viewer goes without a fetch, even when no wake came
LARGE_READ = 1000     # projects built in one read, after which the collector is told to leave them be


@dataclass(frozen=True)
class Current:
    """What the viewer knows now: one read of its mirror after one fetch."""

    snapshot: Snapshot
    node_tips: dict[str, str]
    resume_tips: dict[str, str]        # resume/<p>/<n> -> commit
    fetched: float                     # time.time() of the fetch it came from
    fetch_error: str | None = None     # the last fetch failed: what is shown is what the mirror had
    version: int = 0                   # counts reads, so a waiter can tell a new one from the last
    main: str = field(default="")      # main's commit


def _keep_out_of_collections() -> None:
    """After a large read, the snapshot's long-lived objects leave the cyclic collector's scans (as on a node):
    they are acyclic and freed by reference counting, and a full collection walking them all would stall a
    page for a second at 10,000 projects."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Source:
    """The mirror, the watcher that wakes it, and the last `Current`; `refresh()` fetches and reads once."""

    def __init__(self, url: str, work: Path, poll: float = 2.0) -> None:
        self.url = url
        self.mirror = Mirror(url, Path(work) / "state.git")
        self.view = RepoView(git=self.mirror.reader)
        self.poll = poll
        self._lock = threading.Lock()      # RepoView and its caches are used by one thread at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._watcher: RemoteWatcher | None = None
        self._thread: threading.Thread | None = None
        self._current: Current | None = None
        self._version = 0
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._waiters_lock = threading.Lock()
        self._listeners: list[Callable[[Current], object]] = []

    # -- lifecycle ------------------------------------------------------------------------------
    def open(self) -> Current:
        """Make or reuse the mirror and read it once; GitError when the remote was never reached."""
        self.mirror.open()
        return self.refresh(first=True)

    def start(self) -> None:
        """Keep the mirror fresh on a thread of its own, woken by every change of the remote's refs."""
        self._watcher = RemoteWatcher(self.url, self._wake, self.poll)
        self._watcher.start()
        self._thread = threading.Thread(target=self._loop, name="viewer-fetch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._watcher is not None:
            self._watcher.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.view.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(QUIET_FETCH_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the viewer must outlive any one bad read; the next wake tries again
                log.exception("viewer: reading the mirror failed")

    # -- reading --------------------------------------------------------------------------------
    def refresh(self, first: bool = False) -> Current:
        """Fetch, then read main and the branch tips; a failed fetch keeps showing what the mirror has."""
        error = None
        try:
            self.mirror.fetch()
        except GitError as exc:
            if first and self.view.tip() is None:
                raise
            error = str(exc)
            log.warning("viewer: fetch from %s failed (%s); showing what the mirror has", self.url, exc)
        with self._lock:
            tip = self.view.tip()
            if tip is None:
                raise GitError(f"{self.url} has no branch {layout.MAIN}")
            read_before = self.view.projects_read
            snapshot = self.view.snapshot(tip)
            if self.view.projects_read - read_before >= LARGE_READ:
                _keep_out_of_collections()
            node_tips = self.view.node_tips()
            git = self.view.git
            assert git is not None
            resumes = {ref[len(layout.ORIGIN):]: sha for ref, sha in git.refs(layout.ORIGIN_RESUMES).items()}
        self._version += 1
        fetched = time.time() if error is None else (self._current.fetched if self._current else 0.0)
        current = Current(snapshot, node_tips, resumes, fetched, error, self._version, tip)
        self._current = current
        for listener in self._listeners:
            listener(current)
        self._notify()
        return current

    def listen(self, listener: Callable[[Current], object]) -> None:
        """Call `listener` with every new read, on the thread that read it (before any page is told)."""
        self._listeners.append(listener)
        if self._current is not None:
            listener(self._current)

    @property
    def current(self) -> Current:
        if self._current is None:
            raise GitError("the viewer has not read the state repo yet")
        return self._current

    def nodes(self, current: Current) -> dict[str, NodeView]:
        """Every node with its liveness as of now, on this process's clock (no git process: tips are known)."""
        with self._lock:
            return self.view.nodes(current.snapshot.config.node_timeout, tips=current.node_tips,
                                   trust_commit_time=True)

    def read(self, work: Callable[[RepoView], T]) -> T:
        """Run `work` on the RepoView, one reader at a time (its caches and cat-file are not thread-safe)."""
        with self._lock:
            return work(self.view)

    # -- waiting for news (server-sent events) --------------------------------------------------
    async def changed(self, version: int, timeout: float) -> bool:
        """Wait until a read newer than `version` is there, or `timeout`; True when there is one."""
        if self.current.version > version:
            return True
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._waiters_lock:
            self._waiters.add(waiter)
        try:
            if self.current.version > version:
                return True
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            with self._waiters_lock:
                self._waiters.discard(waiter)

    def _notify(self) -> None:
        with self._waiters_lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop has closed: its waiter is gone with it
                pass
