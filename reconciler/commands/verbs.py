"""The user's verbs: `start`, `pause`, `resume`, `abort`, `approve`, `status` and `logs`.

Each verb that changes something is a shortcut for what a person would do by hand
in their clone of the state repo: pull, edit `run:` (or `env:`) in
projects/<P>/project.yaml keeping their comments, commit with a readable message,
push. A rejected push means someone else pushed first: the commit is dropped and
the edit made again on the new tip, so `request: +1` counts from what is really on
origin and two bumps never conflict. `status` and `logs` only read: origin/main
through git's object store (the work tree stays as the user left it), and the
nodes' branches for live log tails.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from reconciler.edit import set_env, set_fields
from reconciler.errors import ConfigError, GitError, InvalidFile, PushRejected
from reconciler.gitcmd import IDENTITY, git, git_env, has_identity, push
from reconciler.model import Pipeline, ProjectState, Run, RunState, Status
from reconciler.state import DirectoryTree, ProjectEntry, StateReader
from reconciler.validation import is_safe_id, read_lock, read_pipeline, read_project, read_status
from reconciler.yamlsafe import parse_yaml

MAIN = "main"
ORIGIN_MAIN = "refs/remotes/origin/main"
MAIN_REFSPEC = f"+refs/heads/{MAIN}:{ORIGIN_MAIN}"
NODES_REFSPEC = "+refs/heads/winslow/nodes/*:refs/remotes/origin/winslow/nodes/*"
TRIES = 5      # pushes before giving up while origin/main keeps moving
POLL = 1.0     # seconds between fetches of `logs --follow`
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --- the command line -------------------------------------------------------------------------

def add_parser(sub: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--repo-dir", metavar="DIR",
                        help="the clone of the state repo (default: the git top level of the current folder)")

    def verb(name: str, help: str, description: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help, description=description, parents=[common])
        parser.set_defaults(func=func)
        return parser

    start = verb("start", "start a new request of a project (request +1, state running)",
                 "Bump run.request, set run.state: running, and set from/until/step when given (other keys keep "
                 "their values); commit projects/P/project.yaml and push to origin.", run_start)
    start.add_argument("project")
    start.add_argument("--from", dest="from_stage", metavar="STAGE", help="the stage the request starts at")
    start.add_argument("--until", metavar="STAGE", help="the last stage to run")
    start.add_argument("--step", action=argparse.BooleanOptionalAction, default=None,
                       help="pause after every stage for approval (--no-step: turn it off)")

    pause = verb("pause", "let the running stage finish and start no next one (state paused)",
                 "Set run.state: paused in projects/P/project.yaml, commit and push.", run_pause)
    pause.add_argument("project")

    resume = verb("resume", "go on where a paused project stopped, or start a new request with other settings",
                  "Without flags: set run.state: running (the same request goes on). With --from or --env: set the "
                  "env, bump run.request, set from when given and state: running (a new request).", run_resume)
    resume.add_argument("project")
    resume.add_argument("--from", dest="from_stage", metavar="STAGE", help="start a new request at this stage")
    resume.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="set a variable in the project's env (repeatable); makes a new request")

    abort = verb("abort", "stop the running stage now and start nothing (state aborted)",
                 "Set run.state: aborted in projects/P/project.yaml, commit and push.", run_abort)
    abort.add_argument("project")

    approve = verb("approve", "approve a project waiting at a gate (merge its resume branch)",
                   "Merge the newest origin branch resume/P/N into main and push main together with the deletion "
                   "of that branch.", run_approve)
    approve.add_argument("project")

    status = verb("status", "show projects and their runs as origin/main has them",
                  "Fetch origin and show every project (WAITING first), or one project's runs. Reads origin/main "
                  "(the work tree when there is no origin); never changes the clone's files.", run_status)
    status.add_argument("project", nargs="?")
    status.add_argument("--json", action="store_true", help="print the same data as JSON")

    logs = verb("logs", "print a run's log: the final one, or the live tail while it runs",
                "Print projects/P/logs/RUN.log from origin/main; while the run is RUNNING, the live tail from its "
                "node's branch winslow/nodes/NODE.", run_logs)
    logs.add_argument("project")
    logs.add_argument("--run", metavar="ID", help="the run id, like 3-detect-1 (default: the latest run)")
    logs.add_argument("--follow", "-f", action="store_true",
                      help="keep printing new output until the run ends, then the rest of its final log")


# --- the clone ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clone:
    root: Path
    env: Mapping[str, str]

    def git(self, *args: str) -> str:
        return git(self.root, *args, env=self.env)

    def bytes(self, *args: str) -> bytes | None:
        """stdout of a git command as bytes, or None when it fails (a missing file or ref)."""
        result = subprocess.run(["git", *args], cwd=self.root, capture_output=True, env=dict(self.env))
        return result.stdout if result.returncode == 0 else None

    def has_ref(self, ref: str) -> bool:
        return self.bytes("rev-parse", "-q", "--verify", ref + "^{commit}") is not None


def open_clone(repo_dir: str | None) -> Clone:
    start = Path(repo_dir or ".")
    if not start.is_dir():
        raise ConfigError(f"{start}: no such folder")
    try:
        top = Path(git(start, "rev-parse", "--show-toplevel").strip())
    except GitError:
        raise ConfigError(f"{start.resolve()} is not inside a git clone of a state repo (use --repo-dir DIR)") from None
    return Clone(top, git_env(None if has_identity(top) else IDENTITY))


def _check_name(project: str) -> None:
    if not is_safe_id(project):
        raise ConfigError(f"'{project}' is not a project id (letters, digits, '_', '.', '-'; at most 64)")


def _no_project(project: str, known: Sequence[str], where: str = "") -> ConfigError:
    close = difflib.get_close_matches(project, known, n=3, cutoff=0.5)
    names = sorted(known)
    hint = (f"did you mean {', '.join(close)}?" if close else
            f"known: {', '.join(names[:10]) + (', ...' if len(names) > 10 else '') or 'none'}")
    return ConfigError(f"no project '{project}': projects/{project}/project.yaml does not exist{where} ({hint})")


def _local_projects(root: Path) -> list[str]:
    base = root / "projects"
    return [p.name for p in base.iterdir() if (p / "project.yaml").is_file()] if base.is_dir() else []


def _require_main(clone: Clone) -> None:
    branch = clone.bytes("symbolic-ref", "--short", "-q", "HEAD")
    name = branch.decode().strip() if branch else "a detached HEAD"
    if name != MAIN:
        raise ConfigError(f"the clone at {clone.root} is on {name}, not {MAIN}; switch with `git switch {MAIN}`")


def _pull(clone: Clone) -> None:
    try:
        clone.git("pull", "-q", "--rebase", "--autostash", "origin", MAIN)
    except GitError as exc:
        rebasing = clone.bytes("rev-parse", "-q", "--verify", "REBASE_HEAD") is not None
        if rebasing:
            clone.bytes("rebase", "--abort")
            raise GitError(f"your local commits conflict with origin/{MAIN}; run `git pull --rebase` and resolve "
                           "them, then try again") from None
        raise exc


def _fetch(clone: Clone, *refspecs: str, warn: bool = True) -> bool:
    try:
        clone.git("fetch", "-q", "origin", *refspecs)
        return True
    except GitError as exc:
        if warn:
            print(f"winslow: warning: {exc}; showing what this clone already has", file=sys.stderr)
        return False


# --- reading and checking project.yaml --------------------------------------------------------

def _load_pipeline(root: Path, name: str) -> Pipeline | None:
    if not is_safe_id(name):
        return None
    path = f"pipelines/{name}.yaml"
    try:
        pipeline, problems = read_pipeline(parse_yaml((root / path).read_bytes(), path), name)
    except (InvalidFile, OSError):
        return None
    return None if problems else pipeline


def _validate(root: Path, project: str, text: str) -> None:
    """The checks `winslow validate` makes on project.yaml: schema, pipeline exists, from/until name stages."""
    path = f"projects/{project}/project.yaml"
    doc = parse_yaml(text.encode("utf-8"), path)
    pipelines: dict[str, Pipeline | None] = {p.stem: None for p in (root / "pipelines").glob("*.yaml")}
    name = doc.data.get("pipeline") if isinstance(doc.data, dict) else None
    if isinstance(name, str) and name in pipelines:
        pipelines[name] = _load_pipeline(root, name)
    lock, lock_request = None, 0
    lock_path = root / "projects" / project / "pipeline.lock.yaml"
    if lock_path.is_file():
        try:
            locked, _ = read_lock(parse_yaml(lock_path.read_bytes(), str(lock_path)))
            lock_request, lock = locked or (0, None)
        except InvalidFile:
            pass
    _, problems = read_project(doc, project, pipelines, lock, lock_request)
    if problems:
        raise InvalidFile(problems)


def _check_stage(pipeline: Pipeline | None, flag: str, stage: str | None) -> None:
    if stage is None or pipeline is None:
        return  # no pipeline to check against: validation reports that
    if stage not in pipeline.stage_names:
        raise ConfigError(f"{flag} {stage}: pipeline '{pipeline.name}' has no such stage "
                          f"(stages: {', '.join(pipeline.stage_names)})")


# --- the edit verbs ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    """What one verb does to project.yaml, and the commit message that says so."""

    run: Mapping[str, Any]
    message: str
    env: Mapping[str, str] = field(default_factory=dict)
    unchanged: str = "nothing to change"


# (the current run: mapping, the current env: mapping, the project's pipeline) -> the change
Plan = Callable[[Mapping[str, Any], Mapping[str, Any], "Pipeline | None"], Change]


def commit_change(clone: Clone, project: str, plan: Plan) -> str | None:
    """Pull, edit, check, commit and push one change; returns the commit message, None when nothing changed."""
    rel = f"projects/{project}/project.yaml"
    _require_main(clone)
    if clone.git("status", "--porcelain", "--", rel).strip():
        raise ConfigError(f"{rel} has uncommitted changes; commit or stash them first")
    for _ in range(TRIES):
        _pull(clone)
        path = clone.root / rel
        if not path.is_file():
            raise _no_project(project, _local_projects(clone.root))
        text = path.read_bytes().decode("utf-8")
        data = parse_yaml(text.encode("utf-8"), rel).data
        data = data if isinstance(data, dict) else {}
        run = data.get("run") if isinstance(data.get("run"), dict) else {}
        env = data.get("env") if isinstance(data.get("env"), dict) else {}
        pipeline = _load_pipeline(clone.root, data["pipeline"]) if isinstance(data.get("pipeline"), str) else None
        change = plan(run, env, pipeline)
        if all(run.get(k) == v for k, v in change.run.items()) and all(env.get(k) == v for k, v in change.env.items()):
            print(f"{project}: {change.unchanged}")
            return None
        edited = set_env(text, change.env) if change.env else text
        edited = set_fields(edited, ("run",), change.run)
        _validate(clone.root, project, edited)
        path.write_bytes(edited.encode("utf-8"))
        try:
            clone.git("add", "--", rel)
            clone.git("commit", "-q", "-m", change.message, "--", rel)
        except GitError:  # a commit hook said no: leave the file as it was
            clone.bytes("reset", "-q", "--", rel)
            path.write_bytes(text.encode("utf-8"))
            raise
        try:
            push(clone.root, "origin", [f"{MAIN}:{MAIN}"], env=clone.env)
        except PushRejected:
            clone.git("reset", "-q", "--keep", "HEAD~1")  # someone pushed first: make the edit again on their tip
            continue
        except GitError:
            clone.git("reset", "-q", "--keep", "HEAD~1")  # not pushed means not done: leave no local commit
            raise
        sha = clone.git("rev-parse", "--short", "HEAD").strip()
        print(f"{change.message} ({sha}, pushed to origin/{MAIN})")
        return change.message
    raise GitError(f"origin/{MAIN} kept moving: {TRIES} pushes were rejected; try again")


def _request(run: Mapping[str, Any]) -> int:
    value = run.get("request", 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _describe(request: int, run: Mapping[str, Any], values: Mapping[str, Any], pipeline: Pipeline | None) -> str:
    first = pipeline.stage_names[0] if pipeline and pipeline.stages else None
    start = values.get("from") or run.get("from") or first
    text = f"request {request}" + (f" from {start}" if start else "")
    if values.get("until"):
        text += f" until {values['until']}"
    if values.get("step") is True:
        text += ", step by step"
    return text


def run_start(args: argparse.Namespace) -> int:
    _check_name(args.project)

    def plan(run: Mapping[str, Any], env: Mapping[str, Any], pipeline: Pipeline | None) -> Change:
        _check_stage(pipeline, "--from", args.from_stage)
        _check_stage(pipeline, "--until", args.until)
        request = _request(run) + 1
        values: dict[str, Any] = {"request": request}
        if args.from_stage is not None:
            values["from"] = args.from_stage
        if args.until is not None:
            values["until"] = args.until
        if args.step is not None:
            values["step"] = args.step
        values["state"] = "running"
        return Change(values, f"{args.project}: start {_describe(request, run, values, pipeline)}")

    commit_change(open_clone(args.repo_dir), args.project, plan)
    return 0


def _set_state(args: argparse.Namespace, state: str, verb: str) -> int:
    _check_name(args.project)

    def plan(run: Mapping[str, Any], env: Mapping[str, Any], pipeline: Pipeline | None) -> Change:
        return Change({"state": state}, f"{args.project}: {verb} request {_request(run)}",
                      unchanged=f"already {state}; nothing to change")

    commit_change(open_clone(args.repo_dir), args.project, plan)
    return 0


def run_pause(args: argparse.Namespace) -> int:
    return _set_state(args, "paused", "pause")


def run_abort(args: argparse.Namespace) -> int:
    return _set_state(args, "aborted", "abort")


def _env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not ENV_NAME.match(key):
            raise ConfigError(f"--env {pair}: expected KEY=VALUE with KEY made of letters, digits and '_'")
        env[key] = value
    return env


def run_resume(args: argparse.Namespace) -> int:
    _check_name(args.project)
    env_changes = _env_pairs(args.env)

    def plan(run: Mapping[str, Any], env: Mapping[str, Any], pipeline: Pipeline | None) -> Change:
        if args.from_stage is None and not env_changes:
            return Change({"state": "running"}, f"{args.project}: resume request {_request(run)}",
                          unchanged=f"already running; nothing to change (at a gate? `winslow approve {args.project}`)")
        _check_stage(pipeline, "--from", args.from_stage)
        request = _request(run) + 1
        values: dict[str, Any] = {"request": request}
        if args.from_stage is not None:
            values["from"] = args.from_stage
        values["state"] = "running"
        settings = "".join(f" {k}={v}" for k, v in env_changes.items())
        message = f"{args.project}: resume as {_describe(request, run, values, pipeline)}"
        return Change(values, message + (f" with{settings}" if settings else ""), env_changes)

    commit_change(open_clone(args.repo_dir), args.project, plan)
    return 0


# --- approve -----------------------------------------------------------------------------------

def _resume_branch(clone: Clone, project: str) -> int | None:
    """The highest N of the branches resume/<project>/<N> on origin."""
    prefix = f"refs/heads/resume/{project}/"
    listing = clone.git("ls-remote", "origin", prefix + "*")
    numbers = [int(ref[len(prefix):]) for ref in (line.split("\t")[-1] for line in listing.splitlines())
               if ref.startswith(prefix) and ref[len(prefix):].isdigit()]
    return max(numbers) if numbers else None


def run_approve(args: argparse.Namespace) -> int:
    project = args.project
    _check_name(project)
    clone = open_clone(args.repo_dir)
    _require_main(clone)
    for _ in range(TRIES):
        _pull(clone)
        if not (clone.root / "projects" / project / "project.yaml").is_file():
            raise _no_project(project, _local_projects(clone.root))
        number = _resume_branch(clone, project)
        if number is None:
            raise ConfigError(f"{project} is not waiting at a gate: no resume branch on origin")
        branch = f"resume/{project}/{number}"
        tracking = f"refs/remotes/origin/{branch}"
        clone.git("fetch", "-q", "origin", f"+refs/heads/{branch}:{tracking}")
        if clone.bytes("merge-base", "--is-ancestor", tracking, "HEAD") is not None:  # merged by hand already
            push(clone.root, "origin", [f":refs/heads/{branch}"], env=clone.env)
            clone.bytes("update-ref", "-d", tracking)
            print(f"{branch} is already merged into {MAIN}; deleted it on origin")
            return 0
        try:
            clone.git("merge", "-q", "--no-ff", "--autostash", "-m", f"Approve {project}: merge {branch}", tracking)
        except GitError:
            if clone.bytes("rev-parse", "-q", "--verify", "MERGE_HEAD") is None:
                raise
            clone.bytes("merge", "--abort")
            raise GitError(f"{branch} conflicts with {MAIN} (the same lines changed since the gate); merge aborted. "
                           f"Resolve it by hand: git merge origin/{branch}") from None
        try:
            push(clone.root, "origin", ["--atomic", f"{MAIN}:{MAIN}", f":refs/heads/{branch}"], env=clone.env)
        except PushRejected:
            clone.git("reset", "-q", "--keep", "HEAD~1")  # main moved on: merge again on the new tip
            continue
        except GitError:
            clone.git("reset", "-q", "--keep", "HEAD~1")
            raise
        clone.bytes("update-ref", "-d", tracking)
        sha = clone.git("rev-parse", "--short", "HEAD").strip()
        print(f"approved {project}: merged {branch} into {MAIN} ({sha}) and deleted it on origin")
        return 0
    raise GitError(f"origin/{MAIN} kept moving: {TRIES} pushes were rejected; try again")


# --- reading origin/main without touching the work tree ----------------------------------------

class GitTree:
    """One commit of the clone as a state.Tree: one `ls-tree`, one `cat-file --batch`."""

    def __init__(self, clone: Clone, rev: str) -> None:
        listing = clone.bytes("ls-tree", "-r", "-z", "--full-tree", rev)
        if listing is None:
            raise GitError(f"cannot list {rev} in {clone.root}")
        self._ids: dict[str, str] = {}
        for record in listing.decode("utf-8", "replace").split("\0"):
            meta, _, path = record.partition("\t")
            parts = meta.split(" ")
            if len(parts) == 3 and parts[1] == "blob" and _is_state_file(path):
                self._ids[path] = parts[2]
        self._blobs = self._cat(clone, list(self._ids.values()))

    @staticmethod
    def _cat(clone: Clone, ids: list[str]) -> dict[str, bytes]:
        if not ids:
            return {}
        result = subprocess.run(["git", "cat-file", "--batch"], cwd=clone.root, input="\n".join(ids).encode() + b"\n",
                                capture_output=True, env=dict(clone.env))
        if result.returncode != 0:
            raise GitError(f"git cat-file failed in {clone.root}: {result.stderr.decode(errors='replace').strip()}")
        out = result.stdout
        blobs: dict[str, bytes] = {}
        at = 0
        while at < len(out):
            header_end = out.index(b"\n", at)
            sha, _, size = out[at:header_end].decode().split(" ")
            start = header_end + 1
            blobs[sha] = out[start:start + int(size)]
            at = start + int(size) + 1
        return blobs

    def entries(self) -> dict[str, str]:
        return dict(self._ids)

    def read(self, path: str) -> bytes:
        try:
            return self._blobs[self._ids[path]]
        except KeyError:
            raise FileNotFoundError(path) from None


def _is_state_file(path: str) -> bool:
    if not path.endswith((".yaml", ".yml")) or "/logs/" in path:
        return False
    return path == "winslow.yaml" or path.startswith(("pipelines/", "projects/"))


# --- status ------------------------------------------------------------------------------------

def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _seconds(start: str | None, end: str | None, now: datetime) -> float | None:
    began = _time(start)
    ended = _time(end) if end else now
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
    return (running or list(status.runs) or [None])[-1]


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
    parsed = _time(value)
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
        _check_name(args.project)
    _fetch(clone, MAIN_REFSPEC)
    on_origin = clone.has_ref(ORIGIN_MAIN)
    tree = GitTree(clone, ORIGIN_MAIN) if on_origin else DirectoryTree(clone.root)
    snapshot = StateReader().read(tree)
    now = datetime.now(timezone.utc)
    source = f"origin/{MAIN}" if on_origin else "the work tree"
    if args.project:
        entry = snapshot.projects.get(args.project)
        if entry is None:
            raise _no_project(args.project, list(snapshot.projects), f" on {source}")
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


# --- logs --------------------------------------------------------------------------------------

def _read_status(clone: Clone, rev: str, project: str) -> Status:
    path = f"projects/{project}/status.yaml"
    raw = clone.bytes("cat-file", "blob", f"{rev}:{path}")
    if raw is None:
        if clone.bytes("cat-file", "-e", f"{rev}:projects/{project}/project.yaml") is None:
            listing = clone.bytes("ls-tree", "--name-only", f"{rev}:projects") or b""
            raise _no_project(project, listing.decode().split(), f" on {rev.removeprefix('refs/remotes/')}")
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
    _check_name(args.project)
    clone = open_clone(args.repo_dir)
    online = _fetch(clone, MAIN_REFSPEC, NODES_REFSPEC)
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
        online = _fetch(clone, MAIN_REFSPEC, NODES_REFSPEC, warn=online)  # warn once, keep trying
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
