"""The Docker executor against the real engine, with a busybox image built locally."""
from __future__ import annotations

import queue
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import docker
import pytest

from reconciler.errors import ExecutorError
from reconciler.executors.base import (
    LABEL_NODE,
    LABEL_PROJECT,
    LABEL_RUN,
    LABEL_STAGE,
    ExitInfo,
    LaunchSpec,
)
from reconciler.executors.docker import LABEL_TIMEOUT, DockerExecutor, container_name

pytestmark = pytest.mark.docker

EXIT_WAIT_S = 20.0
# Waits inside the container until the test creates /workspace/go: no timing guesses.
WAIT_FOR_GO = "while [ ! -e /workspace/go ]; do sleep 0.05; done"


class Exits:
    """The on_exit callback of one executor, with a bounded way to wait for a report."""

    def __init__(self) -> None:
        self._queue: queue.Queue[ExitInfo] = queue.Queue()

    def __call__(self, info: ExitInfo) -> None:
        self._queue.put(info)

    def next(self, timeout: float = EXIT_WAIT_S) -> ExitInfo:
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no exit reported within {timeout}s")

    def assert_none(self, within: float = 0.5) -> None:
        with pytest.raises(queue.Empty):
            self._queue.get(timeout=within)


@dataclass
class Node:
    """One node's view: its name, its folders and a way to build launch specs."""

    name: str
    root: Path
    image: str

    def spec(self, run_id: str, command: list[str], **overrides) -> LaunchSpec:
        spec = LaunchSpec(
            project="ulm-0812",
            run_id=run_id,
            stage="detect",
            node=self.name,
            image=self.image,
            command=tuple(command),
            env={},
            resources_dir=self.root / "resources",
            workspace_dir=self.root / "workspaces" / "ulm-0812" / run_id,
            input_dir=None,
            log_path=self.root / "logs" / f"{run_id}.log",
        )
        return replace(spec, **overrides)


@pytest.fixture
def node(tmp_path, busybox_image, docker_client) -> Iterator[Node]:
    name = f"test-{uuid.uuid4().hex[:8]}"
    (tmp_path / "resources").mkdir()
    yield Node(name, tmp_path, busybox_image)
    for container in containers_of(docker_client, name):
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass  # its watcher removed it first


@pytest.fixture
def make_executor(docker_client, node) -> Iterator[Callable[[], tuple[DockerExecutor, Exits]]]:
    """New executors for the test's node (a second one stands for a restarted reconciler)."""
    made: list[DockerExecutor] = []

    def make() -> tuple[DockerExecutor, Exits]:
        exits = Exits()
        executor = DockerExecutor(node.name, exits, client=docker_client)
        made.append(executor)
        return executor, exits

    yield make
    for executor in made:
        executor.close()


@pytest.fixture
def executor(make_executor) -> tuple[DockerExecutor, Exits]:
    return make_executor()


def wait_until(predicate: Callable[[], bool], timeout: float = EXIT_WAIT_S, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not met within {timeout}s")
        time.sleep(0.05)


def containers_of(docker_client, node: Node | str) -> list:
    name = node if isinstance(node, str) else node.name
    # Watchers remove containers concurrently: a listed one may be gone before it is inspected.
    return docker_client.containers.list(all=True, filters={"label": f"{LABEL_NODE}={name}"}, ignore_removed=True)


def test_run_writes_log_and_workspace_reads_resources_and_exits_zero(executor, node, docker_client):
    run, exits = executor
    (node.root / "resources" / "video.txt").write_text("frames\n")
    script = (
        "echo hello; cat /resources/video.txt; echo result > /workspace/out.txt; "
        "if touch /resources/x 2>/dev/null; then echo resources-writable; else echo resources-read-only; fi; "
        "echo to-stderr >&2"
    )
    spec = node.spec("3-detect-1", ["sh", "-c", script])

    started = run.start(spec)
    info = exits.next()

    assert info == ExitInfo("ulm-0812", "3-detect-1", 0, info.finished, None)
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", info.finished)
    assert started.image_digest and started.image_digest.startswith("sha256:")
    lines = spec.log_path.read_text().splitlines()
    # stdout and stderr reach Docker through separate pipes: their lines may interleave either way.
    assert [line for line in lines if line != "to-stderr"] == ["hello", "frames", "resources-read-only"]
    assert "to-stderr" in lines
    assert (spec.workspace_dir / "out.txt").read_text() == "result\n"
    assert not (node.root / "resources" / "x").exists()
    wait_until(lambda: not containers_of(docker_client, node), what="container removed after its exit")


def test_container_carries_labels_and_name_and_is_listed_as_running(executor, node, docker_client):
    run, exits = executor
    spec = node.spec("3-detect-1", ["sh", "-c", WAIT_FOR_GO], cpus=0.5, memory=64 * 1024**2)
    run.start(spec)

    [container] = containers_of(docker_client, node)
    assert container.labels[LABEL_PROJECT] == "ulm-0812"
    assert container.labels[LABEL_RUN] == "3-detect-1"
    assert container.labels[LABEL_NODE] == node.name
    assert container.labels[LABEL_STAGE] == "detect"
    assert container.name == container_name(node.name, "ulm-0812", "3-detect-1")
    assert container.attrs["HostConfig"]["NanoCpus"] == 500_000_000
    assert container.attrs["HostConfig"]["Memory"] == 64 * 1024**2
    assert [r.run_id for r in run.running()] == ["3-detect-1"]

    (spec.workspace_dir / "go").touch()
    assert exits.next().exit_code == 0
    assert run.running() == []


def test_nonzero_exit_code_is_reported(executor, node):
    run, exits = executor
    run.start(node.spec("3-detect-1", ["sh", "-c", "echo failing; exit 3"]))
    info = exits.next()
    assert (info.exit_code, info.reason) == (3, None)


def test_stop_reports_the_given_reason_within_ten_seconds(executor, node):
    run, exits = executor
    run.start(node.spec("3-detect-1", ["sleep", "60"]))
    began = time.monotonic()

    run.stop("ulm-0812", "3-detect-1", "aborted")
    run.stop("ulm-0812", "3-detect-1", "aborted again")  # idempotent: first reason stays
    info = exits.next(timeout=10)

    assert time.monotonic() - began < 10
    assert info.reason == "aborted"
    assert info.exit_code not in (None, 0)
    run.stop("ulm-0812", "3-detect-1", "late")  # after the exit: ignored
    run.stop("ulm-0812", "no-such-run", "unknown")  # unknown runs: ignored
    exits.assert_none()


def test_timeout_stops_the_run_and_says_so(executor, node):
    run, exits = executor
    run.start(node.spec("3-detect-1", ["sleep", "60"], timeout=1))
    info = exits.next(timeout=15)
    assert info.reason is not None and info.reason.startswith("timeout"), info
    assert info.reason == "timeout after 1s"


def test_missing_image_raises_executor_error_naming_the_image(executor, node, docker_client):
    run, exits = executor
    image = "127.0.0.1:9/winslow-test/no-such-image:9"  # a pull may only knock on loopback
    with pytest.raises(ExecutorError, match=re.escape(f"the registry 127.0.0.1:9 cannot be reached from {node.name} "
                                                      f"to pull '{image}'")):
        run.start(node.spec("3-detect-1", ["true"], image=image))
    assert containers_of(docker_client, node) == []
    exits.assert_none(within=0.1)


def test_missing_binary_exits_127_with_a_reason(executor, node, docker_client):
    # The executor runs containers with an init (tini) as PID 1, so a command that
    # does not exist is not a start error of Docker's but an exit 127 of tini's.
    run, exits = executor
    spec = node.spec("3-detect-1", ["no-such-binary", "--flag"])
    run.start(spec)
    info = exits.next()
    assert info.exit_code == 127
    assert info.reason == "command 'no-such-binary' could not be run: No such file or directory"
    assert "no-such-binary" in spec.log_path.read_text()
    wait_until(lambda: not containers_of(docker_client, node), what="container removed")


def test_missing_input_folder_raises_before_any_container_exists(executor, node, docker_client):
    run, exits = executor
    spec = node.spec("3-detect-1", ["true"], input_dir=node.root / "missing-input")
    with pytest.raises(ExecutorError, match="input folder .*missing-input.* does not exist"):
        run.start(spec)
    assert containers_of(docker_client, node) == []
    exits.assert_none(within=0.1)


def test_container_that_cannot_start_raises_and_is_removed(executor, node, docker_client):
    if "nvidia" in (docker_client.info().get("Runtimes") or {}):
        pytest.skip("this engine can hand out GPUs, so asking for one does not fail")
    run, exits = executor
    # Without NVIDIA's runtime hook the engine creates the container, then refuses to start it.
    with pytest.raises(ExecutorError, match="^container could not start: .*gpu"):
        run.start(node.spec("3-detect-1", ["true"], gpus=(0,)))
    assert containers_of(docker_client, node) == []
    assert run.running() == []
    exits.assert_none(within=0.1)


def test_stage_sees_winslow_variables_env_secrets_and_expanded_arguments(executor, node):
    run, exits = executor
    (node.root / "previous").mkdir()
    (node.root / "previous" / "tracks.csv").write_text("1,2\n")
    spec = node.spec(
        "3-detect-1",
        ["sh", "-c", 'env | sort; echo "video=${VIDEO}"; cat /input/tracks.csv; echo "unknown=$1"', "sh", "${NOPE}"],
        env={"VIDEO": "ulm/DJI_0001.MP4", "STAGE_MODE": "detect"},
        secrets={"DB_PASSWORD": "s3cret"},
        input_dir=node.root / "previous",
    )
    run.start(spec)
    assert exits.next().exit_code == 0

    lines = spec.log_path.read_text().splitlines()
    for expected in [
        "WINSLOW_PROJECT=ulm-0812",
        "WINSLOW_STAGE=detect",
        "WINSLOW_RUN=3-detect-1",
        f"WINSLOW_NODE={node.name}",
        "WINSLOW_RESOURCES=/resources",
        "WINSLOW_INPUT=/input",
        "WINSLOW_WORKSPACE=/workspace",
        "VIDEO=ulm/DJI_0001.MP4",
        "STAGE_MODE=detect",
        "DB_PASSWORD=s3cret",
        "video=ulm/DJI_0001.MP4",
        "1,2",
        "unknown=${NOPE}",
    ]:
        assert expected in lines


def test_restarted_executor_adopts_a_running_container_and_reports_its_exit(make_executor, node):
    first, first_exits = make_executor()
    spec = node.spec("3-detect-1", ["sh", "-c", f"echo before; {WAIT_FOR_GO}; echo after; exit 4"])
    first.start(spec)
    wait_until(lambda: spec.log_path.exists() and "before" in spec.log_path.read_text(), what="first log line")
    first.close()

    second, second_exits = make_executor()
    assert [(r.project, r.run_id) for r in second.running()] == [("ulm-0812", "3-detect-1")]
    assert second.running()[0].started is not None
    (spec.workspace_dir / "go").touch()

    info = second_exits.next()
    assert (info.run_id, info.exit_code, info.reason) == ("3-detect-1", 4, None)
    assert spec.log_path.read_text() == "before\nafter\n"
    first_exits.assert_none(within=0.1)


def test_container_that_exited_while_nobody_watched_is_reported_with_its_exit_code(make_executor, node, docker_client):
    first, first_exits = make_executor()
    spec = node.spec("3-detect-1", ["sh", "-c", f"echo before; {WAIT_FOR_GO}; echo after; exit 5"])
    first.start(spec)
    wait_until(lambda: spec.log_path.exists() and "before" in spec.log_path.read_text(), what="first log line")
    first.close()
    (spec.workspace_dir / "go").touch()
    [container] = containers_of(docker_client, node)
    assert container.wait(timeout=EXIT_WAIT_S)["StatusCode"] == 5

    second, second_exits = make_executor()
    # Listed at most until its exit is reported: the node reads running() before its journal.
    assert [r.run_id for r in second.running()] in ([], ["3-detect-1"])
    info = second_exits.next()

    assert (info.run_id, info.exit_code, info.reason) == ("3-detect-1", 5, None)
    assert spec.log_path.read_text() == "before\nafter\n"
    wait_until(lambda: not containers_of(docker_client, node), what="container removed after its report")
    assert second.running() == []
    second_exits.assert_none(within=0.2)
    first_exits.assert_none(within=0.1)


def test_container_created_but_never_started_is_reported_as_such(make_executor, node, docker_client):
    labels = {LABEL_PROJECT: "ulm-0812", LABEL_RUN: "3-detect-1", LABEL_NODE: node.name, LABEL_STAGE: "detect"}
    docker_client.containers.create(node.image, ["true"], labels=labels)

    run, exits = make_executor()
    run.running()  # adopts it; listed until its exit is reported
    info = exits.next()
    wait_until(lambda: run.running() == [], what="the reported run to leave running()")

    assert (info.run_id, info.exit_code) == ("3-detect-1", None)
    assert info.reason == "the container was created but never started"
    wait_until(lambda: not containers_of(docker_client, node), what="container removed after its report")


def test_a_container_that_ended_past_its_timeout_while_nobody_watched_keeps_its_own_exit(make_executor, node,
                                                                                         docker_client):
    labels = {LABEL_PROJECT: "ulm-0812", LABEL_RUN: "3-detect-1", LABEL_NODE: node.name, LABEL_STAGE: "detect",
              LABEL_TIMEOUT: "0.001"}
    container = docker_client.containers.run(node.image, ["sh", "-c", "exit 5"], labels=labels, detach=True)
    assert container.wait(timeout=EXIT_WAIT_S)["StatusCode"] == 5

    run, exits = make_executor()
    run.running()  # adopts it: its deadline passed long ago, but it ended on its own

    info = exits.next()
    assert (info.run_id, info.exit_code, info.reason) == ("3-detect-1", 5, None)


def test_running_out_of_memory_is_named_as_the_reason(executor, node):
    run, exits = executor
    grow = 'a=xxxxxxxxxxxxxxxx; while true; do a="$a$a"; done'
    run.start(node.spec("3-detect-1", ["sh", "-c", grow], memory=16 * 1024**2, timeout=30))
    info = exits.next(timeout=40)
    assert info.reason == "out of memory (limit 16.0MiB)", info


def test_container_names_are_valid_for_docker_and_distinct():
    valid = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")
    plain = container_name("node-1", "ulm-0812", "3-detect-1")
    odd = container_name("node 1", "Ulm/0812 ü", "3-detect-1")
    odd_twin = container_name("node 1", "Ulm/0812 ö", "3-detect-1")
    long = container_name("node-1", "p" * 300, "3-detect-1")
    assert plain == "winslow-ulm-0812-3-detect-1-node-1"
    assert all(valid.match(n) for n in (plain, odd, odd_twin, long))
    assert odd != odd_twin
    assert len(long) <= 120
    assert container_name("node-2", "ulm-0812", "3-detect-1") != plain
    # Two state repos whose nodes share an engine and a node name: their containers never collide.
    assert container_name("node-1", "ulm-0812", "3-detect-1", "a1b2c3d4e5f6") != \
        container_name("node-1", "ulm-0812", "3-detect-1", "ffff0000ffff") != plain
