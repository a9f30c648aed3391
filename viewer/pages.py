"""What each page shows, as plain data: the HTML pages render it, `/api/` returns it as JSON.

Every function here is pure over the model (`Snapshot`, `ProjectEntry`, `NodeView`,
`ResultManifest`) and the time it is given; reading git and storage is the caller's.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from reconciler.clock import parse_time
from reconciler.commands import nodes as nodes_command
from reconciler.errors import Problem
from reconciler.model import SECRET_MASK, ClusterConfig, Pipeline, ResultManifest, Run, RunState, Stage
from reconciler.repoview import NodeView, RequestChange
from reconciler.snapshot import ProjectEntry, Snapshot
from viewer.overview import age_seconds, latest_run, project_state


def duration(run: Run, now: datetime) -> float | None:
    began = parse_time(run.started or run.claimed)
    ended = parse_time(run.finished) if run.finished else (now if run.state is RunState.RUNNING else None)
    return max(0.0, (ended - began).total_seconds()) if began and ended else None


def node_state(view: NodeView | None, config: ClusterConfig) -> str:
    """ready, draining, drained, fenced or lost, as `winslow nodes` says it."""
    return nodes_command.state(view, config) if view is not None else "unknown"


def run_dict(run: Run, now: datetime, nodes: Mapping[str, NodeView], config: ClusterConfig) -> dict[str, Any]:
    data = run.to_dict()
    data["duration_seconds"] = duration(run, now)
    if run.state is RunState.RUNNING and run.node:
        data["node_state"] = node_state(nodes.get(run.node), config)
    return data


def pipeline_of(entry: ProjectEntry, snapshot: Snapshot) -> Pipeline | None:
    """The pipeline the project runs on: its lock while a request holds one, else the one it names."""
    if entry.lock is not None:
        return entry.lock
    return snapshot.pipelines.get(entry.project.pipeline) if entry.project else None


def stage_row(pipeline: Pipeline | None, entry: ProjectEntry) -> list[dict[str, Any]]:
    """The pipeline's stages in order, each with its latest run."""
    if pipeline is None:
        return []
    request = entry.status.request
    row = []
    for stage in pipeline.stages:
        runs = [r for r in entry.status.runs if r.stage == stage.name]
        current = [r for r in runs if request is not None and r.request == request.number]
        found = current or runs
        latest = found[-1] if found else None
        row.append({"name": stage.name, "state": latest.state.value if latest else None,
                    "run": latest.id if latest else None, "gate": stage.pause_after,
                    "next": bool(request and request.next == stage.name),
                    "current": bool(current)})
    return row


def secrets_of(pipeline: Pipeline | None) -> list[str]:
    return sorted({name for stage in (pipeline.stages if pipeline else ()) for name in stage.secrets})


def environment(entry: ProjectEntry, pipeline: Pipeline | None) -> dict[str, str]:
    """The env a request runs with (as status recorded it, secrets masked), else what the files say."""
    if entry.status.request is not None and entry.status.request.env:
        env = dict(entry.status.request.env)
    else:
        env = dict(pipeline.env) if pipeline else {}
        env.update(entry.project.env if entry.project else {})
    for name in secrets_of(pipeline):
        env[name] = SECRET_MASK
    return dict(sorted(env.items()))


def project_data(entry: ProjectEntry, snapshot: Snapshot, nodes: Mapping[str, NodeView],
                 history: Sequence[RequestChange], now: datetime) -> dict[str, Any]:
    status, project = entry.status, entry.project
    pipeline = pipeline_of(entry, snapshot)
    run = latest_run(status.runs)
    errors = [p.to_json() for p in entry.problems]
    if project is not None and project.pipeline in snapshot.pipeline_problems:
        errors += [p.to_json() for p in snapshot.pipeline_problems[project.pipeline]]
    return {
        "project": entry.id,
        "name": (project.name if project else "") or entry.id,
        "description": project.description if project else "",
        "pipeline": project.pipeline if project else (pipeline.name if pipeline else None),
        "state": project_state(entry),
        "message": status.message,
        "tags": list(project.tags) if project else [],
        "desired": ({"request": project.run.request, "from": project.run.from_stage, "until": project.run.until,
                     "step": project.run.step, "state": project.run.state.value, "reason": project.run.reason}
                    if project else None),
        "observed_request": status.observed_request,
        "request": status.request.to_dict() if status.request else None,
        "updated": status.updated,
        "stage": run.stage if run else None,
        "errors": errors,
        "status_errors": list(status.errors),
        "stages": stage_row(pipeline, entry),
        "env": environment(entry, pipeline),
        "secrets": secrets_of(pipeline),
        "runs": [run_dict(r, now, nodes, snapshot.config) for r in status.runs],
        "history": [{"commit": c.commit, "author": c.author, "email": c.email, "time": c.time,
                     "subject": c.subject, "request": c.request, "state": c.state, "from": c.from_stage}
                    for c in history],
    }


def manifest_dict(manifest: ResultManifest | None) -> dict[str, Any] | None:
    if manifest is None:
        return None
    return {"workspace": manifest.workspace, "created": manifest.created, "node": manifest.node,
            "total_size": manifest.total_size, "truncated": manifest.truncated,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256,
                       "storage_path": f"{manifest.workspace}/{f.path}"} for f in manifest.files],
            "unlisted": [{"path": p, "reason": r} for p, r in manifest.unlisted],
            "links": [{"path": p, "target": t} for p, t in manifest.links]}


def run_data(entry: ProjectEntry, run: Run, snapshot: Snapshot, nodes: Mapping[str, NodeView], now: datetime,
             log: str | None, live: bool, manifest: ResultManifest | None) -> dict[str, Any]:
    pipeline = pipeline_of(entry, snapshot)
    stage: Stage | None = pipeline.stage(run.stage) if pipeline else None
    return {
        "project": entry.id,
        "name": (entry.project.name if entry.project else "") or entry.id,
        "project_state": project_state(entry),
        "run": run_dict(run, now, nodes, snapshot.config),
        "stage": {"name": stage.name, "image": stage.image, "command": list(stage.command),
                  "gate": stage.pause_after} if stage else None,
        "live": live,
        "log": log,
        "log_source": ("live tail from node " + (run.node or "?")) if live else ("final log on main" if log is not None
                                                                               else None),
        "full_log": f"logs/{entry.id}/{run.id}.log",
        "manifest": manifest_dict(manifest),
    }


def node_data(view: NodeView, snapshot: Snapshot, history: bool = True) -> dict[str, Any]:
    """A node as `winslow nodes --json` describes it: one meaning in the CLI and the viewer."""
    return nodes_command.describe(view, snapshot.config, history=history)


def pipeline_data(name: str, pipeline: Pipeline | None, problems: Sequence[Problem],
                  used_by: int) -> dict[str, Any]:
    stages = []
    for stage in pipeline.stages if pipeline else ():
        stages.append({"name": stage.name, "image": stage.image, "command": list(stage.command),
                       "env": dict(stage.env), "secrets": list(stage.secrets),
                       "resources": {"gpus": stage.resources.gpus, "cpus": stage.resources.cpus,
                                     "memory": stage.resources.memory},
                       "node_tags": list(stage.node_tags), "inputs": list(stage.inputs), "timeout": stage.timeout,
                       "retries": stage.retries, "lost_retries": stage.lost_retries, "gate": stage.pause_after,
                       "gate_timeout": stage.gate_timeout, "description": stage.description})
    return {"name": name, "description": pipeline.description if pipeline else "", "valid": pipeline is not None,
            "env": dict(pipeline.env) if pipeline else {}, "stages": stages,
            "problems": [p.to_json() for p in problems], "projects": used_by}


def problems_data(snapshot: Snapshot) -> dict[str, Any]:
    held = snapshot.held_config.describe() if snapshot.held_config else None
    return {"commit": snapshot.commit, "held_config": held, "problems": [p.to_json() for p in snapshot.problems]}


def age(since: str | None, now: datetime) -> float | None:
    return age_seconds(since, now)
