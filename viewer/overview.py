"""The first screen: every project in one line, and what needs a person first.

A `Row` is one project at a glance (state, stage, node, GPUs, since when, why). Rows are
built once per `ProjectEntry` object: a snapshot read after a commit keeps the entries
of the projects it did not touch, so after a push to one project only that row is
built again. The order is what needs a person first: WAITING at a gate, FAILED,
INVALID, RUNNING, then the rest (PENDING, PAUSED, IDLE, SUCCEEDED); within a state, by project id.
"""
from __future__ import annotations

import difflib
import math
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

from reconciler import layout
from reconciler.clock import parse_time
from reconciler.model import ProjectState, Run, RunState
from reconciler.repoview import NodeView, RepoView
from reconciler.snapshot import ProjectEntry, Snapshot

STATES = ("WAITING", "FAILED", "INVALID", "RUNNING", "PENDING", "PAUSED", "IDLE", "SUCCEEDED")
RANK = {state: i for i, state in enumerate(STATES)}
NEEDS_ME = ("WAITING", "FAILED", "INVALID", "RUNNING")
PER_PAGE = 100
SECTION_MAX = 50  # cards per "needs me" section; the rest are one filter away


@dataclass(frozen=True)
class Row:
    id: str
    name: str
    pipeline: str | None
    state: str
    tags: tuple[str, ...]
    stage: str | None
    run: str | None
    node: str | None
    gpus: tuple[int, ...]
    since: str | None
    exit_code: int | None
    reason: str | None
    message: str | None
    request: int

    @property
    def rank(self) -> int:
        return RANK.get(self.state, len(RANK))

    def matches(self, state: str | None, tag: str | None, words: str | None) -> bool:
        if state and self.state != state:
            return False
        if tag and tag not in self.tags:
            return False
        return not words or words in self.id.lower() or words in self.name.lower()

    def to_dict(self, now: datetime) -> dict[str, Any]:
        return {"project": self.id, "name": self.name, "pipeline": self.pipeline, "state": self.state,
                "tags": list(self.tags), "stage": self.stage, "run": self.run, "node": self.node,
                "gpus": list(self.gpus), "since": self.since, "age_seconds": age_seconds(self.since, now),
                "exit_code": self.exit_code, "reason": self.reason, "message": self.message,
                "request": self.request}


def age_seconds(since: str | None, now: datetime) -> float | None:
    began = parse_time(since)
    return max(0.0, (now - began).total_seconds()) if began else None


def latest_run(runs: Iterable[Run]) -> Run | None:
    """The run a project is about now: the running one, else the last one recorded."""
    runs = tuple(runs)
    running = [r for r in runs if r.state is RunState.RUNNING]
    candidates = running or list(runs)
    return candidates[-1] if candidates else None


def project_state(entry: ProjectEntry) -> str:
    return ProjectState.INVALID.value if entry.invalid else entry.status.state.value


def build_row(entry: ProjectEntry) -> Row:
    status = entry.status
    run = latest_run(status.runs)
    state = project_state(entry)
    if run is not None and run.state is RunState.RUNNING:
        since = run.started or run.claimed
    elif status.state is ProjectState.WAITING and status.request and status.request.waiting_since:
        since = status.request.waiting_since
    else:
        since = (run.finished if run else None) or status.updated
    # An invalid project's first problem says where (file:line:column); the status's message only that it is.
    message = str(entry.problems[0]) if entry.problems else status.message
    project = entry.project
    pipeline = project.pipeline if project else (entry.lock.name if entry.lock else None)
    return Row(id=entry.id, name=(project.name if project else "") or entry.id, pipeline=pipeline, state=state,
               tags=project.tags if project else (), stage=run.stage if run else None, run=run.id if run else None,
               node=run.node if run else None, gpus=run.gpus if run else (), since=since,
               exit_code=run.exit_code if run else None, reason=run.reason if run else None, message=message,
               request=status.observed_request)


@dataclass(frozen=True)
class Overview:
    """Every project of one snapshot, in the order a person should look at them."""

    rows: tuple[Row, ...]
    states: Mapping[str, int]
    tags: Mapping[str, int]


class Rows:
    """Rows by project, reused for every entry object a new snapshot kept from the last one."""

    def __init__(self) -> None:
        self._rows: dict[str, tuple[ProjectEntry, Row]] = {}
        self._overview: tuple[Snapshot, Overview] | None = None
        self._lock = threading.Lock()

    def overview(self, snapshot: Snapshot) -> Overview:
        with self._lock:
            if self._overview is not None and self._overview[0] is snapshot:
                return self._overview[1]
            kept: dict[str, tuple[ProjectEntry, Row]] = {}
            for pid, entry in snapshot.projects.items():
                if not entry.exists:
                    continue
                known = self._rows.get(pid)
                kept[pid] = known if known is not None and known[0] is entry else (entry, build_row(entry))
            self._rows = kept
            rows = tuple(sorted((row for _, row in kept.values()), key=lambda r: (r.rank, r.id)))
            states = Counter(r.state for r in rows)
            tags = Counter(tag for r in rows for tag in r.tags)
            overview = Overview(rows, dict(states), dict(sorted(tags.items())))
            self._overview = (snapshot, overview)
            return overview


@dataclass(frozen=True)
class Query:
    state: str | None = None
    tag: str | None = None
    q: str | None = None
    page: int = 1

    @classmethod
    def of(cls, params: Mapping[str, str]) -> Query:
        state = params.get("state", "").upper() or None
        page = params.get("page", "1")
        return cls(state=state if state in RANK else None, tag=params.get("tag") or None,
                   q=(params.get("q") or "").strip() or None,
                   page=max(1, int(page)) if page.isdigit() else 1)

    @property
    def filtered(self) -> bool:
        return bool(self.state or self.tag or self.q)

    def link(self, **changes: Any) -> str:
        """This query with `changes`, as the query string of a link."""
        values = {"state": self.state, "tag": self.tag, "q": self.q, "page": self.page, **changes}
        parts = [f"{k}={quote(str(v))}" for k, v in values.items() if v and not (k == "page" and v == 1)]
        return "?" + "&".join(parts) if parts else "?"


def select(overview: Overview, query: Query) -> tuple[list[Row], int, int]:
    """The rows of one page of the query, the number that match, and the number of pages."""
    words = query.q.lower() if query.q else None
    rows = overview.rows
    if query.filtered:
        rows = tuple(r for r in rows if r.matches(query.state, query.tag, words))
    pages = max(1, math.ceil(len(rows) / PER_PAGE))
    page = min(query.page, pages)
    return list(rows[(page - 1) * PER_PAGE: page * PER_PAGE]), len(rows), pages


def needs_me(overview: Overview) -> dict[str, list[Row]]:
    """The first cards of each state that needs a person."""
    sections: dict[str, list[Row]] = {state: [] for state in NEEDS_ME}
    for row in overview.rows:
        if row.rank > RANK[NEEDS_ME[-1]]:
            break  # the rows are in rank order: nothing after this needs anyone
        if row.state in sections and len(sections[row.state]) < SECTION_MAX:
            sections[row.state].append(row)
    return sections


# -- gates ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gate:
    """A project waiting at a gate: the branch that approves it, what merging it changes, how to do it."""

    project: str
    branch: str | None          # resume/<p>/<n>; None while no node has proposed it yet
    diff: str                   # main's project.yaml against the branch's
    approve: str                # the command
    merge_request: str | None   # a link that opens the merge request, when winslow.yaml has the pattern

    def to_dict(self) -> dict[str, Any]:
        return {"branch": self.branch, "diff": self.diff, "approve": self.approve, "merge_request": self.merge_request}


def merge_request_link(pattern: str | None, project: str, branch: str) -> str | None:
    if not pattern:
        return None
    return pattern.replace("{branch}", quote(branch, safe="")).replace("{project}", quote(project, safe=""))


class Gates:
    """Resume-branch diffs, computed once per branch tip and project entry (a new entry: its files changed)."""

    def __init__(self) -> None:
        self._diffs: dict[str, tuple[str, ProjectEntry | None, str]] = {}
        self._lock = threading.Lock()

    def gate(self, view: RepoView, snapshot: Snapshot, main: str, resumes: Mapping[str, str], row: Row) -> Gate:
        entry = snapshot.projects.get(row.id)
        number = entry.status.request.number if entry and entry.status.request else row.request
        branch = layout.resume_branch(row.id, number)
        tip = resumes.get(branch)
        approve = f"winslow approve {row.id}"
        if tip is None:
            return Gate(row.id, None, "", approve, None)
        with self._lock:
            known = self._diffs.get(row.id)
        if known is not None and known[0] == tip and known[1] is entry:
            diff = known[2]
        else:
            diff = resume_diff(view, main, tip, row.id)
            with self._lock:
                self._diffs[row.id] = (tip, entry, diff)
        link = merge_request_link(snapshot.config.merge_request_url, row.id, branch)
        return Gate(row.id, branch, diff, approve, link)


def resume_diff(view: RepoView, main: str, tip: str, project: str) -> str:
    """What merging the resume branch changes in project.yaml, as a unified diff."""
    path = layout.project_file(project)
    old = (view.file(main, path) or b"").decode("utf-8", "replace").splitlines(keepends=True)
    new = (view.file(tip, path) or b"").decode("utf-8", "replace").splitlines(keepends=True)
    return "".join(difflib.unified_diff(old, new, f"main:{path}", f"{tip[:10]}:{path}", n=2))


def node_is_lost(row: Row, nodes: Mapping[str, NodeView]) -> bool:
    """A RUNNING row whose node has gone silent: shown as such before any node marks the run LOST."""
    node = nodes.get(row.node or "") if row.state == "RUNNING" else None
    return node is not None and node.lost
