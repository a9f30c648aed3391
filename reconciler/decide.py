"""Decide: `(world, this node) -> plan`. A pure function: no I/O, no clock.

Every node runs it on the same commit. Each project is reconciled on its own
into a frozen `Outcome` (its new status, the local runs to stop, the stage it
could start, a resume branch to propose, a pipeline to lock); a project that
breaks the rules breaks only its own outcome. The stages that can start are
then placed (`placement.py`): only the best-fitting node claims at once, the
k-th ranked one after k grace periods. `decide` folds the outcomes into one
`Plan`, which the node turns into a single commit (`report.py`).

Where a request stands is derived from its runs (`progress.py`).
"""
from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from reconciler import layout
from reconciler.buildplan import BUILDS_PROJECT, BuildClaim, blocked, digest, plan_builds
from reconciler.clock import add_seconds, seconds_between
from reconciler.facts import EXITED, LISTED, QUEUED, STARTED, Fact
from reconciler.model import (
    QUEUED_IN,
    SECRET_MASK,
    Build,
    Desired,
    InputFile,
    NodeInfo,
    Pipeline,
    Project,
    ProjectState,
    RequestProgress,
    Run,
    RunState,
    Stage,
    Status,
    image_repository,
)
from reconciler.placement import rank, slots
from reconciler.progress import ABORTED, SUPERSEDED, Standing, latest_success, standing
from reconciler.snapshot import ProjectEntry, Snapshot

log = logging.getLogger("winslow.decide")

FactKey = tuple[str, str, str]
INPUT_RECHECK_S = 5.0  # how often a stage that waits for an input looks for it again


@dataclass(frozen=True)
class World:
    """What a node knows when it decides; every field is plain data."""

    snapshot: Snapshot
    nodes: Mapping[str, NodeInfo]                 # live nodes, this one included
    now: str                                      # ISO time, for records only
    lost: Mapping[str, str] = field(default_factory=dict)    # lost node -> why
    waited: Mapping[str, float] = field(default_factory=dict)  # "<project>/<run>" -> seconds claimable
    resume_branches: frozenset[str] = frozenset()  # "resume/<project>/<request>" on the remote
    # Whether a path under resources/ exists in the shared storage; None: inputs are not checked.
    has_input: Callable[[str], bool] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Me:
    name: str
    local_runs: frozenset[tuple[str, str]] = frozenset()  # (project, run id) alive on this node
    facts: tuple[Fact, ...] = ()
    may_claim: bool = True  # False while the node's heartbeat lease has run out (fenced)
    images: bool = True  # its executor runs the stage's image (the process executor does not)
    local_builds: frozenset[str] = frozenset()  # "<image>/<source>" this node is building now


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


@dataclass(frozen=True)
class Startable:
    """A stage a project could start now, before placement says which node takes it."""

    project: str
    pipeline: Pipeline
    stage: Stage
    run_id: str
    new_request: RequestProgress | None  # set when this start is also the request's first observation


@dataclass(frozen=True)
class Outcome:
    """What reconciling one project decided; `decide` folds them into the plan."""

    project: str
    status: Status | None = None                 # None: nothing to write
    stops: tuple[Stop, ...] = ()
    start: Startable | None = None
    resume: Resume | None = None
    lock: tuple[int, Pipeline] | None = None
    finished: tuple[tuple[Run, Fact], ...] = ()  # runs that ended, with the fact that says how
    settled: frozenset[FactKey] = frozenset()    # journal facts this outcome publishes (or drops)
    notes: tuple[str, ...] = ()
    claim: Claim | None = None                   # placement: this node claims the start
    waiting: str | None = None                   # placement: "<project>/<run>" startable, not claimed here
    due: str | None = None                       # when time alone changes the decision (a gate timing out)

    def quiet(self, before: Status) -> bool:
        """Nothing to do and nothing to write: it stays so until the project's files or facts change."""
        return (not (self.stops or self.start or self.resume or self.lock or self.finished or self.settled
                     or self.claim or self.waiting or self.due)
                and (self.status is None or replace(self.status, updated=before.updated) == before))


@dataclass(frozen=True)
class Plan:
    """Everything one cycle of one node does, folded from the projects' outcomes."""

    statuses: dict[str, Status] = field(default_factory=dict)
    locks: dict[str, tuple[int, Pipeline]] = field(default_factory=dict)
    finished: list[tuple[str, Run, Fact]] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    stops: list[Stop] = field(default_factory=list)
    resumes: list[Resume] = field(default_factory=list)
    settled: set[FactKey] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # "<project>/<run>" startable but not claimed here
    stale_branches: list[str] = field(default_factory=list)  # resume branches behind their project
    quiet: frozenset[str] = frozenset()  # projects with nothing to do: see `decide`'s `quiet`
    due: str | None = None  # the earliest time at which time alone changes a decision
    builds: dict[str, tuple[Build, ...]] = field(default_factory=dict)  # builds/NAME.yaml to write
    build_claims: list[BuildClaim] = field(default_factory=list)  # images this node builds now
    built: list[tuple[str, Build]] = field(default_factory=list)  # builds that ended: their logs land

    @property
    def commit_needed(self) -> bool:
        return bool(self.statuses or self.locks or self.finished or self.builds)


@dataclass(frozen=True)
class _Cycle:
    """The inputs every project's reconcile shares."""

    world: World
    me: Me
    leads: bool  # this node is the first live node: it records what nobody may claim, and marks lost nodes

    @property
    def now(self) -> str:
        return self.world.now


def leader(world: World, me: str) -> str:
    """The first live node whose cycles work: the one that records what nobody may claim.

    A node whose cycles keep failing (its heartbeat says `degraded`) is alive but never leads,
    so one broken node cannot stop what only the leader does.
    """
    healthy = [name for name, info in world.nodes.items() if not info.degraded]
    return min(healthy) if healthy else me


def decide(world: World, me: Me, quiet: frozenset[str] = frozenset()) -> Plan:
    """The plan of this node for this cycle.

    `quiet` names projects whose last outcome was quiet and whose files, facts and local
    runs have not changed since, with the same live nodes, lost nodes, leader and resume
    branches: their outcome would be quiet again, so they are not reconciled (the node
    keeps this set; `Plan.quiet` is the next one). Their runs still count for placement.
    """
    cycle = _Cycle(world, me, leads=me.name == leader(world, me.name))
    facts: dict[str, list[Fact]] = {}
    for fact in me.facts:
        facts.setdefault(fact.project, []).append(fact)
    built = facts.pop(BUILDS_PROJECT, [])
    local = {project for project, _ in me.local_runs}
    skip = quiet - facts.keys() - local
    unreadable = {layout.project_of(p.path) for p in world.snapshot.problems
                  if p.path.endswith(("/" + layout.STATUS_FILE, "/" + layout.LOCK_FILE))}
    outcomes = [_project(cycle, entry, facts.pop(project_id, []), project_id in unreadable)
                for project_id, entry in world.snapshot.projects.items() if project_id not in skip]
    orphans = frozenset(f.key for orphaned in facts.values() for f in orphaned)
    deleted = tuple(Stop(project_id, run_id, "project deleted") for project_id, run_id in sorted(me.local_runs)
                    if project_id not in world.snapshot.projects)  # its folder is gone, status and all
    placed = _place(cycle, outcomes, skip)
    stale = _stale_branches(world) if cycle.leads else []
    plan = _fold(world, outcomes + placed, orphans, deleted, stale)
    placed_projects = {o.project for o in placed}
    still = frozenset(o.project for o in outcomes if o.project not in placed_projects
                      and o.quiet(world.snapshot.projects[o.project].status))
    due = min((o.due for o in outcomes + placed if o.due), default=None)
    mine = world.nodes.get(me.name)
    settings = world.snapshot.config.nodes.get(me.name)
    may_build = (me.images and me.may_claim and not (mine is not None and mine.degraded)
                 and not (settings is not None and settings.drain))
    builds = plan_builds(world.snapshot, world.nodes, me.name, built, world.now, may_build, me.local_builds)
    plan.settled.update(builds.settled)
    return replace(plan, quiet=still | (skip & world.snapshot.projects.keys()), due=due, builds=builds.records,
                   build_claims=builds.claims, built=builds.finished, notes=plan.notes + builds.notes)


def _fold(world: World, outcomes: Iterable[Outcome], orphans: frozenset[FactKey], deleted: tuple[Stop, ...],
          stale: list[str]) -> Plan:
    plan = Plan(settled=set(orphans), stale_branches=stale)
    for outcome in outcomes:
        if outcome.status is not None:
            plan.statuses[outcome.project] = outcome.status
        if outcome.lock is not None:
            plan.locks[outcome.project] = outcome.lock
        plan.finished.extend((outcome.project, run, fact) for run, fact in outcome.finished)
        plan.stops.extend(outcome.stops)
        plan.settled.update(outcome.settled)
        plan.notes.extend(outcome.notes)
        if outcome.resume is not None:
            plan.resumes.append(outcome.resume)
        if outcome.claim is not None:
            plan.claims.append(outcome.claim)
        if outcome.waiting is not None:
            plan.waiting.append(outcome.waiting)
    plan.stops.extend(deleted)
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


# -- one project ---------------------------------------------------------------------------------

def _project(cycle: _Cycle, entry: ProjectEntry, facts: list[Fact], unreadable: bool) -> Outcome:
    if not layout.is_safe_id(entry.id):  # `..`, `.git`: INVALID to validate, and nothing is written for it
        return Outcome(entry.id)
    if unreadable:
        # Reading it as "never started" would run every stage again: leave it for a person.
        return Outcome(entry.id, settled=frozenset(f.key for f in facts if f.kind in (QUEUED, STARTED)))
    reported = _apply_facts(entry.id, entry.status, facts, cycle.now)
    status = reported.status or entry.status
    # Any node marks a lost node's runs: recovery must not wait on one node (the push is a compare-and-swap).
    status = _mark_lost(status, cycle.world)
    status = _mark_vanished(entry.id, status, cycle.me, cycle.now)
    if not entry.exists:
        stops = _local_stops(entry.id, cycle.me, "project deleted")
        if status == entry.status:
            return replace(reported, status=None, stops=stops)
        # Record how its runs ended, so they hold no node's resources.
        return replace(reported, stops=stops, status=replace(status, state=ProjectState.IDLE, message="project deleted",
                                                            deleted=status.deleted or cycle.now))
    try:
        decided = _reconcile(cycle, entry, status)
    except Exception as exc:  # a status written by hand can break any assumption: that project only
        log.exception("%s: cannot reconcile", entry.id)
        decided = Outcome(entry.id, status=replace(status, state=ProjectState.INVALID,
                                                   message=f"cannot reconcile (internal error "
                                                           f"{type(exc).__name__}: {exc})"))
    return replace(decided, finished=reported.finished, settled=reported.settled,
                   notes=reported.notes + decided.notes)


def _apply_facts(project_id: str, status: Status, facts: list[Fact], now: str) -> Outcome:
    """Fold this node's journal facts into status: queued, started, exited, then listed (the result manifest)."""
    order = {QUEUED: 0, STARTED: 1, EXITED: 2, LISTED: 3}
    finished: list[tuple[Run, Fact]] = []
    settled: set[FactKey] = set()
    notes: list[str] = []
    for fact in sorted(facts, key=lambda f: (order.get(f.kind, 4), f.time if f.kind == QUEUED else "")):
        run = status.run(fact.run_id)
        if fact.kind == LISTED:
            if run is not None and run.state is RunState.RUNNING:
                continue  # its exit is not on main yet: keep the listing until it is
            settled.add(fact.key)
            if run is not None and run.result is None and fact.manifest is not None:
                run = run.with_event(fact.time, _listed(fact.manifest), result=layout.result_file(project_id, run.id))
                status = status.with_run(run)
                finished.append((run, fact))
            continue
        settled.add(fact.key)
        if run is None or run.state is not RunState.RUNNING:
            continue  # already recorded, or marked LOST by another node: publish nothing from it
        read = tuple(InputFile.from_dict(f) for f in fact.inputs) or run.inputs  # recorded by whichever came first
        if fact.kind == QUEUED:
            if run.started is None and fact.reason and _news_of_queue(run, fact):
                status = status.with_run(run.with_event(fact.time, fact.reason, inputs=read))
                notes.append(f"{project_id}: {run.stage} {fact.reason}")
            continue
        if fact.kind == STARTED:
            if run.started is None:
                digest = f" ({fact.image_digest[:19]})" if fact.image_digest else ""
                if fact.pulled:
                    run = run.with_event(fact.time, fact.pulled)
                status = status.with_run(run.with_event(fact.time, f"started{digest}",
                                                        started=fact.time, image_digest=fact.image_digest,
                                                        inputs=read))
                notes.append(f"{project_id}: {run.stage} started on {run.node}")
            continue
        run = _ended(project_id, run, fact)
        status = status.with_run(run)
        finished.append((run, fact))
        notes.append(f"{project_id}: {run.stage} -> {run.state.value}")
    changed = status if (finished or notes) else None
    return Outcome(project_id, status=changed, finished=tuple(finished), settled=frozenset(settled), notes=tuple(notes))


def _news_of_queue(run: Run, fact: Fact) -> bool:
    """A QUEUED fact says something the run's events do not: a reason other than its last, and no older than it."""
    if run.queued == fact.reason:
        return False
    last = next((e for e in reversed(run.events) if e.message.startswith(QUEUED_IN)), None)
    return last is None or (seconds_between(last.time, fact.time) or 0.0) > 0.0


def _ended(project_id: str, run: Run, fact: Fact) -> Run:
    ok = fact.exit_code == 0 and not fact.reason
    ended = f"exited {fact.exit_code}" if fact.exit_code is not None else "did not run"
    message = ended + (f": {fact.reason}" if fact.reason else "")
    state = RunState.LOST if fact.lost else RunState.SUCCEEDED if ok else RunState.FAILED
    return run.with_event(fact.time, message, state=state, finished=fact.time, exit_code=fact.exit_code,
                          reason=fact.reason or exit_reason(fact.exit_code), log=layout.log_file(project_id, run.id),
                          result=layout.result_file(project_id, run.id) if fact.manifest is not None else None)


def exit_reason(code: int | None) -> str | None:
    """Why a run that reported no reason of its own ended as it did: every ending has a reason."""
    if code is None:
        return "the stage did not run"
    if code == 0:
        return None
    if 128 < code < 128 + 65:  # a shell's or Docker's report of a death by signal
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = f"signal {code - 128}"
        hint = " (often the kernel's out-of-memory killer)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}: exit code {code}"
    return f"the program exited with code {code}"


def _listed(manifest: Mapping[str, object]) -> str:
    files = manifest.get("files")
    count = len(files) if isinstance(files, list) else 0
    unlisted = manifest.get("unlisted")
    skipped = f", {len(unlisted)} could not be listed" if isinstance(unlisted, list) and unlisted else ""
    links = manifest.get("links")
    linked = f", {_count(len(links), 'symbolic link')} (not followed)" if isinstance(links, list) and links else ""
    return f"results listed: {_count(count, 'file')}{linked}{skipped}"


def _mark_lost(status: Status, world: World) -> Status:
    for run in status.active:
        if run.node is not None and run.node in world.lost:
            reason = f"node {run.node} lost: {world.lost[run.node]}"
            status = status.with_run(run.with_event(world.now, reason, state=RunState.LOST, finished=world.now,
                                                    reason=reason))
    return status


def _mark_vanished(project_id: str, status: Status, me: Me, now: str) -> Status:
    """A run this node holds in status but has no container for, and no fact about, was lost here."""
    pending = {f.run_id for f in me.facts if f.project == project_id}
    for run in status.active:
        if run.node == me.name and (project_id, run.id) not in me.local_runs and run.id not in pending:
            reason = (f"{me.name} restarted before the stage started" if run.started is None
                      else f"the stage's container vanished from {me.name}")
            status = status.with_run(run.with_event(now, reason, state=RunState.LOST, finished=now, reason=reason))
    return status


def _local_stops(project_id: str, me: Me, reason: str, keep: Iterable[str] = ()) -> tuple[Stop, ...]:
    """Stops for this node's runs of the project, but those in `keep`."""
    kept = set(keep)
    return tuple(Stop(project_id, run_id, reason) for pid, run_id in sorted(me.local_runs)
                 if pid == project_id and run_id not in kept)


def _reconcile(cycle: _Cycle, entry: ProjectEntry, status: Status) -> Outcome:
    project = entry.project
    # Kill local copies that main no longer calls RUNNING (marked LOST elsewhere, or finished twice).
    orphaned = _local_stops(entry.id, cycle.me, "no longer RUNNING on main", keep=(r.id for r in status.active))
    if project is None:
        errors = tuple(str(p) for p in entry.problems)
        message = "invalid: " + (entry.problems[0].message if entry.problems else "unreadable")
        if status.active:
            message += " (the running stage goes on; nothing new starts)"
        return Outcome(entry.id, replace(status, state=ProjectState.INVALID, message=message, errors=errors),
                       stops=orphaned)
    status = replace(status, errors=())
    spec = project.run
    if spec.request == 0 and status.observed_request == 0:
        decided = Outcome(entry.id, replace(status, state=ProjectState.IDLE,
                                            message="not started (bump run.request to start)"))
    elif spec.request > status.observed_request:
        decided = _new_request(cycle, entry, project, status)
    elif status.request is None or entry.lock is None:
        decided = Outcome(entry.id, replace(status, state=ProjectState.IDLE, message="no request observed"))
    else:
        superseded = tuple(Stop(entry.id, run.id, f"{SUPERSEDED} by request {status.observed_request}")
                           for run in status.active
                           if run.request < status.observed_request and run.node == cycle.me.name)
        decided = _continue(cycle, entry, project, status, entry.lock)
        decided = replace(decided, stops=superseded + decided.stops)
    return replace(decided, stops=orphaned + decided.stops)


def observe(status: Status, progress: RequestProgress) -> Status:
    """The one place a request is marked observed (like Kubernetes' observedGeneration)."""
    return replace(status, observed_request=progress.number, request=progress)


def _new_request(cycle: _Cycle, entry: ProjectEntry, project: Project, status: Status) -> Outcome:
    pipeline = cycle.world.snapshot.pipelines.get(project.pipeline)
    if pipeline is None:  # read_project guarantees it for a new request; kept for safety
        return Outcome(entry.id, replace(status, state=ProjectState.INVALID,
                                         message=f"pipeline '{project.pipeline}' missing"))
    # The request runs the images built from images/ as they are now, whatever changes there later.
    pipeline = pipeline.stamped(cycle.world.snapshot.image_sources, cycle.world.snapshot.commit)
    spec = project.run
    progress = RequestProgress(number=spec.request, from_stage=spec.from_stage or pipeline.stages[0].name,
                               until=spec.until or pipeline.stages[-1].name, step=spec.step, since=cycle.now,
                               env=project.env)
    observed = replace(observe(status, progress), state=ProjectState.RUNNING if status.active else ProjectState.PENDING,
                       message=f"request {spec.request} observed")
    busy = status.active
    stops = tuple(Stop(entry.id, run.id, f"{SUPERSEDED} by request {spec.request}")
                  for run in busy if run.node == cycle.me.name)
    first = None
    if spec.state is Desired.RUNNING and not busy:
        stage = pipeline.stage(progress.from_stage)
        assert stage is not None
        first = Startable(entry.id, pipeline, stage, _next_id(status, spec.request, stage.name), progress)
    continued = _continue(cycle, entry, project, observed, pipeline, new=first)
    continued = replace(continued, stops=stops + continued.stops)
    if cycle.leads and continued.start is None:
        # Nothing to start (paused, busy, or it cannot): the first live node records the request now.
        return replace(continued, lock=(spec.request, pipeline),
                       notes=continued.notes + (f"{entry.id}: request {spec.request} observed",))
    # A stage can start: its claimer records the request with the claim (placement), or the first live
    # node does once nobody can or will take it. Until then the status stays as it was.
    return replace(continued, status=status)


def _continue(cycle: _Cycle, entry: ProjectEntry, project: Project, status: Status, pipeline: Pipeline,
              new: Startable | None = None) -> Outcome:
    assert status.request is not None
    spec = project.run
    here = standing(status.request, status.runs, pipeline)
    if spec.state is Desired.ABORTED:
        stops = tuple(Stop(entry.id, run.id, ABORTED) for run in status.active if run.node == cycle.me.name)
        if status.active:
            return Outcome(entry.id, replace(status, state=ProjectState.RUNNING, message="aborting the running stage"),
                           stops=stops)
        if here.state is not ProjectState.SUCCEEDED:
            return Outcome(entry.id, replace(status, state=ProjectState.FAILED,
                                             message=spec.reason or "aborted by request"))
    if status.active:
        paused = " (pausing after it)" if spec.state is Desired.PAUSED else ""
        # Claimed and waiting in its executor's queue (a Slurm job PENDING) is PENDING, with the queue's reason.
        state = ProjectState.PENDING if here.state is ProjectState.PENDING else ProjectState.RUNNING
        return Outcome(entry.id, replace(status, state=state, message=here.message + paused))
    if here.state is ProjectState.WAITING:
        return _waiting(cycle, entry, status, pipeline, here)
    if here.next is None:
        return Outcome(entry.id, replace(status, state=here.state, message=here.message))
    if spec.state is Desired.PAUSED:
        return Outcome(entry.id, replace(status, state=ProjectState.PAUSED, message=f"paused; {here.next} is next",
                                         request=replace(status.request, next=here.next)))
    stage = pipeline.stage(here.next)
    assert stage is not None
    before = pipeline.before(stage.name)
    if before is not None and latest_success(status.runs, before.name) is None:
        return Outcome(entry.id, replace(status, state=ProjectState.FAILED,
                                         message=f"cannot start {stage.name}: stage {before.name} has no successful "
                                                 f"run to take input from"))
    start = new or Startable(entry.id, pipeline, stage, _next_id(status, status.request.number, stage.name), None)
    # Wanted, not placed: PENDING until a node claims it (the claim makes it RUNNING).
    return Outcome(entry.id, replace(status, state=ProjectState.PENDING, message=here.message), start=start)


def _waiting(cycle: _Cycle, entry: ProjectEntry, status: Status, pipeline: Pipeline, here: Standing) -> Outcome:
    assert status.request is not None and here.gate_next
    gated = status.runs[-1] if status.runs else None
    since = status.request.waiting_since or cycle.now
    stage = pipeline.stage(gated.stage) if gated else None
    due = None
    if stage and stage.gate_timeout is not None:
        if (seconds_between(since, cycle.now) or 0.0) > stage.gate_timeout:
            return Outcome(entry.id, replace(status, state=ProjectState.FAILED,
                                             message=f"gate after {stage.name} was not approved in time"))
        due = add_seconds(since, stage.gate_timeout)
    branch = layout.resume_branch(entry.id, status.request.number)
    resume = None
    proposed = status.request.proposed
    if branch in cycle.world.resume_branches:
        proposed = True
    elif proposed:  # it was there and is gone unmerged (an approval merges it in the same push): a rejection
        return Outcome(entry.id, replace(status, state=ProjectState.FAILED,
                                         message=f"rejected: branch {branch} was deleted without being merged",
                                         request=replace(status.request, next=None)))
    else:
        resume = Resume(entry.id, status.request.number, here.gate_next)
    message = here.message + f" — merge branch {branch} or run: winslow approve {entry.id}"
    return Outcome(entry.id, replace(status, state=ProjectState.WAITING, message=message,
                                     request=replace(status.request, waiting_since=since, next=here.gate_next,
                                                     proposed=proposed)),
                   resume=resume, due=due)


def _next_id(status: Status, request: int, stage: str) -> str:
    attempt = 1 + sum(1 for r in status.runs if r.request == request and r.stage == stage)
    return Run.make_id(request, stage, attempt)


# -- placement -------------------------------------------------------------------------------------

def _place(cycle: _Cycle, outcomes: list[Outcome], skipped: frozenset[str]) -> list[Outcome]:
    """Simulate the same placement every node computes; claim what falls to this node.

    Returns one more outcome per startable stage: the claim (or the note that it waits);
    its status replaces the project's status from reconciling.
    """
    world, me = cycle.world, cycle.me
    statuses = {o.project: o.status or world.snapshot.projects[o.project].status for o in outcomes}
    held = [run for project, run in world.snapshot.active_runs if project not in statuses]
    held += [run for status in statuses.values() for run in status.active]
    free = slots(world.nodes, held, world.snapshot.config)
    placed = []
    for item in (o.start for o in outcomes if o.start is not None):
        unbuilt = blocked(item.stage, world.snapshot, world.nodes) if item.stage.build and me.images else None
        if unbuilt is not None:  # its image is not built yet: look again soon (the build lands on its own file)
            waits = _waits(item, statuses[item.project], unbuilt) if cycle.leads else \
                _as_written(item, statuses[item.project], world)
            placed.append(replace(waits, due=add_seconds(cycle.now, INPUT_RECHECK_S)))
            continue
        missing = _missing_input(item, statuses[item.project], world)
        if missing is not None:  # no node can start it yet; look again soon (an upload may be on its way)
            waits = _waits_for_input(item, statuses[item.project], missing, cycle) if cycle.leads else \
                _as_written(item, statuses[item.project], world)
            placed.append(replace(waits, due=add_seconds(cycle.now, INPUT_RECHECK_S)))
            continue
        ranking = rank(item.stage, free)
        if not ranking:
            if cycle.leads:  # one writer, or nodes with different views would take turns
                placed.append(_unplaceable(item, statuses[item.project], cycle))
            else:
                placed.append(_as_written(item, statuses[item.project], world))
            continue
        position = ranking.index(me.name) if me.name in ranking else -1
        waited = world.waited.get(f"{item.project}/{item.run_id}", 0.0)
        chosen = ranking[0]
        if position > 0 and waited >= position * world.snapshot.config.grace:
            chosen = me.name
        free[chosen], gpus = free[chosen].take(item.stage)
        waiting = f"{item.project}/{item.run_id}"
        if chosen == me.name and me.may_claim:
            placed.append(_claim(item, gpus, statuses[item.project], cycle))
        elif cycle.leads and item.new_request is not None and waited >= len(ranking) * world.snapshot.config.grace:
            # Every fitting node had its turn and none claimed it: say the request was seen.
            placed.append(replace(_observed(item, statuses[item.project]), waiting=waiting))
        else:
            placed.append(replace(_as_written(item, statuses[item.project], world), waiting=waiting))
    return placed


def _observed(item: Startable, status: Status, message: str | None = None) -> Outcome:
    """A new request recorded by the first live node without a claim: its status and lock."""
    assert item.new_request is not None
    if status.observed_request >= item.new_request.number:
        return Outcome(item.project, replace(status, message=message) if message else None)
    observed = replace(observe(status, item.new_request), state=ProjectState.PENDING,
                       message=message or f"starting {item.stage.name}")
    return Outcome(item.project, observed, lock=(item.new_request.number, item.pipeline),
                   notes=(f"{item.project}: request {item.new_request.number} observed",))


def _as_written(item: Startable, status: Status, world: World) -> Outcome:
    """A node that neither claims the stage nor leads leaves the project's message as it is on main.

    Who may say why a stage waits is the first live node, and what runs is its claimer:
    every other node writing its own words back would flip the file between them. When
    the node has something else to write (a run it finished), its message goes with it.
    """
    written = world.snapshot.projects[item.project].status
    if replace(status, message=written.message, updated=written.updated) == written:
        return Outcome(item.project, written)
    return Outcome(item.project)


def _missing_input(item: Startable, status: Status, world: World) -> str | None:
    """The first of the stage's inputs that is not in the resource pool yet."""
    if world.has_input is None or not item.stage.inputs:
        return None
    request = item.new_request or status.request
    env = {**item.pipeline.env, **item.stage.env, **(request.env if request else {})}
    return next((path for path in item.stage.inputs_for(env) if not world.has_input(path)), None)


def _waits_for_input(item: Startable, status: Status, missing: str, cycle: _Cycle) -> Outcome:
    return _waits(item, status, f"{item.stage.name} waits for input {missing}: upload it with "
                                f"`winslow upload FILE {missing}`")


def _waits(item: Startable, status: Status, message: str) -> Outcome:
    """The stage is PENDING for `message`'s reason: said once (with the request's observation, if new)."""
    if item.new_request is not None:
        return _observed(item, status, message)
    if status.message != message:
        return Outcome(item.project, replace(status, message=message))
    return Outcome(item.project)


def _unplaceable(item: Startable, status: Status, cycle: _Cycle) -> Outcome:
    """Why no live node can take the stage now: busy, draining, or none could ever (said plainly)."""
    need = item.stage.resources
    wanted = f"{_count(need.gpus, 'GPU')}, {_count(need.cpus, 'CPU')}, {need.memory // 2**20} MiB"
    if item.stage.node_tags:
        wanted += f", tags {', '.join(item.stage.node_tags)}"
    idle = slots(cycle.world.nodes, [], cycle.world.snapshot.config)  # every live node as if it ran nothing
    undrained = {name: replace(slot, drain=False) for name, slot in idle.items()}
    if rank(item.stage, idle):
        message = f"{item.stage.name} waits for a free node with {wanted}: every node that fits is busy"
    elif rank(item.stage, undrained):
        message = f"{item.stage.name} waits for a node with {wanted}: every node that fits is draining"
    else:
        largest = max(idle.values(), key=lambda s: (s.gpu_total, s.cpus), default=None)
        has = (f"; the largest live node, {largest.name}, has {_count(largest.gpu_total, 'GPU')} and "
               f"{_count(largest.cpus, 'CPU')}" if largest else "; no node is alive")
        message = f"no live node could ever run {item.stage.name}: it needs {wanted}{has}"
    return _waits(item, status, message)


def _pinned_image(runs: Sequence[Run], request: int, stage: Stage) -> str:
    """The image a new attempt runs: the digest an earlier attempt of this stage and request ran for its tag (every
    retry runs what the first one pulled, whatever the tag names by then), else the stage's image as written."""
    if "@sha256:" not in stage.image:
        for run in reversed(runs):
            pulled = run.image_digest or ""
            if (run.request == request and run.stage == stage.name and "@sha256:" in pulled
                    and pulled.split("@", 1)[0] == image_repository(stage.image)):
                return pulled
    return stage.image


def _count(n: float, noun: str) -> str:
    return f"{n:g} {noun}" + ("" if n == 1 else "s")


def _claim(item: Startable, gpus: tuple[int, ...], status: Status, cycle: _Cycle) -> Outcome:
    pipeline = item.pipeline
    lock = None
    if item.new_request is not None and status.observed_request < item.new_request.number:
        status = observe(status, item.new_request)
        lock = (item.new_request.number, pipeline)
    assert status.request is not None
    before = pipeline.before(item.stage.name)
    source = latest_success(status.runs, before.name) if before else None
    env = {**pipeline.env, **item.stage.env, **status.request.env}
    recorded = {**env, **{name: SECRET_MASK for name in item.stage.secrets}}
    _, _, attempt = item.run_id.rpartition("-")
    me, now = cycle.me.name, cycle.now
    if not cycle.me.images:
        image = None
    elif item.stage.build:
        image = digest(item.stage, cycle.world.snapshot)  # placement claims it only once there is one
    else:
        image = _pinned_image(status.runs, status.request.number, item.stage)
    events = [f"claimed by {me}"] + ([f"GPU {', '.join(map(str, gpus))} assigned"] if gpus else [])
    if image and item.stage.build:
        events.append(f"image built from {layout.image_dir(item.stage.build)}/: {image}")
    elif image and image != item.stage.image:
        events.append(f"image {item.stage.image} pinned to {image}, as its earlier attempt ran")
    run = Run(id=item.run_id, request=status.request.number, stage=item.stage.name, attempt=int(attempt),
              state=RunState.RUNNING, node=me, gpus=gpus, cpus=item.stage.resources.cpus,
              memory=item.stage.resources.memory, claimed=now, image=image,
              env=recorded,
              workspace=layout.workspace(item.project, item.run_id), input=source.workspace if source else None)
    for message in events:
        run = run.with_event(now, message)
    status = replace(status.with_run(run), state=ProjectState.RUNNING, message=f"{item.stage.name} running on {me}",
                     request=replace(status.request, next=None, waiting_since=None, proposed=False))
    return Outcome(item.project, status, lock=lock, claim=Claim(item.project, run, item.stage, env),
                   notes=(f"{item.project}: {item.stage.name} -> RUNNING on {me}",))
