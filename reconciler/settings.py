"""The cluster settings in force on this node: one owner, read from any thread.

Defaults live in `model.ClusterConfig`; `winslow.yaml` of the last snapshot the
cycle read replaces them; the node's command-line flags go on top. The cycle is
the only writer; the heartbeat and the executor's callbacks read.
"""
from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from reconciler.model import ClusterConfig


class Settings:
    def __init__(self, flags: Mapping[str, Any] | None = None) -> None:
        self._flags = {key: value for key, value in (flags or {}).items() if value is not None}
        self._lock = threading.Lock()
        self._current = replace(ClusterConfig(), **self._flags)
        self._held: str | None = None

    @property
    def current(self) -> ClusterConfig:
        with self._lock:
            return self._current

    @property
    def held(self) -> str | None:
        """winslow.yaml is invalid: which earlier settings stay in force, in words (None: it is valid)."""
        with self._lock:
            return self._held

    def update(self, config: ClusterConfig, held: str | None = None) -> ClusterConfig:
        """Take the settings of a new snapshot (flags still on top); returns what is now in force."""
        merged = replace(config, **self._flags)
        with self._lock:
            self._current, self._held = merged, held
        return merged
