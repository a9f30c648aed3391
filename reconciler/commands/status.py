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

from reconciler.clock import parse_time
from reconciler.commands.clone import add_verb, check_name, fetch, no_project, open_clone
from reconciler.layout import MAIN, MAIN_REFSPEC, ORIGIN_MAIN
from reconciler.model import ProjectState, Run, RunState, Status
from reconciler.snapshot import ProjectEntry


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


def summary(entry: ProjectEntry, now: datetime) -> dict[str, Any]:
    run = _latest(entry.status)
    since = _since(entry, run)
    message = entry.status.message or (str(entry.problems[0].message) if entry.problems else None)
    pipeline = entry.project.pipeline if entry.project else (entry.lock.name if entry.lock else None)
    return {"project": entry.id, "pipeline": pipeline, "state": _state(entry),
            "stage": run.stage if run else None, "run": run.id if run else None, "node": run.node if run else None,
            "since": since, "age_seconds": _seconds(since, None, now), "message": message}


def detail(entry: ProjectEntry, now: datetime) -> dict[str, Any]:
    status = entry.status
    desired = entry.project.run if entry.project else None
    data = summary(entry, now)
    data.update({
        "name": entry.project.name if entry.project else None,
        "desired": {"request": desired.request, "from": desired.from_stage, "until": desired.until,
                    "step": desired.step, "state": desired.state.value} if desired else None,
        "observed_request": status.observed_request,
        "request": status.request.to_dict() if status.request else None,
        "errors": [str(p) for p in entry.problems] + list(status.errors),
        "runs": [dict(r.to_dict(), duration_seconds=_seconds(r.started, r.finished, now)) for r in status.runs],
        "waiting": status.state is ProjectState.WAITING,
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


def _print_detail(data: Mapping[str, Any]) -> None:
    line = f"{data['project']}" + (f" ({data['name']})" if data.get("name") not in (None, data["project"]) else "")
    print(f"{line}   pipeline {data['pipeline'] or '-'}   {data['state']}"
          + (f": {data['message']}" if data.get("message") else ""))
    desired, request = data["desired"], data["request"]
    if request:
        print(f"request {request['number']}: from {request['from']} until {request['until']}"
              + (", step by step" if request.get("step") else "") + f", next: {request.get('next') or '-'}")
    if desired and desired["request"] != data["observed_request"]:
        print(f"asked for: request {desired['request']} ({desired['state']}); "
              f"the nodes have seen request {data['observed_request']}")
    elif desired and desired["state"] != "running":
        print(f"asked for: {desired['state']}")
    for error in data["errors"]:
        print(f"error: {error}")
    if data["runs"]:
        print()
        _table(("ID", "STAGE", "STATE", "NODE", "GPUS", "STARTED", "DURATION", "EXIT", "REASON"),
               [(r["id"], r["stage"], r["state"], r.get("node"), ",".join(map(str, r.get("gpus", []))),
                 _clock(r.get("started")), _age(r["duration_seconds"]), r.get("exit_code"), r.get("reason"))
                for r in data["runs"]])
    if data["waiting"]:
        number = request["number"] if request else "N"
        print(f"\nWaiting at a gate after {data['stage'] or 'a stage'}: look at the results, then "
              f"`{data['approve']}` (merges resume/{data['project']}/{number}).")


def run_status(args: argparse.Namespace) -> int:
    clone = open_clone(args.repo_dir)
    if args.project:
        check_name(args.project)
    fetch(clone, MAIN_REFSPEC)
    on_origin = clone.has_ref(ORIGIN_MAIN)
    view = clone.view() if on_origin else clone.folder_view()
    source = f"origin/{MAIN}" if on_origin else "the work tree"
    try:
        if args.project:
            entry, _ = view.project(args.project)
            if entry is None:
                raise no_project(args.project, view.project_ids(), f" on {source}")
        else:
            snapshot = view.snapshot()
    finally:
        view.close()
    now = datetime.now(timezone.utc)
    if args.project:
        assert entry is not None
        data = detail(entry, now)
        if args.json:
            print(json.dumps(dict(data, source=source), indent=2))
        else:
            _print_detail(data)
        return 0
    rows = sorted((summary(e, now) for e in snapshot.projects.values()),
                  key=lambda r: (r["state"] != ProjectState.WAITING.value, r["project"]))
    if args.json:
        print(json.dumps({"source": source, "projects": rows}, indent=2))
        return 0
    if not rows:
        print(f"no projects on {source}", file=sys.stderr)
        return 0
    _table(("PROJECT", "PIPELINE", "STATE", "STAGE", "RUN", "NODE", "AGE", "MESSAGE"),
           [(r["project"], r["pipeline"], r["state"], r["stage"], r["run"], r["node"], _age(r["age_seconds"]),
             r["message"]) for r in rows])
    return 0
