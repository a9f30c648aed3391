"""Two reconciler processes racing for the same work on one remote: every stage runs exactly once."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.cluster import NodeProcess, StateRemote, wait_for

PROJECTS = 20
PIPELINE = """\
name: race
stages:
  - name: first
    image: {image}
    command: [sh, -c, 'echo "$HOSTNAME $WINSLOW_NODE" >> /workspace/ran']
  - name: second
    image: {image}
    command: [sh, -c, 'echo "$HOSTNAME $WINSLOW_NODE" >> /workspace/ran']
"""


@pytest.mark.docker
@pytest.mark.cluster
def test_two_nodes_run_every_stage_of_twenty_projects_exactly_once(tmp_path: Path, busybox_image: str) -> None:
    remote = StateRemote(tmp_path)
    storage = tmp_path / "storage"
    nodes = [NodeProcess(name, remote.remote, storage, tmp_path / "work" / name, "docker") for name in ("n1", "n2")]
    try:
        wait_for(lambda: len(remote.refs("refs/heads/winslow/nodes/")) == 2, 30, "both heartbeats")
        files = {"pipelines/race.yaml": PIPELINE.format(image=busybox_image)}
        for i in range(PROJECTS):
            files[f"projects/p{i:02d}/project.yaml"] = "pipeline: race\nrun: {request: 1}\n"
        remote.write(files, "20 projects at once")
        wait_for(lambda: all(remote.status(f"p{i:02d}").get("state") == "SUCCEEDED" for i in range(PROJECTS)),
                 240, "all projects to succeed", interval=1.0)
    finally:
        for node in nodes:
            node.stop()
    ran_on = {"n1": 0, "n2": 0}
    for i in range(PROJECTS):
        project = f"p{i:02d}"
        runs = remote.status(project)["runs"]
        assert [(r["id"], r["state"]) for r in runs] == [("1-first-1", "SUCCEEDED"), ("1-second-1", "SUCCEEDED")]
        assert sorted(p.name for p in (storage / "workspaces" / project).iterdir()) == ["1-first-1", "1-second-1"]
        for run in runs:
            executions = (storage / "workspaces" / project / run["id"] / "ran").read_text().splitlines()
            assert len(executions) == 1, f"{project}/{run['id']} ran {len(executions)} times: {executions}"
            assert executions[0].split()[1] == run["node"]
            ran_on[run["node"]] += 1
    assert sum(ran_on.values()) == 2 * PROJECTS
    for node in nodes:  # lost races were retried on the winner's tip, not given up on
        assert "pushes in a row were rejected" not in node.log()
        assert "cycle failed" not in node.log()
