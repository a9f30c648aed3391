"""A node's own log: one line per event of a run, with project, run and node; JSON lines for log shippers."""
from __future__ import annotations

import json
from pathlib import Path

from tests.cluster import NodeProcess, StateRemote, wait_for

PIPELINE = ("name: cpu\nstages:\n  - {name: a, image: none, command: ['true']}\n"
            "  - {name: b, image: none, command: [sh, -c, 'exit 4']}\n")


def test_every_run_event_is_one_json_line_with_project_run_and_node(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    remote.write({"pipelines/cpu.yaml": PIPELINE, "projects/p/project.yaml": "pipeline: cpu\nrun: {request: 1}\n"}, "p")
    node = NodeProcess("ws-1", remote.remote, tmp_path / "storage", tmp_path / "work", extra=("--log-format", "json"))
    try:
        wait_for(lambda: remote.status("p").get("state") == "FAILED", 60, "p to end")
    finally:
        node.stop()
    lines = [json.loads(line) for line in node.log().splitlines() if line.strip()]  # every line parses
    events = {(e.get("run"), e.get("event")) for e in lines if e.get("project") == "p"}
    for run in ("1-a-1", "1-b-1"):
        for event in ("claimed", "started", "exited"):
            assert (run, event) in events, (run, event, sorted(events, key=str))
    assert ("1-a-1", "succeeded") in events and ("1-b-1", "failed") in events
    failed = next(e for e in lines if e.get("run") == "1-b-1" and e.get("event") == "failed")
    assert failed["node"] == "ws-1" and "exited with code 4" in failed["message"] and failed["level"] == "info"
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
