"""What one cycle of a node leaves for the next, so that each decides only what changed.

- The inputs of the last cycle whose plan was empty: a cycle with the same inputs (main's
  tip, live and lost nodes, facts, local runs, resume branches) decides nothing.
- The projects found quiet, with what that depended on: `decide` may skip those that
  still have the same entry object, local runs and resume branches.
- Timers, on this node's monotonic clock: how long each startable stage has waited for
  its claimer (grace periods), when a gate times out, and start facts held back for
  the node's next commit (`STARTED_DELAY_S`).
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from reconciler import layout
from reconciler.clock import seconds_between, utcnow
from reconciler.decide import Plan
from reconciler.facts import EXITED, QUEUED, STARTED, Fact
from reconciler.model import ClusterConfig
from reconciler.snapshot import Snapshot

STARTED_DELAY_S = 3.0  # how long a start may wait to be committed with something else
RunKey = tuple[str, str]
FactKey = tuple[str, str, str]


@dataclass(frozen=True)
class Inputs:
    """What a decision depends on, apart from time."""

    tip: str
    basis: object  # live nodes as placement sees them, lost nodes, whether this node may claim
    facts: frozenset[FactKey]
    local: frozenset[RunKey]
    resumes: frozenset[str]


@dataclass(frozen=True)
class _Quiet:
    projects: frozenset[str]
    snapshot: Snapshot
    inputs: Inputs


class DecisionMemory:
    def __init__(self) -> None:
        self._empty: Inputs | None = None       # inputs of the last cycle whose plan was empty
        self._quiet: _Quiet | None = None
        self._waiting: dict[str, float] = {}    # "<project>/<run>" -> when it was first seen startable
        self._due_at: float | None = None
        self._started: dict[FactKey, float] = {}  # start facts of this node's life -> when recorded

    # -- before deciding ------------------------------------------------------------------------
    def unchanged(self, inputs: Inputs) -> bool:
        """Nothing a decision depends on changed since an empty plan, and no timer is due."""
        return inputs == self._empty and not self.due()

    def due(self) -> bool:
        """Time alone may change a decision now: a grace period running, or a gate or held start due."""
        return bool(self._waiting) or (self._due_at is not None and time.monotonic() >= self._due_at)

    def quiet(self, snapshot: Snapshot, inputs: Inputs) -> frozenset[str]:
        """The projects still quiet: quiet last time, the same entry (unchanged files), the same local runs
        and resume branches, with the same live and lost nodes."""
        last = self._quiet
        if last is None or last.inputs.basis != inputs.basis:
            return frozenset()
        moved = {project for project, _ in inputs.local ^ last.inputs.local}
        moved |= {named[0] for named in map(layout.parse_resume_branch, inputs.resumes ^ last.inputs.resumes) if named}
        if snapshot is last.snapshot:
            return last.projects - moved
        if snapshot.changed is not None and snapshot.base == last.snapshot.commit:
            return last.projects - snapshot.changed - moved  # read as the difference: the rest are the same objects
        before = last.snapshot.projects
        return frozenset(p for p in last.projects if p not in moved and snapshot.projects.get(p) is before.get(p))

    def waited(self) -> dict[str, float]:
        now = time.monotonic()
        return {key: now - since for key, since in self._waiting.items()}

    def started(self, fact: Fact) -> None:
        """A start fact was recorded on this node just now."""
        self._started[fact.key] = time.monotonic()

    def fresh_starts(self, facts: Iterable[Fact]) -> set[FactKey]:
        """Start (and queued) facts younger than STARTED_DELAY_S whose run has not ended: they stay off main for now.

        A short stage's start then lands with its end: one status write less per run. A start
        falls due after the delay and goes in the next commit, with every other start pending
        then; it also goes earlier with any commit that writes its project's status anyway. A run
        queued in its executor (a Slurm job PENDING) that starts within the delay lands its queueing
        with its start, so the project never shows PENDING for a job that did not wait.
        """
        now = time.monotonic()
        facts = list(facts)
        pending = {f.key for f in facts if f.kind in (STARTED, QUEUED)}
        # Forgotten once settled (on main) and old: a start recorded while this cycle's facts were being read
        # is not in `facts` yet, and forgetting it now would make it look like an earlier life's, due at once.
        self._started = {key: at for key, at in self._started.items()
                         if key in pending or now - at < STARTED_DELAY_S}
        ended = {(f.project, f.run_id) for f in facts if f.kind == EXITED}
        waiting = [f.key for f in facts if f.kind in (STARTED, QUEUED) and (f.project, f.run_id) not in ended]
        if any(now - self._started.get(key, -STARTED_DELAY_S) >= STARTED_DELAY_S for key in waiting):
            return set()  # one is due (or from an earlier life of the node): those younger go with it
        return set(waiting)

    # -- after deciding -------------------------------------------------------------------------
    def remember(self, plan: Plan, snapshot: Snapshot, inputs: Inputs, held: set[FactKey]) -> None:
        """What the next cycle needs: the quiet projects, the timers, and the inputs when nothing was done."""
        now = time.monotonic()
        self._waiting = {key: self._waiting.get(key, now) for key in plan.waiting}
        self._quiet = _Quiet(plan.quiet, snapshot, inputs)
        wait = seconds_between(utcnow(), plan.due) if plan.due else None
        self._due_at = now + max(0.0, wait) if wait is not None else None
        if held:  # decide again once the oldest held start is due on its own
            oldest = min(self._started.get(key, now) for key in held)
            self._due_at = min(self._due_at or float("inf"), oldest + STARTED_DELAY_S)
        # A plan that does something is followed by a cycle on its own commit; only an empty one may be skipped.
        empty = not (plan.commit_needed or plan.claims or plan.stops or plan.resumes or plan.stale_branches)
        self._empty = inputs if empty else None

    def sleep_budget(self, config: ClusterConfig) -> float:
        """How long the node may sleep before time alone could change a decision."""
        budget = config.poll * 5
        if self._waiting:
            budget = min(budget, config.grace / 2)
        if self._due_at is not None:
            budget = min(budget, self._due_at - time.monotonic())
        return max(0.05, min(budget, config.node_timeout / 3))
