"""The verbs that change a project: `start`, `pause`, `resume`, `abort`, `approve` and `reject`.

Each is a shortcut for an edit a person would make by hand in their clone of the
state repo (see change.py for how one edit is committed and pushed); `approve`
merges the newest resume/<P>/<N> branch into main instead, and `reject` deletes it
in the same push as the edit that says who rejected the gate and why. The read-only verbs
live in status.py and logs.py.
"""
from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from reconciler import layout
from reconciler.commands.change import Change, Edit, check_project, check_stage, commit_change, commit_edit
from reconciler.commands.clone import (
    MAIN,
    Clone,
    add_verb,
    check_name,
    kept_moving,
    local_projects,
    no_project,
    open_clone,
    pull,
    require_main,
    retries,
)
from reconciler.edit import set_fields
from reconciler.errors import ConfigError, GitError, PushRejected
from reconciler.gitcmd import push
from reconciler.model import Pipeline

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def add_parser(sub: argparse._SubParsersAction) -> None:
    def verb(name: str, help: str, description: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        return add_verb(sub, name, help, description, func)

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

    reject = verb("reject", "refuse a project waiting at a gate: its request ends FAILED",
                  "Set run.state: aborted with run.reason 'rejected by NAME: TEXT' in projects/P/project.yaml and "
                  "push it together with the deletion of the gate's branch resume/P/N, so the request ends FAILED "
                  "with that reason. Deleting the branch by hand (closing its merge request) rejects too, without "
                  "a reason.\n\nexample: winslow reject ulm-0812 --reason 'boxes drift after frame 9000'", run_reject)
    reject.add_argument("project")
    reject.add_argument("--reason", required=True, help="why: shown in status as 'rejected by NAME: TEXT'")


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
    check_name(args.project)

    def plan(run: Mapping[str, Any], env: Mapping[str, Any], pipeline: Pipeline | None) -> Change:
        check_stage(pipeline, "--from", args.from_stage)
        check_stage(pipeline, "--until", args.until)
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
    check_name(args.project)

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
    check_name(args.project)
    env_changes = _env_pairs(args.env)

    def plan(run: Mapping[str, Any], env: Mapping[str, Any], pipeline: Pipeline | None) -> Change:
        if args.from_stage is None and not env_changes:
            return Change({"state": "running"}, f"{args.project}: resume request {_request(run)}",
                          unchanged=f"already running; nothing to change (at a gate? `winslow approve {args.project}`)")
        check_stage(pipeline, "--from", args.from_stage)
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
    prefix = f"refs/heads/{layout.resume_prefix(project)}"
    listing = clone.git("ls-remote", "origin", prefix + "*")
    numbers = [int(ref[len(prefix):]) for ref in (line.split("\t")[-1] for line in listing.splitlines())
               if ref.startswith(prefix) and ref[len(prefix):].isdigit()]
    return max(numbers) if numbers else None


def run_reject(args: argparse.Namespace) -> int:
    project = args.project
    check_name(project)
    clone = open_clone(args.repo_dir)
    who = (clone.bytes("config", "user.name") or b"").decode("utf-8", "replace").strip() or "someone"
    reason = f"rejected by {who}: {' '.join(args.reason.split())}"

    def edit(root: Path) -> Edit | str:
        number = _resume_branch(clone, project)
        if number is None:
            raise ConfigError(f"{project} is not waiting at a gate: no resume branch on origin")
        rel = layout.project_file(project)
        if not (root / rel).is_file():
            raise no_project(project, local_projects(root))
        text = (root / rel).read_text(encoding="utf-8")
        edited = set_fields(text, ("run",), {"state": "aborted", "reason": reason})
        check_project(root, project, edited)
        branch = layout.resume_branch(project, number)
        return Edit(f"{project}: reject the gate of request {number}", {rel: edited}, body=reason,
                    notes=(f"deleted {branch} on origin; the request ends FAILED: {reason}",), deletes=(branch,))

    commit_edit(clone, [layout.project_file(project)], edit)
    return 0


def run_approve(args: argparse.Namespace) -> int:
    project = args.project
    check_name(project)
    clone = open_clone(args.repo_dir)
    require_main(clone)
    tried = 0
    for _ in retries():
        tried += 1
        pull(clone)
        if not (clone.root / layout.project_file(project)).is_file():
            raise no_project(project, local_projects(clone.root))
        number = _resume_branch(clone, project)
        if number is None:
            raise ConfigError(f"{project} is not waiting at a gate: no resume branch on origin")
        branch = layout.resume_branch(project, number)
        tracking = layout.ORIGIN + branch
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
    raise GitError(kept_moving(tried))
