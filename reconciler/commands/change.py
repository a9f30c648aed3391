"""One edit of the state repo, as a verb makes it: plan, check, commit, push, retry.

The edit is what a person would do by hand in their clone: pull, edit `run:` (or
`env:`) of projects/<P>/project.yaml keeping their comments — or add, edit or remove
project and pipeline files (projects.py) — check it the way `winslow validate`
does, commit with a readable message, push. A rejected push means someone else
pushed first: the commit is dropped and the edit made again on the new tip, so
`request: +1` counts from what is really on origin and two bumps never conflict.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reconciler import layout
from reconciler.commands.clone import MAIN, Clone, kept_moving, local_projects, no_project, pull, require_main, retries
from reconciler.edit import remove_fields, set_env, set_fields
from reconciler.errors import ConfigError, GitError, InvalidFile, Problem, PushRejected
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


@dataclass(frozen=True)
class Edit:
    """The files one verb changes in the clone, and the commit message that says what was done."""

    message: str                        # the commit's subject, printed with the commit id once pushed
    files: Mapping[str, str | None]     # path -> its new text; None: the file or folder leaves git
    body: str = ""                      # the rest of the commit message
    notes: tuple[str, ...] = ()         # printed after the commit: what follows from it
    deletes: tuple[str, ...] = ()       # branches deleted on origin in the same (atomic) push


# (the clone's root, just pulled) -> the edit to make, or what to print when there is nothing to change
EditPlan = Callable[[Path], "Edit | str"]


def load_pipeline(root: Path, name: str) -> Pipeline | None:
    """pipelines/<name>.yaml in the clone as the model; None when it is missing or invalid."""
    if not is_safe_id(name):
        return None
    path = layout.pipeline_file(name)
    try:
        pipeline, problems = read_pipeline(parse_yaml((root / path).read_bytes(), path), name)
    except (InvalidFile, OSError):
        return None
    return None if problems else pipeline


def load_lock(root: Path, project: str) -> tuple[int, Pipeline | None]:
    """The request projects/<P>/pipeline.lock.yaml locked, and its pipeline; (0, None) when there is none."""
    path = root / layout.lock_file(project)
    if not path.is_file():
        return 0, None
    try:
        locked, _ = read_lock(parse_yaml(path.read_bytes(), str(path)))
    except InvalidFile:
        return 0, None
    return locked or (0, None)


def project_problems(root: Path, project: str, text: str, gone: Collection[str] = ()) -> list[Problem]:
    """The checks `winslow validate` makes on project.yaml (schema, pipeline exists, from/until name stages),
    as if the pipelines named in `gone` were deleted."""
    path = layout.project_file(project)
    doc = parse_yaml(text.encode("utf-8"), path)
    pipelines: dict[str, Pipeline | None] = {p.stem: None for p in (root / layout.PIPELINES).glob("*.yaml")
                                             if p.stem not in gone}
    name = doc.data.get("pipeline") if isinstance(doc.data, dict) else None
    if isinstance(name, str) and name in pipelines:
        pipelines[name] = load_pipeline(root, name)
    lock_request, lock = load_lock(root, project)
    _, problems = read_project(doc, project, pipelines, lock, lock_request)
    return problems


def check_project(root: Path, project: str, text: str) -> None:
    """Refuse a project.yaml that `winslow validate` would refuse: InvalidFile with every problem."""
    problems = project_problems(root, project, text)
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

    def edit(root: Path) -> Edit | str:
        path = root / rel
        if not path.is_file():
            raise no_project(project, local_projects(root))
        text = path.read_bytes().decode("utf-8")
        data = parse_yaml(text.encode("utf-8"), rel).data
        data = data if isinstance(data, dict) else {}
        run = section(data, "run")
        env = section(data, "env")
        pipeline = load_pipeline(root, data["pipeline"]) if isinstance(data.get("pipeline"), str) else None
        change = plan(run, env, pipeline)
        if all(run.get(k) == v for k, v in change.run.items()) and all(env.get(k) == v for k, v in change.env.items()):
            return f"{project}: {change.unchanged}"
        edited = set_env(text, change.env) if change.env else text
        edited = set_fields(edited, ("run",), change.run)
        if "state" in change.run and "reason" not in change.run and "reason" in run:
            edited = remove_fields(edited, ("run",), ["reason"])  # the reason was for the state it replaces
        check_project(root, project, edited)
        return Edit(change.message, {rel: edited})

    done = commit_edit(clone, [rel], edit)
    return done.message if done else None


def commit_edit(clone: Clone, paths: Sequence[str], plan: EditPlan) -> Edit | None:
    """Pull, plan, commit and push one edit of `paths`; a rejected push makes it again on the new tip.

    The plan reads the clone as it is after the pull, checks the result the way
    `winslow validate` would, and raises a WinslowError to refuse. Nothing is left
    committed locally unless it is on origin. Returns the edit, None when nothing changed.
    """
    require_main(clone)
    if clone.git("status", "--porcelain", "--", *paths).strip():
        raise ConfigError(f"{', '.join(paths)} has uncommitted changes; commit or stash them first")
    tried = 0
    for _ in retries():
        tried += 1
        pull(clone)
        edit = plan(clone.root)
        if isinstance(edit, str):
            print(edit)
            return None
        _commit(clone, edit)
        refspecs = [f"{MAIN}:{MAIN}"] + [f":refs/heads/{branch}" for branch in edit.deletes]
        try:
            push(clone.root, "origin", (["--atomic"] if edit.deletes else []) + refspecs, env=clone.env)
        except PushRejected:
            clone.git("reset", "-q", "--keep", "HEAD~1")  # someone pushed first: make the edit again on their tip
            continue
        except GitError:
            clone.git("reset", "-q", "--keep", "HEAD~1")  # not pushed means not done: leave no local commit
            raise
        for branch in edit.deletes:
            clone.bytes("update-ref", "-d", layout.ORIGIN + branch)
        sha = clone.git("rev-parse", "--short", "HEAD").strip()
        print(f"{edit.message} ({sha}, pushed to origin/{MAIN})")
        for note in edit.notes:
            print(note)
        return edit
    raise GitError(kept_moving(tried))


def _commit(clone: Clone, edit: Edit) -> None:
    """Write and commit exactly the edit's files; on failure (a commit hook said no) put them back as they were."""
    message = ["-m", edit.message] + (["-m", edit.body] if edit.body else [])
    try:
        for rel, text in edit.files.items():
            if text is None:
                clone.git("rm", "-r", "-q", "--", rel)
                continue
            path = clone.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(text.encode("utf-8"))
            clone.git("add", "--", rel)
        clone.git("commit", "-q", *message, "--", *edit.files)
    except GitError:
        _restore(clone, list(edit.files))
        raise


def _restore(clone: Clone, paths: list[str]) -> None:
    """The paths as HEAD has them (they were clean before the edit); those HEAD lacks are removed."""
    clone.bytes("reset", "-q", "--", *paths)
    for rel in paths:
        if clone.bytes("cat-file", "-e", f"HEAD:{rel}") is not None:
            clone.bytes("checkout", "-q", "HEAD", "--", rel)
            continue
        path = clone.root / rel
        if path.is_file():
            path.unlink()
        if path.parent != clone.root and path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()
