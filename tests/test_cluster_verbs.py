"""`winslow drain|undrain|reserve|unreserve`: winslow.yaml edited as a person would, and what nodes then do."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import yaml

from tests.cluster import NodeProcess, StateRemote, git, wait_for
from tests.test_never_wrong import winslow

PIPELINE = "name: cpu\nstages:\n  - {name: a, image: none, command: [sleep, '8']}\n"


def settings(remote: StateRemote) -> dict:
    return (yaml.safe_load(remote.read("winslow.yaml") or "") or {}).get("nodes") or {}


def pull(remote: StateRemote) -> None:
    git(remote.clone, "pull", "-q", "origin", "main")


def test_drain_and_reserve_edit_winslow_yaml_keeping_its_comments(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    before = remote.read("winslow.yaml") or ""
    out = winslow(remote.clone, "drain", "ws-1", "--reason", "new PSU  on Friday")
    assert out.returncode == 0, out.stderr
    assert settings(remote) == {"ws-1": {"drain": True}}
    assert git(remote.remote, "log", "-1", "--format=%s", "main").strip() == "Drain ws-1: new PSU on Friday"
    comments = [line for line in before.splitlines() if line.lstrip().startswith("#")]
    assert all(line in (remote.read("winslow.yaml") or "") for line in comments)

    assert "already draining" in winslow(remote.clone, "drain", "ws-1").stdout
    assert winslow(remote.clone, "reserve", "ws-1", "--gpus", "2,1").returncode == 0
    assert settings(remote) == {"ws-1": {"drain": True, "reserved_gpus": [1, 2]}}
    assert winslow(remote.clone, "unreserve", "ws-1", "--gpus", "1").returncode == 0
    assert settings(remote)["ws-1"]["reserved_gpus"] == [2]
    assert winslow(remote.clone, "undrain", "ws-1").returncode == 0
    assert winslow(remote.clone, "unreserve", "ws-1").returncode == 0
    assert settings(remote) == {}  # nothing left for the node: no empty entry either
    commits = int(git(remote.remote, "rev-list", "--count", "main").strip())
    bad = winslow(remote.clone, "reserve", "ws-1", "--gpus", "one")
    assert bad.returncode == 1 and bad.stderr.strip() == "winslow: --gpus one: expected GPU indexes like 1,2"
    assert int(git(remote.remote, "rev-list", "--count", "main").strip()) == commits


def test_a_drained_node_finishes_its_stage_claims_nothing_new_and_shows_drained_when_idle(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    remote.write({"pipelines/cpu.yaml": PIPELINE, "projects/p/project.yaml": "pipeline: cpu\nrun: {request: 1}\n"},
                 "p")
    node = NodeProcess("ws-1", remote.remote, tmp_path / "storage", tmp_path / "work")
    try:
        wait_for(lambda: (remote.status("p").get("runs") or [{}])[0].get("started"), 30, "p's stage to start")
        pull(remote)
        assert winslow(remote.clone, "drain", "ws-1").returncode == 0
        remote.write({"projects/q/project.yaml": "pipeline: cpu\nrun: {request: 1}\n"}, "q")

        def node_state() -> str:
            data = json.loads(winslow(remote.clone, "nodes", "--json").stdout)
            return next(n["state"] for n in data["nodes"] if n["name"] == "ws-1")
        wait_for(lambda: node_state() == "draining", 30, "ws-1 to show draining")
        wait_for(lambda: remote.status("p").get("state") == "SUCCEEDED", 30, "p's stage to finish on the drained node")
        wait_for(lambda: node_state() == "drained", 30, "ws-1 to show drained once idle")
        assert remote.status("q").get("state") == "PENDING" and not remote.status("q").get("runs")
        assert "draining" in (remote.status("q").get("message") or "")
        pull(remote)
        assert winslow(remote.clone, "undrain", "ws-1").returncode == 0
        wait_for(lambda: remote.status("q").get("runs"), 30, "q to be claimed once undrained")
    finally:
        node.stop()


def test_a_verb_rides_out_a_busy_main_with_backoff(tmp_path: Path) -> None:
    """Others push many times a second while the verb runs: it retries with jittered backoff until it lands."""
    import threading

    from reconciler.commands.clone import retries

    started = time.monotonic()
    assert len(list(retries(for_s=1.0))) >= 3 and time.monotonic() - started < 1.5  # bounded by time, not count

    remote = StateRemote(tmp_path)
    busy = tmp_path / "busy"
    git(tmp_path, "clone", "-q", str(remote.remote), str(busy))
    stop = threading.Event()

    def churn() -> None:
        for i in range(400):  # bounded: at most 400 commits
            if stop.is_set():
                return
            (busy / "notes.txt").write_text(f"{i}\n")
            git(busy, "add", "notes.txt")
            git(busy, "commit", "-qm", f"note {i}")
            subprocess.run(["git", "push", "-q", "origin", "HEAD:main"], cwd=busy, capture_output=True, timeout=30)
            subprocess.run(["git", "pull", "-q", "--rebase", "origin", "main"], cwd=busy, capture_output=True,
                           timeout=30)

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        time.sleep(0.5)
        outs = [winslow(remote.clone, verb, "ws-1") for verb in ("drain", "undrain", "drain")]
    finally:
        stop.set()
        thread.join(timeout=60)
    assert all(out.returncode == 0 for out in outs), [out.stderr for out in outs]
    assert settings(remote) == {"ws-1": {"drain": True}}
