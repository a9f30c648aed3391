"""Chaos under real nodes: a node killed or frozen while its stage runs never leaves two live copies of the stage.

Two node processes (process executor) share one remote and one storage. The stage appends
`<run id> <time>` to a marker file every 0.2 s for a while; each copy's lines span the time it
was alive. A node is killed with SIGKILL (its stage process left behind, as an OOM kill of the
node alone does) or frozen with SIGSTOP past the node timeout; the stage's supervisor (the
wrapper, reading the node's lease file) must end it before the other node's attempt begins.

WINSLOW_CHAOS_TRIALS=N runs each scenario N times (default 1, to keep the suite short).
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.cluster import NodeProcess, StateRemote, wait_for

TRIALS = int(os.environ.get("WINSLOW_CHAOS_TRIALS", "1"))
STAGE = ("name: long\nstages:\n  - name: work\n    image: none\n    lost_retries: 3\n"
         "    command: [sh, -c, 'i=0; while [ $i -lt 150 ]; do echo \"$WINSLOW_RUN $(date +%s.%N)\" >> \"$MARKS\";"
         " i=$((i+1)); sleep 0.2; done']\n")


def spans(marks: Path) -> dict[str, tuple[float, float]]:
    """Each run's first and last mark."""
    found: dict[str, tuple[float, float]] = {}
    for line in marks.read_text().splitlines():
        run, _, at = line.partition(" ")
        when = float(at)
        first, last = found.get(run, (when, when))
        found[run] = (min(first, when), max(last, when))
    return found


def holder(remote: StateRemote) -> str | None:
    runs = remote.status("p").get("runs") or []
    live = [r for r in runs if r["state"] == "RUNNING" and r.get("started")]
    return live[-1]["node"] if live else None


@pytest.mark.parametrize("trial", range(TRIALS))
@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_node_killed_or_frozen_never_leaves_two_copies_of_its_stage(tmp_path: Path, fault: str, trial: int) -> None:
    remote = StateRemote(tmp_path)
    marks = tmp_path / "marks.txt"
    marks.touch()
    remote.write({"pipelines/long.yaml": STAGE,
                  "projects/p/project.yaml": f"pipeline: long\nenv: {{MARKS: {marks}}}\nrun: {{request: 1}}\n"}, "p")
    nodes = {name: NodeProcess(name, remote.remote, tmp_path / "storage", tmp_path / "work" / name)
             for name in ("n1", "n2")}
    try:
        victim = wait_for(lambda: holder(remote), 30, "the stage to start on a node")
        assert isinstance(victim, str)
        wait_for(lambda: marks.read_text().count("\n") >= 5, 15, "the stage to leave marks")
        struck = time.time()
        nodes[victim].signal(getattr(signal, fault))
        other = next(name for name in nodes if name != victim)
        wait_for(lambda: holder(remote) == other, 40, "the other node to take the stage over")
        wait_for(lambda: len(spans(marks)) >= 2, 15, "the new attempt's first mark")
        if fault == "SIGSTOP":
            time.sleep(2)
            branch = f"refs/heads/winslow/nodes/{victim}"
            frozen_tip = remote.refs()[branch]
            nodes[victim].signal(signal.SIGCONT)  # it thaws: it must not publish its stale run, and rejoins
            wait_for(lambda: remote.refs()[branch] != frozen_tip, 30, "the thawed node's next heartbeat")
        time.sleep(1.5)
    finally:
        for node in nodes.values():
            node.signal(signal.SIGCONT)
            node.stop()
    found = spans(marks)
    first, second = sorted(found.items(), key=lambda item: item[1][0])[:2]
    assert first[1][1] < second[1][0], f"two copies alive at once: {found}"
    takeover = second[1][0] - struck
    print(f"{fault} trial {trial}: stage ended {first[1][1] - struck:.1f}s after the fault, "
          f"new attempt {takeover:.1f}s after it")
    runs = remote.status("p")["runs"]
    assert runs[0]["state"] == "LOST" and runs[0]["node"] == victim, runs[0]


DOCKER_STAGE = ("name: long\nstages:\n  - name: work\n    image: {image}\n    lost_retries: 3\n"
                "    command: [sh, -c, 'i=0; while [ $i -lt 150 ]; do cut -d\" \" -f1 /proc/uptime"
                " >> \"$WINSLOW_WORKSPACE/marks\"; i=$((i+1)); sleep 0.2; done']\n")


def uptime_spans(storage: Path) -> dict[str, tuple[float, float]]:
    """Each attempt's first and last mark, on the kernel's uptime clock (the same inside every container)."""
    found = {}
    for marks in sorted((storage / "workspaces" / "p").glob("*/marks")):
        times = [float(line) for line in marks.read_text().split()]
        if times:
            found[marks.parent.name] = (min(times), max(times))
    return found


def test_a_killed_docker_node_leaves_no_container_beside_the_retry(tmp_path: Path, busybox_image: str) -> None:
    """The watchdog outside the node process stops the killed node's container before the retry starts."""
    remote = StateRemote(tmp_path)
    storage = tmp_path / "storage"
    remote.write({"pipelines/long.yaml": DOCKER_STAGE.format(image=busybox_image),
                  "projects/p/project.yaml": "pipeline: long\nrun: {request: 1}\n"}, "p")
    nodes = {name: NodeProcess(name, remote.remote, storage, tmp_path / "work" / name, executor="docker")
             for name in ("n1", "n2")}
    try:
        victim = wait_for(lambda: holder(remote), 60, "the stage to start on a node")
        assert isinstance(victim, str)
        wait_for(lambda: sum(len(s) for s in [uptime_spans(storage)]) >= 1, 20, "the stage's first marks")
        nodes[victim].signal(signal.SIGKILL)
        other = next(name for name in nodes if name != victim)
        wait_for(lambda: holder(remote) == other, 60, "the other node to take the stage over")
        wait_for(lambda: len(uptime_spans(storage)) >= 2, 30, "the new attempt's first mark")
        time.sleep(1.5)
    finally:
        for node in nodes.values():
            node.stop()  # the survivor's container keeps running; its watchdog stops it once the lease lapses
    found = uptime_spans(storage)
    first, second = sorted(found.items(), key=lambda item: item[1][0])[:2]
    assert first[1][1] < second[1][0], f"two copies alive at once: {found}"
    assert "stopped" in (tmp_path / "work" / victim / "watchdog.log").read_text()


def test_a_short_freeze_of_the_node_kills_nothing(tmp_path: Path) -> None:
    """A node frozen for less than its lease: its stage runs on, nobody takes it over, one attempt in all."""
    remote = StateRemote(tmp_path)
    marks = tmp_path / "marks.txt"
    marks.touch()
    remote.write({"pipelines/long.yaml": STAGE.replace("-lt 150", "-lt 40"),
                  "projects/p/project.yaml": f"pipeline: long\nenv: {{MARKS: {marks}}}\nrun: {{request: 1}}\n"}, "p")
    nodes = {name: NodeProcess(name, remote.remote, tmp_path / "storage", tmp_path / "work" / name)
             for name in ("n1", "n2")}
    try:
        victim = wait_for(lambda: holder(remote), 30, "the stage to start on a node")
        assert isinstance(victim, str)
        nodes[victim].signal(signal.SIGSTOP)
        time.sleep(2.5)  # shorter than the lease (4 s) and the node timeout (6 s)
        nodes[victim].signal(signal.SIGCONT)
        wait_for(lambda: remote.status("p").get("state") == "SUCCEEDED", 40, "the stage to finish where it ran")
    finally:
        for node in nodes.values():
            node.signal(signal.SIGCONT)
            node.stop()
    runs = remote.status("p")["runs"]
    assert [(r["id"], r["state"], r["node"]) for r in runs] == [("1-work-1", "SUCCEEDED", victim)]
    assert list(spans(marks)) == ["1-work-1"]
