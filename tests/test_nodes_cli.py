"""`winslow nodes`: a cluster as its operator sees it, read from real node branches."""
from __future__ import annotations

import json
from pathlib import Path

from tests.cluster import NodeProcess, StateRemote, wait_for
from tests.test_never_wrong import winslow
from tests.test_repoview import NODE_DOC, push_node


def test_nodes_shows_ready_draining_drained_and_lost_nodes(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    remote.write({"winslow.yaml": "version: 1\nnodes:\n  ws-2: {drain: true}\n  ws-3: {drain: true}\n"}, "drain two")
    push_node(remote, tmp_path, dict(NODE_DOC, name="ws-1", drain=False))
    push_node(remote, tmp_path, dict(NODE_DOC, name="ws-2", drain=True))             # draining: it still runs p
    push_node(remote, tmp_path, dict(NODE_DOC, name="ws-3", drain=True, runs=[]))    # drained: idle
    push_node(remote, tmp_path, dict(NODE_DOC, name="ws-4", drain=False), age_s=900)  # lost

    out = winslow(remote.clone, "nodes")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert " ready " in rows["ws-1"] and "p/1-a-1" in rows["ws-1"]
    assert " draining " in rows["ws-2"]
    assert " drained " in rows["ws-3"]
    assert "lost (last heard 15m ago)" in rows["ws-4"]
    assert "1x H200 (97%)" in rows["ws-1"] and "16 (12%)" in rows["ws-1"]

    data = json.loads(winslow(remote.clone, "nodes", "--json").stdout)
    states = {n["name"]: n["state"] for n in data["nodes"]}
    assert states == {"ws-1": "ready", "ws-2": "draining", "ws-3": "drained", "ws-4": "lost"}
    assert data["nodes"][3]["heard_seconds_ago"] >= 890


def test_one_node_in_detail_with_its_load_history_and_an_unknown_name(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    push_node(remote, tmp_path, dict(NODE_DOC, drain=False))
    out = winslow(remote.clone, "nodes", "ws-1")
    assert out.returncode == 0, out.stderr
    assert "GPU 0: H200, 141.0GiB" in out.stdout, out.stdout
    assert "TIME" in out.stdout and "2026-11-30T08:00:00.000Z" in out.stdout  # the history table
    detail = json.loads(winslow(remote.clone, "nodes", "ws-1", "--json").stdout)
    assert detail["history"][0]["cpu_percent"] == 3.0 and detail["load"]["gpus"][0]["utilization"] == 97
    missing = winslow(remote.clone, "nodes", "ws-9")
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1].startswith("winslow: no node 'ws-9'")


def test_a_real_node_shows_up_ready_with_its_capacity_and_load(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    node = NodeProcess("ws-1", remote.remote, tmp_path / "storage", tmp_path / "work")
    try:
        def loaded() -> dict | None:
            data = json.loads(winslow(remote.clone, "nodes", "--json").stdout)
            found = [n for n in data["nodes"] if n["name"] == "ws-1" and n["load"]]
            return found[0] if found else None
        seen = wait_for(loaded, 30, "the node's first load sample")
        assert isinstance(seen, dict) and seen["state"] == "ready" and seen["cpus"] >= 1 and seen["memory"] > 0
        assert seen["version"] and seen["executor"] == "process"
    finally:
        node.stop()
