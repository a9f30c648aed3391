"""The decision function, table-driven: one row per lifecycle case, readable as a spec.

Each row builds a small state repo in memory (`statebuild.py`: winslow.yaml, the
pipelines `tracking` (detect: 1 GPU, pause_after, gate_timeout 1h / cleanup / analyse)
and `cpu` (a / b: retries 1, secret DB_PASSWORD / c: lost_retries 0), projects,
status.yaml and pipeline.lock.yaml), the live nodes, and what this node holds (its
local runs and journal facts). It runs `decide` once and states everything the plan
must say. A row leaves out what the plan must NOT do: claims, stops, resumes, locks
and finished runs are compared exactly, so an unexpected action fails the row.

Defaults: one node `gpu1` (2 GPUs, 16 CPUs, 64 GiB) deciding for itself; project
`t` on pipeline `cpu`. Node names are chosen so that the first live node (by name)
is `gpu1`, and `laptop` is a node without GPUs.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from statebuild import (
    NOW,
    T0,
    TRACKING,
    Repo,
    apply,
    base,
    exited,
    node,
    pipeline,
    project,
    run,
    snapshot,
    stage,
    started,
    status,
)

from reconciler.decide import Me, Plan, Resume, World, decide
from reconciler.facts import QUEUED, Fact
from reconciler.model import GiB, NodeInfo

GPU1 = node("gpu1", gpus=2)
GPU2 = node("gpu2", gpus=2)
LAPTOP = node("laptop", gpus=0, cpus=4, memory=16 * GiB)

UNCHANGED = None  # the plan writes no status for the project

REQUEST_OBSERVED = project(request=1) | status(state="PENDING", runs=[], message="starting a")  # nothing claimed yet
LATER = "2024-05-01T12:00:05+00:00"  # the next cycle, a few seconds on
IN_SLURM = "queued in Slurm on gpu1"  # the event of a claimed run whose job waits in Slurm's queue


def queued(run_id: str, why: str | None = "Resources", pid: str = "t", at: str = NOW) -> Fact:
    """The node's fact: the run's Slurm job is PENDING (`why`: Slurm's reason)."""
    return Fact(QUEUED, pid, run_id, at, reason=IN_SLURM + (f": {why}" if why else ""))


def in_queue(run_id: str, why: str | None = "Resources") -> dict[str, Any]:
    """A claimed run whose job waits in Slurm's queue, as status.yaml records it."""
    return run(run_id, started=None, events=[{"time": T0, "message": IN_SLURM + (f": {why}" if why else "")}])
CPU_EDITED = {"name": "cpu", "stages": [stage("a"), stage("x")]}  # b and c renamed away after the lock


def claim(run_id: str, node_name: str = "gpu1", gpus: Sequence[int] = (), pid: str = "t") -> tuple:
    """(project, run id, stage, node, GPUs) of an expected claim; the stage comes from the run id."""
    stage_name = run_id.split("-", 1)[1].rsplit("-", 1)[0]
    return (pid, run_id, stage_name, node_name, tuple(gpus))


def stop(run_id: str, reason: str, pid: str = "t") -> tuple:
    """(project, run id, reason prefix) of an expected stop."""
    return (pid, run_id, reason)


@dataclass
class Case:
    id: str
    # -- given ----------------------------------------------------------------------------------
    repo: Repo
    nodes: Sequence[NodeInfo] = (GPU1,)
    me: str = "gpu1"
    local: Sequence[str] = ()              # "<project>/<run>" alive on this node
    facts: Sequence[Fact] = ()             # this node's journal
    lost: Mapping[str, str] = field(default_factory=dict)
    waited: Mapping[str, float] = field(default_factory=dict)
    resume_branches: Sequence[str] = ()
    # -- then -----------------------------------------------------------------------------------
    state: str | None = UNCHANGED          # project t's state in the plan (UNCHANGED: not written)
    others: Mapping[str, str | None] = field(default_factory=dict)  # other projects' states
    message: str = ""                      # part of t's status message
    errors: Mapping[str, str] = field(default_factory=dict)       # project -> part of its errors
    observed: int | None = None            # t's observed_request
    request: Mapping[str, Any] = field(default_factory=dict)      # fields of t's status.request
    claims: Sequence[tuple] = ()
    claim_env: Mapping[str, str] | None = None  # env handed to the container of the (only) claim
    stops: Sequence[tuple] = ()
    resumes: Sequence[Resume] = ()
    locks: Mapping[str, tuple[int, str]] = field(default_factory=dict)  # project -> (request, "stage names")
    finished: Sequence[tuple[str, str]] = ()  # (run id of t, final state)
    runs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # "[<project>/]<run>" -> fields
    waiting: Sequence[str] = ()
    settled: set[tuple[str, str, str]] | None = None  # None: every given fact


def world(case: Case, now: str = NOW) -> World:
    return World(snapshot(case.repo), {n.name: n for n in case.nodes}, now, dict(case.lost), dict(case.waited),
                 frozenset(case.resume_branches))


def me(case: Case, name: str | None = None, local: Sequence[str] | None = None) -> Me:
    pairs = frozenset(tuple(item.split("/", 1)) for item in (case.local if local is None else local))
    return Me(name or case.me, pairs, tuple(case.facts))  # type: ignore[arg-type]


CASES = [
    # -- starting ---------------------------------------------------------------------------------
    Case(id="request-0-is-idle-and-claims-nothing",
         repo=base() | project(request=0),
         state="IDLE", message="not started"),
    Case(id="new-request-starts-at-first-stage-writes-lock-and-observes-it",
         repo=base() | project(request=1),
         state="RUNNING", observed=1, locks={"t": (1, "a b c")}, claims=[claim("1-a-1")],
         request={"number": 1, "from_stage": "a", "until": "c"},
         runs={"1-a-1": dict(state="RUNNING", node="gpu1", workspace="workspaces/t/1-a-1", input=None,
                             claimed=NOW, image="tracker:1.4", attempt=1)}),
    Case(id="new-request-starts-at-from",
         repo=base() | project(request=2, from_="b")
         | status(state="FAILED", runs=[run("1-a-1", "SUCCEEDED"), run("1-b-1", "FAILED", exit_code=1)]),
         state="RUNNING", observed=2, locks={"t": (2, "a b c")}, claims=[claim("2-b-1")],
         request={"number": 2, "from_stage": "b", "until": "c"},
         runs={"2-b-1": dict(input="workspaces/t/1-a-1", workspace="workspaces/t/2-b-1")}),
    Case(id="new-request-from-a-stage-whose-input-never-succeeded-fails",
         repo=base() | project(request=1, from_="b"),
         state="FAILED", message="stage a has no successful run", observed=1, locks={"t": (1, "a b c")}),
    Case(id="new-request-gpu-stage-claims-a-gpu",
         repo=base() | project(pipeline_name="tracking", request=1),
         state="RUNNING", locks={"t": (1, "detect cleanup analyse")}, claims=[claim("1-detect-1", gpus=[0])],
         runs={"1-detect-1": dict(gpus=(0,), cpus=4.0, memory=8 * GiB)}),
    Case(id="new-request-is-left-to-the-better-node-which-records-it-with-its-claim",
         repo=base() | project(request=1), nodes=[GPU1, LAPTOP],
         state=UNCHANGED, waiting=["t/1-a-1"]),
    Case(id="new-request-no-node-claimed-in-time-is-recorded-by-the-first-live-node",
         repo=base(nodes={"gpu1": {"drain": True}}) | project(request=1), nodes=[GPU1, LAPTOP],
         waited={"t/1-a-1": 3.0},
         state="PENDING", observed=1, message="starting a", locks={"t": (1, "a b c")}, waiting=["t/1-a-1"]),
    Case(id="new-request-still-within-its-grace-is-recorded-by-nobody-but-its-claimer",
         repo=base(nodes={"gpu1": {"drain": True}}) | project(request=1), nodes=[GPU1, LAPTOP],
         waited={"t/1-a-1": 2.9},
         state=UNCHANGED, waiting=["t/1-a-1"]),

    # -- a stage ends ------------------------------------------------------------------------------
    Case(id="exit-0-finishes-run-and-claims-next-stage-in-same-plan",
         repo=base() | project(request=1) | status(runs=[run("1-a-1")]),
         facts=[exited("1-a-1", 0)],
         state="RUNNING", finished=[("1-a-1", "SUCCEEDED")], claims=[claim("1-b-1")],
         runs={"1-a-1": dict(state="SUCCEEDED", exit_code=0, finished=NOW, log="projects/t/logs/1-a-1.log",
                             result="projects/t/results/1-a-1.yaml"),
               "1-b-1": dict(input="workspaces/t/1-a-1", workspace="workspaces/t/1-b-1")}),
    Case(id="exit-0-frees-the-node-for-the-next-stage-in-same-plan",
               repo=base() | project(request=1) | status(runs=[run("1-a-1", cpus=1.0)]),
               nodes=[node("gpu1", cpus=1)], facts=[exited("1-a-1", 0)],
               state="RUNNING", finished=[("1-a-1", "SUCCEEDED")], claims=[claim("1-b-1")]),
    Case(id="last-stage-succeeding-ends-request-succeeded",
         repo=base() | project(request=1)
         | status(runs=[run("1-a-1", "SUCCEEDED"), run("1-b-1", "SUCCEEDED"), run("1-c-1")]),
         facts=[exited("1-c-1", 0)],
         state="SUCCEEDED", message="request 1 is done", finished=[("1-c-1", "SUCCEEDED")]),
    Case(id="until-stage-succeeding-ends-request-succeeded",
         repo=base() | project(request=1, until="b")
         | status(until="b", runs=[run("1-a-1", "SUCCEEDED"), run("1-b-1")]),
         facts=[exited("1-b-1", 0)],
         state="SUCCEEDED", finished=[("1-b-1", "SUCCEEDED")]),
    Case(id="step-mode-waits-after-a-stage-and-proposes-resume",
         repo=base() | project(request=1, step=True) | status(step=True, runs=[run("1-a-1")]),
         facts=[exited("1-a-1", 0)],
         state="WAITING", message="resume/t/1", finished=[("1-a-1", "SUCCEEDED")], resumes=[Resume("t", 1, "b")],
         request={"next": "b", "waiting_since": NOW}),
    Case(id="pause-after-gate-waits-and-proposes-resume",
         repo=base() | project(pipeline_name="tracking", request=1)
         | status(lock=TRACKING, runs=[run("1-detect-1", gpus=[0])]),
         facts=[exited("1-detect-1", 0)],
         state="WAITING", message="waiting for approval (gate)", finished=[("1-detect-1", "SUCCEEDED")],
         resumes=[Resume("t", 1, "cleanup")], request={"next": "cleanup", "waiting_since": NOW}),
    Case(id="gate-with-resume-branch-on-remote-proposes-none",
         repo=base() | project(pipeline_name="tracking", request=1)
         | status(lock=TRACKING, state="WAITING", runs=[run("1-detect-1", "SUCCEEDED")],
                  waiting_since="2024-05-01T11:30:00+00:00"),
         resume_branches=["resume/t/1"],
         state="WAITING", request={"waiting_since": "2024-05-01T11:30:00+00:00"}),
    Case(id="resumed-request-claims-next-stage-with-gate-result-as-input",
         repo=base() | project(pipeline_name="tracking", request=2, from_="cleanup")
         | status(lock=TRACKING, state="WAITING", runs=[run("1-detect-1", "SUCCEEDED")]),
         state="RUNNING", observed=2, locks={"t": (2, "detect cleanup analyse")}, claims=[claim("2-cleanup-1")],
         request={"number": 2, "from_stage": "cleanup", "next": None, "waiting_since": None},
         runs={"2-cleanup-1": dict(input="workspaces/t/1-detect-1", workspace="workspaces/t/2-cleanup-1")}),
    Case(id="started-fact-records-start-time-and-image-digest",
         repo=base() | project(request=1) | status(runs=[run("1-a-1", started=None)]),
         local=["t/1-a-1"], facts=[started("1-a-1")],
         state="RUNNING", runs={"1-a-1": dict(state="RUNNING", started=NOW, image_digest="sha256:" + "ab" * 32)}),

    # -- claimed, and waiting in the executor's queue (a Slurm job PENDING) ---------------------------
    Case(id="queued-fact-shows-the-claimed-run-pending-with-the-queues-reason",
         repo=base() | project(request=1) | status(runs=[run("1-a-1", started=None)]),
         local=["t/1-a-1"], facts=[queued("1-a-1", None), queued("1-a-1", "Resources", at=LATER)],
         state="PENDING", message="a is queued in Slurm on gpu1: Resources",
         runs={"1-a-1": dict(state="RUNNING", started=None, queued="queued in Slurm on gpu1: Resources")}),
    Case(id="queued-run-with-a-new-reason-says-the-new-one",
         repo=base() | project(request=1) | status(state="PENDING", runs=[in_queue("1-a-1", None)]),
         local=["t/1-a-1"], facts=[queued("1-a-1", "Priority")],
         state="PENDING", message="a is queued in Slurm on gpu1: Priority"),
    Case(id="queued-run-whose-reason-is-on-main-writes-nothing",
         repo=base() | project(request=1)
         | status(state="PENDING", message="a is queued in Slurm on gpu1: Resources", runs=[in_queue("1-a-1")]),
         local=["t/1-a-1"], facts=[queued("1-a-1")],
         state=UNCHANGED),
    Case(id="queued-run-that-began-is-running-since-its-real-start",
         repo=base() | project(request=1) | status(state="PENDING", runs=[in_queue("1-a-1")]),
         local=["t/1-a-1"], facts=[started("1-a-1")],
         state="RUNNING", message="a running on gpu1", runs={"1-a-1": dict(started=NOW, queued=None)}),
    Case(id="queued-and-started-in-one-cycle-is-running",
         repo=base() | project(request=1) | status(runs=[run("1-a-1", started=None)]),
         local=["t/1-a-1"], facts=[started("1-a-1"), queued("1-a-1")],
         state="RUNNING", message="a running on gpu1", runs={"1-a-1": dict(started=NOW, queued=None)}),
    Case(id="queued-run-paused-stays-pending-and-says-it-pauses-after-it",
         repo=base() | project(request=1, state="paused") | status(state="PENDING", runs=[in_queue("1-a-1")]),
         local=["t/1-a-1"],
         state="PENDING", message="a is queued in Slurm on gpu1: Resources (pausing after it)"),
    Case(id="queued-run-aborted-is-cancelled",
         repo=base() | project(request=1, state="aborted") | status(state="PENDING", runs=[in_queue("1-a-1")]),
         local=["t/1-a-1"],
         state="RUNNING", message="aborting the running stage", stops=[stop("1-a-1", "aborted")]),
    Case(id="queued-run-cancelled-before-it-began-fails-with-slurms-reason",
         repo=base() | project(request=1) | status(state="PENDING", runs=[in_queue("1-a-1")]),
         facts=[exited("1-a-1", None, "Slurm job 7 was cancelled")],
         state="FAILED", message="a failed: Slurm job 7 was cancelled", finished=[("1-a-1", "FAILED")],
         runs={"1-a-1": dict(started=None, queued=None)}),

    # -- paused ------------------------------------------------------------------------------------
    Case(id="paused-while-stage-runs-neither-stops-nor-claims",
         repo=base() | project(request=1, state="paused") | status(runs=[run("1-a-1")]),
         local=["t/1-a-1"],
         state="RUNNING", message="pausing after it"),
    Case(id="paused-after-stage-exits-is-paused-and-claims-nothing",
         repo=base() | project(request=1, state="paused") | status(runs=[run("1-a-1")]),
         facts=[exited("1-a-1", 0)],
         state="PAUSED", message="b is next", finished=[("1-a-1", "SUCCEEDED")], request={"next": "b"}),
    Case(id="running-again-after-pause-claims-next-stage-of-same-request",
         repo=base() | project(request=1) | status(state="PAUSED", runs=[run("1-a-1", "SUCCEEDED")]),
         state="RUNNING", claims=[claim("1-b-1")], runs={"1-b-1": dict(request=1, input="workspaces/t/1-a-1")}),

    # -- aborted -----------------------------------------------------------------------------------
    Case(id="aborted-stops-local-run-now",
         repo=base() | project(request=1, state="aborted") | status(runs=[run("1-a-1")]),
         local=["t/1-a-1"],
         state="RUNNING", message="aborting", stops=[stop("1-a-1", "aborted")]),
    Case(id="aborted-run-on-another-node-is-stopped-by-that-node",
         repo=base() | project(request=1, state="aborted") | status(runs=[run("1-a-1", node="gpu2")]),
         nodes=[GPU1, GPU2],
         state="RUNNING", message="aborting"),
    Case(id="aborted-exit-fails-run-and-project-and-starts-nothing",
         repo=base() | project(request=1, state="aborted") | status(runs=[run("1-a-1")]),
         facts=[exited("1-a-1", 137, "aborted")],
         state="FAILED", message="aborted", finished=[("1-a-1", "FAILED")],
         runs={"1-a-1": dict(state="FAILED", reason="aborted", exit_code=137)}),

    # -- redo --------------------------------------------------------------------------------------
    Case(id="redo-from-first-stage-runs-a-new-attempt-in-a-new-workspace",
         repo=base() | project(request=2, from_="a")
         | status(state="SUCCEEDED", runs=[run("1-a-1", "SUCCEEDED"), run("1-b-1", "SUCCEEDED"),
                                           run("1-c-1", "SUCCEEDED")]),
         state="RUNNING", observed=2, locks={"t": (2, "a b c")}, claims=[claim("2-a-1")],
         runs={"2-a-1": dict(workspace="workspaces/t/2-a-1", input=None),
               "1-a-1": dict(state="SUCCEEDED", workspace="workspaces/t/1-a-1")}),
    Case(id="redo-from-middle-stage-takes-latest-result-of-stage-before",
         repo=base() | project(request=3, from_="b")
         | status(state="SUCCEEDED", request=2, from_="a",
                  runs=[run("1-a-1", "SUCCEEDED"), run("1-b-1", "SUCCEEDED"), run("1-c-1", "SUCCEEDED"),
                        run("2-a-1", "SUCCEEDED"), run("2-b-1", "SUCCEEDED"), run("2-c-1", "SUCCEEDED")]),
         state="RUNNING", observed=3, locks={"t": (3, "a b c")}, claims=[claim("3-b-1")],
         runs={"3-b-1": dict(input="workspaces/t/2-a-1", workspace="workspaces/t/3-b-1")}),

    # -- failures and retries ----------------------------------------------------------------------
    Case(id="non-zero-exit-fails-run-and-project-without-retries",
         repo=base() | project(request=1) | status(runs=[run("1-a-1")]),
         facts=[exited("1-a-1", 3)],
         state="FAILED", message="exited with code 3", finished=[("1-a-1", "FAILED")],
         runs={"1-a-1": dict(state="FAILED", exit_code=3, reason="the program exited with code 3",
                             log="projects/t/logs/1-a-1.log")}),
    Case(id="death-by-signal-names-the-signal",
         repo=base() | project(request=1) | status(runs=[run("1-a-1")]),
         facts=[exited("1-a-1", 137)],
         state="FAILED", message="killed by SIGKILL", finished=[("1-a-1", "FAILED")],
         runs={"1-a-1": dict(state="FAILED", exit_code=137)}),
    Case(id="failed-stage-with-retries-1-gets-second-attempt",
         repo=base() | project(request=1) | status(runs=[run("1-a-1", "SUCCEEDED"), run("1-b-1")]),
         facts=[exited("1-b-1", 2)],
         state="RUNNING", finished=[("1-b-1", "FAILED")], claims=[claim("1-b-2")],
         runs={"1-b-2": dict(attempt=2, workspace="workspaces/t/1-b-2", input="workspaces/t/1-a-1")}),
    Case(id="failed-stage-out-of-retries-fails-project",
         repo=base() | project(request=1)
         | status(runs=[run("1-a-1", "SUCCEEDED"), run("1-b-1", "FAILED", exit_code=2), run("1-b-2")]),
         facts=[exited("1-b-2", 2)],
         state="FAILED", message="b failed: the program exited with code 2", finished=[("1-b-2", "FAILED")]),
    Case(id="start-failure-fails-run-with-its-reason",
         repo=base() | project(request=1) | status(runs=[run("1-a-1", started=None)]),
         facts=[exited("1-a-1", None, "image 'x' not found: pull access denied")],
         state="FAILED", message="image 'x' not found", finished=[("1-a-1", "FAILED")],
         runs={"1-a-1": dict(state="FAILED", exit_code=None, reason="image 'x' not found: pull access denied",
                             result=None)}),

    # -- invalid and deleted projects --------------------------------------------------------------
    Case(id="unknown-pipeline-is-invalid-while-valid-neighbour-is-claimed",
         repo=base() | project("bad", "nope", request=1) | project(request=1),
         state="RUNNING", others={"bad": "INVALID"}, errors={"bad": "pipeline 'nope' does not exist"},
         locks={"t": (1, "a b c")}, claims=[claim("1-a-1")]),
    Case(id="invalid-project-lets-its-running-stage-go-on-and-starts-nothing",
         repo=base() | project(pipeline_name="nope", request=2) | status(request=1, runs=[run("1-a-1")]),
         local=["t/1-a-1"],
         state="INVALID", message="running stage goes on", errors={"t": "pipeline 'nope' does not exist"}),
    Case(id="deleted-project-stops-its-local-run",
         repo=base() | status(runs=[run("1-a-1")]),
         local=["t/1-a-1"],
         stops=[stop("1-a-1", "project deleted")]),
    Case(id="deleted-project-folder-stops-its-local-run",
         repo=base(),
         local=["t/1-a-1"],
         stops=[stop("1-a-1", "project deleted")]),

    # -- lost nodes and vanished runs --------------------------------------------------------------
    Case(id="run-on-lost-node-is-marked-lost-by-first-live-node-and-retried",
         repo=base() | project(pipeline_name="tracking", request=1)
         | status(lock=TRACKING, runs=[run("1-detect-1", node="gpu3", gpus=[0])]),
         nodes=[GPU1, GPU2], lost={"gpu3": "no heartbeat for 30s"},
         state="RUNNING", claims=[claim("1-detect-2", gpus=[0])],
         runs={"1-detect-1": dict(state="LOST", reason="node gpu3 lost: no heartbeat for 30s", finished=NOW),
               "1-detect-2": dict(attempt=2, workspace="workspaces/t/1-detect-2")}),
    Case(id="run-on-lost-node-is-marked-by-any-live-node-and-retried-by-the-best-fit",
         repo=base() | project(pipeline_name="tracking", request=1)
         | status(lock=TRACKING, runs=[run("1-detect-1", node="gpu3", gpus=[0])]),
         nodes=[GPU1, GPU2], me="gpu2", lost={"gpu3": "no heartbeat for 30s"},
         state="PENDING", waiting=["t/1-detect-2"], runs={"1-detect-1": dict(state="LOST")}),
    Case(id="run-on-lost-node-without-lost-retries-fails-project",
         repo=base() | project(request=1)
         | status(runs=[run("1-a-1", "SUCCEEDED"), run("1-b-1", "SUCCEEDED"), run("1-c-1", node="gpu3")]),
         nodes=[GPU1, GPU2], lost={"gpu3": "no heartbeat for 30s"},
         state="FAILED", message="out of lost retries", runs={"1-c-1": dict(state="LOST")}),
    Case(id="local-run-main-no-longer-calls-running-is-stopped",
         repo=base() | project(request=1) | status(runs=[run("1-a-1", "LOST", exit_code=None, reason="node lost")]),
         local=["t/1-a-1"],
         state="RUNNING", stops=[stop("1-a-1", "no longer RUNNING on main")], claims=[claim("1-a-2")]),
    Case(id="running-run-of-this-node-with-no-container-and-no-fact-vanished",
         repo=base() | project(request=1) | status(runs=[run("1-a-1")]),
         state="RUNNING", claims=[claim("1-a-2")],
         runs={"1-a-1": dict(state="LOST", reason="the stage's container vanished from gpu1")}),
    Case(id="exit-of-a-run-already-marked-lost-elsewhere-is-settled-not-published",
         repo=base() | project(request=1) | status(runs=[run("1-a-1", "LOST", exit_code=None, reason="node lost")],
                                                  message="starting a"),
         facts=[exited("1-a-1", 0)],
         state="RUNNING", claims=[claim("1-a-2")], runs={"1-a-1": dict(state="LOST", reason="node lost")}),
    Case(id="claimed-run-never-started-before-node-restart-is-lost",
         repo=base() | project(request=1) | status(runs=[run("1-a-1", started=None)]),
         state="RUNNING", claims=[claim("1-a-2")],
         runs={"1-a-1": dict(state="LOST", reason="gpu1 restarted before the stage started")}),

    # -- placement ---------------------------------------------------------------------------------
    Case(id="gpu-stage-on-node-without-gpus-waits-and-says-for-what",
         repo=base() | project(pipeline_name="tracking", request=1) | status(lock=TRACKING, runs=[]),
         nodes=[LAPTOP], me="laptop",
         state="PENDING", message="no live node could ever run detect: it needs 1 GPU, 4 CPUs, 8192 MiB; "
                                  "the largest live node, laptop, has 0 GPUs and 4 CPUs"),
    Case(id="new-gpu-request-on-node-without-gpus-says-what-it-waits-for",
               repo=base() | project(pipeline_name="tracking", request=1),
               nodes=[LAPTOP], me="laptop",
               state="PENDING", observed=1, locks={"t": (1, "detect cleanup analyse")},
               message="no live node could ever run detect: it needs 1 GPU"),
    Case(id="two-gpu-stages-get-gpu-0-and-1-and-a-third-waits",
         repo=base() | project("p1", "tracking", request=1) | project("p2", "tracking", request=1)
         | project("p3", "tracking", request=1),
         others={"p1": "RUNNING", "p2": "RUNNING", "p3": "PENDING"},
         locks={p: (1, "detect cleanup analyse") for p in ("p1", "p2", "p3")},
         claims=[claim("1-detect-1", gpus=[0], pid="p1"), claim("1-detect-1", gpus=[1], pid="p2")]),
    Case(id="gpu-held-by-a-running-run-is-not-assigned-again",
         repo=base() | project(pipeline_name="tracking", request=1)
         | project("u", "tracking", request=1)
         | status("u", lock=TRACKING, runs=[run("1-detect-1", gpus=[0], project="u")]),
         local=["u/1-detect-1"],
         state="RUNNING", others={"u": "RUNNING"}, locks={"t": (1, "detect cleanup analyse")},
         claims=[claim("1-detect-1", gpus=[1])]),
    Case(id="reserved-gpus-are-never-assigned",
         repo=base(nodes={"gpu1": {"reserved_gpus": [0]}}) | project(pipeline_name="tracking", request=1),
         state="RUNNING", locks={"t": (1, "detect cleanup analyse")}, claims=[claim("1-detect-1", gpus=[1])]),
    Case(id="gpu-stage-waits-when-every-gpu-is-reserved",
         repo=base(nodes={"gpu1": {"reserved_gpus": [0, 1]}}) | project(pipeline_name="tracking", request=1)
         | status(lock=TRACKING, runs=[]),
         state="PENDING", message="no live node could ever run detect: it needs 1 GPU"),
    Case(id="drained-node-claims-nothing",
         repo=base(nodes={"gpu1": {"drain": True}}) | project(request=1) | status(runs=[]),
         state="PENDING", message="a waits for a node with 0 GPUs, 1 CPU, 1024 MiB: every node that fits is draining"),
    Case(id="drained-node-still-records-a-new-request",
         repo=base(nodes={"gpu1": {"drain": True}}) | project(request=1),
         state="PENDING", observed=1, locks={"t": (1, "a b c")}),
    Case(id="cpu-stage-is-left-to-node-without-gpus",
         repo=base() | REQUEST_OBSERVED, nodes=[GPU1, LAPTOP],
         state=UNCHANGED, waiting=["t/1-a-1"]),
    Case(id="cpu-stage-is-claimed-by-node-without-gpus",
         repo=base() | project(request=1) | status(runs=[]), nodes=[GPU1, LAPTOP], me="laptop",
         state="RUNNING", claims=[claim("1-a-1", "laptop")]),
    Case(id="second-ranked-node-waits-before-one-grace-period",
         repo=base() | REQUEST_OBSERVED, nodes=[GPU1, LAPTOP], waited={"t/1-a-1": 2.9},
         state=UNCHANGED, waiting=["t/1-a-1"]),
    Case(id="second-ranked-node-claims-after-one-grace-period",
         repo=base() | project(request=1) | status(runs=[]), nodes=[GPU1, LAPTOP], waited={"t/1-a-1": 3.0},
         state="RUNNING", claims=[claim("1-a-1")]),
    Case(id="third-ranked-node-waits-before-two-grace-periods",
         repo=base() | REQUEST_OBSERVED, nodes=[GPU1, GPU2, LAPTOP], me="gpu2",
         waited={"t/1-a-1": 5.9},
         state=UNCHANGED, waiting=["t/1-a-1"]),
    Case(id="third-ranked-node-claims-after-two-grace-periods",
         repo=base() | project(request=1) | status(runs=[]), nodes=[GPU1, GPU2, LAPTOP], me="gpu2",
         waited={"t/1-a-1": 6.0},
         state="RUNNING", claims=[claim("1-a-1", "gpu2")]),
    Case(id="node-whose-memory-is-used-up-claims-no-more",
               repo=base() | project("u1", request=1) | project("u2", request=1) | project("u3", request=1),
               nodes=[node("gpu1", cpus=8, memory=2 * GiB)],
               others={"u1": "RUNNING", "u2": "RUNNING", "u3": "PENDING"},
               locks={p: (1, "a b c") for p in ("u1", "u2", "u3")},
               claims=[claim("1-a-1", pid="u1"), claim("1-a-1", pid="u2")]),
    Case(id="node-whose-memory-is-held-by-running-runs-claims-no-more",
               repo=base() | project(request=1) | status(state="PENDING", runs=[], message="starting a")
               | project("u1", request=1) | status("u1", runs=[run("1-a-1", project="u1", memory=GiB)])
               | project("u2", request=1) | status("u2", runs=[run("1-a-1", project="u2", memory=GiB)]),
               nodes=[node("gpu1", cpus=8, memory=2 * GiB)], local=["u1/1-a-1", "u2/1-a-1"],
               state="PENDING", others={"u1": "RUNNING", "u2": "RUNNING"},
               message="a waits for a free node with 0 GPUs, 1 CPU, 1024 MiB: every node that fits is busy"),

    # -- env and secrets ---------------------------------------------------------------------------
    Case(id="project-env-wins-over-stage-env-wins-over-pipeline-env",
         repo=base() | project(request=1, env={"LEVEL": "project", "VIDEO": "ulm.mp4"}),
         state="RUNNING", locks={"t": (1, "a b c")}, claims=[claim("1-a-1")],
         request={"env": {"LEVEL": "project", "VIDEO": "ulm.mp4"}},
         claim_env={"LEVEL": "project", "FROM_PIPELINE": "p", "FROM_STAGE": "s", "VIDEO": "ulm.mp4"},
         runs={"1-a-1": dict(env={"LEVEL": "project", "FROM_PIPELINE": "p", "FROM_STAGE": "s",
                                  "VIDEO": "ulm.mp4"})}),
    Case(id="secrets-of-a-stage-are-masked-in-the-recorded-env",
         repo=base() | project(request=1) | status(runs=[run("1-a-1")]),
         facts=[exited("1-a-1", 0)],
         state="RUNNING", finished=[("1-a-1", "SUCCEEDED")], claims=[claim("1-b-1")],
         claim_env={"LEVEL": "pipeline", "FROM_PIPELINE": "p"},
         runs={"1-b-1": dict(env={"LEVEL": "pipeline", "FROM_PIPELINE": "p", "DB_PASSWORD": "***"})}),
    Case(id="running-request-keeps-the-env-it-began-with",
         repo=base() | project(request=1, env={"LEVEL": "edited"})
         | status(env={"LEVEL": "at-start"}, runs=[run("1-a-1", "SUCCEEDED")]),
         state="RUNNING", claims=[claim("1-b-1")], claim_env={"LEVEL": "at-start", "FROM_PIPELINE": "p"}),

    # -- superseded --------------------------------------------------------------------------------
    Case(id="new-request-while-old-run-active-stops-it-superseded-and-waits",
         repo=base() | project(request=2) | status(request=1, runs=[run("1-a-1")]),
         local=["t/1-a-1"],
         state="RUNNING", observed=2, locks={"t": (2, "a b c")}, stops=[stop("1-a-1", "superseded")]),
    Case(id="superseded-run-still-alive-is-stopped-again-and-nothing-claimed",
         repo=base() | project(request=2) | status(request=2, runs=[run("1-a-1")]),
         local=["t/1-a-1"],
         state="RUNNING", stops=[stop("1-a-1", "superseded by request 2")]),
    Case(id="superseded-run-ended-so-new-request-starts",
         repo=base() | project(request=2) | status(request=2, runs=[run("1-a-1")]),
         facts=[exited("1-a-1", 137, "superseded by request 2")],
         state="RUNNING", finished=[("1-a-1", "FAILED")], claims=[claim("2-a-1")]),

    # -- the pipeline lock -------------------------------------------------------------------------
    Case(id="pipeline-edited-after-request-began-runs-on-locked-stages",
         repo=base() | pipeline(CPU_EDITED) | project(request=1) | status(runs=[run("1-a-1")]),
         facts=[exited("1-a-1", 0)],
         state="RUNNING", finished=[("1-a-1", "SUCCEEDED")], claims=[claim("1-b-1")]),
    Case(id="pipeline-edited-to-drop-locked-until-stage-keeps-request-valid",
               repo=base() | pipeline(CPU_EDITED) | project(request=1, until="c")
               | status(until="c", runs=[run("1-a-1", "SUCCEEDED")]),
               state="RUNNING", claims=[claim("1-b-1")]),
    Case(id="pipeline-deleted-after-request-began-keeps-project-valid",
         repo={k: v for k, v in base().items() if k != "pipelines/cpu.yaml"}
         | project(request=1) | status(runs=[run("1-a-1", "SUCCEEDED")]),
         state="RUNNING", claims=[claim("1-b-1")]),
    Case(id="new-request-after-pipeline-edit-locks-the-edited-pipeline",
         repo=base() | pipeline(CPU_EDITED) | project(request=2)
         | status(state="SUCCEEDED", runs=[run("1-a-1", "SUCCEEDED"), run("1-b-1", "SUCCEEDED"),
                                           run("1-c-1", "SUCCEEDED")]),
         state="RUNNING", observed=2, locks={"t": (2, "a x")}, claims=[claim("2-a-1")]),

    # -- gates ---------------------------------------------------------------------------------------
    Case(id="gate-unanswered-past-gate-timeout-fails-project",
         repo=base() | project(pipeline_name="tracking", request=1)
         | status(lock=TRACKING, state="WAITING", runs=[run("1-detect-1", "SUCCEEDED")], waiting_since=T0),
         state="FAILED", message="not approved in time"),
    Case(id="gate-within-gate-timeout-keeps-waiting",
         repo=base() | project(pipeline_name="tracking", request=1)
         | status(lock=TRACKING, state="WAITING", runs=[run("1-detect-1", "SUCCEEDED")],
                  waiting_since="2024-05-01T11:30:00+00:00"),
         state="WAITING", resumes=[Resume("t", 1, "cleanup")]),
    Case(id="aborting-a-waiting-project-fails-it",
         repo=base() | project(pipeline_name="tracking", request=1, state="aborted")
         | status(lock=TRACKING, state="WAITING", runs=[run("1-detect-1", "SUCCEEDED")]),
         state="FAILED", message="aborted by request"),

    # -- facts already on main -----------------------------------------------------------------------
    Case(id="exit-fact-for-run-already-finished-on-main-is-settled-without-change",
         repo=base() | project(request=1)
         | status(runs=[run("1-a-1", "SUCCEEDED"), run("1-b-1", node="gpu2")], message="b running on gpu2"),
         nodes=[GPU1, GPU2], facts=[exited("1-a-1", 0)],
         state=UNCHANGED, settled={("exited", "t", "1-a-1")}),
    Case(id="facts-of-a-project-gone-from-the-repo-are-settled",
         repo=base() | project(request=0) | status(state="IDLE", request=0, message="not started (bump run.request to start)"),
         facts=[exited("1-a-1", 0, pid="gone"), started("1-a-1", pid="gone")],
         state=UNCHANGED),
]


def _status_of(plan: Plan, pid: str):
    assert pid in plan.statuses, f"no status written for {pid}; written: {sorted(plan.statuses)}"
    return plan.statuses[pid]


@pytest.mark.parametrize("case", [c if not isinstance(c, Case) else pytest.param(c, id=c.id) for c in CASES])
def test_decide(case: Case) -> None:
    plan = decide(world(case), me(case))

    expected_states = {"t": case.state, **case.others}
    written = {pid: s.state.value for pid, s in plan.statuses.items()}
    assert written == {pid: s for pid, s in expected_states.items() if s is not UNCHANGED}
    if case.message:
        assert case.message in (_status_of(plan, "t").message or "")
    for pid, text in case.errors.items():
        assert any(text in e for e in _status_of(plan, pid).errors), _status_of(plan, pid).errors
    if case.observed is not None:
        assert _status_of(plan, "t").observed_request == case.observed
    for name, value in case.request.items():
        progress = _status_of(plan, "t").request
        got = getattr(progress, name)
        assert (dict(got) if name == "env" else got) == value, name

    assert [(c.project, c.run.id, c.stage.name, c.run.node, c.run.gpus) for c in plan.claims] == list(case.claims)
    if case.claim_env is not None:
        (only,) = plan.claims
        assert dict(only.env) == case.claim_env
    assert [(s.project, s.run_id) for s in plan.stops] == [(p, r) for p, r, _ in case.stops]
    for got, (_, _, reason) in zip(plan.stops, case.stops):
        assert got.reason.startswith(reason), got.reason
    assert plan.resumes == list(case.resumes)
    assert {p: (n, " ".join(pl.stage_names)) for p, (n, pl) in plan.locks.items()} == dict(case.locks)
    assert [(p, r.id, r.state.value) for p, r, _ in plan.finished] == [("t", r, s) for r, s in case.finished]
    assert sorted(plan.waiting) == sorted(case.waiting)
    assert plan.settled == (case.settled if case.settled is not None else {f.key for f in case.facts})

    for key, fields in case.runs.items():
        pid, run_id = key.split("/", 1) if "/" in key else ("t", key)
        found = _status_of(plan, pid).run(run_id)
        assert found is not None, f"{run_id} not in {pid}'s status"
        for name, value in fields.items():
            got = getattr(found, name)
            assert (dict(got) if name == "env" else got) == value, f"{run_id}.{name}"


# -- every node computes the same answer ----------------------------------------------------------

@dataclass
class Placement:
    id: str
    repo: Repo
    nodes: Sequence[NodeInfo]
    claimers: Sequence[str]                # the nodes whose plan claims the stage
    waited: Mapping[str, float] = field(default_factory=dict)
    local: Mapping[str, Sequence[str]] = field(default_factory=dict)  # node -> "<project>/<run>" alive there


PLACEMENTS = [
    Placement("cpu-stage-goes-to-the-node-without-gpus", base() | REQUEST_OBSERVED, [GPU1, GPU2, LAPTOP],
              claimers=["laptop"]),
    Placement("cpu-stage-of-a-new-request-goes-to-the-node-without-gpus", base() | project(request=1),
              [GPU1, LAPTOP], claimers=["laptop"]),
    Placement("gpu-stage-goes-to-the-gpu-node-with-fewest-gpus",
              base() | project(pipeline_name="tracking", request=1), [node("gpu0", gpus=4), GPU1, LAPTOP],
              claimers=["gpu1"]),
    Placement("equal-nodes-break-the-tie-by-name", base() | REQUEST_OBSERVED, [GPU2, GPU1], claimers=["gpu1"]),
    Placement("drained-favourite-leaves-the-stage-to-the-next-node",
              base(nodes={"laptop": {"drain": True}}) | REQUEST_OBSERVED, [GPU1, LAPTOP], claimers=["gpu1"]),
    Placement("full-favourite-leaves-the-stage-to-the-next-node",
              base() | REQUEST_OBSERVED | project("u", request=1)
              | status("u", runs=[run("1-a-1", node="laptop", cpus=4.0, project="u")]),
              [GPU1, LAPTOP], claimers=["gpu1"], local={"laptop": ["u/1-a-1"]}),
    Placement("second-ranked-node-joins-only-after-one-grace-period", base() | REQUEST_OBSERVED, [GPU1, LAPTOP],
              claimers=["laptop"], waited={"t/1-a-1": 2.9}),
    Placement("second-ranked-node-joins-after-one-grace-period", base() | REQUEST_OBSERVED, [GPU1, LAPTOP],
              claimers=["gpu1", "laptop"], waited={"t/1-a-1": 3.0}),
    Placement("grace-counts-from-winslow-yaml", base(grace="10s") | REQUEST_OBSERVED, [GPU1, LAPTOP],
              claimers=["laptop"], waited={"t/1-a-1": 9.0}),
    Placement("gpu-stage-fits-no-node-so-nobody-claims", base(nodes={"gpu1": {"drain": True}})
              | project(pipeline_name="tracking", request=1), [GPU1, LAPTOP], claimers=[]),
    pytest.param(Placement("new-request-from-stage-without-earlier-result-starts-nowhere",
                           base() | project(request=1, from_="b"), [GPU1, LAPTOP], claimers=[]),
                 id="new-request-from-stage-without-earlier-result-starts-nowhere",
                 ),
]


@pytest.mark.parametrize("case", [c if not isinstance(c, Placement) else pytest.param(c, id=c.id)
                                  for c in PLACEMENTS])
def test_every_live_node_agrees_who_claims(case: Placement) -> None:
    live = {n.name: n for n in case.nodes}
    snap = snapshot(case.repo)
    claimers = []
    for name in sorted(live):
        local = frozenset(tuple(item.split("/", 1)) for item in case.local.get(name, ()))
        plan = decide(World(snap, live, NOW, {}, dict(case.waited)), Me(name, local))  # type: ignore[arg-type]
        claimers += [name for c in plan.claims if c.project == "t"]
    assert claimers == sorted(case.claimers)


# -- idempotency: a plan, once on main, leads to no further change ----------------------------------


def _again_params() -> list[Any]:
    rows = [c if isinstance(c, Case) else c.values[0] for c in CASES]
    return [pytest.param(c, id=c.id) for c in rows]


@pytest.mark.parametrize("case", _again_params())
def test_applying_a_plan_and_its_facts_again_changes_nothing(case: Case) -> None:
    """Every row's plan, pushed, then the next cycle with the same facts (the journal not yet settled)."""
    first = decide(world(case), me(case))
    ended = {(p, r.id) for p, r, _ in first.finished}
    local = ({tuple(item.split("/", 1)) for item in case.local} - ended) | {(c.project, c.run.id) for c in first.claims}
    after = Case(**{**case.__dict__, "repo": apply(case.repo, first)})
    second = decide(world(after, LATER), me(after, local=[f"{p}/{r}" for p, r in local]))
    # Skipping the projects the first plan called quiet decides the same (the node skips them when nothing changed).
    skipping = decide(world(after, LATER), me(after, local=[f"{p}/{r}" for p, r in local]), quiet=first.quiet)
    assert (skipping.statuses, skipping.claims, skipping.stops, skipping.resumes, skipping.locks) == \
        (second.statuses, second.claims, second.stops, second.resumes, second.locks)
    assert second.statuses == {}, {p: (s.state.value, s.message) for p, s in second.statuses.items()}
    assert second.locks == {}
    assert second.finished == []
    assert second.claims == []
    assert second.settled == {f.key for f in case.facts}


def test_a_status_edited_by_hand_into_nonsense_breaks_only_its_own_project() -> None:
    repo = (base() | project(pid="t", request=1) | status(pid="t", from_="no-such-stage")
            | project(pid="u", request=1))
    plan = decide(World(snapshot(repo), {"gpu1": GPU1}, NOW), Me("gpu1"))
    assert plan.statuses["t"].state.value == "INVALID"
    assert "cannot reconcile" in plan.statuses["t"].message
    assert [c.project for c in plan.claims] == ["u"]


def test_an_unreadable_status_starts_nothing_and_writes_nothing() -> None:
    repo = base() | project(pid="t", request=1) | {"projects/t/status.yaml": "state: Succeeded\nruns: []\n"}
    plan = decide(World(snapshot(repo), {"gpu1": GPU1}, NOW), Me("gpu1"))
    assert plan.claims == [] and "t" not in plan.statuses and not plan.locks


def test_a_run_of_a_project_whose_file_was_deleted_is_recorded_as_ended() -> None:
    repo = base() | status(pid="t", runs=[run("1-a-1", node="gpu1")])
    plan = decide(World(snapshot(repo), {"gpu1": GPU1}, NOW), Me("gpu1", facts=(exited("1-a-1", 0),)))
    assert [r.state.value for r in plan.statuses["t"].runs] == ["SUCCEEDED"]
    assert plan.statuses["t"].message == "project deleted" and plan.claims == []
    assert plan.statuses["t"].deleted == NOW


def test_a_fenced_node_claims_nothing() -> None:
    repo = base() | project(pid="t", request=1)
    assert decide(World(snapshot(repo), {"gpu1": GPU1}, NOW), Me("gpu1", may_claim=False)).claims == []
    assert len(decide(World(snapshot(repo), {"gpu1": GPU1}, NOW), Me("gpu1")).claims) == 1


def test_a_claim_records_the_image_only_where_the_executor_runs_it() -> None:
    repo = base() | project(pid="t", request=1)
    (docker,) = decide(World(snapshot(repo), {"gpu1": GPU1}, NOW), Me("gpu1")).claims
    (process,) = decide(World(snapshot(repo), {"gpu1": GPU1}, NOW), Me("gpu1", images=False)).claims
    assert docker.run.image and process.run.image is None


def test_a_run_stopped_by_fencing_ends_lost_and_is_retried_on_the_lost_budget() -> None:
    repo = base() | project(pid="t", request=1) | status(pid="t", runs=[run("1-a-1", node="gpu1")])
    fact = Fact("exited", "t", "1-a-1", NOW, exit_code=143, reason="fenced: gpu1 could not renew", lost=True)
    plan = decide(World(snapshot(repo), {"gpu1": GPU1}, NOW), Me("gpu1", facts=(fact,)))
    assert [(r.id, r.state.value) for r in plan.statuses["t"].runs] == [("1-a-1", "LOST"), ("1-a-2", "RUNNING")]


def test_resume_branches_behind_their_project_are_pruned_by_the_first_live_node_only() -> None:
    repo = base() | project(pid="t", request=2) | status(pid="t", request=2, runs=[run("2-a-1", node="gpu1")])
    branches = frozenset({"resume/t/1", "resume/t/2", "resume/gone/4"})
    nodes = {"gpu1": GPU1, "laptop": LAPTOP}
    first = decide(World(snapshot(repo), nodes, NOW, resume_branches=branches),
                   Me("gpu1", local_runs=frozenset({("t", "2-a-1")})))
    other = decide(World(snapshot(repo), nodes, NOW, resume_branches=branches), Me("laptop"))
    assert first.stale_branches == ["resume/gone/4", "resume/t/1"] and other.stale_branches == []


def test_a_quiet_project_is_not_reconciled_but_its_runs_still_hold_their_node() -> None:
    # u's run fills gpu2, the only node that takes work (gpu1 drains): t's stage fits nowhere.
    busy = project(pid="u", request=1) | status(pid="u", runs=[run("1-a-1", node="gpu2", cpus=16.0, project="u")])
    repo = base(nodes={"gpu1": {"drain": True}}) | busy | project(pid="t", request=1)
    nodes = {"gpu1": GPU1, "gpu2": GPU2}
    first = decide(World(snapshot(repo), nodes, NOW), Me("gpu1"))
    settled = apply(repo, first)
    second = decide(World(snapshot(settled), nodes, NOW), Me("gpu1"))
    assert "u" in second.quiet and "t" not in second.quiet
    again = decide(World(snapshot(settled), nodes, NOW), Me("gpu1"), quiet=second.quiet)
    assert again.waiting == second.waiting == [] and again.claims == []  # u's run still fills gpu2
    assert again.quiet == second.quiet


def test_a_gate_with_a_timeout_says_when_it_falls_due() -> None:
    repo = (base() | project(pipeline_name="tracking", request=1)
            | status(lock=TRACKING, runs=[run("1-detect-1", "SUCCEEDED", exit_code=0)], state="WAITING",
                     waiting_since=NOW))
    plan = decide(World(snapshot(repo), {"gpu1": GPU1}, NOW, resume_branches=frozenset({"resume/t/1"})), Me("gpu1"))
    assert plan.due is not None and plan.due.startswith("2024-05-01T13:00:00") and "t" not in plan.quiet


def test_only_the_first_live_node_says_why_a_stage_waits_and_no_other_node_writes_it_back() -> None:
    repo = base(nodes={"gpu1": {"drain": True}, "laptop": {"drain": True}}) | REQUEST_OBSERVED
    nodes = {"gpu1": GPU1, "laptop": LAPTOP}
    leader = decide(World(snapshot(repo), nodes, NOW), Me("gpu1"))
    assert "every node that fits is draining" in (leader.statuses["t"].message or "")
    written = apply(repo, leader)
    for name in ("laptop", "gpu1"):  # neither the other node nor the leader itself rewrites it
        again = decide(World(snapshot(written), nodes, NOW), Me(name))
        assert again.statuses == {}, (name, again.statuses.get("t"))


# -- stage inputs ------------------------------------------------------------------------------------

READS = {"name": "reads", "env": {"VIDEO": "none"},
         "stages": [stage("detect", inputs=["videos/${VIDEO}", "models/yolo.pt"]), stage("track")]}


def test_a_stage_whose_input_is_missing_waits_for_it_says_which_and_looks_again_soon() -> None:
    repo = base() | pipeline(READS) | project(pid="t", pipeline_name="reads", env={"VIDEO": "DJI_0001.MP4"}, request=1)
    present = {"models/yolo.pt"}
    waiting = decide(World(snapshot(repo), {"gpu1": GPU1}, NOW, has_input=present.__contains__), Me("gpu1"))
    assert waiting.claims == []
    message = waiting.statuses["t"].message or ""
    assert "waits for input videos/DJI_0001.MP4" in message and "winslow upload" in message
    assert waiting.due is not None and waiting.due > NOW  # a timer, so an upload is noticed without a push
    assert waiting.statuses["t"].observed_request == 1  # the request is seen, and says why it waits

    present.add("videos/DJI_0001.MP4")
    (claim,) = decide(World(snapshot(repo), {"gpu1": GPU1}, NOW, has_input=present.__contains__), Me("gpu1")).claims
    assert claim.run.stage == "detect"


def test_only_the_first_live_node_writes_why_a_stage_waits_for_an_input() -> None:
    repo = base() | pipeline(READS) | project(pid="t", pipeline_name="reads", env={"VIDEO": "x.mp4"}, request=1)
    nodes = {"gpu1": GPU1, "gpu2": GPU2}
    first = decide(World(snapshot(repo), nodes, NOW, has_input=lambda _: False), Me("gpu1"))
    other = decide(World(snapshot(repo), nodes, NOW, has_input=lambda _: False), Me("gpu2"))
    assert "waits for input videos/x.mp4" in (first.statuses["t"].message or "")
    assert "t" not in other.statuses and other.claims == []


# -- rejecting a gate ---------------------------------------------------------------------------------

def _gated(proposed: bool, **spec: object) -> Repo:
    return (base() | project(pipeline_name="tracking", request=1, **spec)
            | status(lock=TRACKING, state="WAITING", runs=[run("1-detect-1", "SUCCEEDED")],
                     waiting_since="2024-05-01T11:59:00+00:00", proposed=proposed))


def test_a_gate_records_that_its_resume_branch_was_proposed() -> None:
    plan = decide(World(snapshot(_gated(False)), {"gpu1": GPU1}, NOW, resume_branches=frozenset({"resume/t/1"})),
                  Me("gpu1"))
    assert plan.statuses["t"].state.value == "WAITING" and plan.statuses["t"].request.proposed
    assert plan.resumes == []


def test_a_resume_branch_deleted_unmerged_rejects_the_gate_and_one_not_yet_pushed_is_proposed() -> None:
    rejected = decide(World(snapshot(_gated(True)), {"gpu1": GPU1}, NOW), Me("gpu1"))
    assert rejected.statuses["t"].state.value == "FAILED"
    assert "rejected: branch resume/t/1 was deleted" in (rejected.statuses["t"].message or "")
    fresh = decide(World(snapshot(_gated(False)), {"gpu1": GPU1}, NOW), Me("gpu1"))
    assert fresh.resumes == [Resume("t", 1, "cleanup")] and fresh.statuses["t"].state.value == "WAITING"


def test_an_abort_with_a_reason_ends_failed_with_that_reason() -> None:
    plan = decide(World(snapshot(_gated(True, state="aborted", reason="rejected by Ann: boxes drift")),
                        {"gpu1": GPU1}, NOW, resume_branches=frozenset({"resume/t/1"})), Me("gpu1"))
    assert plan.statuses["t"].state.value == "FAILED"
    assert plan.statuses["t"].message == "rejected by Ann: boxes drift"


def test_a_node_whose_cycles_fail_does_not_lead_and_the_next_healthy_one_does() -> None:
    from dataclasses import replace as with_

    repo = base(nodes={"gpu1": {"drain": True}, "gpu2": {"drain": True}}) | REQUEST_OBSERVED
    nodes = {"gpu1": with_(GPU1, degraded="3 cycles in a row failed: OSError"), "gpu2": GPU2}
    second = decide(World(snapshot(repo), nodes, NOW), Me("gpu2"))
    assert "every node that fits is draining" in (second.statuses["t"].message or "")
    healthy = {"gpu1": GPU1, "gpu2": GPU2}
    assert decide(World(snapshot(repo), healthy, NOW), Me("gpu2")).statuses == {}  # gpu1 leads when it works


@pytest.mark.parametrize("folder", ["..", ".git", "-rf", "a b"])
def test_nothing_is_ever_written_for_a_project_folder_that_is_not_a_safe_name(folder: str) -> None:
    repo = base() | project(pid=folder, request=1) | project(pid="t", request=1)
    plan = decide(World(snapshot(repo), {"gpu1": GPU1}, NOW), Me("gpu1"))
    assert folder not in plan.statuses and folder not in plan.locks and all(c.project != folder for c in plan.claims)
    assert "t" in plan.statuses  # its neighbour goes on


def test_the_report_refuses_to_write_outside_a_project_folder(tmp_path) -> None:
    from reconciler.model import Status
    from reconciler.report import changes
    from reconciler.storage import LocalStorage

    plan = Plan(statuses={"..": Status()})
    with pytest.raises(ValueError, match="outside a project's folder"):
        changes(plan, LocalStorage(tmp_path), snapshot(base()).config, "gpu1", None)


def test_a_retry_runs_the_digest_its_first_attempt_pulled_and_a_new_request_the_tag_again() -> None:
    """The tag may name another image by the time of the retry: the retry runs what the first attempt ran."""
    pulled = "tracker@sha256:" + "a" * 64
    first = run("1-a-1", node="gpu1", image="tracker:1.4", image_digest=pulled)
    repo = base() | project(pid="t", request=1) | status(pid="t", runs=[first])
    fact = Fact("exited", "t", "1-a-1", NOW, exit_code=143, reason="fenced: gpu1 could not renew", lost=True)
    plan = decide(World(snapshot(repo), {"gpu1": GPU1}, NOW), Me("gpu1", facts=(fact,)))
    retry = plan.statuses["t"].runs[-1]
    assert (retry.id, retry.image) == ("1-a-2", pulled)
    assert any("pinned to " + pulled in event.message for event in retry.events), retry.events
    done = {**first, "state": "SUCCEEDED", "finished": T0, "exit_code": 0}
    again = base() | project(pid="t", request=2) | status(pid="t", runs=[done])
    fresh = decide(World(snapshot(again), {"gpu1": GPU1}, NOW), Me("gpu1")).statuses["t"].runs[-1]
    assert (fresh.id, fresh.image) == ("2-a-1", "tracker:1.4")

