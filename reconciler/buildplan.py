"""Which stage images to build, who builds them, and what their builds say: part of `decide`, pure like it.

A folder `images/NAME/` with a Dockerfile on main is an image Winslow builds; its content id
(`Snapshot.image_sources`) names one version of it. A request locks the content its stages
run (`Pipeline.stamped`), so a stage runs the build of the files its request saw, however
the folder changed since. Every version on main, and every version a request locked, is
built once: one node claims it by committing a RUNNING record to builds/NAME.yaml (the
push is a compare-and-swap, as for a stage), builds and pushes it to the registry of
winslow.yaml, and commits the digest, or why it failed. A build whose node is gone, or that
a restarted node no longer runs, is claimed again; a failed one is not retried: the fix
is a change to images/NAME/, which is a new version.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from reconciler import layout
from reconciler.facts import Fact
from reconciler.model import Build, BuildState, NodeInfo, Stage
from reconciler.snapshot import Snapshot

BUILDS_PROJECT = ".builds"  # the journal's project for build facts: never a project's id
BUILT = "built"  # the fact a finished build leaves: exit_code 0 and image_digest, or 1 and reason
KEEP = 20  # builds kept per image: the newest


@dataclass(frozen=True)
class BuildClaim:
    name: str
    source: str
    commit: str
    image: str  # the tag to push: REGISTRY/PREFIX/NAME:SOURCE


@dataclass
class BuildPlan:
    records: dict[str, tuple[Build, ...]] = field(default_factory=dict)  # builds/NAME.yaml to write
    claims: list[BuildClaim] = field(default_factory=list)
    finished: list[tuple[str, Build]] = field(default_factory=list)  # their logs land with them
    settled: set[tuple[str, str, str]] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


def key(name: str, source: str) -> str:
    return f"{name}/{source}"


def latest(snapshot: Snapshot, name: str, source: str) -> Build | None:
    return next((b for b in reversed(snapshot.builds.get(name, ())) if b.source == source), None)


def source_of(stage: Stage, snapshot: Snapshot) -> tuple[str | None, str | None]:
    """(content id, commit) a stage's built image comes from: what its request locked, else main's now."""
    assert stage.build is not None
    if stage.build_source:
        return stage.build_source, stage.build_commit
    return snapshot.image_sources.get(stage.build), snapshot.commit


def wanted(snapshot: Snapshot) -> dict[tuple[str, str], str]:
    """(name, source) -> a commit holding it: every version on main and every version a request locked."""
    found = {(name, source): snapshot.commit or "" for name, source in snapshot.image_sources.items()}
    if not found and not snapshot.builds:
        return found
    for entry in snapshot.projects.values():
        if entry.lock is None or not entry.lock.builds:
            continue
        for stage in entry.lock.stages:
            if stage.build and stage.build_source and stage.build_commit:
                found.setdefault((stage.build, stage.build_source), stage.build_commit)
    return {k: commit for k, commit in found.items() if commit}


def blocked(stage: Stage, snapshot: Snapshot, live: Mapping[str, NodeInfo]) -> str | None:
    """Why the stage cannot start yet for its image, or None once its build has a digest."""
    assert stage.build is not None
    name = stage.build
    source, _ = source_of(stage, snapshot)
    if source is None:
        return (f"{stage.name} waits for its image: {layout.image_dir(name)}/Dockerfile is not on main "
                f"(add the folder, or fix the name in `image: {{build: {name}}}`)")
    if not snapshot.config.registry:
        return (f"{stage.name} waits for its image {name}: builds need a registry every node can pull from "
                f"(set images.registry in winslow.yaml)")
    build = latest(snapshot, name, source)
    version = f"{name} ({source[:12]})"
    if build is None:
        return f"{stage.name} waits for image {version} to be built"
    if build.state is BuildState.RUNNING:
        where = build.node if build.node in live else f"{build.node}, which is not alive: another node takes it over"
        return f"{stage.name} waits for image {version}, being built on {where}"
    if build.state is BuildState.FAILED:
        return (f"{stage.name} cannot start: image {version} failed to build on {build.node}: {build.reason}"
                f"{f' (log: {build.log})' if build.log else ''}; fix {layout.image_dir(name)}/ and start a new request")
    return None


def digest(stage: Stage, snapshot: Snapshot) -> str | None:
    source, _ = source_of(stage, snapshot)
    build = latest(snapshot, stage.build or "", source or "")
    return build.digest if build is not None and build.state is BuildState.SUCCEEDED else None


def plan_builds(snapshot: Snapshot, live: Mapping[str, NodeInfo], me: str, facts: Iterable[Fact], now: str,
                may_build: bool, local: frozenset[str]) -> BuildPlan:
    """Fold this node's finished builds into the records, and claim one build that nobody runs, when it may."""
    plan = BuildPlan()
    records = {name: list(builds) for name, builds in snapshot.builds.items()}
    for fact in facts:
        plan.settled.add(fact.key)
        name, _, source = fact.run_id.partition("/")
        builds = records.get(name, [])
        at = next((i for i in range(len(builds) - 1, -1, -1) if builds[i].source == source), None)
        if at is None or builds[at].state is not BuildState.RUNNING or builds[at].node != me:
            continue  # taken over meanwhile: publish nothing from it
        done = replace(builds[at], state=BuildState.SUCCEEDED if fact.exit_code == 0 else BuildState.FAILED,
                       finished=fact.time, digest=fact.image_digest if fact.exit_code == 0 else None,
                       reason=fact.reason, log=layout.build_log(name, source))
        builds[at] = done
        plan.records[name] = tuple(builds[-KEEP:])
        plan.finished.append((name, done))
        plan.notes.append(f"image {name} ({source[:12]}) built on {me}" if fact.exit_code == 0 else
                          f"image {name} ({source[:12]}) failed to build on {me}")
    building = any(b.state is BuildState.RUNNING and b.node == me for builds in records.values() for b in builds)
    if not may_build or building or not snapshot.config.registry:
        return plan
    for (name, source), commit in sorted(wanted(snapshot).items()):
        builds = records.get(name, [])
        last = next((b for b in reversed(builds) if b.source == source), None)
        if last is not None and not _abandoned(name, last, live, me, local):
            continue
        image = snapshot.config.build_ref(name, source)
        assert image is not None
        attempt = last.attempt + 1 if last is not None else 1
        claim = Build(source=source, commit=commit, state=BuildState.RUNNING, node=me, attempt=attempt, claimed=now,
                      image=image)
        builds = [b for b in builds if b is not last] + [claim]
        plan.records[name] = tuple(builds[-KEEP:])
        plan.claims.append(BuildClaim(name, source, commit, image))
        plan.notes.append(f"image {name} ({source[:12]}) -> building on {me}")
        break  # one build at a time per node
    return plan


def _abandoned(name: str, build: Build, live: Mapping[str, NodeInfo], me: str, local: frozenset[str]) -> bool:
    """A RUNNING build nobody runs: its node is gone, or it is this node's and this node no longer runs it (it
    restarted; a build that ended has its fact, folded above)."""
    if build.state is not BuildState.RUNNING:
        return False
    if build.node == me:
        return key(name, build.source) not in local
    return build.node not in live
