"""Self-fencing: a node cut off from the remote stops its own runs, and says so when they end.

When a node cannot renew its heartbeat for the lease time, the others may already
have declared it lost and started its work elsewhere. So it claims nothing new and
stops what it runs; each run stopped that way ends LOST (the node's failure), not
FAILED (the program's). The heartbeat thread fences, the executor's threads report
the ends, and the cycle asks whether it may claim: one lock keeps them consistent.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

RunKey = tuple[str, str]  # (project, run id)
FENCED = "fenced: "  # how the reason of a run ended by fencing begins
LEASE_FILE = "lease"  # in a node's work folder: until when its lease holds, for its runs' supervisors


def write_lease(path: Path, expires: float) -> None:
    """Tell the supervisors outside the node process until when (wall clock) this node's lease holds.

    Each stage's supervisor (the process executor's wrapper, the Docker watchdog) ends the
    stage once the time in this file has passed: the node is dead or frozen and cannot fence
    itself, and others take over only after the longer node timeout.
    """
    temp = path.with_name(f".{path.name}.{os.getpid()}")
    temp.write_text(f"{expires:.3f}\n")
    os.replace(temp, path)


def write_shared_lease(path: Path, expires: float) -> None:
    """The same, on shared storage (NFS) that supervisors on other machines read (a Slurm job's script).

    Rewritten in place, never replaced: a reader on another NFS client may keep a replaced file's
    name pointing at the old one for a while, while opening the same file again (close-to-open)
    reads its newest bytes. The line has a fixed width and ends with a newline, so a read that
    catches a write half-way is seen as incomplete and ignored (the reader keeps the last time).
    """
    line = f"{expires:.3f}\n".encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, line, 0)
        os.ftruncate(fd, len(line))
    finally:
        os.close(fd)


class Fence:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fenced = False
        self._stopped: set[RunKey] = set()

    @property
    def fenced(self) -> bool:
        with self._lock:
            return self._fenced

    def cut_off(self, running: Iterable[RunKey]) -> list[RunKey]:
        """Fence the node; the runs among `running` not stopped by fencing yet, now marked so."""
        with self._lock:
            self._fenced = True
            fresh = [key for key in running if key not in self._stopped]
            self._stopped.update(fresh)
            return fresh

    def renewed(self) -> bool:
        """The heartbeat got through again; True when the node was fenced until now."""
        with self._lock:
            was, self._fenced = self._fenced, False
            return was

    def ended(self, key: RunKey) -> bool:
        """A run ended: True when fencing stopped it (its end is LOST), and forget it."""
        with self._lock:
            if key in self._stopped:
                self._stopped.discard(key)
                return True
            return False
