"""Secrets: values a node passes to stages but never writes to git.

Each node keeps them in its own folder (`--secrets DIR`, one file per
secret). A stage names the ones it needs; every log that leaves the node
(the capped log on main, the live tail on the node branch) has every secret
value of the folder replaced by `***`, as GitLab CI masks job logs.
"""
from __future__ import annotations

import threading
from pathlib import Path

from reconciler.errors import ExecutorError
from reconciler.model import SECRET_MASK

MASK = SECRET_MASK.encode()
MIN_MASKED = 4  # shorter values would mask ordinary words


class SecretStore:
    def __init__(self, folder: Path | None, node: str) -> None:
        self.folder = folder
        self.node = node
        self._lock = threading.Lock()
        self._cache: tuple[float, dict[str, str]] | None = None

    def _all(self) -> dict[str, str]:
        if self.folder is None or not self.folder.is_dir():
            return {}
        stamp = max([self.folder.stat().st_mtime] + [p.stat().st_mtime for p in self.folder.iterdir() if p.is_file()])
        with self._lock:
            if self._cache is None or self._cache[0] != stamp:
                values = {p.name: p.read_text(errors="replace").rstrip("\n")
                          for p in self.folder.iterdir() if p.is_file() and not p.name.startswith(".")}
                self._cache = (stamp, values)
            return self._cache[1]

    def get(self, names: tuple[str, ...]) -> dict[str, str]:
        """The values of the named secrets; ExecutorError naming the first one missing."""
        known = self._all()
        for name in names:
            if name not in known:
                raise ExecutorError(f"secret {name} is missing on {self.node} "
                                    f"(expected a file named {name} in the node's --secrets folder)")
        return {name: known[name] for name in names}

    @property
    def longest(self) -> int:
        """The length of the longest secret value: how far past a cut text must be read to mask it whole."""
        return max((len(v.encode()) for v in self._all().values()), default=0)

    def mask(self, data: bytes) -> bytes:
        for value in sorted(self._all().values(), key=len, reverse=True):
            if len(value) >= MIN_MASKED:
                data = data.replace(value.encode(), MASK)
        return data
