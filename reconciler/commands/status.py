"""`winslow status`: every project at a glance, or one project's runs, as origin/main has them.

Reads origin/main through git's object store (the work tree stays as the user left
it), or the work tree when the clone has no origin/main.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from reconciler import layout
from reconciler.clock import parse_time
from reconciler.commands.clone import add_verb, check_name, fetch, no_project, open_clone
from reconciler.errors import InvalidFile
from reconciler.layout import MAIN, MAIN_REFSPEC, NODES_REFSPEC, ORIGIN_MAIN
from reconciler.model import ProjectState, Run, RunState, Status
from reconciler.repoview import NodeView, RepoView
from reconciler.snapshot import ProjectEntry, Snapshot
from reconciler.yamlsafe import parse_yaml


def add_parser(sub: argparse._SubParsersAction) -> None:
    status = add_verb(sub, "status", "show projects and their runs as origin/main has them",
                      "Fetch origin and show every project (WAITING first), or one project's runs. Reads origin/main "
                      "(the work tree when there is no origin); never changes the clone's files.", run_status)
    status.add_argument("project", nargs="?")
    status.add_argument("--json", action="store_true", help="print the same data as JSON")


def _seconds(start: str | None, end: str | None, now: datetime) -> float | None:
    began = parse_time(start)
    ended = parse_time(end) if end else now
    return (ended - began).total_seconds() if began and ended else None


def _age(seconds: float | None) -> str:
    """Like kubectl: 45s, 5m3s, 42m, 3h12m, 20h, 2d4h, 12d."""
    if seconds is None:
        return "-"
    s = int(max(0, seconds))
    if s < 120:
        return f"{s}s"
    if s < 600:
        return f"{s // 60}m{s % 60}s"
    if s < 3 * 3600:
        return f"{s // 60}m"
    if s < 8 * 3600:
        return f"{s // 3600}h{s % 3600 // 60}m"
    if s < 48 * 3600:
        return f"{s // 3600}h"
    return f"{s // 86400}d{s % 86400 // 3600}h" if s < 8 * 86400 else f"{s // 86400}d"


def _latest(status: Status) -> Run | None:
    running = [r for r in status.runs if r.state is RunState.RUNNING]
    candidates = running or list(status.runs)
    return candidates[-1] if candidates else None


def _state(entry: ProjectEntry) -> str:
    return ProjectState.INVALID.value if entry.invalid else entry.status.state.value


def _since(entry: ProjectEntry, run: Run | None) -> str | None:
    """When the project entered its current state, as far as status.yaml tells."""
    status = entry.status
    if run is not None and run.state is RunState.RUNNING:
        return run.started or run.claimed
    if status.state is ProjectState.WAITING and status.request and status.request.waiting_since:
        return status.request.waiting_since
    return (run.finished if run else None) or status.updated


def _liveness(run: Run | None, nodes: Mapping[str, NodeView]) -> dict[str, Any] | None:
    """How the node of a RUNNING run is doing, judged here from its branch: a dead node shows as dead
    even when no other node is alive to mark its runs LOST."""
    if run is None or run.state is not RunState.RUNNING or not run.node:
        return None
    node = nodes.get(run.node)
    if node is None:
        return {"state": "unknown", "heard_seconds_ago": None}
    return {"state": "lost" if node.lost else "alive", "heard_seconds_ago": node.heard_ago}


def _node_cell(data: Mapping[str, Any]) -> str | None:
    node, live = data.get("node"), data.get("node_liveness")
    if not node or not live:
        return node
    if live["state"] == "unknown":
        return f"{node} (never heard from)"
    return f"{node} (LOST: last heard {_age(live['heard_seconds_ago'])} ago)" if live["state"] == "lost" else node


def unreadable(snapshot: Snapshot) -> dict[str, str]:
    """Projects whose node-written files cannot be read, with what to do: the nodes start nothing for them."""
    found: dict[str, str] = {}
    for problem in snapshot.problems:
        project = layout.project_of(problem.path)
        if project and problem.path.endswith(("/" + layout.STATUS_FILE, "/" + layout.LOCK_FILE)):
            found.setdefault(project,
                             f"{problem.path} is unreadable ({problem}); the nodes start nothing for this project "
                             f"until it is restored: git log -p -- {problem.path}, then git checkout COMMIT -- "
                             f"{problem.path}, commit and push")
    return found


def last_readable(view: RepoView, path: str, project: str) -> str | None:
    """The newest commit on main whose version of `path` (a node-written file) reads cleanly, if its recent history
    has one: what to restore."""
    from reconciler.validation import read_status  # the one reader the nodes use too

    if view.git is None or not path.endswith("/" + layout.STATUS_FILE):
        return None
    for commit, raw in view.git.versions(view.tip() or MAIN, path)[1:]:
        if raw is None:
            return None
        try:
            status, problems = read_status(parse_yaml(raw, path), project)
        except InvalidFile:
            continue
        if status is not None and not problems:
            return commit
    return None


def summary(entry: ProjectEntry, now: datetime, nodes: Mapping[str, NodeView] | None = None,
            pipeline: str | None = None, broken: str | None = None) -> dict[str, Any]:
    run = _latest(entry.status)
    since = _since(entry, run)
    message = entry.status.message or (str(entry.problems[0].message) if entry.problems else None)
    if broken is not None:
        message = broken
    pipeline = entry.project.pipeline if entry.project else (entry.lock.name if entry.lock else pipeline)
    live = _liveness(run, nodes or {})
    if run is not None and live is not None and live["state"] == "lost":
        message = (f"node {run.node} has not been heard from for {_age(live['heard_seconds_ago'])}; its runs "
                   f"become LOST when a live node notices") + (f" (status says: {message})" if message else "")
    return {"project": entry.id, "pipeline": pipeline,
            "state": ProjectState.INVALID.value if broken is not None else _state(entry),
            "stage": run.stage if run else None, "run": run.id if run else None, "node": run.node if run else None,
            "node_liveness": live, "since": since, "age_seconds": _seconds(since, None, now), "message": message}


def _as_written(view: RepoView, entry: ProjectEntry) -> dict[str, Any]:
    """An invalid project's project.yaml as far as it can be read: its name and pipeline are still worth showing."""
    raw = view.file((view.tip() or "") if view.git is not None else "", layout.project_file(entry.id))
    try:
        data = parse_yaml(raw, layout.project_file(entry.id)).data if raw else None
    except InvalidFile:
        return {}
    return data if isinstance(data, dict) else {}


def detail(entry: ProjectEntry, snapshot: Snapshot, now: datetime, nodes: Mapping[str, NodeView],
           view: RepoView) -> dict[str, Any]:
    status = entry.status
    desired = entry.project.run if entry.project else None
    written = _as_written(view, entry) if entry.project is None else {}
    name = entry.project.name if entry.project else written.get("name")
    pipeline = written.get("pipeline") if isinstance(written.get("pipeline"), str) else None
    broken = unreadable(snapshot).get(entry.id)
    if broken:
        good = last_readable(view, layout.status_file(entry.id), entry.id)
        if good:
            broken += (f"; its last readable version is in {good[:12]}: git checkout {good[:12]} -- "
                       f"{layout.status_file(entry.id)}")
    data = summary(entry, now, nodes, pipeline, broken)
    errors = [str(p) for p in entry.problems] + list(status.errors) + ([broken] if broken else [])
    if broken:
        data["message"] = "its status cannot be read (see below)"
    if data["pipeline"] and entry.project is None:  # the pipeline's own errors, where it is the broken part
        errors += [str(p) for p in snapshot.pipeline_problems.get(data["pipeline"], ())]
    if entry.invalid and errors:  # the errors follow; the header need not repeat the first one
        goes_on = bool(status.active)
        data["message"] = "invalid" + ("; the running stage goes on, nothing new starts" if goes_on else "")
    data.update({
        "name": name if isinstance(name, str) else None,
        "desired": {"request": desired.request, "from": desired.from_stage, "until": desired.until,
                    "step": desired.step, "state": desired.state.value} if desired else None,
        "observed_request": status.observed_request,
        "request": status.request.to_dict() if status.request else None,
        "errors": list(dict.fromkeys(errors)),
        "runs": [dict(r.to_dict(), duration_seconds=_seconds(r.started, r.finished, now),
                      node_liveness=_liveness(r, nodes), queued=r.queued) for r in status.runs],
        "waiting": status.state is ProjectState.WAITING,
        "unreadable": broken is not None,
    })
    if data["waiting"]:
        data["approve"] = f"winslow approve {entry.id}"
    return data


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[("-" if v is None or v == "" else str(v)) for v in row] for row in rows]
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(box=None, header_style="bold", pad_edge=False)
        for i, header in enumerate(headers):  # the first column (the name) never wraps
            table.add_column(header, overflow="fold", no_wrap=i == 0)
        for row in cells:
            table.add_row(*row)
        Console().print(table)
        return
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *cells)]
    for row in [list(headers), *cells]:
        print("   ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _clock(value: str | None) -> str:
    parsed = parse_time(value)
    return parsed.astimezone().strftime("%Y-%m-%d %H:%M:%S") if parsed else "-"


def _held(snapshot: Snapshot) -> str | None:
    return f"warning: {snapshot.held_config.describe()}" if snapshot.held_config else None


def _print_detail(data: Mapping[str, Any]) -> None:
    line = f"{data['project']}" + (f" ({data['name']})" if data.get("name") not in (None, data["project"]) else "")
    print(f"{line}   pipeline {data['pipeline'] or '-'}   {data['state']}"
          + (f": {data['message']}" if data.get("message") else ""))
    desired, request = data["desired"], data["request"]
    if request:
        print(f"request {request['number']}: from {request['from']} until {request['until']}"
              + (", step by step" if request.get("step") else "") + f", next: {request.get('next') or '-'}")
    if desired and desired["request"] != data["observed_request"] and not data.get("unreadable"):
        print(f"asked for: request {desired['request']} ({desired['state']}); "
              f"the nodes have seen request {data['observed_request']}")
    elif desired and desired["state"] != "running":
        print(f"asked for: {desired['state']}")
    for error in data["errors"]:
        print(f"error: {error}")
    if data["runs"]:
        print()
        _table(("ID", "STAGE", "STATE", "NODE", "GPUS", "STARTED", "DURATION", "EXIT", "REASON"),
               [(r["id"], r["stage"], r["state"], _node_cell(r), ",".join(map(str, r.get("gpus", []))),
                 _clock(r.get("started")), _age(r["duration_seconds"]), r.get("exit_code"),
                 r.get("reason") or r.get("queued"))  # a claimed run waiting in Slurm's queue: where and why
                for r in data["runs"]])
    if data["waiting"]:
        number = request["number"] if request else "N"
        print(f"\nWaiting at a gate after {data['stage'] or 'a stage'}: look at the results, then "
              f"`{data['approve']}` (merges resume/{data['project']}/{number}).")


def run_status(args: argparse.Namespace) -> int:
    clone = open_clone(args.repo_dir)
    if args.project:
        check_name(args.project)
    fetch(clone, MAIN_REFSPEC, NODES_REFSPEC)
    on_origin = clone.has_ref(ORIGIN_MAIN)
    view = clone.view() if on_origin else clone.folder_view()
    source = f"origin/{MAIN}" if on_origin else "the work tree"
    now = datetime.now(timezone.utc)
    data = None
    try:
        if args.project:
            entry, snapshot = view.project(args.project)
            if entry is None:
                raise no_project(args.project, view.project_ids(), f" on {source}")
        else:
            snapshot = view.snapshot()
        # Liveness from the node branches on this machine's clock: a one-shot look goes by the heartbeat's time.
        nodes = view.nodes(snapshot.config.node_timeout, trust_commit_time=True)
        if args.project:
            assert entry is not None
            data = detail(entry, snapshot, now, nodes, view)
    finally:
        view.close()
    held = _held(snapshot)
    settings = {"held": snapshot.held_config.describe()} if snapshot.held_config else {}
    if data is not None:
        if args.json:
            print(json.dumps(dict(data, source=source, settings=settings), indent=2))
            return 0
        if held:
            print(held)
        _print_detail(data)
        return 0
    broken = unreadable(snapshot)
    rows = sorted((summary(e, now, nodes, broken=broken.get(e.id)) for e in snapshot.projects.values()),
                  key=lambda r: (r["state"] != ProjectState.WAITING.value, r["project"]))
    if args.json:
        print(json.dumps({"source": source, "settings": settings, "projects": rows}, indent=2))
        return 0
    if held:
        print(held)
    if not rows:
        print(f"no projects on {source}", file=sys.stderr)
        return 0
    _table(("PROJECT", "PIPELINE", "STATE", "STAGE", "RUN", "NODE", "AGE", "MESSAGE"),
           [(r["project"], r["pipeline"], r["state"], r["stage"], r["run"], _node_cell(r), _age(r["age_seconds"]),
             r["message"]) for r in rows])
    return 0
