"""Where a request stands, derived from its runs: the lifecycle rules in one place.

Status records facts (runs and how they ended); what happens next is always
computed from them, so a status written by any node, at any time, leads
every node to the same next step.
"""
from __future__ import annotations

from dataclasses import dataclass

from reconciler.model import Pipeline, ProjectState, RequestProgress, Run, RunState

ABORTED = "aborted"
SUPERSEDED = "superseded"


@dataclass(frozen=True)
class Standing:
    """The request's position: what state it is in and which stage comes next."""

    state: ProjectState
    message: str
    next: str | None = None       # the stage to start now (None: nothing to start)
    gate_next: str | None = None  # WAITING: the stage a resume would start


def attempts(runs: tuple[Run, ...], request: int, stage: str) -> list[Run]:
    return [r for r in runs if r.request == request and r.stage == stage]


def latest_success(runs: tuple[Run, ...], stage: str) -> Run | None:
    """The newest SUCCEEDED run of a stage, in any request: the input of the stage after it."""
    return next((r for r in reversed(runs) if r.stage == stage and r.state is RunState.SUCCEEDED), None)


def standing(progress: RequestProgress, runs: tuple[Run, ...], pipeline: Pipeline) -> Standing:
    mine = [r for r in runs if r.request == progress.number]
    if not mine:
        return Standing(ProjectState.RUNNING, f"starting {progress.from_stage}", next=progress.from_stage)
    last = mine[-1]
    stage = pipeline.stage(last.stage)
    if last.state is RunState.RUNNING:
        if last.queued:  # claimed, and waiting in its executor's queue (a Slurm job PENDING): not running yet
            return Standing(ProjectState.PENDING, f"{last.stage} is {last.queued}")
        return Standing(ProjectState.RUNNING, f"{last.stage} running on {last.node}")
    if stage is None:
        return Standing(ProjectState.FAILED, f"stage '{last.stage}' is not in the locked pipeline")
    if last.state is RunState.SUCCEEDED:
        following = pipeline.after(last.stage)
        if last.stage == progress.until or following is None:
            return Standing(ProjectState.SUCCEEDED, f"{last.stage} succeeded; request {progress.number} is done")
        if stage.pause_after or progress.step:
            why = "gate" if stage.pause_after else "step mode"
            return Standing(ProjectState.WAITING, f"{last.stage} succeeded; waiting for approval ({why}) "
                            f"to continue with {following.name}", gate_next=following.name)
        return Standing(ProjectState.RUNNING, f"{last.stage} succeeded; starting {following.name}", next=following.name)
    tries = attempts(runs, progress.number, last.stage)
    if last.state is RunState.LOST:
        lost = sum(1 for r in tries if r.state is RunState.LOST)
        if lost <= stage.lost_retries:
            return Standing(ProjectState.RUNNING, f"{last.stage} lost ({last.reason}); retrying "
                            f"({lost} of {stage.lost_retries} lost retries used)", next=last.stage)
        return Standing(ProjectState.FAILED, f"{last.stage} lost and out of lost retries: {last.reason}")
    if last.reason in (ABORTED, SUPERSEDED) or (last.reason or "").startswith(SUPERSEDED):
        return Standing(ProjectState.FAILED, f"{last.stage} {last.reason}")
    failed = sum(1 for r in tries if r.state is RunState.FAILED)
    if failed <= stage.retries:
        return Standing(ProjectState.RUNNING, f"{last.stage} failed ({_why(last)}); retrying "
                        f"({failed} of {stage.retries} retries used)", next=last.stage)
    return Standing(ProjectState.FAILED, f"{last.stage} failed: {_why(last)}")


def _why(run: Run) -> str:
    if run.reason:
        return run.reason
    return f"exit code {run.exit_code}" if run.exit_code is not None else "unknown reason"
