"""The node's journal: facts it observed, on disk before they reach git.

A container exited with code 1 at T is a fact; it is appended here (and
fsynced) the moment it is seen, and removed only once a commit carrying it
is on the remote. A crash or an unreachable remote loses nothing.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict
from pathlib import Path

from reconciler.facts import Fact


class Journal:
    """An append-only JSON-lines file, rewritten when facts are published."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._facts: dict[tuple[str, str, str], Fact] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                fact = Fact(**json.loads(line))
            except (ValueError, TypeError):
                continue  # a line torn by a crash mid-write
            self._facts[fact.key] = fact

    def record(self, fact: Fact) -> None:
        with self._lock:
            self._facts[fact.key] = fact
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(asdict(fact)) + "\n")
                handle.flush()
                os.fsync(handle.fileno())

    def pending(self) -> tuple[Fact, ...]:
        with self._lock:
            return tuple(self._facts.values())

    def settle(self, keys: set[tuple[str, str, str]]) -> None:
        """Forget facts that are now on the remote."""
        if not keys:
            return
        with self._lock:
            for key in keys:
                self._facts.pop(key, None)
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w", encoding="utf-8") as handle:
                for fact in self._facts.values():
                    handle.write(json.dumps(asdict(fact)) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
