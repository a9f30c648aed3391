"""The storage root: the resource pool, run workspaces and full logs.

Large files never enter git. Every path below the root goes through
`inside()`, so nothing (a `..`, an absolute path, a symlink) leaves it. The
interface is small on purpose: an object store can implement it too.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from reconciler import layout
from reconciler.errors import StorageError
from reconciler.layout import escapes


@dataclass(frozen=True)
class LocalStorage:
    """A local folder or a shared mount (NFS) at the same path on every node."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    def prepare(self) -> None:
        for name in layout.STORAGE_FOLDERS:
            (self.root / name).mkdir(parents=True, exist_ok=True)

    def inside(self, relative: str) -> Path:
        """The absolute path of `relative`; StorageError when it would leave the root."""
        if escapes(relative):
            raise StorageError(f"path '{relative}' leaves the storage root")
        path = (self.root / relative).resolve()
        if path != self.root and self.root not in path.parents:
            raise StorageError(f"path '{relative}' leaves the storage root (through a symlink)")
        return path

    @property
    def resources(self) -> Path:
        return self.root / layout.RESOURCES

    def workspace(self, project: str, run_id: str) -> Path:
        return self.inside(layout.workspace(project, run_id))

    def log_path(self, project: str, run_id: str) -> Path:
        return self.inside(layout.storage_log(project, run_id))

    def remove_project(self, project: str) -> list[Path]:
        """Delete a project's workspaces and logs, and nothing else."""
        removed = []
        for top in layout.PROJECT_STORAGE:
            target = self.inside(f"{top}/{project}")
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
                removed.append(target)
        return removed

    def projects_on_disk(self) -> set[str]:
        found: set[str] = set()
        for top in layout.PROJECT_STORAGE:
            base = self.root / top
            if base.is_dir():
                found.update(entry.name for entry in base.iterdir() if entry.is_dir())
        return found


def capped_log(path: Path, head: int, tail: int) -> bytes:
    """The first `head` and last `tail` bytes of a log, marked where it was cut."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return b""
    with open(path, "rb") as handle:
        if size <= head + tail:
            return handle.read()
        first = handle.read(head)
        handle.seek(size - tail)
        last = handle.read()
    cut = size - head - tail
    marker = f"\n[... winslow: {cut} bytes cut here; the full log is in storage ...]\n".encode()
    return first + marker + last


def read_tail(path: Path, limit: int) -> str:
    """The last `limit` bytes of a log as text, starting at a line boundary when possible."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            handle.seek(max(0, size - limit))
            data = handle.read(limit)
    except OSError:
        return ""
    if size > limit and b"\n" in data:
        data = data[data.index(b"\n") + 1:]
    return data.decode("utf-8", "replace")
