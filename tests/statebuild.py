"""State repos built in memory, read by the real `StateReader`: the fixtures of the decision tests.

A repo is a dict `{path: text}`. The builders below write each file as a user or a
reconciler would (YAML text that the schemas check), so a test reads like the
repo it describes:

    repo = base() | project("t", "cpu", request=1) | status("t", runs=[run("1-a-1")])

`snapshot(repo)` turns it into the `Snapshot` that `decide` takes, and
`apply(repo, plan)` writes a plan's statuses and locks back, like the commit a
node would push.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

from reconciler.decide import Plan
from reconciler.facts import Fact
from reconciler.model import GiB, Gpu, NodeInfo, Pipeline
from reconciler.report import lock_file, status_file
from reconciler.snapshot import Snapshot
from reconciler.state import StateReader
from reconciler.yamlsafe import dump_yaml

Repo = dict[str, str]

T0 = "2024-05-01T10:00:00+00:00"   # when the request of a given status began
NOW = "2024-05-01T12:00:00+00:00"  # the time every decision is taken at


class MemoryTree:
    """The `Tree` protocol over a dict: the content id is a hash of the text, like a blob sha."""

    def __init__(self, files: Mapping[str, str | bytes]) -> None:
        self.files = {path: text.encode() if isinstance(text, str) else text for path, text in files.items()}

    def entries(self) -> dict[str, str]:
        return {path: hashlib.sha1(data).hexdigest() for path, data in self.files.items()}

    def read(self, path: str) -> bytes:
        return self.files[path]


class _Remember(dict):  # type: ignore[type-arg]
    """A parse cache that forgets nothing (StateReader drops what the current tree lacks)."""

    def __delitem__(self, key: object) -> None:
        pass


# One reader for every test: the rows share most files, and a file's parse is keyed by its
# content hash, so keeping every parse is sound and makes a snapshot cost only its new files.
_READER = StateReader()
_READER._cache = _Remember()
_READER._meaning = _Remember()


def snapshot(repo: Mapping[str, str | bytes]) -> Snapshot:
    return _READER.read(MemoryTree(repo), "c0ffee")


# -- pipelines ---------------------------------------------------------------------------------

def stage(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "image": "tracker:1.4", "command": ["run", name], **fields}


TRACKING: dict[str, Any] = {
    "name": "tracking",
    "env": {"VIDEO": "none"},
    "stages": [
        stage("detect", resources={"gpus": 1, "cpus": 4, "memory": "8GiB"}, pause_after=True, gate_timeout="1h"),
        stage("cleanup", resources={"cpus": 2, "memory": "2GiB"}),
        stage("analyse", resources={"cpus": 2, "memory": "2GiB"}),
    ],
}

CPU: dict[str, Any] = {
    "name": "cpu",
    "env": {"LEVEL": "pipeline", "FROM_PIPELINE": "p"},
    "stages": [
        stage("a", env={"LEVEL": "stage", "FROM_STAGE": "s"}),
        stage("b", retries=1, secrets=["DB_PASSWORD"]),
        stage("c", lost_retries=0),
    ],
}


def pipeline(data: Mapping[str, Any]) -> Repo:
    return {f"pipelines/{data['name']}.yaml": dump_yaml(dict(data))}


def config(**settings: Any) -> Repo:
    """winslow.yaml; `grace` in seconds, `nodes` as in the file."""
    data: dict[str, Any] = {"version": 1, "timeouts": {"grace": settings.pop("grace", 3)}}
    data.update(settings)
    return {"winslow.yaml": dump_yaml(data)}


def base(**settings: Any) -> Repo:
    """winslow.yaml and both pipelines, as they are on main."""
    return config(**settings) | pipeline(TRACKING) | pipeline(CPU)


# -- projects ----------------------------------------------------------------------------------

def project(pid: str = "t", pipeline_name: str = "cpu", env: Mapping[str, str] | None = None,
            **run: Any) -> Repo:
    """project.yaml; `run` as in the file (`from_` for `from`)."""
    if "from_" in run:
        run["from"] = run.pop("from_")
    data: dict[str, Any] = {"name": f"project {pid}", "pipeline": pipeline_name}
    if env:
        data["env"] = dict(env)
    data["run"] = run
    return {f"projects/{pid}/project.yaml": dump_yaml(data)}


def run(run_id: str, state: str = "RUNNING", node: str = "gpu1", **fields: Any) -> dict[str, Any]:
    """A run as status.yaml records it; request, stage and attempt come from the id."""
    request, rest = run_id.split("-", 1)
    stage_name, attempt = rest.rsplit("-", 1)
    project_id = fields.pop("project", "t")
    data: dict[str, Any] = {"id": run_id, "request": int(request), "stage": stage_name, "attempt": int(attempt),
                            "state": state, "node": node, "gpus": list(fields.pop("gpus", ())),
                            "cpus": fields.pop("cpus", 1.0), "memory": fields.pop("memory", GiB),
                            "claimed": T0, "started": T0,
                            "workspace": f"workspaces/{project_id}/{run_id}"}
    if state != "RUNNING":
        data.update(finished=T0, exit_code=0 if state == "SUCCEEDED" else 1)
    data.update(fields)
    return data


def status(pid: str = "t", state: str = "RUNNING", request: int = 1, runs: Sequence[Mapping[str, Any]] = (),
           lock: Mapping[str, Any] | None = CPU, from_: str | None = None, until: str | None = None,
           step: bool = False, waiting_since: str | None = None, env: Mapping[str, str] | None = None,
           message: str | None = None, proposed: bool = False) -> Repo:
    """status.yaml of an observed request, and its pipeline.lock.yaml (`lock=None`: none)."""
    stages = [s["name"] for s in (lock or CPU)["stages"]]
    progress: dict[str, Any] | None = None
    if request:
        progress = {"number": request, "from": from_ or stages[0], "until": until or stages[-1], "step": step,
                    "next": None, "since": T0, "env": dict(env or {})}
        if waiting_since:
            progress["waiting_since"] = waiting_since
        if proposed:
            progress["proposed"] = True
    data = {"state": state, "message": message, "observed_request": request, "request": progress,
            "updated": T0, "runs": [dict(r) for r in runs]}
    files = {f"projects/{pid}/status.yaml": dump_yaml(data)}
    if lock is not None and request:
        files[f"projects/{pid}/pipeline.lock.yaml"] = lock_file(request, Pipeline.from_dict(lock), "c0ffee").decode()
    return files


# -- nodes and facts ---------------------------------------------------------------------------

def node(name: str, gpus: int = 0, cpus: float = 16, memory: int = 64 * GiB) -> NodeInfo:
    return NodeInfo(name, cpus=cpus, memory=memory, gpus=tuple(Gpu(i) for i in range(gpus)))


def exited(run_id: str, exit_code: int | None = 0, reason: str | None = None, pid: str = "t",
           manifest: Mapping[str, Any] | None = None) -> Fact:
    if manifest is None and exit_code is not None:
        manifest = {"files": []}
    return Fact("exited", pid, run_id, NOW, exit_code, reason, manifest=dict(manifest) if manifest else None)


def started(run_id: str, pid: str = "t", digest: str = "sha256:" + "ab" * 32) -> Fact:
    return Fact("started", pid, run_id, NOW, image_digest=digest)


# -- writing a plan back -----------------------------------------------------------------------

def apply(repo: Mapping[str, str], plan: Plan) -> Repo:
    """The repo after the commit a node would push for `plan` (statuses and locks)."""
    after = dict(repo)
    for pid, new in plan.statuses.items():
        after[f"projects/{pid}/status.yaml"] = status_file(new).decode()
    for pid, (request, locked) in plan.locks.items():
        after[f"projects/{pid}/pipeline.lock.yaml"] = lock_file(request, locked, "c0ffee").decode()
    return after
