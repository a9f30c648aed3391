"""`winslow logs --follow` against a real node: it follows the request, keeps up with the stage, and says how it ended."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cluster import GIT_ENV, NodeProcess, StateRemote, git, wait_for

REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECT = "pipeline: {pipeline}\nrun:\n  request: 1\n  state: running\n"
TWO_STAGES = """\
name: two
stages:
  - {name: a, image: none, command: [sh, -c, 'echo a-first; sleep 1; echo a-second']}
  - {name: b, image: none, command: [sh, -c, 'echo b-only']}
"""
FAILING = "name: bad\nstages:\n  - {name: detect, image: none, command: [sh, -c, 'echo detecting; exit 1']}\n"
# A line every 0.2 s for about 6 s, each saying when it was written.
CHATTY = """\
name: chatty
stages:
  - name: s
    image: none
    command: [sh, -c, 'for i in $(seq 1 30); do echo "line $i $(date +%s.%N)"; sleep 0.2; done']
"""
SLOW_HEARTBEAT = ("--heartbeat", "5s", "--lease", "20s", "--node-timeout", "30s")  # the defaults of winslow.yaml


@dataclass
class Follower:
    """`winslow logs ... --follow` in its own process, with the time each stdout line arrived."""

    proc: subprocess.Popen[str]
    lines: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.time(), line))

    def finish(self, timeout: float) -> tuple[int, str, str]:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._reader.join(timeout=5)
        return code, "".join(line for _, line in self.lines), self.proc.stderr.read() if self.proc.stderr else ""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[StateRemote, list[NodeProcess]]]:
    remote = StateRemote(tmp_path)
    nodes: list[NodeProcess] = []
    yield remote, nodes
    for node in nodes:
        node.stop()


def start_node(remote: StateRemote, nodes: list[NodeProcess], *extra: str) -> NodeProcess:
    node = NodeProcess("n1", remote.remote, remote.root / "storage", remote.root / "work" / "n1", "process", extra)
    nodes.append(node)
    return node


def first_run(remote: StateRemote, project: str) -> None:
    wait_for(lambda: remote.status(project).get("runs"), 30, f"a node to claim the first stage of {project}")


def follow(remote: StateRemote, *args: str, merged: bool = False) -> Follower:
    """`winslow logs ... --follow` in the user's own clone (not the one the test pushes from).

    merged: stderr (headers, the closing line) into stdout, to see the order of both.
    """
    user = remote.root / "user"
    if not user.exists():
        git(remote.root, "clone", "-q", str(remote.remote), str(user))
    proc = subprocess.Popen([sys.executable, "-m", "reconciler", "logs", "--repo-dir", str(user), *args, "--follow"],
                            cwd=REPO_ROOT, env=GIT_ENV, stdout=subprocess.PIPE, text=True, bufsize=1,
                            stderr=subprocess.STDOUT if merged else subprocess.PIPE)
    return Follower(proc)


def test_follow_prints_every_stage_of_the_request_then_how_it_ended(cluster) -> None:
    remote, nodes = cluster
    remote.write({"pipelines/two.yaml": TWO_STAGES, "projects/p/project.yaml": PROJECT.format(pipeline="two")})
    follower = follow(remote, "p", merged=True)  # before any node took the request: it waits for it
    start_node(remote, nodes)

    code, out, _ = follower.finish(timeout=60)

    assert code == 0, out
    assert out.splitlines()[:6] == ["==> p/1-a-1 (stage a on n1) <==", "a-first", "a-second",
                                    "==> p/1-b-1 (stage b on n1) <==", "b-only",
                                    "winslow: p request 1: SUCCEEDED (b succeeded; request 1 is done)"], out
    assert len(out.splitlines()) == 6, out


def test_follow_of_a_failing_request_says_failed_and_exits_1(cluster) -> None:
    remote, nodes = cluster
    remote.write({"pipelines/bad.yaml": FAILING, "projects/f/project.yaml": PROJECT.format(pipeline="bad")})
    start_node(remote, nodes)
    first_run(remote, "f")
    follower = follow(remote, "f")

    code, out, err = follower.finish(timeout=60)

    assert code == 1, out + err
    assert "detecting" in out
    closing = err.strip().splitlines()[-1]
    assert closing.startswith("winslow: f request 1: FAILED (detect failed") and "code 1" in closing, err
    one_run = follow(remote, "f", "--run", "1-detect-1")
    code, out, err = one_run.finish(timeout=30)
    assert code == 1 and out == "detecting\n", out + err
    assert err.startswith("winslow: f/1-detect-1: FAILED (") and "code 1" in err, err
    read = subprocess.run([sys.executable, "-m", "reconciler", "logs", "--repo-dir", str(remote.root / "user"), "f"],
                          cwd=REPO_ROOT, env=GIT_ENV, capture_output=True, text=True, timeout=30)
    assert read.returncode == 0 and read.stdout == "detecting\n", read.stderr  # without --follow it is a read


def test_follow_ends_at_a_gate_with_exit_0_and_at_an_abort_with_exit_1(cluster) -> None:
    remote, nodes = cluster
    gated = "name: gated\nstages:\n  - {name: a, image: none, command: [echo, looked], pause_after: true}\n" \
            "  - {name: b, image: none, command: [echo, b]}\n"
    slow = "name: slow\nstages:\n  - {name: s, image: none, command: [sh, -c, 'echo started; sleep 60']}\n"
    remote.write({"pipelines/gated.yaml": gated, "projects/g/project.yaml": PROJECT.format(pipeline="gated"),
                  "pipelines/slow.yaml": slow, "projects/s/project.yaml": PROJECT.format(pipeline="slow")})
    start_node(remote, nodes)
    first_run(remote, "g")
    first_run(remote, "s")
    at_gate, aborted = follow(remote, "g"), follow(remote, "s")

    code, out, err = at_gate.finish(timeout=60)
    assert code == 0 and out == "looked\n", out + err
    assert err.strip().splitlines()[-1].startswith("winslow: g request 1: WAITING"), err
    assert "winslow approve g" in err

    wait_for(lambda: aborted.lines, 30, "the slow stage's first line")
    remote.write({"projects/s/project.yaml": PROJECT.format(pipeline="slow").replace("running", "aborted")})
    code, out, err = aborted.finish(timeout=60)
    assert code == 1 and out == "started\n", out + err
    assert err.strip().splitlines()[-1].startswith("winslow: s request 1: FAILED ("), err
    assert "aborted" in err


def test_follow_shows_each_line_within_seconds_not_at_the_next_heartbeat(cluster) -> None:
    remote, nodes = cluster
    remote.write({"pipelines/chatty.yaml": CHATTY, "projects/c/project.yaml": PROJECT.format(pipeline="chatty")})
    start_node(remote, nodes, *SLOW_HEARTBEAT)
    first_run(remote, "c")
    follower = follow(remote, "c")

    code, out, err = follower.finish(timeout=90)

    assert code == 0, out + err
    delays = [arrived - float(line.split()[2]) for arrived, line in follower.lines if line.startswith("line ")]
    assert len(delays) == 30, out
    shown = ", ".join(f"{d:.1f}" for d in delays)
    # At a 5 s heartbeat the first line waits for the next beat, and over 6 s of output some line waits 3 s or more.
    assert delays[0] < 2.5, f"first line after {delays[0]:.1f}s (all: {shown})"
    assert max(delays) < 2.5, f"a line took {max(delays):.1f}s (all: {shown})"


def test_a_stage_that_prints_nothing_adds_no_beats(cluster) -> None:
    remote, nodes = cluster
    quiet = "name: quiet\nstages:\n  - {name: s, image: none, command: [sh, -c, 'echo begun; sleep 8']}\n"
    remote.write({"pipelines/quiet.yaml": quiet, "projects/q/project.yaml": PROJECT.format(pipeline="quiet")})
    start_node(remote, nodes, *SLOW_HEARTBEAT)
    first_run(remote, "q")
    follower = follow(remote, "q")
    wait_for(lambda: any(line == "begun\n" for _, line in follower.lines), 30, "the stage's only line")

    ticks = [_tick(remote)]
    time.sleep(4)
    ticks.append(_tick(remote))

    assert ticks[1] - ticks[0] <= 1, f"{ticks[1] - ticks[0]} beats in 4 s of silence at a 5 s heartbeat"
    code, out, err = follower.finish(timeout=30)
    assert code == 0 and out.endswith("begun\n"), out + err


def _tick(remote: StateRemote) -> int:
    return int(remote.read("nodes/n1.tick", ref="winslow/nodes/n1") or 0)
