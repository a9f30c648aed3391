"""Report: turn a plan into the files of one commit, and a message a person can read."""
from __future__ import annotations

from collections.abc import Callable

from reconciler import layout
from reconciler.decide import Plan
from reconciler.errors import StorageError
from reconciler.facts import EXITED
from reconciler.model import ClusterConfig, Pipeline, Status
from reconciler.storage import LocalStorage, capped_log
from reconciler.yamlsafe import dump_yaml


def schema_line(kind: str, path: str) -> str:
    """The editor's hint for a file at `path`: relative to the file, to the schemas `winslow init` copies in."""
    return f"# yaml-language-server: $schema={'../' * path.count('/')}schema/{kind}.schema.json\n"
GENERATED = "# Written by Winslow's reconcilers; do not edit by hand.\n"


def status_file(status: Status) -> bytes:
    return (schema_line("status", layout.status_file("p")) + GENERATED + dump_yaml(status.to_dict())).encode()


def lock_file(request: int, pipeline: Pipeline, commit: str | None) -> bytes:
    data = {"request": request, "source": layout.pipeline_file(pipeline.name), "commit": commit,
            "pipeline": dict(pipeline.source)}
    return (schema_line("pipeline-lock", layout.lock_file("p")) + GENERATED + dump_yaml(data)).encode()


def changes(plan: Plan, storage: LocalStorage, config: ClusterConfig, node: str, commit: str | None,
            mask: Callable[[bytes], bytes] = lambda data: data, overlap: int = 0) -> dict[str, bytes | None]:
    """The files of one commit. Everything goes through `mask`: a secret's value never reaches main, whether in
    a log, a reason, a message or an event (the node masks reasons where they arise; this is the last guard)."""
    files: dict[str, bytes | None] = {}
    unsafe = [p for p in (*plan.statuses, *plan.locks, *(p for p, _, _ in plan.finished)) if not layout.is_safe_id(p)]
    if unsafe:  # decide never plans for such a folder; should it, nothing leaves the project's folder
        raise ValueError(f"refusing to write outside a project's folder: {', '.join(sorted(set(unsafe)))}")
    for project, status in plan.statuses.items():
        files[layout.status_file(project)] = mask(status_file(status))
    for project, (request, pipeline) in plan.locks.items():
        files[layout.lock_file(project)] = mask(lock_file(request, pipeline, commit))
    for project, run, fact in plan.finished:
        if fact.kind == EXITED:
            try:  # a broken log is its run's problem, said in its place; the commit goes on
                log = capped_log(storage.log_path(project, run.id), config.log_head, config.log_tail, mask, overlap)
            except StorageError as exc:
                log = f"[winslow: the log could not be read: {exc}]\n".encode()
            files[layout.log_file(project, run.id)] = mask(log)
        if fact.manifest is not None:
            manifest = {"project": project, "run": run.id, "stage": run.stage, "node": node, "created": fact.time,
                        **fact.manifest}
            files[layout.result_file(project, run.id)] = mask((schema_line("result", layout.result_file(project, run.id))
                                                               + GENERATED + dump_yaml(manifest)).encode())
    for name, builds in plan.builds.items():
        data = {"name": name, "builds": [build.to_dict() for build in builds]}
        files[layout.build_file(name)] = mask((schema_line("build", layout.build_file(name)) + GENERATED
                                               + dump_yaml(data)).encode())
    for name, build in plan.built:
        try:
            log = capped_log(storage.root / layout.build_log_path(name, build.source), config.log_head,
                             config.log_tail, mask, overlap)
        except StorageError as exc:
            log = f"[winslow: the build log could not be read: {exc}]\n".encode()
        files[layout.build_log(name, build.source)] = mask(log)
    return files


def message(plan: Plan, node: str) -> str:
    notes = list(dict.fromkeys(plan.notes)) or [f"{p}: status" for p in sorted(plan.statuses)]
    subject = "; ".join(notes)
    if len(subject) > 120:
        subject = f"{notes[0]} (and {len(notes) - 1} more)"
    body = "\n".join(f"- {n}" for n in notes) if len(notes) > 1 else ""
    return f"{subject}\n\n{body}\n\nNode: {node}".replace("\n\n\n", "\n\n")
