"""`winslow logs`: a run's final log from origin/main, or its live tail from its node's branch.

While a run is RUNNING its node publishes the log's tail on winslow/nodes/<NODE>, within
about a second of the stage writing it (`heartbeat.py` beats early when a tail changed).
`--follow` follows the project's current request: each of its runs in turn, after a
`==> P/RUN (stage S on NODE) <==` header like `tail -f` of several files, printing only
what is new and then the rest of each run's final log; it ends with a line saying how
the request ended, and its exit code says whether that end was a failure. Headers and
that line go to stderr, so stdout holds only what the stages wrote (plus a newline where a
run's output ended inside a line).
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
from reconciler.model import Desired, ProjectState, Run, RunState, Status
from reconciler.repoview import RepoView
from reconciler.snapshot import ProjectEntry
from reconciler.validation import is_safe_id
from reconciler.wake import RemoteWatcher

POLL = 1.0            # seconds between `ls-remote` polls of a remote that cannot be watched
FOLLOW_WAIT_S = 5.0   # the longest `logs --follow` waits for a wake before fetching anyway
# How a request's end reads as an exit code: a gate or a pause is where a person takes over, not a failure.
ENDS_OK = (ProjectState.SUCCEEDED, ProjectState.WAITING, ProjectState.PAUSED)
ENDS_BAD = (ProjectState.FAILED, ProjectState.INVALID, ProjectState.IDLE)


def add_parser(sub: argparse._SubParsersAction) -> None:
    logs = add_verb(sub, "logs", "print a run's log, or follow a request's runs as they happen",
                    "Print projects/P/logs/RUN.log from origin/main; while the run is RUNNING, the live tail from its "
                    "node's branch winslow/nodes/NODE. Without --follow it only reads: it exits 0 whatever state "
                    "the run ended in. With --follow it exits 0 when the request SUCCEEDED or stopped at a gate or a "
                    "pause, and 1 when it FAILED (an aborted request is FAILED), was superseded, or is INVALID; "
                    "with --run as well, 0 when that run SUCCEEDED and 1 otherwise.", run_logs)
    logs.add_argument("project")
    logs.add_argument("--run", metavar="ID", help="the run id, like 3-detect-1 (default: the latest run)")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="follow the project's current request (with --run: that run only) until it ends: every "
                           "run's output as it is written, then a closing line on stderr with the final state")


def _read_entry(view: RepoView, project: str) -> ProjectEntry:
    entry, snapshot = view.project(project)
    if entry is None or not entry.exists:
        known = view.project_ids() if view.git is not None else [p for p, e in snapshot.projects.items() if e.exists]
        raise no_project(project, known, _where(view))
    unreadable = [p for p in snapshot.problems if p.path == layout.status_file(project)]
    if unreadable:
        raise InvalidFile(unreadable)
    return entry


def _read_status(view: RepoView, project: str) -> Status:
    status = _read_entry(view, project).status
    if not status.runs and status.observed_request == 0 and status.updated is None:
        raise ConfigError(f"{project} has no runs yet (no {layout.status_file(project)}{_where(view)})")
    return status


def _where(view: RepoView) -> str:
    return f" on {ORIGIN_MAIN.removeprefix('refs/remotes/')}" if view.git is not None else " in the work tree"


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
    follower = _Follower(clone, view, args.project, online)
    try:
        if not args.follow:
            return _print_once(view, args.project, args.run)
        if args.run is not None:
            return _follow_run(follower, args.run)
        return _follow_request(follower)
    finally:
        follower.close()


def _print_once(view: RepoView, project: str, run_id: str | None) -> int:
    """The run's live tail while it runs, else its final log; a read, so 0 whatever state the run ended in."""
    run = _pick_run(_read_status(view, project), project, run_id)
    if run.state is RunState.RUNNING:
        tail = _live_tail(view, project, run)
        if tail is None:
            print(f"winslow: {run.id} is running on {run.node or 'a node'}; its branch has no live log yet",
                  file=sys.stderr)
        _write(tail or "")
        return 0
    final = _final_log(view, project, run)
    if final is None:
        raise ConfigError(f"no log of run {run.id} ({run.state.value}){_where(view)}")
    _write(final)
    return 0


def _follow_run(follower: _Follower, run_id: str) -> int:
    run = follower.follow(_pick_run(_read_status(follower.view, follower.project), follower.project, run_id))
    follower.note(f"{follower.project}/{run.id}: {run.state.value} ({_run_end(run)})")
    return 0 if run.state is RunState.SUCCEEDED else 1


def _follow_request(follower: _Follower) -> int:
    """Every run of the current request in turn, from the latest one there is, until the request ends."""
    project = follower.project
    entry = _read_entry(follower.view, project)
    number = _current_request(entry)
    if number == 0 and entry.problems:
        raise InvalidFile(list(entry.problems))
    if number == 0:
        raise ConfigError(f"{project} has no runs yet (not started: `winslow start {project}` bumps run.request)")
    seen = {r.id for r in entry.status.runs if r.request == number}
    latest = next((r for r in reversed(entry.status.runs) if r.request == number), None)
    seen.discard(latest.id if latest else "")  # like `tail -f`: what is there now, then what comes
    while True:
        run = next((r for r in entry.status.runs if r.request == number and r.id not in seen), None)
        if run is not None:
            follower.header(f"{project}/{run.id} (stage {run.stage} on {run.node or 'no node yet'})")
            follower.follow(run)
            seen.add(run.id)
            entry = _read_entry(follower.view, project)
            continue
        end = _request_end(entry, number)
        if end is not None:
            message, ok = end
            follower.note(f"{project} request {number}: {message}")
            return 0 if ok else 1
        follower.wait()
        entry = _read_entry(follower.view, project)


def _current_request(entry: ProjectEntry) -> int:
    """The request the project asks for now: observed by the nodes already, or about to be."""
    asked = entry.project.run.request if entry.project is not None else 0
    return max(asked, entry.status.observed_request)


def _request_end(entry: ProjectEntry, number: int) -> tuple[str, bool] | None:
    """How request `number` ended, and whether that is a success; None while it goes on."""
    status = entry.status
    if status.observed_request > number:
        return f"superseded by request {status.observed_request}", False
    if status.observed_request < number:  # not taken up yet: only a broken project keeps it from starting
        problems = [p for p in entry.problems if p.path != layout.status_file(entry.id)]
        return (f"{ProjectState.INVALID.value} ({problems[0]})", False) if problems else None
    if status.active or status.state not in ENDS_OK + ENDS_BAD:
        return None
    # A status the nodes are about to change is no end: a pause the project no longer asks for (`winslow resume`
    # was just pushed), or INVALID after the files were mended.
    if status.state is ProjectState.PAUSED and entry.project is not None and entry.project.run.state is not Desired.PAUSED:
        return None
    if status.state is ProjectState.INVALID and not entry.problems:
        return None
    return f"{status.state.value} ({status.message or 'no message'})", status.state in ENDS_OK


def _run_end(run: Run) -> str:
    if run.reason:
        return run.reason
    return f"exit code {run.exit_code}" if run.exit_code is not None else "no exit code"


class _Follower:
    """What `--follow` keeps between reads: the clone, a watch on origin, and where stdout stands."""

    def __init__(self, clone: Clone, view: RepoView, project: str, online: bool) -> None:
        self.clone = clone
        self.view = view
        self.project = project
        self.online = online
        self.watcher: RemoteWatcher | None = None
        self.line_open = False    # stdout ends inside a line

    def wait(self) -> None:
        """Until origin's branches move (or FOLLOW_WAIT_S, so a quiet outage stays visible), then fetch."""
        if self.watcher is None:
            url = self.clone.git("remote", "get-url", "origin").strip()
            self.watcher = RemoteWatcher(url, threading.Event(), POLL)
            self.watcher.start()
        self.watcher.wake.wait(FOLLOW_WAIT_S)
        self.watcher.wake.clear()
        self.online = fetch(self.clone, MAIN_REFSPEC, NODES_REFSPEC, warn=self.online)  # warn once, keep trying

    def follow(self, run: Run) -> Run:
        """Print the run's live tail while it runs, then the rest of its final log; the run as it ended."""
        shown = ""
        while run.state is RunState.RUNNING:
            tail = _live_tail(self.view, self.project, run)
            if tail is not None:
                self.write(new_text(shown, tail))
                shown = tail
            self.wait()
            now = _read_entry(self.view, self.project).status.run(run.id)
            if now is None:
                raise ConfigError(f"run {run.id} is gone from {layout.status_file(self.project)}")
            run = now
        final = _final_log(self.view, self.project, run)
        if final is None:
            self.note(f"no final log of run {run.id} ({run.state.value}: {_run_end(run)})")
            return run
        at = final.rfind(shown) if shown else -1
        if shown and at == -1:
            self.note("the live tail does not line up with the final log; here is all of it")
        self.write(final[at + len(shown):] if at != -1 else final)
        return run

    def write(self, text: str) -> None:
        if text:
            _write(text)
            self.line_open = not text.endswith("\n")

    def header(self, title: str) -> None:
        self._stderr(f"==> {title} <==")

    def note(self, message: str) -> None:
        self._stderr(f"winslow: {message}")

    def _stderr(self, line: str) -> None:
        """Winslow's own lines go to stderr, so stdout holds only what the stages wrote."""
        if self.line_open:
            self.write("\n")
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        self.view.close()
