"""Which nodes are alive, judged on this node's own monotonic clock.

A node is alive while its branch keeps changing. No clock synchronisation is
assumed: only "when did *I* last see that branch move" counts.
"""
from __future__ import annotations

import logging
import time
from typing import Mapping

from reconciler.gitsync import StateRepo
from reconciler.model import NodeInfo
from reconciler.state import Snapshot
from reconciler.units import format_duration
from reconciler.yamlsafe import parse_yaml

log = logging.getLogger("winslow.liveness")


class Liveness:
    def __init__(self, me: str) -> None:
        self.me = me
        self._seen: dict[str, tuple[str, float]] = {}      # node -> (branch tip, when it last moved)
        self._info: dict[str, NodeInfo] = {}
        self._unknown: dict[str, float] = {}               # node named in status with no branch -> first seen

    def observe(self, repo: StateRepo, tips: Mapping[str, str], snapshot: Snapshot, mine: NodeInfo,
                timeout: float) -> tuple[dict[str, NodeInfo], dict[str, str]]:
        """Live nodes (this one included) and lost ones with why, from the node branches' tips."""
        now = time.monotonic()
        for name, sha in tips.items():
            previous = self._seen.get(name)
            if previous is None or previous[0] != sha:
                self._seen[name] = (sha, now)
                info = self._read(repo, name, sha)
                if info is not None:
                    self._info[name] = info
        live = {self.me: mine}
        lost: dict[str, str] = {}
        for name, (_, moved) in self._seen.items():
            if name == self.me:
                continue
            if now - moved < timeout:
                if name in self._info:
                    live[name] = self._info[name]
            else:
                lost[name] = f"no heartbeat for {format_duration(now - moved)}"
        holders = {r.node for e in snapshot.projects.values() for r in e.status.active if r.node}
        for name in holders - set(self._seen) - {self.me}:
            first = self._unknown.setdefault(name, now)
            if now - first >= timeout:
                lost[name] = f"no heartbeat branch seen for {format_duration(now - first)}"
        return live, lost

    def _read(self, repo: StateRepo, name: str, sha: str) -> NodeInfo | None:
        data = repo.read(sha, f"nodes/{name}.yaml")
        if data is None:
            return None
        try:
            doc = parse_yaml(data, f"nodes/{name}.yaml")
            return NodeInfo.from_dict(doc.data) if isinstance(doc.data, dict) and "name" in doc.data else None
        except Exception as exc:  # another node's broken file must not break this node's cycle
            log.warning("node %s: unreadable heartbeat: %s", name, exc)
            return None

