"""Listing finished runs' workspaces off the exit path: the result manifest as a fact of its own.

A stage's exit is recorded the moment it is seen; its workspace (tens of GB for a
detection stage) is listed and hashed afterwards, here, one run at a time in a
thread of its own, and the manifest becomes a LISTED fact in the journal that the
next cycle commits as `projects/<p>/results/<run>.yaml`. So the next stage starts
as soon as the previous one exited, however big its output.

A run waiting to be listed has a marker file in the node's work folder, so a node
that restarts lists what it had not listed yet.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reconciler.clock import utcnow
from reconciler.facts import LISTED, Fact
from reconciler.journal import Journal
from reconciler.validation import is_safe_id

log = logging.getLogger("winslow.lister")

Build = Callable[[str, str], dict[str, Any]]  # (project, run id) -> manifest


class Lister:
    def __init__(self, folder: Path, build: Build, journal: Journal, wake: threading.Event) -> None:
        self.folder = Path(folder)
        self._build = build
        self._journal = journal
        self._wake = wake
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pending: set[tuple[str, str]] = set()
        self._listed = threading.Condition()

    def start(self) -> None:
        """Start listing, beginning with what an earlier life of this node left unlisted."""
        for marker in sorted(self.folder.glob("*/*")):
            self._queue.put((marker.parent.name, marker.name))
        self._thread = threading.Thread(target=self._work, name="lister", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def list_later(self, project: str, run_id: str) -> None:
        """Queue a finished run's workspace; safe to call from any thread."""
        if not (is_safe_id(project) and is_safe_id(run_id)):
            log.warning("%s/%s: not listing a run with such a name", project, run_id)
            return
        marker = self.folder / project / run_id
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError as exc:  # listing still happens; only a restart would forget it
            log.warning("%s/%s: cannot note the listing to do: %s", project, run_id, exc)
        with self._listed:
            self._pending.add((project, run_id))
        self._queue.put((project, run_id))

    def wait_for(self, runs: set[tuple[str, str]], timeout: float) -> None:
        """Wait until none of `runs` is still to be listed, or `timeout` passed: a small workspace is listed
        in milliseconds, and its manifest can then go in the same commit as its exit."""
        deadline = time.monotonic() + timeout
        with self._listed:
            while runs & self._pending:
                left = deadline - time.monotonic()
                if left <= 0 or not self._listed.wait(left):
                    return

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._list(*item)

    def _list(self, project: str, run_id: str) -> None:
        try:
            manifest = self._build(project, run_id)
        except Exception as exc:  # noqa: BLE001 - whatever the stage left, its exit is already recorded; say what went wrong
            log.warning("%s/%s: cannot list the workspace: %s", project, run_id, exc)
            manifest = {"files": [], "total_size": 0, "truncated": False,
                        "unlisted": [{"path": ".", "reason": f"the workspace could not be listed: {exc}"}]}
        self._journal.record(Fact(LISTED, project, run_id, utcnow(), manifest=manifest))
        try:
            (self.folder / project / run_id).unlink(missing_ok=True)
        except OSError as exc:
            log.warning("%s/%s: cannot remove the listing marker: %s", project, run_id, exc)
        with self._listed:
            self._pending.discard((project, run_id))
            self._listed.notify_all()
        files = manifest.get("files") or []
        log.info("%s/%s: workspace listed: %d %s, %d bytes", project, run_id, len(files),
                 "file" if len(files) == 1 else "files", manifest.get("total_size", 0))
        self._wake.set()
