"""Winslow's image (the top-level Dockerfile): its CLI validates a mounted state repo, and a node in it
runs a stage through the host's engine."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import pytest

from reconciler.executors.base import LABEL_NODE
from tests.cluster import StateRemote

pytestmark = pytest.mark.docker

NODE_DEADLINE_S = 120
ONE_SHOT_DEADLINE_S = 60

PIPELINE = """\
name: hello
stages:
  - name: greet
    image: {image}
    command: [sh, -c, 'echo "hello from $WINSLOW_STAGE"; echo done > "$WINSLOW_WORKSPACE/out.txt"']
"""
PROJECT = "pipeline: hello\nrun: {request: 1, state: running}\n"


def engine_socket() -> str:
    """The host path of the engine's socket, which a node in a container needs mounted."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        reason = f"the engine answers on {host}, not on a socket a container can mount"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI=true: Docker tests must run)", pytrace=False)
        pytest.skip(reason)
    return host.removeprefix("unix://")


def run_once(client: docker.DockerClient, image: str, args: list[str], volumes: dict[str, dict[str, str]]) -> tuple[int, str]:
    """`docker run --rm IMAGE ARGS...`: the exit code and the output, stdout and stderr together."""
    container = client.containers.run(image, args, volumes=volumes, network_mode="none", detach=True,
                                      labels={"winslow.test": "image"})
    try:
        code = container.wait(timeout=ONE_SHOT_DEADLINE_S)["StatusCode"]
        return code, container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)


def test_image_validates_a_mounted_state_repo(docker_client, winslow_image, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    subprocess.run([sys.executable, "-m", "reconciler", "init", str(repo)], check=True, capture_output=True)
    mount = {str(repo): {"bind": "/repo", "mode": "ro"}}

    code, output = run_once(docker_client, winslow_image, ["validate", "/repo"], mount)
    assert (code, output.startswith("ok: ")) == (0, True), output

    project = repo / "projects/ulm-0812/project.yaml"
    project.write_text(project.read_text().replace("pipeline: tracking", "pipeline: trackng"))
    code, output = run_once(docker_client, winslow_image, ["validate", "/repo"], mount)
    assert code == 1, output
    assert re.search(r"/repo/projects/ulm-0812/project\.yaml:\d+:.*trackng", output), output


def test_node_in_the_image_runs_a_stage_through_the_hosts_engine(docker_client, winslow_image, busybox_image,
                                                                  tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    remote.write({"pipelines/hello.yaml": PIPELINE.format(image=busybox_image),
                  "projects/p/project.yaml": PROJECT})
    name = f"image-node-{uuid.uuid4().hex[:8]}"
    storage = tmp_path / "storage"
    # tmp_path holds the remote, the storage and the node's folder; mounted at the same path, since
    # the node asks the host's engine to bind-mount workspaces by the paths it sees.
    node = docker_client.containers.run(
        winslow_image,
        ["node", "--repo", str(remote.remote), "--storage", str(storage), "--name", name, "--executor", "docker",
         "--work", str(tmp_path / "work"), "--heartbeat", "1s", "--poll", "1s"],
        name=name, detach=True, init=True, network_mode="none", labels={"winslow.test": "image"},
        volumes={engine_socket(): {"bind": "/var/run/docker.sock", "mode": "rw"},
                 str(tmp_path): {"bind": str(tmp_path), "mode": "rw"}},
    )
    try:
        status = wait_for_state(remote, node, "p", "SUCCEEDED")
        [run] = status["runs"]
        assert (run["state"], run["node"]) == ("SUCCEEDED", name)
        assert "hello from greet" in (remote.read(f"projects/p/logs/{run['id']}.log") or "")
        assert (storage / "workspaces/p" / run["id"] / "out.txt").read_text() == "done\n"
    finally:
        stop_node(docker_client, node, name)


def wait_for_state(remote: StateRemote, node: Any, project: str, state: str) -> dict:
    """The project's status once it reaches `state`; fails at once, with the node's log, if the node exits."""
    deadline = time.monotonic() + NODE_DEADLINE_S
    while time.monotonic() < deadline:
        status = remote.status(project)
        if status.get("state") == state:
            return status
        node.reload()
        if node.status not in ("created", "running"):
            pytest.fail(f"the node container is {node.status}:\n{node.logs().decode(errors='replace')}")
        time.sleep(0.5)
    pytest.fail(f"{project} not {state} after {NODE_DEADLINE_S}s (status: {remote.status(project)}):\n"
                f"{node.logs().decode(errors='replace')}")


def stop_node(client: docker.DockerClient, node: Any, name: str) -> None:
    """Stop and remove the node's container, then any stage container it left (they carry its name)."""
    try:
        node.stop(timeout=10)
    finally:
        node.remove(force=True)
        for stage in client.containers.list(all=True, filters={"label": f"{LABEL_NODE}={name}"}):
            stage.remove(force=True)
