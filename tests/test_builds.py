"""Stage images built from the state repo: images/NAME/ with a Dockerfile is built by one node, pushed to the registry
of winslow.yaml (Debian's docker-registry on 127.0.0.1), and its digest committed to builds/NAME.yaml; a stage with
`image: {build: NAME}` runs the build of the content its request locked. A change to the folder is a new build."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.cluster import NodeProcess, StateRemote, wait_for
from tests.registry import Registry, registry  # noqa: F401 - the fixture

pytestmark = pytest.mark.docker

PIPELINE = ("name: greet\nstages:\n  - name: say\n    image: {build: greeter}\n"
            "    command: [sh, -c, 'cat /greeting.txt']\n")


def dockerfile(base: str) -> str:
    return f"FROM {base}\nCOPY greeting.txt /greeting.txt\n"


def settings(remote: StateRemote, registry_host: str) -> str:
    text = (remote.clone / "winslow.yaml").read_text()
    return text + f"\nimages:\n  registry: {registry_host}\n  prefix: lab\n"


def builds(remote: StateRemote) -> list[dict]:
    return (yaml.safe_load(remote.read("builds/greeter.yaml") or "{}") or {}).get("builds") or []


def ended(remote: StateRemote, request: int) -> dict:
    def run() -> dict | None:
        runs = [r for r in remote.status("p").get("runs") or [] if r["request"] == request and r["state"] != "RUNNING"]
        return runs[-1] if runs else None
    found = wait_for(run, 120, f"request {request}'s run to end")
    assert isinstance(found, dict)
    return found


def test_an_image_folder_is_built_once_pushed_and_its_digest_run(tmp_path: Path, registry: Registry,  # noqa: F811
                                                                 busybox_image: str) -> None:
    remote = StateRemote(tmp_path)
    remote.write({"winslow.yaml": settings(remote, registry.host), "images/greeter/Dockerfile": dockerfile(busybox_image),
                  "images/greeter/greeting.txt": "hello, version one\n", "pipelines/greet.yaml": PIPELINE,
                  "projects/p/project.yaml": "pipeline: greet\nrun: {request: 1}\n"}, "an image and a stage that runs it")
    nodes = [NodeProcess(name, remote.remote, tmp_path / "storage", tmp_path / "work" / name, executor="docker")
             for name in ("ws-1", "ws-2")]
    try:
        first = ended(remote, 1)
        remote.write({"images/greeter/greeting.txt": "hello, version two\n",
                      "projects/p/project.yaml": "pipeline: greet\nrun: {request: 2}\n"}, "a new greeting")
        second = ended(remote, 2)
    finally:
        for node in nodes:
            node.stop()
    records = builds(remote)
    assert [b["state"] for b in records] == ["SUCCEEDED", "SUCCEEDED"], records  # each version built once
    one, two = records
    assert one["digest"].startswith(f"{registry.host}/lab/greeter@sha256:") and one["digest"] != two["digest"]
    assert one["image"] == f"{registry.host}/lab/greeter:{one['source'][:16]}"
    assert (first["state"], first["image"], first["image_digest"]) == ("SUCCEEDED", one["digest"], one["digest"]), first
    assert (second["state"], second["image_digest"]) == ("SUCCEEDED", two["digest"]), second
    assert "hello, version one" in (remote.read(first["log"]) or "")
    assert "hello, version two" in (remote.read(second["log"]) or "")
    build_log = remote.read(one["log"]) or ""
    assert "winslow: building" in build_log and "winslow: pushed" in build_log, build_log
    lock = yaml.safe_load(remote.read("projects/p/pipeline.lock.yaml") or "{}")
    assert lock["pipeline"]["stages"][0]["image"]["source"] == two["source"]  # the request locked its content


def test_a_build_that_fails_is_recorded_with_its_reason_and_the_stage_says_so(tmp_path: Path,
                                                                             registry: Registry) -> None:  # noqa: F811
    remote = StateRemote(tmp_path)
    remote.write({"winslow.yaml": settings(remote, registry.host),
                  "images/greeter/Dockerfile": "FROM scratch\nCOPY no-such-file /x\n",
                  "pipelines/greet.yaml": PIPELINE, "projects/p/project.yaml": "pipeline: greet\nrun: {request: 1}\n"})
    node = NodeProcess("ws-1", remote.remote, tmp_path / "storage", tmp_path / "work" / "ws-1", executor="docker")
    try:
        wait_for(lambda: builds(remote) and builds(remote)[-1]["state"] != "RUNNING", 60, "the build to end")
        wait_for(lambda: "failed to build" in (remote.status("p").get("message") or ""), 30,
                 "the project to say why it cannot start")
    finally:
        node.stop()
    record = builds(remote)[-1]
    assert record["state"] == "FAILED" and "docker build failed" in record["reason"], record
    status = remote.status("p")
    assert status["state"] == "PENDING" and not status.get("runs"), status
    assert "fix images/greeter/ and start a new request" in status["message"]
