"""Stage images from a real registry (Debian's docker-registry on 127.0.0.1): a tag is pulled when the run starts and
the run records and runs the digest it named then; a missing image and an unreachable registry each fail the run with
a reason that says which; the pull shows in the run's log and events."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.cluster import NodeProcess, StateRemote, wait_for
from tests.registry import Registry, free_port, registry  # noqa: F401 - the fixture

pytestmark = pytest.mark.docker

PIPELINE = "name: one\nstages:\n  - name: s\n    image: {image}\n    command: [sh, -c, 'echo hello from $WINSLOW_RUN']\n"


def project(pipeline: str, request: int = 1) -> str:
    return f"pipeline: {pipeline}\nrun: {{request: {request}}}\n"


def _unlink_local(ref: str) -> None:
    """Drop this engine's name for the pushed image, so that the node has to pull it."""
    subprocess.run(["docker", "rmi", ref], capture_output=True, timeout=60, check=False)


def _variant(base: str, tag: str, tmp: Path) -> str:
    """Another image (one label more) built locally from `base`, so that a tag can move to new content."""
    (tmp / "Dockerfile").write_text(f"FROM {base}\nLABEL winslow.test.variant={tag}\n")
    subprocess.run(["docker", "build", "-q", "-t", tag, str(tmp)], check=True, capture_output=True, timeout=120)
    return tag


def finished(remote: StateRemote, project_id: str, request: int = 1) -> dict:
    def ended() -> dict | None:
        status = remote.status(project_id)
        runs = [r for r in status.get("runs") or [] if r["request"] == request and r["state"] != "RUNNING"]
        return runs[-1] if runs else None
    run = wait_for(ended, 90, f"{project_id}'s run of request {request} to end")
    assert isinstance(run, dict)
    return run


def test_a_tag_is_pulled_at_the_start_and_its_digest_recorded_and_run(tmp_path: Path, registry: Registry,  # noqa: F811
                                                                      busybox_image: str) -> None:
    v1 = registry.push(busybox_image, "tools/busybox:v1")
    tagged = f"{registry.host}/tools/busybox:v1"
    _unlink_local(tagged)
    remote = StateRemote(tmp_path)
    remote.write({"pipelines/one.yaml": PIPELINE.format(image=tagged), "projects/p/project.yaml": project("one")})
    node = NodeProcess("ws-1", remote.remote, tmp_path / "storage", tmp_path / "work", executor="docker")
    try:
        first = finished(remote, "p")
        # The tag moves to other content; the next request pulls it again and runs the new digest.
        moved = _variant(busybox_image, "winslow-test/variant:2", tmp_path)
        v2 = registry.push(moved, "tools/busybox:v1")
        _unlink_local(tagged)
        remote.write({"projects/p/project.yaml": project("one", request=2)})
        second = finished(remote, "p", request=2)
    finally:
        node.stop()
    assert v1 != v2
    assert (first["state"], first["image"], first["image_digest"]) == ("SUCCEEDED", tagged, v1), first
    assert (second["state"], second["image_digest"]) == ("SUCCEEDED", v2), second
    events = [event["message"] for event in first["events"]]
    assert any(message.startswith(f"pulled {v1}") for message in events), events
    assert f"queued in Docker on ws-1: pulling {tagged}" in events, events  # a long pull shows the project PENDING
    log = remote.read(first["log"]) or ""
    assert f"winslow: pulling {tagged}" in log and "hello from 1-s-1" in log, log


def test_a_missing_image_and_an_unreachable_registry_fail_with_reasons_that_say_which(
        tmp_path: Path, registry: Registry) -> None:  # noqa: F811
    closed = f"127.0.0.1:{free_port()}"  # nothing listens there
    remote = StateRemote(tmp_path)
    remote.write({"pipelines/missing.yaml": PIPELINE.format(image=f"{registry.host}/nope/absent:v1").replace(
                      "name: one", "name: missing"),
                  "pipelines/away.yaml": PIPELINE.format(image=f"{closed}/tools/busybox:v1").replace(
                      "name: one", "name: away"),
                  "projects/m/project.yaml": project("missing"), "projects/a/project.yaml": project("away")})
    node = NodeProcess("ws-1", remote.remote, tmp_path / "storage", tmp_path / "work", executor="docker")
    try:
        missing, away = finished(remote, "m"), finished(remote, "a")
    finally:
        node.stop()
    assert missing["state"] == "FAILED" and away["state"] == "FAILED", (missing, away)
    assert f"is not in the registry {registry.host}" in missing["reason"], missing["reason"]
    assert f"the registry {closed} cannot be reached from ws-1" in away["reason"], away["reason"]
