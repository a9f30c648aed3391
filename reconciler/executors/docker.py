"""Runs each stage as a Docker container on this node's engine.

A container carries labels naming its project, run and node, so a restarted
reconciler finds its own containers again (`running()`), keeps their logs
going and reports the ones that ended while nobody watched. One watcher
thread per run streams the log to the node's disk, waits for the exit and
reports it through `on_exit` at once, then removes the container.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
import requests

from reconciler.errors import ExecutorError
from reconciler.executors.base import (
    LABEL_CLUSTER,
    LABEL_NODE,
    LABEL_PROJECT,
    LABEL_RUN,
    LABEL_STAGE,
    ExitCallback,
    ExitInfo,
    LaunchSpec,
    RunningInfo,
    StartInfo,
    expand,
    stage_env,
    utcnow,
)
from reconciler.units import format_duration, format_size

log = logging.getLogger(__name__)

# Where a re-attaching watcher finds what the LaunchSpec said; only this module reads them.
LABEL_LOG = "winslow.log"
LABEL_TIMEOUT = "winslow.timeout"

STOP_GRACE_S = 5
_JOIN_TIMEOUT_S = 2.0
_LIVE = {"running", "paused", "restarting"}
_NAME_INVALID = re.compile(r"[^a-zA-Z0-9_.-]+")
_NAME_MAX = 120
# The init (tini) that runs as PID 1 says so when the stage's command cannot be executed.
_INIT_EXEC_FAILED = re.compile(rb"\[FATAL tini \(\d+\)\] exec (.+?) failed: ([^\r\n]+)")
# What talking to the engine can raise: its own errors, or the socket's when it is down.
_ENGINE_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)


@dataclass(eq=False)
class _Watch:
    """One run this executor follows, from start (or adoption) to its exit report."""

    project: str
    run_id: str
    container: Any
    log_path: Path | None
    started: str | None
    since: float | None = None
    stop_reason: str | None = None
    exec_failure: str | None = None
    stream: Any = None
    timer: threading.Timer | None = None
    thread: threading.Thread | None = None
    done: threading.Event = field(default_factory=threading.Event)
    reported: bool = False  # the exit reached on_exit: until then the run counts as running

    @property
    def key(self) -> tuple[str, str]:
        return (self.project, self.run_id)

    def describe(self) -> str:
        return f"project={self.project} run={self.run_id}"


class DockerExecutor:
    name = "docker"

    def __init__(self, node: str, on_exit: ExitCallback, client: Any = None, cluster: str = "") -> None:
        self.node = node
        self.cluster = cluster
        self._on_exit = on_exit
        self._client = client if client is not None else _connect()
        self._lock = threading.Lock()
        self._watches: dict[tuple[str, str], _Watch | None] = {}  # None: being started
        self._prepared: dict[tuple[str, str], tuple[Any, Any]] = {}  # created, not started: (image, container)
        self._closing = threading.Event()

    # -- the Executor interface ------------------------------------------------

    def prepare(self, spec: LaunchSpec) -> None:
        """Create the run's container while its claim is being pushed; only start() runs it."""
        key = (spec.project, spec.run_id)
        with self._lock:
            if key in self._watches or self._closing.is_set():
                return
            self._watches[key] = None
        try:
            # Only an image already here: a pull can take minutes and belongs to start().
            image = self._client.images.get(spec.image)
            self._prepared[key] = (image, self._create(spec))
        except (ExecutorError, *_ENGINE_ERRORS):
            with self._lock:
                self._watches.pop(key, None)  # start() tries again and reports why

    def discard(self, project: str, run_id: str) -> None:
        """Remove a prepared container whose claim did not land."""
        prepared = self._prepared.pop((project, run_id), None)
        if prepared is not None:
            _remove(prepared[1])
            with self._lock:
                self._watches.pop((project, run_id), None)

    def start(self, spec: LaunchSpec) -> StartInfo:
        if self._closing.is_set():
            raise ExecutorError(f"cannot start run {spec.run_id} of {spec.project}: the executor is closed")
        key = (spec.project, spec.run_id)
        prepared = self._prepared.pop(key, None)
        with self._lock:
            if prepared is None and key in self._watches:
                raise ExecutorError(f"run {spec.run_id} of {spec.project} is already running on {self.node}")
            self._watches[key] = None  # keeps running() from adopting the half-made container
        try:
            image, container = prepared if prepared else (self._image(spec.image), self._create(spec))
            self._start_container(container, spec)
            started = utcnow()
        except BaseException:
            with self._lock:
                self._watches.pop(key, None)
            raise
        log.info("container started: node=%s project=%s run=%s container=%s image=%s",
                 self.node, spec.project, spec.run_id, container.name, spec.image)
        watch = _Watch(spec.project, spec.run_id, container, spec.log_path, started)
        self._follow(watch, spec.timeout, time.monotonic())
        return StartInfo(started=started, image_digest=_digest(image))

    def stop(self, project: str, run_id: str, reason: str) -> None:
        with self._lock:
            watch = self._watches.get((project, run_id))
        if watch is None:
            watch = self._adopt_run(project, run_id)
        if watch is None or watch.done.is_set():
            return
        if watch.stop_reason is None:
            watch.stop_reason = reason
        log.info("stopping container: node=%s %s reason=%s", self.node, watch.describe(), reason)
        self._stop_container(watch)

    def running(self) -> list[RunningInfo]:
        alive: list[RunningInfo] = []
        for summary in self._list(**{LABEL_NODE: self.node}):
            labels = summary.attrs.get("Labels") or {}
            key = (labels.get(LABEL_PROJECT, ""), labels.get(LABEL_RUN, ""))
            if not all(key):
                continue
            with self._lock:
                known = key in self._watches
                watch = self._watches.get(key)
            if not known:
                watch = self._adopt(summary.id)
            if watch is None:
                continue  # being started right now, or gone, or already exited
            if not watch.reported:  # a run counts as running until its exit has been reported
                alive.append(RunningInfo(watch.project, watch.run_id, watch.started))
        return alive

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            watches = [w for w in self._watches.values() if w is not None]
        for watch in watches:
            if watch.timer is not None:
                watch.timer.cancel()
            _close_stream(watch)
        deadline = time.monotonic() + _JOIN_TIMEOUT_S
        for watch in watches:
            if watch.thread is not None:
                watch.thread.join(timeout=max(0.0, deadline - time.monotonic()))

    # -- starting ----------------------------------------------------------------

    def _image(self, ref: str) -> Any:
        try:
            return self._client.images.get(ref)
        except docker.errors.ImageNotFound:
            pass
        except _ENGINE_ERRORS as exc:
            raise ExecutorError(f"image '{ref}' could not be inspected on {self.node}: {_explain(exc)}") from exc
        log.info("pulling image: node=%s image=%s", self.node, ref)
        try:
            return self._client.images.pull(ref)
        except _ENGINE_ERRORS as exc:
            raise ExecutorError(
                f"image '{ref}' not found on {self.node} and could not be pulled: {_explain(exc)}"
            ) from exc

    def _create(self, spec: LaunchSpec) -> Any:
        env = stage_env(spec, "/resources", "/input" if spec.input_dir else None, "/workspace")
        if spec.gpus and "CUDA_VISIBLE_DEVICES" not in {**spec.env, **spec.secrets}:
            # Docker hands the container only the requested GPUs, renumbered from 0:
            # the node's indexes would point CUDA at devices it cannot see.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(spec.gpus)))
        labels = {
            LABEL_PROJECT: spec.project,
            LABEL_RUN: spec.run_id,
            LABEL_NODE: self.node,
            LABEL_STAGE: spec.stage,
            LABEL_LOG: str(Path(spec.log_path).absolute()),
        }
        if self.cluster:
            labels[LABEL_CLUSTER] = self.cluster
        if spec.timeout is not None:
            labels[LABEL_TIMEOUT] = repr(float(spec.timeout))
        options: dict[str, Any] = {}
        if spec.cpus:
            options["nano_cpus"] = int(spec.cpus * 1e9)
        if spec.memory:
            options["mem_limit"] = int(spec.memory)
        if spec.gpus:
            options["device_requests"] = [
                docker.types.DeviceRequest(device_ids=[str(g) for g in spec.gpus], capabilities=[["gpu"]])
            ]
        try:
            return self._client.containers.create(
                spec.image,
                expand(spec.command, env),
                name=container_name(self.node, spec.project, spec.run_id),
                environment=env,
                labels=labels,
                mounts=self._mounts(spec),
                detach=True,
                init=True,  # a real PID 1: the program gets TERM on stop, zombies are reaped
                **options,
            )
        except _ENGINE_ERRORS as exc:
            raise ExecutorError(f"container could not be created on {self.node}: {_explain(exc)}") from exc

    def _mounts(self, spec: LaunchSpec) -> list[docker.types.Mount]:
        resources = Path(spec.resources_dir).absolute()
        workspace = Path(spec.workspace_dir).absolute()
        try:
            resources.mkdir(parents=True, exist_ok=True)
            workspace.mkdir(parents=True, exist_ok=True)
            Path(spec.log_path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExecutorError(f"cannot prepare the folders of run {spec.run_id} on {self.node}: {exc}") from exc
        mounts = [
            docker.types.Mount("/resources", str(resources), type="bind", read_only=True),
            docker.types.Mount("/workspace", str(workspace), type="bind"),
        ]
        if spec.input_dir is not None:
            source = Path(spec.input_dir).absolute()
            if not source.is_dir():
                raise ExecutorError(f"input folder {source} of run {spec.run_id} does not exist on {self.node}")
            mounts.append(docker.types.Mount("/input", str(source), type="bind", read_only=True))
        return mounts

    def _start_container(self, container: Any, spec: LaunchSpec) -> None:
        try:
            container.start()
        except _ENGINE_ERRORS as exc:
            _remove(container)
            reason = _explain(exc)
            if spec.gpus and "could not select device driver" in reason:
                reason += f" (no GPU support in Docker on {self.node}: is the NVIDIA Container Toolkit installed?)"
            raise ExecutorError(f"container could not start: {reason}") from exc

    # -- adopting ----------------------------------------------------------------

    def _list(self, **labels: str) -> list[Any]:
        if self.cluster:
            labels = {**labels, LABEL_CLUSTER: self.cluster}
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        try:
            return self._client.containers.list(all=True, sparse=True, filters=filters)
        except _ENGINE_ERRORS as exc:
            raise ExecutorError(f"cannot list the containers of {self.node}: {_explain(exc)}") from exc

    def _adopt_run(self, project: str, run_id: str) -> _Watch | None:
        found = self._list(**{LABEL_NODE: self.node, LABEL_PROJECT: project, LABEL_RUN: run_id})
        return self._adopt(found[0].id) if found else None

    def _adopt(self, container_id: str) -> _Watch | None:
        """Follow a container started before this executor existed; exited ones get reported."""
        if self._closing.is_set():
            return None
        try:
            container = self._client.containers.get(container_id)
        except docker.errors.NotFound:
            return None
        except _ENGINE_ERRORS as exc:
            raise ExecutorError(f"cannot inspect container {container_id[:12]} on {self.node}: {_explain(exc)}") from exc
        labels = container.labels
        key = (labels.get(LABEL_PROJECT, ""), labels.get(LABEL_RUN, ""))
        state = container.attrs.get("State") or {}
        log_label = labels.get(LABEL_LOG)
        log_path = Path(log_label) if log_label else None
        watch = _Watch(key[0], key[1], container, log_path, _docker_time(state.get("StartedAt")),
                       since=_mtime(log_path))
        with self._lock:
            if key in self._watches:
                return self._watches[key]
            self._watches[key] = watch
        log.info("adopting container: node=%s %s container=%s state=%s",
                 self.node, watch.describe(), container.name, state.get("Status"))
        timeout = labels.get(LABEL_TIMEOUT)
        started_at = _docker_epoch(state.get("StartedAt"))
        elapsed = time.time() - started_at if started_at else 0.0
        self._follow(watch, float(timeout) if timeout else None, time.monotonic() - max(0.0, elapsed))
        return watch

    # -- watching ----------------------------------------------------------------

    def _follow(self, watch: _Watch, timeout: float | None, began: float) -> None:
        with self._lock:
            self._watches[watch.key] = watch
        if timeout is not None:
            remaining = max(0.0, timeout - (time.monotonic() - began))
            watch.timer = threading.Timer(remaining, self._expire, args=(watch, timeout))
            watch.timer.daemon = True
            watch.timer.start()
        watch.thread = threading.Thread(
            target=self._watch, args=(watch,), daemon=True, name=f"winslow-watch-{watch.run_id}"
        )
        watch.thread.start()

    def _expire(self, watch: _Watch, timeout: float) -> None:
        if watch.done.is_set() or self._closing.is_set():
            return
        if watch.stop_reason is None:
            watch.stop_reason = f"timeout after {format_duration(timeout)}"
        log.info("timeout: node=%s %s after=%ss", self.node, watch.describe(), timeout)
        try:
            self._stop_container(watch)
        except ExecutorError as exc:
            log.error("%s", exc)

    def _watch(self, watch: _Watch) -> None:
        try:
            self._pump_logs(watch)
            if self._closing.is_set():
                return
            info = self._wait(watch)
            if self._closing.is_set():
                return
            if watch.timer is not None:
                watch.timer.cancel()
            watch.done.set()
            if self._report(watch, info):
                _remove(watch.container)
            with self._lock:
                if self._watches.get(watch.key) is watch:
                    del self._watches[watch.key]
        except Exception:  # a watcher must never die silently
            log.exception("watcher failed: node=%s %s", self.node, watch.describe())
            if not watch.done.is_set():
                with self._lock:  # the next running() adopts the container afresh
                    if self._watches.get(watch.key) is watch:
                        del self._watches[watch.key]

    def _pump_logs(self, watch: _Watch) -> None:
        """Append the container's output to the log file until the container ends."""
        kwargs: dict[str, Any] = {"stream": True, "follow": True}
        if watch.since:
            kwargs["since"] = watch.since
        try:
            watch.stream = watch.container.logs(**kwargs)
        except _ENGINE_ERRORS as exc:
            log.warning("cannot read logs: node=%s %s error=%s", self.node, watch.describe(), _explain(exc))
            return
        if self._closing.is_set():
            _close_stream(watch)
        out = _open_log(watch.log_path)
        try:
            for chunk in watch.stream:
                if watch.exec_failure is None and b"[FATAL tini" in chunk:
                    watch.exec_failure = _exec_failure(chunk)
                if out is not None:
                    try:
                        out.write(chunk)
                        out.flush()
                    except OSError as exc:
                        log.warning("cannot write log: node=%s %s error=%s", self.node, watch.describe(), exc)
                        out.close()
                        out = None
        finally:
            if out is not None:
                out.close()

    def _wait(self, watch: _Watch) -> ExitInfo:
        container = watch.container
        try:
            for _ in range(_WAIT_ATTEMPTS):  # under load the engine may answer a wait early
                container.wait()
                container.reload()
                if (container.attrs.get("State") or {}).get("Status") not in _LIVE:
                    break
        except docker.errors.NotFound:
            return ExitInfo(watch.project, watch.run_id, None, utcnow(),
                            watch.stop_reason or "the container disappeared (removed outside Winslow)")
        except _ENGINE_ERRORS as exc:
            return ExitInfo(watch.project, watch.run_id, None, utcnow(),
                            watch.stop_reason or f"lost track of the container: {_explain(exc)}")
        state = container.attrs.get("State") or {}
        status = state.get("Status")
        exit_code = state.get("ExitCode") if status in ("exited", "dead") else None
        reason = watch.stop_reason
        if reason is None and state.get("OOMKilled"):
            limit = (container.attrs.get("HostConfig") or {}).get("Memory") or 0
            reason = f"out of memory (limit {format_size(limit)})" if limit else "out of memory"
        if reason is None and exit_code in (126, 127) and watch.exec_failure:
            reason = watch.exec_failure
        if reason is None and status == "created":
            reason = "the container was created but never started"
        finished = _docker_time(state.get("FinishedAt")) or utcnow()
        return ExitInfo(watch.project, watch.run_id, exit_code, finished, reason)

    def _report(self, watch: _Watch, info: ExitInfo) -> bool:
        log.info("container exited: node=%s %s exit_code=%s reason=%s",
                 self.node, watch.describe(), info.exit_code, info.reason)
        try:
            self._on_exit(info)
            watch.reported = True
        except Exception:  # keep the container so a restart reports it again
            log.exception("on_exit failed, keeping the container: node=%s %s", self.node, watch.describe())
            return False
        return True

    def _stop_container(self, watch: _Watch) -> None:
        try:
            watch.container.stop(timeout=STOP_GRACE_S)
        except docker.errors.NotFound:
            pass
        except _ENGINE_ERRORS as exc:
            raise ExecutorError(
                f"cannot stop run {watch.run_id} of {watch.project} on {self.node}: {_explain(exc)}"
            ) from exc


_WAIT_ATTEMPTS = 5


def container_name(node: str, project: str, run_id: str) -> str:
    """`winslow-<project>-<run>-<node>`, made valid for Docker and unique per engine."""
    raw = f"winslow-{project}-{run_id}-{node}"
    name = _NAME_INVALID.sub("-", raw)
    if name == raw and len(name) <= _NAME_MAX:
        return name
    # Sanitising or cutting could make two runs collide; the hash of the original keeps them apart.
    digest = hashlib.sha1(raw.encode()).hexdigest()[:10]
    return f"{name[:_NAME_MAX - 11]}-{digest}"


def _connect() -> Any:
    try:
        return docker.from_env(max_pool_size=64)
    except docker.errors.DockerException as exc:
        raise ExecutorError(f"no Docker engine answers on this node: {exc}") from exc


def _digest(image: Any) -> str | None:
    repo_digests = image.attrs.get("RepoDigests") or []
    return repo_digests[0] if repo_digests else image.id


def _explain(exc: Exception) -> str:
    """The engine's own words, without the layers of runtime prefixes."""
    text = str(getattr(exc, "explanation", None) or exc)
    marker = "unable to start container process: "
    if marker in text:
        text = text.split(marker, 1)[1]
    text = text.removesuffix(": unknown")
    return " ".join(text.split())


def _exec_failure(chunk: bytes) -> str | None:
    match = _INIT_EXEC_FAILED.search(chunk)
    if match is None:
        return None
    command, why = (part.decode(errors="replace") for part in match.groups())
    return f"command '{command}' could not be run: {why}"


def _remove(container: Any) -> None:
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        pass
    except _ENGINE_ERRORS as exc:
        if getattr(exc, "status_code", None) != 409:  # 409: removal already in progress
            log.warning("cannot remove container %s: %s", container.name, _explain(exc))


def _close_stream(watch: _Watch) -> None:
    stream = watch.stream
    if stream is None:
        return
    try:
        stream.close()
    except Exception:  # closing is best effort; the thread is a daemon
        log.debug("cannot close log stream of %s", watch.describe(), exc_info=True)


def _open_log(path: Path | None) -> Any:
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "ab")
    except OSError as exc:
        log.warning("cannot open log file %s: %s", path, exc)
        return None


def _mtime(path: Path | None) -> float | None:
    try:
        return path.stat().st_mtime if path is not None else None
    except OSError:
        return None


def _parse_docker_time(text: str | None) -> _dt.datetime | None:
    """Docker writes RFC 3339 with nanoseconds; a zero year means 'never'."""
    if not text or text.startswith("0001-"):
        return None
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$", text)
    if not match:
        return None
    base, fraction, zone = match.groups()
    micro = (fraction or "0")[:6].ljust(6, "0")
    stamp = _dt.datetime.fromisoformat(f"{base}.{micro}{'+00:00' if zone == 'Z' else zone}")
    return stamp.astimezone(_dt.timezone.utc)


def _docker_time(text: str | None) -> str | None:
    stamp = _parse_docker_time(text)
    if stamp is None:
        return None
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _docker_epoch(text: str | None) -> float | None:
    stamp = _parse_docker_time(text)
    return stamp.timestamp() if stamp is not None else None
