"""Decide: `(world, this node) -> plan`. A pure function: no I/O, no clock.

Every node runs it on the same commit. It folds the node's journal facts into
status, derives each request's standing (`progress.py`), and places the
stages that can start (`placement.py`): only the best-fitting node claims at
once, the k-th ranked one after k grace periods.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Mapping

import logging

from reconciler import layout
from reconciler.clock import seconds_between
from reconciler.facts import Fact
from reconciler.model import (SECRET_MASK, Desired, NodeInfo, Pipeline, Project, ProjectState, RequestProgress, Run,
                              RunState, Stage, Status)
from reconciler.placement import rank, slots
from reconciler.progress import ABORTED, SUPERSEDED, Standing, latest_success, standing
from reconciler.snapshot import ProjectEntry, Snapshot

log = logging.getLogger("winslow.decide")



@dataclass(frozen=True)
class World:
    """What a node knows when it decides; every field is plain data."""

    snapshot: Snapshot
    nodes: Mapping[str, NodeInfo]                 # live nodes, this one included
    now: str                                      # ISO time, for records only
    lost: Mapping[str, str] = field(default_factory=dict)    # lost node -> why
    waited: Mapping[str, float] = field(default_factory=dict)  # "<project>/<run>" -> seconds claimable
    resume_branches: frozenset[str] = frozenset()  # "resume/<project>/<request>" on the remote


@dataclass(frozen=True)
class Me:
    name: str
    local_runs: frozenset[tuple[str, str]] = frozenset()  # (project, run id) alive on this node
    facts: tuple[Fact, ...] = ()
    may_claim: bool = True  # False while the node's heartbeat lease has run out (fenced)


@dataclass(frozen=True)
class Claim:
    project: str
    run: Run
    stage: Stage
    env: Mapping[str, str]


@dataclass(frozen=True)
class Stop:
    project: str
    run_id: str
    reason: str


@dataclass(frozen=True)
class Resume:
    project: str
    request: int
    next_stage: str


@dataclass
class Plan:
    statuses: dict[str, Status] = field(default_factory=dict)
    locks: dict[str, tuple[int, Pipeline]] = field(default_factory=dict)
    finished: list[tuple[str, Run, Fact]] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    stops: list[Stop] = field(default_factory=list)
    resumes: list[Resume] = field(default_factory=list)
    settled: set[tuple[str, str, str]] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # "<project>/<run>" startable but not claimed here
    stale_branches: list[str] = field(default_factory=list)  # resume branches behind their project

    @property
    def commit_needed(self) -> bool:
        return bool(self.statuses or self.locks or self.finished)


@dataclass(frozen=True)
class _Startable:
    project: str
    pipeline: Pipeline
    stage: Stage
    run_id: str
    new_request: RequestProgress | None


def decide(world: World, me: Me) -> Plan:
    plan = Plan()
    first_live = min(world.nodes) if world.nodes else me.name
    facts: dict[str, list[Fact]] = {}
    for fact in me.facts:
        facts.setdefault(fact.project, []).append(fact)
    startable: list[_Startable] = []
    unreadable = {layout.project_of(p.path) for p in world.snapshot.problems
                  if p.path.endswith(("/" + layout.STATUS_FILE, "/" + layout.LOCK_FILE))} - {None}
    for project_id, entry in world.snapshot.projects.items():
        if project_id in unreadable:
            # Reading it as "never started" would run every stage again: leave it for a person.
            plan.settled.update(f.key for f in facts.pop(project_id, []) if f.kind == "started")
            continue
        status = _apply_facts(project_id, entry.status, facts.pop(project_id, []), world, plan)
        if me.name == first_live:
            status = _mark_lost(project_id, status, world)
        status = _mark_vanished(project_id, status, me, world)
        if not entry.exists:
            _stop_local(project_id, status, me, plan, "project deleted")
            if status != entry.status:  # record how its runs ended, so they hold no node's resources
                plan.statuses[project_id] = replace(status, state=ProjectState.IDLE, message="project deleted",
                                                    deleted=status.deleted or world.now)
            continue
        try:
            status, start = _reconcile(entry, status, world, me, plan, first_live)
        except Exception as exc:  # a status written by hand can break any assumption: that project only
            log.exception("%s: cannot reconcile", project_id)
            status, start = replace(status, state=ProjectState.INVALID,
                                    message=f"cannot reconcile (internal error {type(exc).__name__}: {exc})"), None
        plan.statuses[project_id] = status
        if start:
            startable.append(start)
    for orphans in facts.values():
        plan.settled.update(f.key for f in orphans)
    for project_id, run_id in sorted(me.local_runs):
        if project_id not in world.snapshot.projects:  # its folder was deleted
            plan.stops.append(Stop(project_id, run_id, "project deleted"))
    _place(startable, world, me, plan, first_live)
    if me.name == first_live:
        plan.stale_branches = _stale_branches(world)
    for project_id, status in list(plan.statuses.items()):
        before = world.snapshot.projects[project_id].status
        if replace(status, updated=before.updated) == before:
            del plan.statuses[project_id]
        else:
            plan.statuses[project_id] = replace(status, updated=world.now)
    return plan


def _stale_branches(world: World) -> list[str]:
    stale = []
    for branch in sorted(world.resume_branches):
        named = layout.parse_resume_branch(branch)
        entry = world.snapshot.projects.get(named[0]) if named else None
        if named is None or entry is None or named[1] is None or entry.status.observed_request > named[1]:
            stale.append(branch)
    return stale


def _apply_facts(project_id: str, status: Status, facts: list[Fact], world: World, plan: Plan) -> Status:
    for fact in sorted(facts, key=lambda f: f.kind != "started"):
        run = status.run(fact.run_id)
        plan.settled.add(fact.key)
        if run is None or run.state is not RunState.RUNNING:
            continue  # already recorded, or marked LOST by another node: publish nothing from it
        if fact.kind == "started":
            if run.started is None:
                digest = f" ({fact.image_digest[:19]})" if fact.image_digest else ""
                status = status.with_run(run.with_event(fact.time, f"started{digest}",
                                                        started=fact.time, image_digest=fact.image_digest))
                plan.notes.append(f"{project_id}: {run.stage} started on {run.node}")
            continue
        ok = fact.exit_code == 0 and not fact.reason
        ended = f"exited {fact.exit_code}" if fact.exit_code is not None else "did not run"
        message = ended + (f": {fact.reason}" if fact.reason else "")
        state = RunState.LOST if fact.lost else RunState.SUCCEEDED if ok else RunState.FAILED
        run = run.with_event(fact.time, message, state=state,
                             finished=fact.time, exit_code=fact.exit_code, reason=fact.reason,
                             log=layout.log_file(project_id, run.id),
                             result=layout.result_file(project_id, run.id) if fact.manifest is not None else None)
        status = status.with_run(run)
        plan.finished.append((project_id, run, fact))
        plan.notes.append(f"{project_id}: {run.stage} -> {run.state.value}")
    return status


def _mark_lost(project_id: str, status: Status, world: World) -> Status:
    for run in status.active:
        if run.node in world.lost:
            reason = f"node {run.node} lost: {world.lost[run.node]}"
            status = status.with_run(run.with_event(world.now, reason, state=RunState.LOST, finished=world.now,
                                                    reason=reason))
    return status


def _mark_vanished(project_id: str, status: Status, me: Me, world: World) -> Status:
    """A run this node holds in status but has no container for, and no fact about, was lost here."""
    pending = {f.run_id for f in me.facts if f.project == project_id}
    for run in status.active:
        if run.node == me.name and (project_id, run.id) not in me.local_runs and run.id not in pending:
            reason = (f"{me.name} restarted before the stage started" if run.started is None
                      else f"the stage's container vanished from {me.name}")
            status = status.with_run(run.with_event(world.now, reason, state=RunState.LOST, finished=world.now,
                                                    reason=reason))
    return status


def _stop_local(project_id: str, status: Status, me: Me, plan: Plan, reason: str) -> None:
    for pid, run_id in sorted(me.local_runs):
        if pid == project_id:
            plan.stops.append(Stop(project_id, run_id, reason))


def _reconcile(entry: ProjectEntry, status: Status, world: World, me: Me, plan: Plan,
               first_live: str) -> tuple[Status, _Startable | None]:
    project = entry.project
    # Kill local copies that main no longer calls RUNNING (marked LOST elsewhere, or finished twice).
    running_ids = {r.id for r in status.active}
    for pid, run_id in sorted(me.local_runs):
        if pid == entry.id and run_id not in running_ids:
            plan.stops.append(Stop(entry.id, run_id, "no longer RUNNING on main"))
    if project is None:
        errors = tuple(str(p) for p in entry.problems)
        message = "invalid: " + (entry.problems[0].message if entry.problems else "unreadable")
        if status.active:
            message += " (the running stage goes on; nothing new starts)"
        return replace(status, state=ProjectState.INVALID, message=message, errors=errors), None
    status = replace(status, errors=())
    spec = project.run
    if spec.request == 0 and status.observed_request == 0:
        return replace(status, state=ProjectState.IDLE, message="not started (bump run.request to start)"), None
    if spec.request > status.observed_request:
        return _new_request(entry, project, status, world, me, plan, first_live)
    if status.request is None or entry.lock is None:
        return replace(status, state=ProjectState.IDLE, message="no request observed"), None
    for run in status.active:
        if run.request < status.observed_request and run.node == me.name:
            plan.stops.append(Stop(entry.id, run.id, f"{SUPERSEDED} by request {status.observed_request}"))
    return _continue(entry, project, status, entry.lock, world, me, plan, first_live)


def _new_request(entry: ProjectEntry, project: Project, status: Status, world: World, me: Me, plan: Plan,
                 first_live: str) -> tuple[Status, _Startable | None]:
    pipeline = world.snapshot.pipelines.get(project.pipeline)
    if pipeline is None:  # read_project guarantees it for a new request; kept for safety
        return replace(status, state=ProjectState.INVALID, message=f"pipeline '{project.pipeline}' missing"), None
    spec = project.run
    progress = RequestProgress(number=spec.request, from_stage=spec.from_stage or pipeline.stages[0].name,
                               until=spec.until or pipeline.stages[-1].name, step=spec.step, since=world.now,
                               env=project.env)
    observed = replace(status, observed_request=spec.request, request=progress, state=ProjectState.RUNNING,
                       message=f"request {spec.request} observed")
    busy = status.active
    for run in busy:
        if run.node == me.name:
            plan.stops.append(Stop(entry.id, run.id, f"{SUPERSEDED} by request {spec.request}"))
    start = None
    if spec.state is Desired.RUNNING and not busy:
        stage = pipeline.stage(progress.from_stage)
        assert stage is not None
        start = _Startable(entry.id, pipeline, stage, _next_id(status, spec.request, stage.name), progress)
    continued, start = _continue(entry, project, observed, pipeline, world, me, plan, first_live, new=start)
    if me.name == first_live:
        # The first live node records the request even when nobody can start it yet.
        plan.locks[entry.id] = (spec.request, pipeline)
        plan.notes.append(f"{entry.id}: request {spec.request} observed")
        return continued, start
    return status, start


def _continue(entry: ProjectEntry, project: Project, status: Status, pipeline: Pipeline, world: World, me: Me,
              plan: Plan, first_live: str, new: _Startable | None = None) -> tuple[Status, _Startable | None]:
    assert status.request is not None
    spec = project.run
    here = standing(status.request, status.runs, pipeline)
    if spec.state is Desired.ABORTED:
        for run in status.active:
            if run.node == me.name:
                plan.stops.append(Stop(entry.id, run.id, ABORTED))
        if status.active:
            return replace(status, state=ProjectState.RUNNING, message="aborting the running stage"), None
        if here.state is not ProjectState.SUCCEEDED:
            return replace(status, state=ProjectState.FAILED, message="aborted by request"), None
    if status.active:
        paused = " (pausing after it)" if spec.state is Desired.PAUSED else ""
        return replace(status, state=ProjectState.RUNNING, message=here.message + paused), None
    if here.state is ProjectState.WAITING:
        return _waiting(entry, status, pipeline, here, world, plan), None
    if here.next is None:
        return replace(status, state=here.state, message=here.message), None
    if spec.state is Desired.PAUSED:
        return replace(status, state=ProjectState.PAUSED, message=f"paused; {here.next} is next"), None
    stage = pipeline.stage(here.next)
    assert stage is not None
    before = pipeline.before(stage.name)
    if before is not None and latest_success(status.runs, before.name) is None:
        return replace(status, state=ProjectState.FAILED,
                       message=f"cannot start {stage.name}: stage {before.name} has no successful run to take input from"), None
    status = replace(status, state=ProjectState.RUNNING, message=here.message)
    return status, new or _Startable(entry.id, pipeline, stage, _next_id(status, status.request.number, stage.name), None)


def _waiting(entry: ProjectEntry, status: Status, pipeline: Pipeline, here: Standing, world: World,
             plan: Plan) -> Status:
    assert status.request is not None and here.gate_next
    gated = status.runs[-1] if status.runs else None
    since = status.request.waiting_since or world.now
    stage = pipeline.stage(gated.stage) if gated else None
    if stage and stage.gate_timeout is not None and (seconds_between(since, world.now) or 0.0) > stage.gate_timeout:
        return replace(status, state=ProjectState.FAILED, message=f"gate after {stage.name} was not approved in time")
    branch = layout.resume_branch(entry.id, status.request.number)
    if branch not in world.resume_branches:
        plan.resumes.append(Resume(entry.id, status.request.number, here.gate_next))
    message = here.message + f" — merge branch {branch} or run: winslow approve {entry.id}"
    return replace(status, state=ProjectState.WAITING, message=message,
                   request=replace(status.request, waiting_since=since, next=here.gate_next))


def _next_id(status: Status, request: int, stage: str) -> str:
    attempt = 1 + sum(1 for r in status.runs if r.request == request and r.stage == stage)
    return Run.make_id(request, stage, attempt)


def _place(startable: list[_Startable], world: World, me: Me, plan: Plan, first_live: str) -> None:
    """Simulate the same placement every node computes, and claim what falls to this node."""
    running = [r for pid, entry in world.snapshot.projects.items()
               for r in plan.statuses.get(pid, entry.status).active]
    free = slots(world.nodes, running, world.snapshot.config)
    for item in startable:
        ranking = rank(item.stage, free)
        if not ranking:
            if me.name == first_live:  # one writer, or nodes with different views would take turns
                _note_unplaceable(item, plan, world)
            continue
        position = ranking.index(me.name) if me.name in ranking else -1
        waited = world.waited.get(f"{item.project}/{item.run_id}", 0.0)
        chosen = ranking[0]
        if position > 0 and waited >= position * world.snapshot.config.grace:
            chosen = me.name
        free[chosen], gpus = free[chosen].take(item.stage)
        if chosen == me.name and me.may_claim:
            _claim(item, gpus, world, me, plan)
        else:
            plan.waiting.append(f"{item.project}/{item.run_id}")


def _note_unplaceable(item: _Startable, plan: Plan, world: World) -> None:
    status = plan.statuses.get(item.project, world.snapshot.projects[item.project].status)
    need = item.stage.resources
    wanted = f"{need.gpus} GPU(s), {need.cpus:g} CPU(s), {need.memory // 2**20} MiB"
    if item.stage.node_tags:
        wanted += f", tags {', '.join(item.stage.node_tags)}"
    message = f"{item.stage.name} waits for a free node with {wanted}"
    observed = item.new_request is None or status.observed_request >= item.new_request.number
    if status.message != message and observed:
        plan.statuses[item.project] = replace(status, message=message)


def _claim(item: _Startable, gpus: tuple[int, ...], world: World, me: Me, plan: Plan) -> None:
    entry = world.snapshot.projects[item.project]
    status = plan.statuses.get(item.project, entry.status)
    pipeline = item.pipeline
    if item.new_request is not None and status.observed_request < item.new_request.number:
        status = replace(status, observed_request=item.new_request.number, request=item.new_request)
        plan.locks[item.project] = (item.new_request.number, pipeline)
    assert status.request is not None
    before = pipeline.before(item.stage.name)
    source = latest_success(status.runs, before.name) if before else None
    env = {**pipeline.env, **item.stage.env, **status.request.env}
    recorded = {**env, **{name: SECRET_MASK for name in item.stage.secrets}}
    request, _, attempt = item.run_id.rpartition("-")
    events = [f"claimed by {me.name}"] + ([f"GPU {', '.join(map(str, gpus))} assigned"] if gpus else [])
    run = Run(id=item.run_id, request=status.request.number, stage=item.stage.name, attempt=int(attempt),
              state=RunState.RUNNING, node=me.name, gpus=gpus, cpus=item.stage.resources.cpus,
              memory=item.stage.resources.memory, claimed=world.now, image=item.stage.image, env=recorded,
              workspace=layout.workspace(item.project, item.run_id), input=source.workspace if source else None)
    for message in events:
        run = run.with_event(world.now, message)
    status = replace(status.with_run(run), state=ProjectState.RUNNING,
                     message=f"{item.stage.name} running on {me.name}")
    status = replace(status, request=replace(status.request, next=None, waiting_since=None))
    plan.statuses[item.project] = status
    plan.claims.append(Claim(item.project, run, item.stage, env))
    plan.notes.append(f"{item.project}: {item.stage.name} -> RUNNING on {me.name}")
