"""A node that is killed, cut off from its remote, or told a project is gone loses nothing it should keep."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from tests.cluster import NodeProcess, StateRemote, wait_for

PROJECT = "pipeline: {pipeline}\nrun: {{request: 1}}\n"


@pytest.fixture
def setup(tmp_path: Path):
    remote = StateRemote(tmp_path)
    nodes: list[NodeProcess] = []

    def start(*extra: str) -> NodeProcess:
        node = NodeProcess("n1", remote.remote, tmp_path / "storage", tmp_path / "work" / "n1", "process", extra)
        nodes.append(node)
        return node

    yield remote, start, tmp_path
    for node in nodes:
        node.stop()


def started(remote: StateRemote, project: str) -> bool:
    return any(r.get("started") for r in remote.status(project).get("runs", []))


def test_a_node_killed_mid_stage_adopts_it_on_restart_and_does_not_run_it_again(setup) -> None:
    remote, start, tmp = setup
    pipeline = "name: slow\nstages:\n  - {name: s, image: none, command: [sh, -c, 'sleep 4; echo finished']}\n"
    remote.write({"pipelines/slow.yaml": pipeline, "projects/p/project.yaml": PROJECT.format(pipeline="slow")})
    first = start()
    wait_for(lambda: started(remote, "p"), 30, "the stage to start")
    first.signal(signal.SIGKILL)
    first.proc.wait(timeout=10)
    start()
    wait_for(lambda: remote.status("p").get("state") == "SUCCEEDED", 40, "the adopted stage to finish")
    runs = remote.status("p")["runs"]
    assert [(r["id"], r["state"], r["exit_code"]) for r in runs] == [("1-s-1", "SUCCEEDED", 0)]
    assert "finished" in remote.read("projects/p/logs/1-s-1.log")


def test_facts_observed_while_the_remote_is_away_land_when_it_is_back(setup) -> None:
    remote, start, tmp = setup
    pipeline = "name: short\nstages:\n  - {name: s, image: none, command: [sh, -c, 'sleep 6; echo done; exit 4']}\n"
    remote.write({"pipelines/short.yaml": pipeline, "projects/p/project.yaml": PROJECT.format(pipeline="short")})
    start("--lease", "120s", "--node-timeout", "240s")
    wait_for(lambda: started(remote, "p"), 30, "the stage to start")
    away = remote.remote.with_name("remote.away")
    os.rename(remote.remote, away)
    try:
        journal = tmp / "work" / "n1" / "journal.jsonl"
        wait_for(lambda: journal.exists() and '"exited"' in journal.read_text(), 20, "the exit in the journal")
        time.sleep(2)  # a few failed fetches and pushes
    finally:
        os.rename(away, remote.remote)
    wait_for(lambda: remote.status("p").get("state") == "FAILED", 30, "the exit to land after the outage")
    run = remote.status("p")["runs"][0]
    assert (run["state"], run["exit_code"]) == ("FAILED", 4)
    assert "done" in remote.read("projects/p/logs/1-s-1.log")
    wait_for(lambda: '"exited"' not in journal.read_text(), 10, "the journal to settle")


def test_a_deleted_project_stops_its_stage_and_its_storage_goes_after_the_grace_period(setup) -> None:
    remote, start, tmp = setup
    forever = ("name: forever\nstages:\n"
               "  - {name: s, image: none, command: [sh, -c, 'echo $$ > \"$WINSLOW_WORKSPACE/pid\"; exec sleep 300']}\n")
    quick = "name: quick\nstages:\n  - {name: q, image: none, command: [sh, -c, 'echo kept > \"$WINSLOW_WORKSPACE/out\"']}\n"
    remote.write({"winslow.yaml": "version: 1\ntimeouts: {cleanup: 2s}\n", "pipelines/forever.yaml": forever,
                  "pipelines/quick.yaml": quick, "projects/gone/project.yaml": PROJECT.format(pipeline="forever"),
                  "projects/kept/project.yaml": PROJECT.format(pipeline="quick")})
    start()
    storage = tmp / "storage"
    pid_file = storage / "workspaces/gone/1-s-1/pid"
    wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 30, "the stage to write its pid")
    wait_for(lambda: remote.status("kept").get("state") == "SUCCEEDED", 30, "the other project")
    pid = int(pid_file.read_text())
    remote.write({"projects/gone": None}, "delete the project folder gone")
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 15,
             "the deleted project's stage to stop")
    wait_for(lambda: not (storage / "workspaces/gone").exists() and not (storage / "logs/gone").exists(), 30,
             "the deleted project's storage to be removed")
    assert (storage / "workspaces/kept/1-q-1/out").read_text() == "kept\n"
    assert remote.read("projects/gone/status.yaml") is None


def test_a_node_cut_off_longer_than_its_lease_stops_its_stage_and_the_run_ends_lost_not_failed(setup) -> None:
    remote, start, tmp = setup
    pipeline = "name: long\nstages:\n  - {name: s, image: none, command: [sleep, '300'], retries: 0}\n"
    remote.write({"pipelines/long.yaml": pipeline, "projects/p/project.yaml": PROJECT.format(pipeline="long")})
    start("--lease", "3s", "--node-timeout", "60s")
    wait_for(lambda: started(remote, "p"), 30, "the stage to start")
    away = remote.remote.with_name("remote.away")
    os.rename(remote.remote, away)
    try:
        journal = tmp / "work" / "n1" / "journal.jsonl"
        wait_for(lambda: journal.exists() and '"lost": true' in journal.read_text(), 20, "the node to fence itself")
    finally:
        os.rename(away, remote.remote)
    wait_for(lambda: len(remote.status("p").get("runs", [])) == 2, 30, "a new attempt after the lost one")
    first, second = remote.status("p")["runs"]
    assert first["state"] == "LOST" and first["reason"].startswith("fenced:")
    assert second["id"] == "1-s-2" and second["state"] == "RUNNING"
