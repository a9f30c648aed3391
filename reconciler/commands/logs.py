"""`winslow logs`: a run's final log from origin/main, or its live tail from its node's branch.

While a run is RUNNING its node publishes the log's tail on winslow/nodes/<NODE>;
`--follow` keeps fetching it, prints only what is new, and ends with the rest of the
final log once the run is over.
"""
from __future__ import annotations

import argparse
import difflib
import sys
import threading

from reconciler import layout
from reconciler.commands.clone import Clone, add_verb, check_name, fetch, no_project, open_clone
from reconciler.errors import ConfigError, InvalidFile
from reconciler.layout import MAIN_REFSPEC, NODES_REFSPEC, ORIGIN_MAIN
from reconciler.model import Run, RunState, Status
from reconciler.repoview import RepoView
from reconciler.validation import is_safe_id
from reconciler.wake import RemoteWatcher

POLL = 1.0            # seconds between `ls-remote` polls of a remote that cannot be watched
FOLLOW_WAIT_S = 5.0   # the longest `logs --follow` waits for a wake before fetching anyway


def add_parser(sub: argparse._SubParsersAction) -> None:
    logs = add_verb(sub, "logs", "print a run's log: the final one, or the live tail while it runs",
                    "Print projects/P/logs/RUN.log from origin/main; while the run is RUNNING, the live tail from its "
                    "node's branch winslow/nodes/NODE.", run_logs)
    logs.add_argument("project")
    logs.add_argument("--run", metavar="ID", help="the run id, like 3-detect-1 (default: the latest run)")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="keep printing new output until the run ends, then the rest of its final log")


def _read_status(view: RepoView, project: str) -> Status:
    entry, snapshot = view.project(project)
    where = f" on {ORIGIN_MAIN.removeprefix('refs/remotes/')}" if view.git is not None else " in the work tree"
    if entry is None or not entry.exists:
        known = view.project_ids() if view.git is not None else [p for p, e in snapshot.projects.items() if e.exists]
        raise no_project(project, known, where)
    unreadable = [p for p in snapshot.problems if p.path == layout.status_file(project)]
    if unreadable:
        raise InvalidFile(unreadable)
    if not entry.status.runs and entry.status.observed_request == 0 and entry.status.updated is None:
        raise ConfigError(f"{project} has no runs yet (no {layout.status_file(project)}{where})")
    return entry.status


def _final_log(view: RepoView, project: str, run: Run) -> str | None:
    if view.git is None:
        return view.final_log("", project, run.id)
    commit = view.tip()
    return view.final_log(commit, project, run.id) if commit else None


def _live_tail(view: RepoView, project: str, run: Run) -> str | None:
    if not run.node or not is_safe_id(run.node):
        return None
    tip = view.node_tips().get(run.node)
    info = view.node(run.node, tip) if tip else None
    entry = info.run(project, run.id) if info else None
    return entry.log_tail if entry else None


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
    view = clone.view() if clone.has_ref(ORIGIN_MAIN) else clone.folder_view()
    watcher = None
    try:
        run: Run | None = _pick_run(_read_status(view, args.project), args.project, args.run)
        last = run
        shown = ""
        while run is not None and run.state is RunState.RUNNING:
            tail = _live_tail(view, args.project, run)
            if tail is not None:
                _write(new_text(shown, tail))
                shown = tail
            elif not args.follow:
                print(f"winslow: {run.id} is running on {run.node or 'a node'}; its branch has no live log yet",
                      file=sys.stderr)
            if not args.follow:
                return 0
            watcher = watcher or _watch_origin(clone)
            watcher.wake.wait(FOLLOW_WAIT_S)  # a push to origin wakes it; the bound keeps a quiet outage visible
            watcher.wake.clear()
            online = fetch(clone, MAIN_REFSPEC, NODES_REFSPEC, warn=online)  # warn once, keep trying
            last, run = run, _read_status(view, args.project).run(run.id)
        if run is None:
            assert last is not None
            raise ConfigError(f"run {last.id} is gone from {layout.status_file(args.project)}")
        final = _final_log(view, args.project, run)
        if final is None:
            raise ConfigError(f"no log of run {run.id} ({run.state.value}) on "
                              f"{ORIGIN_MAIN.removeprefix('refs/remotes/') if view.git else 'the work tree'}")
        at = final.rfind(shown) if shown else -1
        if shown and at == -1:
            print("winslow: the live tail does not line up with the final log; here is all of it", file=sys.stderr)
        _write(final[at + len(shown):] if at != -1 else final)
        return 0
    finally:
        if watcher is not None:
            watcher.stop()
        view.close()


def _watch_origin(clone: Clone) -> RemoteWatcher:
    """Wakes `logs --follow` when origin's branches move (a watch on a local remote, else `ls-remote` polls)."""
    url = clone.git("remote", "get-url", "origin").strip()
    watcher = RemoteWatcher(url, threading.Event(), POLL)
    watcher.start()
    return watcher
