"""Meaning checks: what a schema cannot say (names resolve, stages in order, paths stay inside).

Each `read_*` function turns one parsed file into the model, or returns the
problems that keep it from being used, each located at its line.
"""
from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping
from typing import Any

from reconciler.errors import Problem
from reconciler.layout import escapes, in_workspaces_of, is_safe_id, workspace_prefix
from reconciler.model import VAR, Build, ClusterConfig, Pipeline, Project, Run, Status, fill
from reconciler.schemas import check
from reconciler.units import parse_duration, parse_size
from reconciler.yamlsafe import Document, shorten

MOUNTS = ("/resources", "/input", "/workspace")


def section(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    """`data[key]` when it is a mapping, else an empty one (the schema reports the wrong type)."""
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _units(doc: Document, data: Any, base: tuple[object, ...], sizes: tuple[str, ...],
           durations: tuple[str, ...]) -> list[Problem]:
    """Sizes and durations that do not parse; values of a type the schema refuses are the schema's to report."""
    problems: list[Problem] = []
    if not isinstance(data, dict):
        return problems
    checks: tuple[tuple[tuple[str, ...], Callable[[Any], object], tuple[type, ...]], ...] = (
        (sizes, parse_size, (str, int)), (durations, parse_duration, (str, int, float)))
    for keys, parse, types in checks:
        for key in keys:
            value = data.get(key)
            if not isinstance(value, types) or isinstance(value, bool):
                continue
            try:
                parse(value)
            except ValueError as exc:
                message = str(exc)
                if isinstance(value, str) and len(value) > 60:
                    message = message.replace(value, shorten(value), 1)
                problems.append(doc.problem(base + (key,), message))
    return problems


def read_config(doc: Document) -> tuple[ClusterConfig | None, list[Problem]]:
    problems = check(doc, "winslow")
    if problems:
        return None, problems
    data = doc.data
    problems += _units(doc, data.get("timeouts", {}), ("timeouts",), (),
                       ("heartbeat", "node", "lease", "grace", "poll", "cleanup"))
    problems += _units(doc, data.get("logs", {}), ("logs",), ("head", "tail", "live_tail"), ())
    timeouts = data.get("timeouts", {})
    if not problems and isinstance(timeouts, dict) and "lease" in timeouts and "node" in timeouts \
            and parse_duration(timeouts["lease"]) >= parse_duration(timeouts["node"]):
        problems.append(doc.problem(("timeouts", "lease"), "timeouts.lease must be shorter than timeouts.node: a "
                                                           "cut-off node must stop its stages before others take over"))
    root = data.get("storage", {}).get("root")
    if root is not None and not root.startswith("/"):
        problems.append(doc.problem(("storage", "root"), f"storage root '{shorten(root)}' must be an absolute path"))
    return (None, problems) if problems else (ClusterConfig.from_dict(data), [])


def _mount_escapes(value: str) -> bool:
    for mount in MOUNTS:
        if value == mount or value.startswith(mount + "/"):
            normal = posixpath.normpath(value)
            return not (normal == mount or normal.startswith(mount + "/"))
    return False


def read_pipeline(doc: Document, stem: str) -> tuple[Pipeline | None, list[Problem]]:
    """A pipeline file; its meaning is checked even when the schema found errors, so one run reports them all."""
    problems = check(doc, "pipeline")
    data = doc.data if isinstance(doc.data, dict) else {}
    meaning = []
    name = data.get("name")
    if isinstance(name, str) and name != stem:
        meaning.append(doc.problem(("name",), f"pipeline name '{shorten(name)}' must match its file name '{stem}'"))
    meaning += _pipeline_meaning(doc, data, ())
    problems += _not_at(meaning, problems)
    return (None, sorted(set(problems))) if problems else (Pipeline.from_dict(data), [])


def _not_at(meaning: list[Problem], schema: list[Problem]) -> list[Problem]:
    """Meaning problems at a place the schema has not already reported: one error per value."""
    taken = {(p.line, p.column) for p in schema}
    return [p for p in meaning if (p.line, p.column) not in taken]


def _pipeline_meaning(doc: Document, data: Mapping[str, Any], base: tuple[object, ...]) -> list[Problem]:
    """What a pipeline's schema cannot say, for a pipeline file or one locked inside pipeline.lock.yaml.

    Safe on a pipeline the schema refused: whatever has the wrong type is skipped.
    """
    problems = []
    seen: dict[str, int] = {}
    stages = data.get("stages")
    for i, stage in enumerate(stages if isinstance(stages, list) else ()):
        if not isinstance(stage, dict):
            continue
        at = base + ("stages", i)
        name = stage.get("name")
        if isinstance(name, str):
            if name in seen:
                problems.append(doc.problem(at + ("name",),
                                            f"duplicate stage name '{shorten(name)}' (also stage {seen[name] + 1})"))
            seen.setdefault(name, i)
        problems += _units(doc, stage.get("resources"), at + ("resources",), ("memory",), ())
        problems += _units(doc, stage, at, (), ("timeout", "gate_timeout"))
        command = stage.get("command")
        for j, arg in enumerate(command if isinstance(command, list) else ()):
            if isinstance(arg, str) and _mount_escapes(arg):
                problems.append(doc.problem(at + ("command", j), f"path '{shorten(arg)}' leaves its mount"))
        env = stage.get("env")
        for key, value in (env.items() if isinstance(env, dict) else ()):
            if isinstance(value, str) and _mount_escapes(value):
                problems.append(doc.problem(at + ("env", key), f"path '{shorten(value)}' leaves its mount"))
        inputs = stage.get("inputs")
        for j, path in enumerate(inputs if isinstance(inputs, list) else ()):
            if isinstance(path, str) and escapes(VAR.sub("x", path)):
                problems.append(doc.problem(at + ("inputs", j), f"input '{shorten(path)}' leaves the resource pool: "
                                                                f"name a path relative to resources/"))
    return problems


def _stage_range(doc: Document, run: Mapping[str, Any], pipeline: Pipeline) -> list[Problem]:
    problems = []
    names = pipeline.stage_names
    for key in ("from", "until"):
        if key in run and isinstance(run[key], str) and run[key] not in names:
            problems.append(doc.problem(("run", key), f"'{key}: {shorten(run[key])}' names no stage of pipeline "
                                                      f"'{pipeline.name}' (stages: {', '.join(names)})"))
    if not problems and run.get("from") in names and run.get("until") in names \
            and names.index(run["until"]) < names.index(run["from"]):
        problems.append(doc.problem(("run", "until"), f"'until: {run['until']}' comes before 'from: {run['from']}' "
                                                      f"in pipeline '{pipeline.name}'"))
    return problems


def read_project(doc: Document, project_id: str, pipelines: Mapping[str, Pipeline | None],
                 locked: Pipeline | None = None, locked_request: int = 0) -> tuple[Project | None, list[Problem]]:
    """A project, checked against the pipelines of the same commit.

    A request that has already begun runs on its locked pipeline, so a pipeline
    deleted or broken since then does not make the project invalid. Meaning is
    checked even when the schema found errors, so one run reports them all.
    """
    problems = []
    if not is_safe_id(project_id):
        problems.append(doc.problem((), f"project folder '{shorten(project_id)}' is not a safe name "
                                        f"(letters, digits, '_', '.', '-'; at most 64)"))
    problems += check(doc, "project")
    data = doc.data if isinstance(doc.data, dict) else {}
    run = section(data, "run")
    env = section(data, "env")
    name = data.get("pipeline")
    if isinstance(name, str):
        pipeline = pipelines.get(name)
        request = run.get("request", 0)
        if locked is not None and isinstance(request, int) and request == locked_request:
            pipeline = locked  # a request that has begun runs on, and is checked against, its lock
        if pipeline is None:
            if name in pipelines:
                problems.append(doc.problem(("pipeline",), f"pipeline '{name}' is invalid (see pipelines/{name}.yaml)"))
            else:
                known = ", ".join(sorted(pipelines)) or "none"
                problems.append(doc.problem(("pipeline",), f"pipeline '{shorten(name)}' does not exist (known: {known})"))
        else:
            problems += _stage_range(doc, run, pipeline)
            problems += _substituted_paths(doc, pipeline, env)
            problems += _filled_inputs(doc, pipeline, env)
    for key, value in env.items():
        if isinstance(value, str) and _mount_escapes(value):
            problems.append(doc.problem(("env", key), f"path '{shorten(value)}' leaves its mount"))
    return (None, sorted(set(problems))) if problems else (Project.from_dict(project_id, data), [])


def lowered_request(doc: Document, observed: int, status_path: str) -> Problem | None:
    """A `run.request` below the request the nodes have already observed: they ignore it, requests only go up.

    Only `winslow validate` asks this. To a node the project is not invalid: it goes on
    with the request it observed, so this check stays out of `read_project`.
    A project.yaml without `run.request` states no request and is left alone.
    """
    data = doc.data if isinstance(doc.data, dict) else {}
    request = section(data, "run").get("request")
    if isinstance(request, float) and request.is_integer():
        request = int(request)  # 2.0 is an integer to the schema, as in status.yaml
    if isinstance(request, bool) or not isinstance(request, int) or not 0 <= request < observed:
        return None  # absent, not lowered, or a value the schema refuses (it reports those)
    return doc.problem(("run", "request"), f"run.request {request} is below request {observed} that the nodes "
                                           f"already acted on ({status_path}), so they ignore it: requests only "
                                           f"go up ({observed} keeps that execution, {observed + 1} starts a new one)")


def _substituted_paths(doc: Document, pipeline: Pipeline, env: Mapping[str, Any]) -> list[Problem]:
    """A project's env fills `${VAR}` in its stages' commands; the result must stay inside its mount."""
    problems = []
    text = {k: str(v) for k, v in env.items()}
    for stage in pipeline.stages:
        values = {**pipeline.env, **stage.env, **text}
        for arg in stage.command:
            if "${" not in arg:
                continue
            mine = [name for name in VAR.findall(arg) if name in text]
            if not mine:
                continue
            filled = fill(arg, values)
            if _mount_escapes(filled):
                what = ", ".join(f"{name}='{shorten(text[name])}'" for name in mine)
                problems.append(doc.problem(("env", mine[0]),
                                            f"{what} makes '{shorten(arg)}' in stage '{stage.name}' leave its mount"))
    return problems


def _filled_inputs(doc: Document, pipeline: Pipeline, env: Mapping[str, Any]) -> list[Problem]:
    """A project's env fills `${VAR}` in its stages' inputs: every name must be set, and the path stay in the pool."""
    problems = []
    text = {k: str(v) for k, v in env.items()}
    for stage in pipeline.stages:
        values = {**pipeline.env, **stage.env, **text}
        for path, filled in zip(stage.inputs, stage.inputs_for(values)):
            unset = VAR.findall(filled)
            if unset:
                problems.append(doc.problem(("env",) if "env" in doc.data else (),
                                            f"stage '{stage.name}' reads input '{shorten(path)}': set "
                                            f"{', '.join(unset)} in env"))
            elif escapes(filled):
                problems.append(doc.problem(("env",), f"input '{shorten(filled)}' of stage '{stage.name}' leaves "
                                                      f"the resource pool"))
    return problems


def read_builds(doc: Document) -> tuple[tuple[Build, ...] | None, list[Problem]]:
    """builds/NAME.yaml: the builds the nodes recorded."""
    problems = check(doc, "build")
    if problems:
        return None, problems
    return tuple(Build.from_dict(item) for item in doc.data["builds"]), []


def read_status(doc: Document, project_id: str) -> tuple[Status | None, list[Problem]]:
    problems = check(doc, "status")
    if problems:
        return None, problems
    for i, run in enumerate(doc.data.get("runs", [])):
        expected = Run.make_id(run["request"], run["stage"], run["attempt"])
        if run["id"] != expected:
            problems.append(doc.problem(("runs", i, "id"), f"run id '{shorten(run['id'])}' does not match its request, "
                                                           f"stage and attempt ('{shorten(expected)}')"))
        for key in ("log", "result"):
            if run.get(key) and escapes(run[key]):
                problems.append(doc.problem(("runs", i, key), f"path '{shorten(run[key])}' leaves the state repo"))
        for key in ("workspace", "input"):
            if run.get(key) and not in_workspaces_of(run[key], project_id):
                problems.append(doc.problem(("runs", i, key), f"path '{shorten(run[key])}' is not inside "
                                                              f"{workspace_prefix(project_id)}"))
    return (None, problems) if problems else (Status.from_dict(doc.data), [])


def read_lock(doc: Document) -> tuple[tuple[int, Pipeline] | None, list[Problem]]:
    problems = check(doc, "pipeline-lock")
    data = doc.data if isinstance(doc.data, dict) else {}
    pipeline = data.get("pipeline")
    if isinstance(pipeline, dict):
        problems += _not_at(_pipeline_meaning(doc, pipeline, ("pipeline",)), problems)
    if problems:
        return None, sorted(set(problems))
    assert isinstance(pipeline, dict)  # the schema requires it
    return (int(data["request"]), Pipeline.from_dict(pipeline)), []


def read_result(doc: Document, project_id: str) -> list[Problem]:
    problems = check(doc, "result")
    if problems:
        return problems
    workspace = doc.data.get("workspace")
    if workspace and not in_workspaces_of(workspace, project_id):
        problems.append(doc.problem(("workspace",), f"path '{shorten(workspace)}' is not inside "
                                                    f"{workspace_prefix(project_id)}"))
    for i, entry in enumerate(doc.data["files"]):
        if escapes(entry["path"]):
            problems.append(doc.problem(("files", i, "path"), f"path '{shorten(entry['path'])}' leaves the workspace"))
    return problems
