"""`/metrics` in Prometheus' text format: a real node process's own view, and the viewer's view of the cluster.

Every scrape is parsed with prometheus_client's own parser; the tests read values, not text.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from reconciler import __version__
from reconciler.clock import format_time
from reconciler.metrics import NodeMetrics
from reconciler.yamlsafe import dump_yaml
from tests import statebuild as sb
from tests.cluster import GIT_ENV, NodeProcess, StateRemote, free_port, git, wait_for
from viewer.app import create_app
from viewer.source import Source

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

PIPELINE = """\
name: two
stages:
  - {name: quick, image: none, command: [sh, -c, 'echo quick']}
  - {name: slow, image: none, command: [sleep, '3']}
"""
PROJECT = "pipeline: two\nrun: {request: 1, state: running}\n"
# Once, when a node pushes main: someone else's commit lands first, so the node's push loses the race.
RACE_HOOK = """\
#!/bin/sh
while read old new ref; do
  if [ "$ref" = refs/heads/main ] && [ ! -e "$GIT_DIR/raced" ]; then
    touch "$GIT_DIR/raced"
    unset GIT_QUARANTINE_PATH GIT_OBJECT_DIRECTORY GIT_ALTERNATE_OBJECT_DIRECTORIES
    other=$(git commit-tree -p "$old" -m "someone else got there first" "$old^{tree}")
    git update-ref refs/heads/main "$other" "$old"
  fi
done
exit 0
"""


def parse(text: str) -> Samples:
    """Every sample as {(name, labels): value}."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return parse(response.read().decode())


def test_node_metrics_show_its_runs_latencies_claims_conflicts_and_load(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    hook = remote.remote / "hooks" / "pre-receive"
    hook.write_text(RACE_HOOK)
    remote.write({"pipelines/two.yaml": PIPELINE, "projects/p/project.yaml": PROJECT})  # the hook races from here on
    hook.chmod(0o755)
    port = free_port()
    node = NodeProcess("n1", remote.remote, tmp_path / "storage", tmp_path / "work" / "n1",
                       extra=("--metrics-port", str(port)))
    try:
        def running() -> Samples | None:
            try:
                samples = scrape(port)
            except OSError:
                return None  # not listening yet
            held = (value(samples, "winslow_node_runs", state="RUNNING"),
                    value(samples, "winslow_node_runs", state="SUCCEEDED"))
            return samples if held == (1, 1) else None

        samples = wait_for(running, 20, "the node's metrics to show slow RUNNING after quick SUCCEEDED")
        assert isinstance(samples, dict)
        assert (value(samples, "winslow_node_info", node="n1", executor="process", version=__version__) == 1)
        assert value(samples, "winslow_node_fetch_seconds_count") > 0
        assert value(samples, "winslow_node_fetch_seconds_sum") > 0
        assert value(samples, "winslow_node_push_seconds_count") >= 3  # the lost race, quick's claim, slow's claim
        assert value(samples, "winslow_node_claim_conflicts_total") == 1
        assert value(samples, "winslow_node_claims_total") == 2
        assert value(samples, "winslow_node_stage_duration_seconds_count", stage="quick", state="SUCCEEDED") == 1
        assert value(samples, "winslow_node_journal_backlog") is not None
        assert value(samples, "winslow_node_may_claim") == 1
        assert value(samples, "winslow_node_memory_total_bytes") > 0
        assert value(samples, "winslow_node_cpu_percent") is not None  # the heartbeat's first load sample
        assert value(samples, "process_resident_memory_bytes") > 0
        assert "someone else got there first" in git(remote.remote, "log", "--format=%s", "main")

        def slow_done() -> Samples | None:
            samples = scrape(port)
            done = value(samples, "winslow_node_stage_duration_seconds_count", stage="slow", state="SUCCEEDED")
            return samples if done == 1 and value(samples, "winslow_node_runs", state="SUCCEEDED") == 2 else None

        samples = wait_for(slow_done, 20, "slow's end in the node's metrics")
        assert isinstance(samples, dict)
        assert value(samples, "winslow_node_stage_duration_seconds_sum", stage="slow", state="SUCCEEDED") >= 2.5
        assert value(samples, "winslow_node_stage_duration_seconds_bucket", stage="slow", state="SUCCEEDED",
                     le="1.0") == 0
        assert value(samples, "winslow_node_runs", state="RUNNING") == 0
    finally:
        node.stop()
    assert node.proc.returncode == 0, node.log()[-2000:]
    with pytest.raises(OSError):
        scrape(port)  # the endpoint ended with the node


def test_a_metrics_port_in_use_is_said_in_one_line(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "reconciler", "node", "--help"],
                         capture_output=True, text=True, env=GIT_ENV, check=True).stdout
    assert "--metrics-port" in out and "--metrics-host" in out and "127.0.0.1" in out
    port = free_port()
    with socket.socket() as taken:  # a port that is in use is said plainly, not as a traceback
        taken.bind(("127.0.0.1", port))
        taken.listen()
        remote = StateRemote(tmp_path)
        node = NodeProcess("n1", remote.remote, tmp_path / "storage", tmp_path / "work" / "n1",
                           extra=("--metrics-port", str(port)))
        try:
            node.proc.wait(timeout=15)
        finally:
            node.stop()
    assert node.proc.returncode != 0
    assert f"--metrics-port {port}: cannot listen on 127.0.0.1" in node.log()
    assert "Traceback" not in node.log()


def test_each_node_metrics_has_its_own_registry() -> None:
    class Fake:  # only the event counters are touched: no collector is scraped
        name, journal, view, heartbeat = "n", None, None, None

    first, second = NodeMetrics(Fake()), NodeMetrics(Fake())  # type: ignore[arg-type]
    first.claim_conflicts.inc()
    assert first.registry.get_sample_value("winslow_node_claim_conflicts_total") == 1
    assert second.registry.get_sample_value("winslow_node_claim_conflicts_total") == 0


# -- the viewer -------------------------------------------------------------------------------------------------
def _node_branch(remote: Path, name: str, document: dict, committed: str) -> None:
    """A heartbeat branch whose commit says it was made at `committed` (how old the last beat is)."""
    blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=remote, input=dump_yaml(document).encode(),
                          capture_output=True, check=True).stdout.decode().strip()
    inner = subprocess.run(["git", "mktree"], cwd=remote, input=f"100644 blob {blob}\t{name}.yaml\n".encode(),
                           capture_output=True, check=True).stdout.decode().strip()
    tree = subprocess.run(["git", "mktree"], cwd=remote, input=f"040000 tree {inner}\tnodes\n".encode(),
                          capture_output=True, check=True).stdout.decode().strip()
    env = {**GIT_ENV, "GIT_COMMITTER_DATE": committed, "GIT_AUTHOR_DATE": committed}
    commit = subprocess.run(["git", "commit-tree", "-m", f"{name}: heartbeat", tree], cwd=remote, env=env,
                            capture_output=True, check=True).stdout.decode().strip()
    git(remote, "update-ref", f"refs/heads/winslow/nodes/{name}", commit)


def _heartbeat(name: str, utilization: int, gpu_memory_used: int) -> dict:
    load = {"time": sb.T0, "cpu_percent": 37.5, "memory_used": 12 * 2**30, "net_rx": 0, "net_tx": 0,
            "gpus": [{"index": 0, "utilization": utilization, "memory_used": gpu_memory_used}]}
    return {"name": name, "version": "0.1.0", "executor": "process", "started": sb.T0, "tags": [], "drain": False,
            "capacity": {"cpus": 16, "memory": 64 * 2**30,
                         "gpus": [{"index": 0, "uuid": "GPU-0", "model": "A100", "memory": 40 * 2**30}]},
            "load": load, "history": [load],
            "runs": [{"project": "busy", "run": "1-a-1", "stage": "a", "gpus": [0], "started": sb.T0, "log_tail": ""}]}


@pytest.fixture
def viewer(tmp_path: Path) -> Iterator[TestClient]:
    remote = StateRemote(tmp_path / "state")
    hour_ago = format_time(datetime.now(timezone.utc) - timedelta(hours=1))
    files: dict[str, str | None] = {"pipelines/cpu.yaml": sb.pipeline(sb.CPU)["pipelines/cpu.yaml"]}
    for pid in ("queued", "busy", "done"):
        files[f"projects/{pid}/project.yaml"] = dump_yaml({"pipeline": "cpu", "run": {"request": 1}})
    # PENDING since its first stage ended an hour ago (the request itself is older: sb.T0).
    files |= sb.status("queued", "PENDING", runs=[sb.run("1-a-1", "SUCCEEDED", project="queued", finished=hour_ago)],
                       message="b waits for a node")
    files |= sb.status("busy", "RUNNING", runs=[sb.run("1-a-1", "FAILED", project="busy", finished=sb.T0,
                                                       started="2024-05-01T09:58:00+00:00"),
                                                sb.run("1-a-2", "RUNNING", project="busy", gpus=[0])])
    files |= sb.status("done", "SUCCEEDED", runs=[sb.run("1-a-1", "SUCCEEDED", project="done",
                                                         started="2024-05-01T09:00:00+00:00")])
    remote.write(files, "a cluster for the metrics")
    _node_branch(remote.remote, "gpu1", _heartbeat("gpu1", 80, 10 * 2**30), format_time(datetime.now(timezone.utc)))
    _node_branch(remote.remote, "gone", _heartbeat("gone", 5, 2**30), "2020-01-01T00:00:00+00:00")
    source = Source(str(remote.remote), tmp_path / "viewer-work")
    source.open()
    try:
        yield TestClient(create_app(source, None))
    finally:
        source.stop()


def test_viewer_metrics_show_projects_runs_queue_and_nodes(viewer: TestClient) -> None:
    got = viewer.get("/metrics")
    assert got.status_code == 200 and got.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse(got.text)
    assert value(samples, "winslow_cluster_projects", state="PENDING") == 1
    assert value(samples, "winslow_cluster_projects", state="RUNNING") == 1
    assert value(samples, "winslow_cluster_projects", state="SUCCEEDED") == 1
    assert value(samples, "winslow_cluster_projects", state="WAITING") == 0
    assert value(samples, "winslow_cluster_runs", state="RUNNING") == 1
    assert value(samples, "winslow_cluster_runs", state="SUCCEEDED") == 2
    assert value(samples, "winslow_cluster_runs", state="FAILED") == 1
    assert value(samples, "winslow_cluster_queue_length") == 1
    assert 3590 <= value(samples, "winslow_cluster_queue_oldest_seconds") <= 3700  # since its last run ended
    assert value(samples, "winslow_cluster_stage_duration_seconds_count", stage="a", state="SUCCEEDED") == 2
    assert value(samples, "winslow_cluster_stage_duration_seconds_sum", stage="a", state="FAILED") == 120
    assert value(samples, "winslow_cluster_stage_duration_seconds_bucket", stage="a", state="FAILED", le="60.0") == 0
    assert value(samples, "winslow_cluster_stage_duration_seconds_bucket", stage="a", state="FAILED", le="300.0") == 1
    assert value(samples, "winslow_cluster_node_up", node="gpu1") == 1
    assert value(samples, "winslow_cluster_node_up", node="gone") == 0
    assert value(samples, "winslow_cluster_node_heard_seconds", node="gone") > 86400
    assert value(samples, "winslow_cluster_node_runs", node="gpu1") == 1
    assert value(samples, "winslow_cluster_node_cpu_percent", node="gpu1") == 37.5
    assert value(samples, "winslow_cluster_node_memory_used_bytes", node="gpu1") == 12 * 2**30
    assert value(samples, "winslow_cluster_node_memory_total_bytes", node="gpu1") == 64 * 2**30
    assert value(samples, "winslow_cluster_node_gpu_utilization_percent", node="gpu1", gpu="0") == 80
    assert value(samples, "winslow_cluster_node_gpu_memory_used_bytes", node="gpu1", gpu="0") == 10 * 2**30
    assert value(samples, "winslow_cluster_node_gpu_memory_total_bytes", node="gpu1", gpu="0") == 40 * 2**30
    assert value(samples, "winslow_cluster_node_gpu_utilization_percent", node="gone", gpu="0") is None  # stale
    assert value(samples, "winslow_cluster_node_runs", node="gone") is None
    assert value(samples, "winslow_cluster_fetched_timestamp_seconds") > 0
    assert viewer.head("/metrics").status_code == 200

