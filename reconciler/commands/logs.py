"""`winslow logs`: a run's final log from origin/main, or its live tail from its node's branch.

While a run is RUNNING its node publishes the log's tail on winslow/nodes/<NODE>;
`--follow` keeps fetching it, prints only what is new, and ends with the rest of the
final log once the run is over.
"""
from __future__ import annotations

import argparse
import difflib
import sys
import time

from reconciler.commands.clone import (MAIN_REFSPEC, NODES_REFSPEC, ORIGIN_MAIN, Clone, add_verb, check_name, fetch,
                                       no_project, open_clone)
from reconciler.errors import ConfigError, InvalidFile
from reconciler.model import Run, RunState, Status
from reconciler.validation import is_safe_id, read_status
from reconciler.yamlsafe import parse_yaml

POLL = 1.0     # seconds between fetches of `logs --follow`


def add_parser(sub: argparse._SubParsersAction) -> None:
    logs = add_verb(sub, "logs", "print a run's log: the final one, or the live tail while it runs",
                    "Print projects/P/logs/RUN.log from origin/main; while the run is RUNNING, the live tail from its "
                    "node's branch winslow/nodes/NODE.", run_logs)
    logs.add_argument("project")
    logs.add_argument("--run", metavar="ID", help="the run id, like 3-detect-1 (default: the latest run)")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="keep printing new output until the run ends, then the rest of its final log")


def _read_status(clone: Clone, rev: str, project: str) -> Status:
    path = f"projects/{project}/status.yaml"
    raw = clone.bytes("cat-file", "blob", f"{rev}:{path}")
    if raw is None:
        if clone.bytes("cat-file", "-e", f"{rev}:projects/{project}/project.yaml") is None:
            listing = clone.bytes("ls-tree", "--name-only", f"{rev}:projects") or b""
            raise no_project(project, listing.decode().split(), f" on {rev.removeprefix('refs/remotes/')}")
        raise ConfigError(f"{project} has no runs yet (no {path} on {rev.removeprefix('refs/remotes/')})")
    status, problems = read_status(parse_yaml(raw, path), project)
    if status is None:
        raise InvalidFile(problems)
    return status


def _final_log(clone: Clone, rev: str, project: str, run: Run) -> str | None:
    raw = clone.bytes("cat-file", "blob", f"{rev}:{run.log or f'projects/{project}/logs/{run.id}.log'}")
    return raw.decode("utf-8", "replace") if raw is not None else None


def _live_tail(clone: Clone, project: str, run: Run) -> str | None:
    if not run.node or not is_safe_id(run.node):
        return None
    path = f"nodes/{run.node}.yaml"
    raw = clone.bytes("cat-file", "blob", f"refs/remotes/origin/winslow/nodes/{run.node}:{path}")
    try:
        data = parse_yaml(raw, path).data if raw is not None else None
    except InvalidFile:
        return None
    for entry in (data or {}).get("runs") or []:
        if isinstance(entry, dict) and entry.get("run") == run.id and entry.get("project", project) == project:
            return str(entry.get("log_tail") or "")
    return None


def new_text(shown: str, tail: str) -> str:
    """The part of a sliding log tail not shown yet: where the new tail's start overlaps the old one's end."""
    if not shown or tail.startswith(shown):
        return tail[len(shown):]
    if not tail:
        return ""
    first = tail[:tail.find("\n") + 1 or len(tail)][:256]  # the tail's first line is where overlaps start
    at = shown.find(first)
    while at != -1:
        if tail.startswith(shown[at:]):
            return tail[len(shown) - at:]
        at = shown.find(first, at + 1)
    for at in range(max(0, len(shown) - len(first) + 1), len(shown)):  # an overlap shorter than that line
        if tail.startswith(shown[at:]):
            return tail[len(shown) - at:]
    return tail


def _write(text: str) -> None:
    if text:
        sys.stdout.write(text)
        sys.stdout.flush()


def _pick_run(status: Status, project: str, run_id: str | None) -> Run:
    if run_id is None:
        if not status.runs:
            raise ConfigError(f"{project} has no runs yet")
        return status.runs[-1]
    run = status.run(run_id)
    if run is None:
        ids = [r.id for r in status.runs]
        close = difflib.get_close_matches(run_id, ids, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"runs: {', '.join(ids[-10:]) or 'none'}"
        raise ConfigError(f"{project} has no run '{run_id}' ({hint})")
    return run


def run_logs(args: argparse.Namespace) -> int:
    check_name(args.project)
    clone = open_clone(args.repo_dir)
    online = fetch(clone, MAIN_REFSPEC, NODES_REFSPEC)
    rev = ORIGIN_MAIN if clone.has_ref(ORIGIN_MAIN) else "HEAD"
    run: Run | None = _pick_run(_read_status(clone, rev, args.project), args.project, args.run)
    last = run
    shown = ""
    while run is not None and run.state is RunState.RUNNING:
        tail = _live_tail(clone, args.project, run)
        if tail is not None:
            _write(new_text(shown, tail))
            shown = tail
        elif not args.follow:
            print(f"winslow: {run.id} is running on {run.node or 'a node'}; its branch has no live log yet",
                  file=sys.stderr)
        if not args.follow:
            return 0
        time.sleep(POLL)
        online = fetch(clone, MAIN_REFSPEC, NODES_REFSPEC, warn=online)  # warn once, keep trying
        last, run = run, _read_status(clone, rev, args.project).run(run.id)
    if run is None:
        raise ConfigError(f"run {last.id} is gone from projects/{args.project}/status.yaml")
    final = _final_log(clone, rev, args.project, run)
    if final is None:
        raise ConfigError(f"no log of run {run.id} ({run.state.value}) on {rev.removeprefix('refs/remotes/')}")
    at = final.rfind(shown) if shown else -1
    if shown and at == -1:
        print("winslow: the live tail does not line up with the final log; here is all of it", file=sys.stderr)
    _write(final[at + len(shown):] if at != -1 else final)
    return 0
