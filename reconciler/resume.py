"""The resume branch: a proposed commit that continues a project waiting at a gate.

It changes only `run:` in project.yaml (a new request starting at the next
stage), so merging it, as a merge request or with `winslow approve`, is the
approval, and the merge is the record of who approved and when.
"""
from __future__ import annotations

import logging

from reconciler import layout
from reconciler.decide import Resume
from reconciler.edit import set_fields
from reconciler.errors import GitError, WinslowError
from reconciler.gitsync import Mirror

log = logging.getLogger("winslow.resume")


def resume_commit(repo: Mirror, tip: str, resume: Resume) -> str | None:
    path = layout.project_file(resume.project)
    current = repo.reader.read(tip, path)
    if current is None:
        return None
    text = set_fields(current.decode("utf-8"), ("run",),
                      {"request": resume.request + 1, "from": resume.next_stage, "state": "running"})
    message = (f"{resume.project}: approve the gate, continue at {resume.next_stage} (request {resume.request + 1})\n\n"
               f"Merge this branch to resume {resume.project} after request {resume.request}.")
    return repo.commit(tip, {path: text.encode("utf-8")}, message)


def push_resume(repo: Mirror, tip: str, resume: Resume) -> None:
    branch = layout.resume_branch(resume.project, resume.request)
    try:
        commit = resume_commit(repo, tip, resume)
        if commit is None:
            return
        repo.push_branch(branch, commit)
        log.info("%s: proposed %s", resume.project, branch)
    except GitError as exc:
        log.info("%s: could not push %s (%s); another node may have", resume.project, branch, exc)
    except WinslowError as exc:
        log.warning("%s: cannot prepare %s: %s", resume.project, branch, exc)


def prune_branches(repo: Mirror, branches: list[str]) -> None:
    """Delete resume branches of requests that are behind the project: merging one now would go back."""
    try:
        repo.push([f":refs/heads/{branch}" for branch in branches])
        for branch in branches:
            repo.set_tracking_ref(layout.ORIGIN + branch, None)
        log.info("deleted stale %s", ", ".join(branches))
    except GitError as exc:
        log.info("could not delete %s (%s)", ", ".join(branches), exc)
