"""One edit of projects/<P>/project.yaml, as a verb makes it: plan, check, commit, push, retry.

The edit is what a person would do by hand in their clone: pull, edit `run:` (or
`env:`) keeping their comments, check it the way `winslow validate` does, commit with
a readable message, push. A rejected push means someone else pushed first: the commit
is dropped and the edit made again on the new tip, so `request: +1` counts from what is
really on origin and two bumps never conflict.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler import layout
from reconciler.commands.clone import MAIN, TRIES, Clone, local_projects, no_project, pull, require_main
from reconciler.edit import set_env, set_fields
from reconciler.errors import ConfigError, GitError, InvalidFile, PushRejected
from reconciler.gitcmd import push
from reconciler.model import Pipeline
from reconciler.validation import is_safe_id, read_lock, read_pipeline, read_project, section
from reconciler.yamlsafe import parse_yaml


@dataclass(frozen=True)
class Change:
    """What one verb does to project.yaml, and the commit message that says so."""

    run: Mapping[str, Any]
    message: str
    env: Mapping[str, str] = field(default_factory=dict)
    unchanged: str = "nothing to change"


# (the current run: mapping, the current env: mapping, the project's pipeline) -> the change
Plan = Callable[[Mapping[str, Any], Mapping[str, Any], "Pipeline | None"], Change]


def _load_pipeline(root: Path, name: str) -> Pipeline | None:
    if not is_safe_id(name):
        return None
    path = layout.pipeline_file(name)
    try:
        pipeline, problems = read_pipeline(parse_yaml((root / path).read_bytes(), path), name)
    except (InvalidFile, OSError):
        return None
    return None if problems else pipeline


def _validate(root: Path, project: str, text: str) -> None:
    """The checks `winslow validate` makes on project.yaml: schema, pipeline exists, from/until name stages."""
    path = layout.project_file(project)
    doc = parse_yaml(text.encode("utf-8"), path)
    pipelines: dict[str, Pipeline | None] = {p.stem: None for p in (root / layout.PIPELINES).glob("*.yaml")}
    name = doc.data.get("pipeline") if isinstance(doc.data, dict) else None
    if isinstance(name, str) and name in pipelines:
        pipelines[name] = _load_pipeline(root, name)
    lock, lock_request = None, 0
    lock_path = root / layout.lock_file(project)
    if lock_path.is_file():
        try:
            locked, _ = read_lock(parse_yaml(lock_path.read_bytes(), str(lock_path)))
            lock_request, lock = locked or (0, None)
        except InvalidFile:
            pass
    _, problems = read_project(doc, project, pipelines, lock, lock_request)
    if problems:
        raise InvalidFile(problems)


def check_stage(pipeline: Pipeline | None, flag: str, stage: str | None) -> None:
    if stage is None or pipeline is None:
        return  # no pipeline to check against: validation reports that
    if stage not in pipeline.stage_names:
        raise ConfigError(f"{flag} {stage}: pipeline '{pipeline.name}' has no such stage "
                          f"(stages: {', '.join(pipeline.stage_names)})")


def commit_change(clone: Clone, project: str, plan: Plan) -> str | None:
    """Pull, edit, check, commit and push one change; returns the commit message, None when nothing changed."""
    rel = layout.project_file(project)
    require_main(clone)
    if clone.git("status", "--porcelain", "--", rel).strip():
        raise ConfigError(f"{rel} has uncommitted changes; commit or stash them first")
    for _ in range(TRIES):
        pull(clone)
        path = clone.root / rel
        if not path.is_file():
            raise no_project(project, local_projects(clone.root))
        text = path.read_bytes().decode("utf-8")
        data = parse_yaml(text.encode("utf-8"), rel).data
        data = data if isinstance(data, dict) else {}
        run = section(data, "run")
        env = section(data, "env")
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
