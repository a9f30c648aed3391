"""Runs each stage as a Docker container on this node's engine.

A container carries labels naming its project, run and node, so a restarted
reconciler finds its own containers again, keeps their logs going and reports
the ones that ended while nobody watched. While the tracker (`tracker.py`)
follows a run, its watcher streams the container's output to the log file on
the node's disk, waits for the exit, and once the exit is reported the
container is removed.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
import requests

from reconciler.clock import format_time, parse_time, utcnow
from reconciler.errors import ExecutorError
from reconciler.executors import images, watchdog
from reconciler.executors.base import (
    LABEL_CLUSTER,
    LABEL_NODE,
    LABEL_PROJECT,
    LABEL_RUN,
    LABEL_STAGE,
    STOP_NOTES,
    ExitCallback,
    LaunchSpec,
    StartInfo,
    expand,
    make_folders,
    stage_env,
)
from reconciler.executors.tracker import STOP_GRACE_S, WAKE_S, Ended, Found, RunTracker
from reconciler.units import format_size

__all__ = ["STOP_GRACE_S", "DockerEngine", "DockerExecutor", "container_name"]

log = logging.getLogger(__name__)

# Where a re-attaching watcher finds what the LaunchSpec said; only this module reads them.
LABEL_LOG = "winslow.log"
LABEL_TIMEOUT = "winslow.timeout"

_LIVE = {"running", "paused", "restarting"}
_NAME_INVALID = re.compile(r"[^a-zA-Z0-9_.-]+")
_NAME_MAX = 120
_FRACTION = re.compile(r"\.(\d+)")
# The init (tini) that runs as PID 1 says so when the stage's command cannot be executed.
_INIT_EXEC_FAILED = re.compile(rb"\[FATAL tini \(\d+\)\] exec (.+?) failed: ([^\r\n]+)")
# What talking to the engine can raise: its own errors, or the socket's when it is down.
_ENGINE_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)


@dataclass(eq=False)
class _Container:
    """One run's container, and what its watcher learns while following it."""

    project: str
    run_id: str
    container: Any
    log_path: Path | None
    since: float | None = None  # adopted: the log file already holds the output until then
    exec_failure: str | None = None
    stream: Any = None

    def __str__(self) -> str:
        return f"container={self.container.name}"

    def describe(self, node: str) -> str:
        return f"node={node} project={self.project} run={self.run_id} {self}"


class DockerEngine:
    """Creates, starts, waits for, stops and lists the containers of one node."""

    name = "docker"
    images = True

    def __init__(self, node: str, client: Any = None, cluster: str = "", work: Path | None = None) -> None:
        self.node = node
        self.cluster = cluster
        self.work = work  # where the node's lease file is; its watchdog stops the containers once it lapses
        try:
            self._client: Any = client if client is not None else docker.from_env(max_pool_size=64)
        except docker.errors.DockerException as exc:
            raise ExecutorError(f"no Docker engine answers on this node: {exc}") from exc
        self._prepared: dict[tuple[str, str], tuple[Any, Any]] = {}  # created, not started: (image, container)

    def prepare(self, spec: LaunchSpec) -> None:
        # Only an image already here: a pull can take minutes and belongs to spawn(), as does a registry's tag,
        # which spawn() pulls to learn the digest it names now.
        if images.registry_of(spec.image) and not images.by_digest(spec.image):
            return
        try:
            image = self._client.images.get(spec.image)
        except _ENGINE_ERRORS as exc:
            raise ExecutorError(f"image '{spec.image}' is not on {self.node} yet: {_explain(exc)}") from exc
        self._prepared[(spec.project, spec.run_id)] = (image, self._create(spec))

    def waits_for(self, spec: LaunchSpec) -> str | None:
        """A registry's tag is always pulled (to learn what it names now), a digest when it is not here yet."""
        if images.registry_of(spec.image) is None:
            return None
        if images.by_digest(spec.image):
            try:
                self._client.images.get(spec.image)
                return None
            except _ENGINE_ERRORS:
                pass
        return f"pulling {spec.image}"

    def discard(self, project: str, run_id: str) -> None:
        prepared = self._prepared.pop((project, run_id), None)
        if prepared is not None:
            _remove(prepared[1])

    def spawn(self, spec: LaunchSpec) -> tuple[_Container, StartInfo]:
        prepared = self._prepared.pop((spec.project, spec.run_id), None)
        pulled = None
        if prepared:
            image, container = prepared
        else:
            image, pulled = self._image(spec)
            pinned = images.digest_ref(image, spec.image) if images.registry_of(spec.image) else None
            container = self._create(replace(spec, image=pinned) if pinned else spec)  # never what the tag says later
        self._start(container, spec)
        run = _Container(spec.project, spec.run_id, container, spec.log_path)
        # The registry's name for it when it came from the stage's repository, else this engine's content id.
        digest = images.digest_ref(image, spec.image) or image.id
        return run, StartInfo(started=utcnow(), image_digest=digest, pulled=pulled)

    def wait(self, run: _Container, closing: threading.Event) -> Ended | None:
        self._pump_logs(run, closing)
        try:
            if not _await_exit(run.container, closing):
                return None
        except docker.errors.NotFound:
            return Ended(None, utcnow(), "the container disappeared (removed outside Winslow)")
        except _ENGINE_ERRORS as exc:
            return Ended(None, utcnow(), f"lost track of the container: {_explain(exc)}")
        ended = _ended(run)
        why = watchdog.note(self.work, run.container.name) if self.work is not None else None
        return replace(ended, reason=why) if why else ended

    def stop(self, run: _Container, grace: float) -> None:
        try:
            run.container.stop(timeout=int(grace))  # TERM to the init, KILL after the grace
        except docker.errors.NotFound:
            pass
        except _ENGINE_ERRORS as exc:
            reason = _explain(exc)
            raise ExecutorError(f"cannot stop run {run.run_id} of {run.project} on {self.node}: {reason}") from exc

    def runs(self) -> list[tuple[str, str]]:
        labels = [summary.attrs.get("Labels") or {} for summary in self._list(**{LABEL_NODE: self.node})]
        keys = [(label.get(LABEL_PROJECT, ""), label.get(LABEL_RUN, "")) for label in labels]
        return [key for key in keys if all(key)]

    def adopt(self, project: str, run_id: str) -> Found[_Container] | None:
        listed = self._list(**{LABEL_NODE: self.node, LABEL_PROJECT: project, LABEL_RUN: run_id})
        if not listed:
            return None
        try:
            container = self._client.containers.get(listed[0].id)
        except docker.errors.NotFound:
            return None
        except _ENGINE_ERRORS as exc:
            reason = _explain(exc)
            raise ExecutorError(f"cannot inspect container {listed[0].id[:12]} on {self.node}: {reason}") from exc
        state = container.attrs.get("State") or {}
        log_label = container.labels.get(LABEL_LOG)
        log_path = Path(log_label) if log_label else None
        run = _Container(project, run_id, container, log_path, since=_mtime(log_path))
        status = str(state.get("Status"))
        timeout = container.labels.get(LABEL_TIMEOUT)
        started_at = _parse_docker_time(state.get("StartedAt"))
        elapsed = time.time() - started_at.timestamp() if started_at else 0.0
        return Found(run, format_time(started_at) if started_at else None, status,
                     # one that ended meanwhile is not stopped for its timeout
                     float(timeout) if timeout and status in _LIVE else None, max(0.0, elapsed))

    def release(self, run: _Container) -> None:
        _remove(run.container)

    def interrupt(self, run: _Container) -> None:
        """Close the log stream: the watcher's read returns at once."""
        if run.stream is None:
            return
        try:
            run.stream.close()
        except Exception:  # closing is best effort; the thread is a daemon
            log.debug("cannot close the log stream: %s", run.describe(self.node), exc_info=True)

    # -- starting ----------------------------------------------------------------

    def _image(self, spec: LaunchSpec) -> tuple[Any, str | None]:
        """The image to run, pulled if need be, and what the pull was (None when there was none)."""
        ref, registry = spec.image, images.registry_of(spec.image)
        if registry is None or images.by_digest(ref):  # this engine's own, or a digest already here: no pull
            try:
                return self._client.images.get(ref), None
            except docker.errors.ImageNotFound:
                pass
            except _ENGINE_ERRORS as exc:
                raise ExecutorError(f"image '{ref}' could not be inspected on {self.node}: {_explain(exc)}") from exc
        if registry is None:
            log.info("pulling image: node=%s image=%s", self.node, ref)
            try:
                return self._client.images.pull(ref), None
            except _ENGINE_ERRORS as exc:
                raise ExecutorError(
                    f"image '{ref}' not found on {self.node} and could not be pulled: {_explain(exc)}"
                ) from exc
        return self._pull(ref, registry, spec.log_path)

    def _pull(self, ref: str, registry: str, log_path: Path | None) -> tuple[Any, str]:
        """Pull from a registry, its progress into the run's log; the image and a line saying what came."""
        log.info("pulling image: node=%s image=%s", self.node, ref)
        progress = images.Progress(ref, lambda line: _log_line(log_path, line))
        _log_line(log_path, f"winslow: pulling {ref} on {self.node}")
        try:
            images.follow_pull(self._client.api.pull(ref, stream=True, decode=True), ref, registry, self.node,
                               progress)
            image = self._client.images.get(ref)
        except _ENGINE_ERRORS as exc:
            raise ExecutorError(images.explain_pull(ref, registry, self.node, _explain(exc))) from exc
        pulled = f"pulled {images.digest_ref(image, ref) or ref} ({progress.summary()})"
        _log_line(log_path, f"winslow: {pulled}")
        return image, pulled

    def _create(self, spec: LaunchSpec) -> Any:
        env = stage_env(spec, "/resources", "/input" if spec.input_dir else None, "/workspace")
        if spec.gpus and "CUDA_VISIBLE_DEVICES" not in {**spec.env, **spec.secrets}:
            # Docker hands the container only the requested GPUs, renumbered from 0:
            # the node's indexes would point CUDA at devices it cannot see.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(spec.gpus)))
        labels = {LABEL_PROJECT: spec.project, LABEL_RUN: spec.run_id, LABEL_NODE: self.node,
                  LABEL_STAGE: spec.stage, LABEL_LOG: str(Path(spec.log_path).absolute())}
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
                spec.image, expand(spec.command, env), name=container_name(self.node, spec.project, spec.run_id, self.cluster),
                environment=env, labels=labels, mounts=self._mounts(spec), detach=True,
                init=True,  # a real PID 1: the program gets TERM on stop, zombies are reaped
                **options,
            )
        except _ENGINE_ERRORS as exc:
            raise ExecutorError(f"container could not be created on {self.node}: {_explain(exc)}") from exc

    def _mounts(self, spec: LaunchSpec) -> list[docker.types.Mount]:
        make_folders(spec, self.node, Path(spec.resources_dir))  # a bind mount needs its source
        mounts = [
            docker.types.Mount("/resources", str(Path(spec.resources_dir).absolute()), type="bind", read_only=True),
            docker.types.Mount("/workspace", str(Path(spec.workspace_dir).absolute()), type="bind"),
        ]
        if spec.input_dir is not None:
            mounts.append(docker.types.Mount("/input", str(Path(spec.input_dir).absolute()), type="bind",
                                             read_only=True))
        return mounts

    def _start(self, container: Any, spec: LaunchSpec) -> None:
        try:
            container.start()
        except _ENGINE_ERRORS as exc:
            _remove(container)
            reason = _explain(exc)
            if spec.gpus and "could not select device driver" in reason:
                reason += f" (no GPU support in Docker on {self.node}: is the NVIDIA Container Toolkit installed?)"
            raise ExecutorError(f"container could not start: {reason}") from exc

    # -- following ---------------------------------------------------------------

    def _list(self, **labels: str) -> list[Any]:
        if self.cluster:
            labels = {**labels, LABEL_CLUSTER: self.cluster}
        filters = {"label": [f"{k}={v}" for k, v in labels.items()]}
        try:
            listed: list[Any] = self._client.containers.list(all=True, sparse=True, filters=filters)
        except _ENGINE_ERRORS as exc:
            raise ExecutorError(f"cannot list the containers of {self.node}: {_explain(exc)}") from exc
        return listed

    def _pump_logs(self, run: _Container, closing: threading.Event) -> None:
        """Append the container's output to the log file until the container ends or the executor closes."""
        try:
            run.stream = run.container.logs(stream=True, follow=True, since=run.since)
        except _ENGINE_ERRORS as exc:
            log.warning("cannot read logs: %s error=%s", run.describe(self.node), _explain(exc))
            return
        if closing.is_set():  # close() came before there was a stream to close
            self.interrupt(run)
        out = _open_log(run.log_path)
        try:
            for chunk in run.stream:
                if run.exec_failure is None and b"[FATAL tini" in chunk:
                    run.exec_failure = _exec_failure(chunk)
                if out is not None:
                    try:
                        out.write(chunk)
                        out.flush()
                    except OSError as exc:
                        log.warning("cannot write log: %s error=%s", run.describe(self.node), exc)
                        out.close()
                        out = None
        except Exception:
            if not closing.is_set():  # the tracker forgets the run: the next running() adopts it afresh
                raise
        finally:
            if out is not None:
                out.close()


class DockerExecutor(RunTracker[_Container]):
    """The Executor of a node whose stages run as Docker containers."""

    def __init__(self, node: str, on_exit: ExitCallback, client: Any = None, cluster: str = "",
                 work: Path | None = None) -> None:
        super().__init__(node, on_exit, DockerEngine(node, client, cluster, work),
                         notes=work / STOP_NOTES if work is not None else None)
        if work is not None:
            watchdog.ensure(node, cluster, work)


def _await_exit(container: Any, closing: threading.Event) -> bool:
    """Wait until the container has ended (True) or the executor closes (False)."""
    while not closing.is_set():
        try:
            container.wait(timeout=WAKE_S)
        except requests.exceptions.RequestException as exc:
            if "timed out" not in str(exc):  # the engine is gone, not merely slow to answer
                raise
        container.reload()  # under load the engine may answer a wait early: only the state counts
        if (container.attrs.get("State") or {}).get("Status") not in _LIVE:
            return True
    return False


def _ended(run: _Container) -> Ended:
    container = run.container
    state = container.attrs.get("State") or {}
    status = state.get("Status")
    exit_code = state.get("ExitCode") if status in ("exited", "dead") else None
    reason = None
    if state.get("OOMKilled"):
        limit = (container.attrs.get("HostConfig") or {}).get("Memory") or 0
        reason = f"out of memory (limit {format_size(limit)})" if limit else "out of memory"
    elif exit_code in (126, 127) and run.exec_failure:
        reason = run.exec_failure
    elif status == "created":
        reason = "the container was created but never started"
    finished = _parse_docker_time(state.get("FinishedAt"))
    return Ended(exit_code, format_time(finished) if finished else utcnow(), reason)


def container_name(node: str, project: str, run_id: str, cluster: str = "") -> str:
    """`winslow-<project>-<run>-<node>[-<cluster>]`, made valid for Docker and unique per engine: two state repos
    whose nodes share an engine (and a node name) never take each other's container names."""
    raw = f"winslow-{project}-{run_id}-{node}" + (f"-{cluster[:8]}" if cluster else "")
    name = _NAME_INVALID.sub("-", raw)
    if name == raw and len(name) <= _NAME_MAX:
        return name
    # Sanitising or cutting could make two runs collide; the hash of the original keeps them apart.
    digest = hashlib.sha1(raw.encode()).hexdigest()[:10]
    return f"{name[:_NAME_MAX - 11]}-{digest}"


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


def _open_log(path: Path | None) -> Any:
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "ab")
    except OSError as exc:
        log.warning("cannot open log file %s: %s", path, exc)
        return None


def _log_line(path: Path | None, line: str) -> None:
    """One line of Winslow's own into a run's log (a pull's progress, before the container writes there)."""
    out = _open_log(path)
    if out is not None:
        with out:
            try:
                out.write(line.encode() + b"\n")
            except OSError as exc:
                log.warning("cannot write log file %s: %s", path, exc)


def _mtime(path: Path | None) -> float | None:
    try:
        return path.stat().st_mtime if path is not None else None
    except OSError:
        return None


def _parse_docker_time(text: str | None) -> _dt.datetime | None:
    """Docker writes RFC 3339 with up to nine digits of a second; a zero year means 'never'."""
    if not text or text.startswith("0001-"):
        return None
    return parse_time(_FRACTION.sub(lambda m: "." + m.group(1)[:6].ljust(6, "0"), text, count=1))
