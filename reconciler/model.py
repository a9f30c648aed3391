"""The domain model: one meaning for Pipeline, Stage, Project, Run and NodeInfo everywhere.

Everything is built once, at the boundary, from validated YAML (see `state.py`),
and is immutable from then on. `to_dict` gives back what goes into YAML.
"""
from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any

from reconciler.layout import IMAGES
from reconciler.units import parse_duration, parse_size

VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")  # ${NAME} in a command, an env value or an input path


def fill(text: str, values: Mapping[str, str]) -> str:
    """`${VAR}` in `text` replaced from `values`; names it does not know stay as written."""
    return VAR.sub(lambda m: values.get(m.group(1), m.group(0)), text)

MiB = 1024 * 1024
GiB = 1024 * MiB
SECRET_MASK = "***"  # what a secret's value is replaced with wherever env or logs are recorded


class ProjectState(str, enum.Enum):
    PENDING = "PENDING"  # a stage is wanted and no node has claimed it yet; `message` says why
    RUNNING = "RUNNING"
    PAUSED = "PAUSED"
    WAITING = "WAITING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    IDLE = "IDLE"
    INVALID = "INVALID"


class RunState(str, enum.Enum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    LOST = "LOST"


class Desired(str, enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    ABORTED = "aborted"


def _env(values: Mapping[str, Any] | None) -> dict[str, str]:
    def text(value: Any) -> str:
        return ("true" if value else "false") if isinstance(value, bool) else str(value)
    return {str(k): text(v) for k, v in (values or {}).items()}



def image_repository(ref: str) -> str:
    """An image reference without its tag or digest: `registry.lab:5000/a/b:v1` -> `registry.lab:5000/a/b`."""
    name = ref.split("@", 1)[0]
    colon = name.rfind(":")
    return name[:colon] if colon > name.rfind("/") else name

@dataclass(frozen=True)
class Resources:
    gpus: int = 0
    cpus: float = 1.0
    memory: int = 1 * GiB

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Resources:
        data = data or {}
        return cls(
            gpus=int(data.get("gpus", 0)),
            cpus=float(data.get("cpus", 1.0)),
            memory=parse_size(data.get("memory", 1 * GiB)),
        )


@dataclass(frozen=True)
class Stage:
    name: str
    image: str
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    resources: Resources = Resources()
    node_tags: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()  # resource paths (relative to resources/) it reads; ${VAR} from the env
    timeout: float | None = None
    retries: int = 0
    lost_retries: int = 2
    pause_after: bool = False
    gate_timeout: float | None = None
    description: str = ""
    build: str | None = None  # `image: {build: NAME}`: the image Winslow builds from images/NAME/ in the state repo
    build_source: str | None = None  # set in a request's lock: images/NAME/'s content id at the locked commit ...
    build_commit: str | None = None  # ... and that commit, where a builder finds those files

    def inputs_for(self, env: Mapping[str, str]) -> tuple[str, ...]:
        """Its inputs with `${VAR}` filled from a run's env."""
        return tuple(fill(path, env) for path in self.inputs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Stage:
        image = data["image"]
        built = image if isinstance(image, Mapping) else {}
        return cls(
            name=data["name"],
            image=f"{IMAGES}/{built['build']}" if built else image,
            build=built.get("build"), build_source=built.get("source"), build_commit=built.get("commit"),
            command=tuple(data["command"]),
            env=_env(data.get("env")),
            secrets=tuple(data.get("secrets", ())),
            resources=Resources.from_dict(data.get("resources")),
            node_tags=tuple(data.get("node_tags", ())),
            inputs=tuple(data.get("inputs", ())),
            timeout=parse_duration(data["timeout"]) if data.get("timeout") is not None else None,
            retries=int(data.get("retries", 0)),
            lost_retries=int(data.get("lost_retries", 2)),
            pause_after=bool(data.get("pause_after", False)),
            gate_timeout=parse_duration(data["gate_timeout"]) if data.get("gate_timeout") is not None else None,
            description=data.get("description", ""),
        )


@dataclass(frozen=True)
class Pipeline:
    name: str
    stages: tuple[Stage, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    description: str = ""
    source: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Pipeline:
        return cls(
            name=data["name"],
            stages=tuple(Stage.from_dict(s) for s in data["stages"]),
            env=_env(data.get("env")),
            description=data.get("description", ""),
            source=data,
        )

    @property
    def stage_names(self) -> list[str]:
        return [s.name for s in self.stages]

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def index(self, name: str) -> int:
        return self.stage_names.index(name)

    def after(self, name: str) -> Stage | None:
        """The stage that follows `name`, or None at the end."""
        i = self.index(name) + 1
        return self.stages[i] if i < len(self.stages) else None

    def before(self, name: str) -> Stage | None:
        i = self.index(name)
        return self.stages[i - 1] if i > 0 else None


    @property
    def builds(self) -> tuple[str, ...]:
        """The names of the images its stages have Winslow build (`image: {build: NAME}`)."""
        return tuple(dict.fromkeys(stage.build for stage in self.stages if stage.build))

    def stamped(self, sources: Mapping[str, str], commit: str | None) -> Pipeline:
        """The copy a request locks: each built image names the content it runs (images/NAME/ at `commit`)."""
        if not self.builds:
            return self
        stages = []
        for raw in self.source.get("stages", []):
            image = raw.get("image")
            if isinstance(image, Mapping) and image.get("build") in sources and not image.get("source"):
                raw = {**raw, "image": {"build": image["build"], "source": sources[image["build"]], "commit": commit}}
            stages.append(raw)
        return Pipeline.from_dict({**self.source, "stages": stages})

@dataclass(frozen=True)
class RunSpec:
    """What a user asks for in project.yaml's `run:`."""

    request: int = 0
    from_stage: str | None = None
    until: str | None = None
    step: bool = False
    state: Desired = Desired.RUNNING
    reason: str | None = None  # why the state was asked for (`winslow reject` writes who rejected and why)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RunSpec:
        data = data or {}
        return cls(
            request=int(data.get("request", 0)),
            from_stage=data.get("from"),
            until=data.get("until"),
            step=bool(data.get("step", False)),
            state=Desired(data.get("state", "running")),
            reason=data.get("reason"),
        )


@dataclass(frozen=True)
class Project:
    id: str
    pipeline: str
    name: str = ""
    tags: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    run: RunSpec = RunSpec()
    description: str = ""

    @classmethod
    def from_dict(cls, project_id: str, data: Mapping[str, Any]) -> Project:
        return cls(
            id=project_id,
            pipeline=data["pipeline"],
            name=data.get("name", project_id),
            tags=tuple(data.get("tags", ())),
            env=_env(data.get("env")),
            run=RunSpec.from_dict(data.get("run")),
            description=data.get("description", ""),
        )


@dataclass(frozen=True)
class Event:
    time: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {"time": self.time, "message": self.message}


@dataclass(frozen=True)
class InputFile:
    """One file a run read from the resource pool: what it was, so a result can be traced to its bytes."""

    path: str           # relative to resources/
    size: int
    sha256: str | None  # None: it could not be read (the reason says why)
    reason: str | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputFile:
        return cls(data["path"], int(data["size"]), data.get("sha256"), data.get("reason"))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in {"path": self.path, "size": self.size, "sha256": self.sha256,
                                  "reason": self.reason}.items() if v is not None}


QUEUED_IN = "queued in "  # how the event of a run waiting in its executor's queue begins: "queued in Slurm on hpc: Resources"


def queued_event(queue: str, node: str, reason: str | None) -> str:
    """The event of a claimed run that waits in `queue` on `node` (a Slurm job PENDING), with the queue's reason."""
    return f"{QUEUED_IN}{queue} on {node}" + (f": {reason}" if reason else "")


@dataclass(frozen=True)
class Run:
    """One attempt of one stage: `<request>-<stage>-<attempt>`."""

    id: str
    request: int
    stage: str
    attempt: int
    state: RunState
    node: str | None = None
    gpus: tuple[int, ...] = ()
    cpus: float = 0.0
    memory: int = 0
    claimed: str | None = None
    started: str | None = None
    finished: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    image: str | None = None
    image_digest: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    workspace: str = ""
    input: str | None = None
    inputs: tuple[InputFile, ...] = ()  # the resource files it read, as they were when it started
    log: str | None = None
    result: str | None = None
    events: tuple[Event, ...] = ()

    @staticmethod
    def make_id(request: int, stage: str, attempt: int) -> str:
        # int(): a request or attempt read as 1.0 (valid JSON Schema integers) still names run 1, not '1.0'.
        return f"{int(request)}-{stage}-{int(attempt)}"

    @property
    def done(self) -> bool:
        return self.state is not RunState.RUNNING

    @property
    def queued(self) -> str | None:
        """Where and why a claimed run that has not started waits (its last `queued in ...` event); None otherwise."""
        if self.state is not RunState.RUNNING or self.started is not None:
            return None
        return next((e.message for e in reversed(self.events) if e.message.startswith(QUEUED_IN)), None)

    def with_event(self, time: str, message: str, **changes: Any) -> Run:
        return replace(self, events=self.events + (Event(time, message),), **changes)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Run:
        return cls(
            id=data["id"], request=int(data["request"]), stage=data["stage"], attempt=int(data["attempt"]),
            state=RunState(data["state"]), node=data.get("node"), gpus=tuple(data.get("gpus", ())),
            cpus=float(data.get("cpus", 0.0)), memory=int(data.get("memory", 0)),
            claimed=data.get("claimed"), started=data.get("started"), finished=data.get("finished"),
            exit_code=data.get("exit_code"), reason=data.get("reason"), image=data.get("image"),
            image_digest=data.get("image_digest"), env=_env(data.get("env")),
            workspace=data.get("workspace", ""), input=data.get("input"),
            inputs=tuple(InputFile.from_dict(f) for f in data.get("inputs", ())), log=data.get("log"),
            result=data.get("result"),
            events=tuple(Event(e["time"], e["message"]) for e in data.get("events", ())),
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["state"] = self.state.value
        data["gpus"] = list(self.gpus)
        data["env"] = dict(self.env)
        data["events"] = [e.to_dict() for e in self.events]
        data["inputs"] = [f.to_dict() for f in self.inputs]
        keep_none = ("exit_code",) if self.done else ()
        return {k: v for k, v in data.items() if (v is not None and v != [] and v != {}) or k in keep_none}


@dataclass(frozen=True)
class RequestProgress:
    """How far the observed request has come."""

    number: int
    from_stage: str
    until: str
    step: bool = False
    next: str | None = None
    since: str | None = None
    waiting_since: str | None = None
    proposed: bool = False  # WAITING: its resume branch was seen on the remote (deleting it rejects the gate)
    env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RequestProgress | None:
        if not data:
            return None
        return cls(
            number=int(data["number"]), from_stage=data["from"], until=data["until"],
            step=bool(data.get("step", False)), next=data.get("next"), since=data.get("since"),
            waiting_since=data.get("waiting_since"), proposed=bool(data.get("proposed", False)),
            env=_env(data.get("env")),
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"number": self.number, "from": self.from_stage, "until": self.until,
                                "step": self.step, "next": self.next, "since": self.since}
        if self.waiting_since:
            data["waiting_since"] = self.waiting_since
        if self.proposed:
            data["proposed"] = True
        data["env"] = dict(self.env)
        return data


@dataclass(frozen=True)
class Status:
    state: ProjectState = ProjectState.IDLE
    message: str | None = None
    observed_request: int = 0
    request: RequestProgress | None = None
    errors: tuple[str, ...] = ()
    deleted: str | None = None
    updated: str | None = None
    runs: tuple[Run, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Status:
        data = data or {}
        return cls(
            state=ProjectState(data.get("state", "IDLE")), message=data.get("message"),
            observed_request=int(data.get("observed_request", 0)),
            request=RequestProgress.from_dict(data.get("request")),
            errors=tuple(data.get("errors", ())), deleted=data.get("deleted"), updated=data.get("updated"),
            runs=tuple(Run.from_dict(r) for r in data.get("runs", ())),
        )

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"state": self.state.value, "message": self.message,
                                "observed_request": self.observed_request,
                                "request": self.request.to_dict() if self.request else None}
        if self.errors:
            data["errors"] = list(self.errors)
        if self.deleted:
            data["deleted"] = self.deleted
        data["updated"] = self.updated
        data["runs"] = [r.to_dict() for r in self.runs]
        return data

    def run(self, run_id: str) -> Run | None:
        return next((r for r in self.runs if r.id == run_id), None)

    @cached_property
    def active(self) -> tuple[Run, ...]:
        """The RUNNING runs (computed once: a status never changes)."""
        return tuple(r for r in self.runs if r.state is RunState.RUNNING)

    def with_run(self, run: Run) -> Status:
        runs = tuple(run if r.id == run.id else r for r in self.runs)
        if run.id not in {r.id for r in self.runs}:
            runs += (run,)
        return replace(self, runs=runs)


@dataclass(frozen=True)
class SlurmSettings:
    """Where a Slurm node (`winslow node --executor slurm`) submits its jobs; None: Slurm's own default."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    flags: tuple[str, ...] = ()  # more sbatch options, each one argument (`--exclusive`, `--reservation=lab`)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SlurmSettings:
        data = data or {}
        return cls(partition=data.get("partition"), account=data.get("account"), qos=data.get("qos"),
                   flags=tuple(data.get("flags", ())))

    def over(self, below: SlurmSettings | None) -> SlurmSettings:
        """These settings (the node's flags), each one that is set, on top of `below` (winslow.yaml's)."""
        if below is None:
            return self
        return SlurmSettings(partition=self.partition or below.partition, account=self.account or below.account,
                             qos=self.qos or below.qos, flags=self.flags or below.flags)


@dataclass(frozen=True)
class NodeSettings:
    """What people decide about a node in winslow.yaml."""

    drain: bool = False
    reserved_gpus: tuple[int, ...] = ()
    tags: tuple[str, ...] = ()
    slurm: SlurmSettings | None = None  # for a node whose executor is slurm


@dataclass(frozen=True)
class ClusterConfig:
    heartbeat: float = 5.0
    node_timeout: float = 240.0  # long enough to ride out a git outage of minutes: see winslow.yaml
    lease: float = 180.0
    grace: float = 3.0
    poll: float = 2.0
    cleanup: float = 3600.0
    storage_root: str | None = None
    log_head: int = 1 * MiB
    log_tail: int = 4 * MiB
    live_tail: int = 8 * 1024
    nodes: Mapping[str, NodeSettings] = field(default_factory=dict)
    merge_request_url: str | None = None  # viewer.merge_request_url: opens a merge request of {branch}
    registry: str | None = None  # images.registry: where built images are pushed (host:port)
    image_prefix: str = "winslow"  # images.prefix: the repository folder they are pushed under

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> ClusterConfig:
        data = data or {}
        t = data.get("timeouts", {})
        logs = data.get("logs", {})
        default = cls()
        return cls(
            heartbeat=parse_duration(t.get("heartbeat", default.heartbeat)),
            node_timeout=parse_duration(t.get("node", default.node_timeout)),
            lease=parse_duration(t.get("lease", default.lease)),
            grace=parse_duration(t.get("grace", default.grace)),
            poll=parse_duration(t.get("poll", default.poll)),
            cleanup=parse_duration(t.get("cleanup", default.cleanup)),
            storage_root=data.get("storage", {}).get("root"),
            log_head=parse_size(logs.get("head", default.log_head)),
            log_tail=parse_size(logs.get("tail", default.log_tail)),
            live_tail=parse_size(logs.get("live_tail", default.live_tail)),
            nodes={name: NodeSettings(drain=bool(s.get("drain", False)),
                                      reserved_gpus=tuple(s.get("reserved_gpus", ())),
                                      tags=tuple(s.get("tags", ())),
                                      slurm=SlurmSettings.from_dict(s["slurm"]) if "slurm" in s else None)
                   for name, s in data.get("nodes", {}).items()},
            merge_request_url=data.get("viewer", {}).get("merge_request_url"),
            registry=data.get("images", {}).get("registry"),
            image_prefix=data.get("images", {}).get("prefix", default.image_prefix),
        )

    def build_ref(self, name: str, source: str) -> str | None:
        """The tag a build of images/NAME/ at `source` is pushed as; None without a registry."""
        return f"{self.registry}/{self.image_prefix}/{name}:{source[:16]}" if self.registry else None


class BuildState(str, enum.Enum):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"


@dataclass(frozen=True)
class Build:
    """One build of images/NAME/ with one content (`source`), as builds/NAME.yaml records it."""

    source: str  # the content id of images/NAME/ (its files' paths and blob ids)
    commit: str  # a commit on main that holds that content
    state: BuildState
    node: str
    attempt: int = 1
    claimed: str | None = None
    finished: str | None = None
    image: str | None = None   # the tag it is pushed as: REGISTRY/PREFIX/NAME:SOURCE
    digest: str | None = None  # REGISTRY/PREFIX/NAME@sha256:..., what stages run
    reason: str | None = None
    log: str | None = None     # the capped build log on main

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Build:
        return cls(source=str(data["source"]), commit=str(data["commit"]), state=BuildState(data["state"]),
                   node=str(data["node"]), attempt=int(data.get("attempt", 1)), claimed=data.get("claimed"),
                   finished=data.get("finished"), image=data.get("image"), digest=data.get("digest"),
                   reason=data.get("reason"), log=data.get("log"))

    def to_dict(self) -> dict[str, Any]:
        data = {"source": self.source, "commit": self.commit, "state": self.state.value, "node": self.node,
                "attempt": self.attempt, "claimed": self.claimed, "finished": self.finished, "image": self.image,
                "digest": self.digest, "reason": self.reason, "log": self.log}
        return {key: value for key, value in data.items() if value is not None}


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str = ""
    model: str = ""
    memory: int = 0


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _items(value: Any) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


@dataclass(frozen=True)
class GpuLoad:
    index: int
    utilization: int | None = None   # percent
    memory_used: int | None = None   # bytes
    temperature: int | None = None   # degrees Celsius

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GpuLoad:
        return cls(_int(data.get("index")) or 0, _int(data.get("utilization")), _int(data.get("memory_used")),
                   _int(data.get("temperature")))


@dataclass(frozen=True)
class LoadSample:
    """One sample of a node's load, as its heartbeat carries it."""

    time: str | None = None
    cpu_percent: float | None = None
    memory_used: int | None = None    # bytes
    net_rx: int | None = None         # bytes per second, loopback left out
    net_tx: int | None = None
    gpus: tuple[GpuLoad, ...] = ()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoadSample:
        return cls(time=data.get("time") if isinstance(data.get("time"), str) else None,
                   cpu_percent=_float(data.get("cpu_percent")), memory_used=_int(data.get("memory_used")),
                   net_rx=_int(data.get("net_rx")), net_tx=_int(data.get("net_tx")),
                   gpus=tuple(GpuLoad.from_dict(g) for g in _items(data.get("gpus"))))


@dataclass(frozen=True)
class NodeRun:
    """A run a node has going, with the live tail of its log."""

    project: str
    run: str
    stage: str = ""
    gpus: tuple[int, ...] = ()
    started: str | None = None
    log_tail: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeRun:
        return cls(project=str(data.get("project", "")), run=str(data.get("run", "")),
                   stage=str(data.get("stage") or ""),
                   gpus=tuple(g for g in (_int(x) for x in data.get("gpus") or ()) if g is not None),
                   started=data.get("started") if isinstance(data.get("started"), str) else None,
                   log_tail=str(data.get("log_tail") or ""))


@dataclass(frozen=True)
class NodeInfo:
    """A node as others see it through its heartbeat branch (`nodes/<node>.yaml`)."""

    name: str
    cpus: float = 1.0
    memory: int = 0
    gpus: tuple[Gpu, ...] = ()
    tags: tuple[str, ...] = ()
    executor: str = "process"
    tick: int = 0
    version: str = ""
    started: str | None = None
    drain: bool = False
    fenced: bool = False            # its lease ran out: it stopped its runs and claims nothing until renewed
    settings_held: str | None = None  # winslow.yaml is invalid: what the node keeps instead, in words
    degraded: str | None = None       # its cycles keep failing (why): alive, but not trusted to lead
    load: LoadSample | None = None
    history: tuple[LoadSample, ...] = field(default=(), compare=False, repr=False)
    runs: tuple[NodeRun, ...] = field(default=(), compare=False, repr=False)

    @property
    def running(self) -> tuple[str, ...]:
        """`<project>/<run>` of the runs it has going."""
        return tuple(f"{r.project}/{r.run}" for r in self.runs)

    def run(self, project: str, run_id: str) -> NodeRun | None:
        return next((r for r in self.runs if r.project == project and r.run == run_id), None)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeInfo:
        found = data.get("capacity")
        capacity: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
        load = data.get("load")
        return cls(
            name=data["name"], cpus=float(capacity.get("cpus", 1.0)), memory=int(capacity.get("memory", 0)),
            gpus=tuple(Gpu(int(g.get("index", 0)), g.get("uuid", ""), g.get("model", ""), int(g.get("memory", 0)))
                       for g in _items(capacity.get("gpus"))),
            tags=tuple(data.get("tags", ())), executor=data.get("executor", "process"),
            tick=int(data.get("tick", 0)), version=str(data.get("version") or ""),
            started=data.get("started") if isinstance(data.get("started"), str) else None,
            drain=bool(data.get("drain", False)), fenced=bool(data.get("fenced", False)),
            settings_held=data["settings_held"] if isinstance(data.get("settings_held"), str) else None,
            degraded=data["degraded"] if isinstance(data.get("degraded"), str) else None,
            load=LoadSample.from_dict(load) if isinstance(load, Mapping) else None,
            history=tuple(LoadSample.from_dict(sample) for sample in _items(data.get("history"))),
            runs=tuple(NodeRun.from_dict(r) for r in _items(data.get("runs"))),
        )


@dataclass(frozen=True)
class ResultFile:
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class ResultManifest:
    """`projects/<p>/results/<run>.yaml`: every file a run left in its workspace."""

    project: str
    run: str
    stage: str = ""
    node: str = ""
    created: str | None = None
    workspace: str = ""
    total_size: int = 0
    truncated: bool = False
    files: tuple[ResultFile, ...] = ()
    unlisted: tuple[tuple[str, str], ...] = ()  # (path, why it could not be listed)
    links: tuple[tuple[str, str], ...] = ()     # (path, target): symbolic links, never followed

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResultManifest:
        return cls(
            project=str(data.get("project", "")), run=str(data.get("run", "")), stage=str(data.get("stage") or ""),
            node=str(data.get("node") or ""), created=data.get("created"), workspace=str(data.get("workspace") or ""),
            total_size=int(data.get("total_size", 0)), truncated=bool(data.get("truncated", False)),
            files=tuple(ResultFile(str(f["path"]), int(f["size"]), str(f["sha256"])) for f in _items(data.get("files"))),
            unlisted=tuple((str(u.get("path", "")), str(u.get("reason", ""))) for u in _items(data.get("unlisted"))),
            links=tuple((str(k.get("path", "")), str(k.get("target", ""))) for k in _items(data.get("links"))),
        )
