"""The node's journal: facts it observed, on disk before they reach git.

A container exited with code 1 at T is a fact; it is appended here (and
fsynced) the moment it is seen, and removed only once a commit carrying it
is on the remote. A crash or an unreachable remote loses nothing.

A result manifest (up to 10,000 files) is written once to a file of its own
beside the journal, and the journal line names that file: settling facts
rewrites only short lines, never the manifests.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from reconciler.facts import Fact

log = logging.getLogger("winslow.journal")


class Journal:
    """An append-only JSON-lines file, rewritten when facts are published."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.manifests = self.path.with_name(self.path.name + ".manifests")
        self._lock = threading.Lock()
        self._facts: dict[tuple[str, str, str], Fact] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                data = json.loads(line)
                external = data.pop("manifest_file", None)
                fact = Fact(**data)
            except (ValueError, TypeError):
                continue  # a line torn by a crash mid-write
            if external is not None:
                manifest = self._read_manifest(external)
                if manifest is None:
                    continue  # the fact was being recorded when the node died: its listing is made again
                fact = replace(fact, manifest=manifest)
            self._facts[fact.key] = fact

    def record(self, fact: Fact) -> None:
        with self._lock:
            line = self._line(fact, write_manifest=True)
            self._facts[fact.key] = fact
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line)
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
            gone = [self._facts.pop(key) for key in keys if key in self._facts]
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "w", encoding="utf-8") as handle:
                for fact in self._facts.values():
                    handle.write(self._line(fact, write_manifest=False))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            for fact in gone:
                if fact.manifest is not None:
                    self._manifest_path(fact).unlink(missing_ok=True)

    def _line(self, fact: Fact, write_manifest: bool) -> str:
        data = asdict(fact)
        manifest = data.pop("manifest")
        if manifest is not None:
            path = self._manifest_path(fact)
            if write_manifest:
                self._write_manifest(path, manifest)
            data["manifest_file"] = path.name
        return json.dumps(data) + "\n"

    def _manifest_path(self, fact: Fact) -> Path:
        name = hashlib.sha256("\0".join(fact.key).encode()).hexdigest()[:32]
        return self.manifests / f"{name}.json"

    def _write_manifest(self, path: Path, manifest: dict[str, Any]) -> None:
        self.manifests.mkdir(exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def _read_manifest(self, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.manifests / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("journal: manifest %s is unreadable (%s); its fact is dropped", name, exc)
            return None
        return data if isinstance(data, dict) else None
