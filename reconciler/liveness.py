"""Which nodes are alive, as this node judges them for its decisions.

A node is alive while its branch keeps changing, timed on this node's own
monotonic clock (`RepoView.nodes`): no clock synchronisation is assumed, so a
branch seen for the first time counts as just moved. A node that holds runs in
status but has never had a branch is lost once it stayed unseen that long.

Silence counts only while this node itself reaches the remote (`ConnectedClock`):
when the git server is down for everyone, nobody's branch can move and nobody is
lost; when it comes back, the nodes' branches move again before anyone judges them.
"""
from __future__ import annotations

from collections.abc import Mapping

from reconciler.model import NodeInfo
from reconciler.repoview import RepoView
from reconciler.snapshot import Snapshot
from reconciler.units import format_duration


class ConnectedClock:
    """Seconds this node has been in touch with the remote: it runs from the start of one successful
    fetch to the start of the next, and stands still across any stretch with a failed fetch in it.

    A fetch tells how the remote stood when it began, so the clock advances only to then: a node
    frozen (SIGSTOP, a paused VM) with a fetch in flight does not count the freeze as time in touch,
    and does not judge other nodes silent on tips it fetched before the freeze."""

    def __init__(self) -> None:
        self._total = 0.0
        self._last_ok: float | None = None

    def fetched(self, ok: bool, began: float) -> None:
        """A fetch that began at `began` (this process's monotonic clock) succeeded or failed."""
        if not ok:
            self._last_ok = None
            return
        if self._last_ok is not None:
            self._total += max(0.0, began - self._last_ok)
        self._last_ok = began

    def __call__(self) -> float:
        return self._total


class Liveness:
    def __init__(self, me: str) -> None:
        self.me = me
        self.clock = ConnectedClock()
        self._unknown: dict[str, float] = {}  # node named in status with no branch -> first seen

    def observe(self, view: RepoView, tips: Mapping[str, str], snapshot: Snapshot, mine: NodeInfo,
                timeout: float) -> tuple[dict[str, NodeInfo], dict[str, str]]:
        """Live nodes (this one included) and lost ones with why, from the node branches' tips."""
        live = {self.me: mine}
        lost: dict[str, str] = {}
        for name, node in view.nodes(timeout, tips, trust_commit_time=False, clock=self.clock).items():
            if name == self.me:
                continue
            if node.lost:
                lost[name] = f"no heartbeat for {format_duration(node.heard_ago or 0.0)}"
            elif node.info is not None:
                live[name] = node.info
        now = self.clock()
        holders = {run.node for _, run in snapshot.active_runs if run.node}
        for name in holders - set(tips) - {self.me}:
            first = self._unknown.setdefault(name, now)
            if now - first >= timeout:
                lost[name] = f"no heartbeat branch seen for {format_duration(now - first)}"
        return live, lost
