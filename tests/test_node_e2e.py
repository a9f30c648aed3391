"""One real node against a real remote: the stage lifecycle as a user drives it by pushing YAML."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster import GIT_ENV, NodeProcess, StateRemote, git, wait_for

PIPELINE = """\
name: cpu
stages:
  - name: a
    image: {image}
    command: [sh, -c, 'echo "a says $GREETING"; echo a-out > "$WINSLOW_WORKSPACE/a.txt"']
    env: {{GREETING: from-stage, ONLY_STAGE: stage-only}}
    pause_after: {gate}
  - name: b
    image: {image}
    command: [sh, -c, 'cat "$WINSLOW_INPUT/a.txt"; echo b-out > "$WINSLOW_WORKSPACE/b.txt"']
"""
PROJECT = """\
# a comment the reconciler must keep
pipeline: {pipeline}
env: {{GREETING: from-project}}
run:
  request: {request}
  state: {state}
"""


@pytest.fixture
def cluster(tmp_path: Path):
    remote = StateRemote(tmp_path)
    nodes: list[NodeProcess] = []

    def start(name: str = "n1", executor: str = "process") -> NodeProcess:
        node = NodeProcess(name, remote.remote, tmp_path / "storage", tmp_path / "work" / name, executor)
        nodes.append(node)
        return node

    yield remote, start
    for node in nodes:
        node.stop()


def state_of(remote: StateRemote, project: str) -> str | None:
    return remote.status(project).get("state")


def listed_run(remote: StateRemote, project: str) -> dict:
    """The project's first run once its result manifest is recorded (it lands after the exit, or with it)."""
    def listed() -> dict | None:
        runs = remote.status(project).get("runs") or []
        return runs[0] if runs and runs[0].get("result") else None
    return wait_for(listed, 15, f"the result manifest of {project}")


def test_pipeline_runs_through_gate_approved_by_merging_resume_branch(cluster, tmp_path: Path) -> None:
    remote, start = cluster
    remote.write({"pipelines/cpu.yaml": PIPELINE.format(image="none", gate="true"),
                  "projects/p/project.yaml": PROJECT.format(pipeline="cpu", request=1, state="running")})
    start()
    wait_for(lambda: state_of(remote, "p") == "WAITING", 30, "the gate after stage a")
    status = remote.status("p")
    assert [r["state"] for r in status["runs"]] == ["SUCCEEDED"]
    assert status["runs"][0]["env"]["GREETING"] == "from-project"  # project env wins over stage env
    assert status["runs"][0]["env"]["ONLY_STAGE"] == "stage-only"
    log = remote.read("projects/p/logs/1-a-1.log")
    assert log is not None and "a says from-project" in log
    branch = wait_for(lambda: "refs/heads/resume/p/1" in remote.refs() and "refs/heads/resume/p/1", 10, "resume branch")
    wait_for(lambda: remote.status("p")["request"].get("proposed"), 10, "the gate to record its branch")
    # Approve as a person would: merge the branch in a clone and push.
    git(remote.clone, "fetch", "-q", "origin")
    git(remote.clone, "reset", "-q", "--hard", "origin/main")
    git(remote.clone, "merge", "-q", "--no-ff", "-m", "approve", "origin/resume/p/1")
    git(remote.clone, "push", "-q", "origin", "main")
    project = remote.read("projects/p/project.yaml")
    assert "# a comment the reconciler must keep" in project and "request: 2" in project and "from: b" in project
    wait_for(lambda: state_of(remote, "p") == "SUCCEEDED", 30, "stage b after approval")
    runs = remote.status("p")["runs"]
    assert [(r["id"], r["state"]) for r in runs] == [("1-a-1", "SUCCEEDED"), ("2-b-1", "SUCCEEDED")]
    assert runs[1]["input"] == "workspaces/p/1-a-1"
    assert "a-out" in remote.read("projects/p/logs/2-b-1.log")
    manifest = wait_for(lambda: remote.read("projects/p/results/2-b-1.yaml"), 15, "the result manifest")
    assert "path: b.txt" in manifest and "sha256:" in manifest
    assert (tmp_path / "storage/workspaces/p/2-b-1/b.txt").read_text() == "b-out\n"
    assert branch


def test_abort_stops_running_stage_within_ten_seconds(cluster) -> None:
    remote, start = cluster
    pipeline = "name: slow\nstages:\n  - {name: s, image: none, command: [sleep, '300']}\n"
    remote.write({"pipelines/slow.yaml": pipeline,
                  "projects/p/project.yaml": PROJECT.format(pipeline="slow", request=1, state="running")})
    start()
    wait_for(lambda: any(r.get("started") for r in remote.status("p").get("runs", [])), 30, "the stage to start")
    began = time.monotonic()
    remote.write({"projects/p/project.yaml": PROJECT.format(pipeline="slow", request=1, state="aborted")})
    wait_for(lambda: state_of(remote, "p") == "FAILED", 15, "the abort to land")
    assert time.monotonic() - began < 10
    run = remote.status("p")["runs"][0]
    assert run["state"] == "FAILED" and run["reason"] == "aborted"


def test_failures_are_recorded_and_the_node_goes_on(cluster) -> None:
    remote, start = cluster
    failing = ("name: bad\nstages:\n  - {name: x, image: none, command: [sh, -c, 'echo oops >&2; exit 3'], retries: 1}\n")
    missing = "name: missing\nstages:\n  - {name: x, image: none, command: [no-such-program-winslow]}\n"
    remote.write({"pipelines/bad.yaml": failing, "pipelines/missing.yaml": missing,
                  "projects/f/project.yaml": PROJECT.format(pipeline="bad", request=1, state="running"),
                  "projects/m/project.yaml": PROJECT.format(pipeline="missing", request=1, state="running"),
                  "projects/i/project.yaml": PROJECT.format(pipeline="nope", request=1, state="running"),
                  "projects/ok/project.yaml": PROJECT.format(pipeline="cpu", request=1, state="running"),
                  "pipelines/cpu.yaml": PIPELINE.format(image="none", gate="false")})
    node = start()
    wait_for(lambda: all(state_of(remote, p) in ("FAILED", "SUCCEEDED", "INVALID") for p in "fmi")
             and state_of(remote, "ok") == "SUCCEEDED", 40, "every project to settle")
    f_runs = remote.status("f")["runs"]
    assert [(r["id"], r["exit_code"]) for r in f_runs] == [("1-x-1", 3), ("1-x-2", 3)]  # retries: 1
    assert state_of(remote, "f") == "FAILED" and "oops" in remote.read("projects/f/logs/1-x-2.log")
    m_run = remote.status("m")["runs"][0]
    assert m_run["state"] == "FAILED" and "no-such-program-winslow" in m_run["reason"]
    invalid = remote.status("i")
    assert invalid["state"] == "INVALID" and "pipeline 'nope' does not exist" in invalid["errors"][0]
    assert node.proc.poll() is None  # still alive


def test_paused_project_finishes_stage_then_resumes_where_it_stopped(cluster) -> None:
    remote, start = cluster
    pipeline = ("name: two\nstages:\n  - {name: a, image: none, command: [sleep, '2']}\n"
                "  - {name: b, image: none, command: [echo, b]}\n")
    remote.write({"pipelines/two.yaml": pipeline,
                  "projects/p/project.yaml": PROJECT.format(pipeline="two", request=1, state="running")})
    start()
    wait_for(lambda: remote.status("p").get("runs"), 20, "stage a to be claimed")
    remote.write({"projects/p/project.yaml": PROJECT.format(pipeline="two", request=1, state="paused")})
    wait_for(lambda: state_of(remote, "p") == "PAUSED", 20, "the pause after a")
    assert [r["state"] for r in remote.status("p")["runs"]] == ["SUCCEEDED"]
    remote.write({"projects/p/project.yaml": PROJECT.format(pipeline="two", request=1, state="running")})
    wait_for(lambda: state_of(remote, "p") == "SUCCEEDED", 20, "stage b after resuming")
    assert [r["id"] for r in remote.status("p")["runs"]] == ["1-a-1", "1-b-1"]


@pytest.mark.docker
def test_docker_stage_sees_its_mounts_and_a_missing_image_fails_clearly(cluster, busybox_image: str, tmp_path: Path) -> None:
    remote, start = cluster
    pipeline = f"""\
name: box
stages:
  - name: a
    image: {busybox_image}
    command: [sh, -c, 'cat /resources/hello.txt; echo out > /workspace/a.txt; touch /resources/x || echo resources-read-only']
  - name: b
    image: {busybox_image}
    command: [sh, -c, 'cat /input/a.txt; echo $WINSLOW_RUN']
"""
    missing = "name: ghost\nstages:\n  - {name: g, image: '127.0.0.1:9/winslow-test/no-such-image:0', command: ['true']}\n"
    (tmp_path / "storage/resources").mkdir(parents=True)
    (tmp_path / "storage/resources/hello.txt").write_text("hello resources\n")
    remote.write({"pipelines/box.yaml": pipeline, "pipelines/ghost.yaml": missing,
                  "projects/d/project.yaml": PROJECT.format(pipeline="box", request=1, state="running"),
                  "projects/g/project.yaml": PROJECT.format(pipeline="ghost", request=1, state="running")})
    start(executor="docker")
    wait_for(lambda: state_of(remote, "d") == "SUCCEEDED" and state_of(remote, "g") == "FAILED", 60, "both projects")
    log_a = remote.read("projects/d/logs/1-a-1.log")
    assert "hello resources" in log_a and "resources-read-only" in log_a
    assert "out" in remote.read("projects/d/logs/1-b-1.log") and "1-b-1" in remote.read("projects/d/logs/1-b-1.log")
    ghost = remote.status("g")["runs"][0]
    assert ghost["state"] == "FAILED" and "no-such-image" in ghost["reason"]


def test_secrets_reach_the_stage_but_never_git(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "DB_PASSWORD").write_text("hunter2-very-secret\n")
    pipeline = ("name: sec\nstages:\n  - name: s\n    image: none\n    secrets: [DB_PASSWORD]\n"
                "    command: [sh, -c, 'echo \"password is $DB_PASSWORD\"; test ${#DB_PASSWORD} = 19']\n"
                "  - {name: t, image: none, secrets: [API_TOKEN], command: ['true']}\n")
    remote.write({"pipelines/sec.yaml": pipeline, "projects/p/project.yaml": PROJECT.format(pipeline="sec", request=1,
                                                                                             state="running")})
    node = NodeProcess("n1", remote.remote, tmp_path / "storage", tmp_path / "work" / "n1", "process",
                       ("--secrets", str(secrets)))
    try:
        wait_for(lambda: state_of(remote, "p") == "FAILED", 30, "the project to end")
    finally:
        node.stop()
    first, second = remote.status("p")["runs"]
    assert (first["state"], first["env"]["DB_PASSWORD"]) == ("SUCCEEDED", "***")
    assert remote.read("projects/p/logs/1-s-1.log") == "password is ***\n"
    assert "hunter2" in (tmp_path / "storage/logs/p/1-s-1.log").read_text()  # the full log stays on the node
    assert second["state"] == "FAILED" and "secret API_TOKEN is missing on n1" in second["reason"]
    history = subprocess.run(["git", "--git-dir", str(remote.remote), "log", "--all", "-p"], capture_output=True,
                             text=True).stdout
    assert "hunter2" not in history


LOOPY = """\
name: loopy
stages:
  - name: a
    image: none
    command: [sh, -c, 'cd "$WINSLOW_WORKSPACE" && echo data > out.txt && ln -s b a && ln -s a b']
    lost_retries: 0
"""


def test_a_workspace_with_a_symlink_loop_keeps_its_exit_and_says_what_was_not_listed(cluster) -> None:
    remote, start = cluster
    remote.write({"pipelines/loopy.yaml": LOOPY,
                  "projects/p/project.yaml": PROJECT.format(pipeline="loopy", request=1, state="running")})
    start()
    wait_for(lambda: state_of(remote, "p") == "SUCCEEDED", 30, "the stage to succeed")
    manifest = wait_for(lambda: remote.read("projects/p/results/1-a-1.yaml"), 15, "the result manifest")
    assert "path: out.txt" in manifest and "links:" in manifest and "target: b" in manifest
    run = listed_run(remote, "p")
    assert (run["state"], run["exit_code"], run["result"]) == ("SUCCEEDED", 0, "projects/p/results/1-a-1.yaml")
    assert any("results listed: 1 file" in e["message"] for e in run["events"])


QUICK = "name: quick\nstages:\n  - {name: q, image: none, command: [sh, -c, 'echo hi > \"$WINSLOW_WORKSPACE/out.txt\"']}\n"


def test_a_short_run_costs_its_status_file_at_most_three_writes(cluster) -> None:
    remote, start = cluster
    remote.write({"pipelines/quick.yaml": QUICK,
                  "projects/p/project.yaml": PROJECT.format(pipeline="quick", request=1, state="running")})
    start()
    wait_for(lambda: state_of(remote, "p") == "SUCCEEDED", 30, "the stage to succeed")
    run = listed_run(remote, "p")
    assert run["started"] and run["finished"] and run["exit_code"] == 0
    commits = git(remote.remote, "log", "--reverse", "--format=%H", "main", "--", "projects/p/status.yaml").split()
    assert 1 <= len(commits) <= 3, commits  # the claim (with the request); the start and the end; the manifest
    states = [yaml.safe_load(git(remote.remote, "show", f"{c}:projects/p/status.yaml"))["runs"] for c in commits[1:]]
    first_started = next(runs[0] for runs in states if runs and runs[0].get("started"))
    assert first_started["state"] == "SUCCEEDED"  # a start younger than a few seconds rides with the end


@pytest.mark.parametrize("how", ["winslow reject", "branch deleted by hand"])
def test_a_gate_rejected_ends_the_request_failed_with_who_and_why(cluster, tmp_path: Path, how: str) -> None:
    remote, start = cluster
    remote.write({"pipelines/cpu.yaml": PIPELINE.format(image="none", gate="true"),
                  "projects/p/project.yaml": PROJECT.format(pipeline="cpu", request=1, state="running")})
    start()
    wait_for(lambda: remote.status("p").get("request", {}).get("proposed"), 30, "the gate's branch to be proposed")
    git(remote.clone, "fetch", "-q", "origin")
    git(remote.clone, "reset", "-q", "--hard", "origin/main")
    if how == "winslow reject":
        out = subprocess.run([sys.executable, "-m", "reconciler", "reject", "p", "--reason", "boxes  drift"],
                             cwd=remote.clone, capture_output=True, text=True, timeout=60,
                             env={**GIT_ENV, "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "user.name",
                                  "GIT_CONFIG_VALUE_0": "Ann"})
        assert out.returncode == 0, out.stderr
        expected = "rejected by Ann: boxes drift"
    else:
        git(remote.clone, "push", "-q", "origin", ":refs/heads/resume/p/1")
        expected = "rejected: branch resume/p/1 was deleted without being merged"
    assert "refs/heads/resume/p/1" not in remote.refs()
    wait_for(lambda: state_of(remote, "p") == "FAILED", 30, "the rejection to land")
    assert remote.status("p")["message"] == expected
    assert [r["id"] for r in remote.status("p")["runs"]] == ["1-a-1"]  # b never ran
    if how == "winslow reject":  # asking again drops the reason, which was for the rejection
        git(remote.clone, "pull", "-q", "origin", "main")
        again = subprocess.run([sys.executable, "-m", "reconciler", "start", "p"], cwd=remote.clone,
                               capture_output=True, text=True, timeout=60, env=GIT_ENV)
        assert again.returncode == 0, again.stderr
        assert "reason" not in (remote.read("projects/p/project.yaml") or "reason")


def test_a_secret_in_a_failure_reason_never_reaches_any_object_of_the_remote(tmp_path: Path) -> None:
    """`command: ["${X}"]` with X a secret: the 'program not found' reason names the value; it must be masked."""
    remote = StateRemote(tmp_path)
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "X").write_text("Sup3rS3cretValue-42xyz\n")
    pipeline = "name: sec\nstages:\n  - {name: s, image: none, secrets: [X], command: ['${X}']}\n"
    remote.write({"pipelines/sec.yaml": pipeline,
                  "projects/p/project.yaml": PROJECT.format(pipeline="sec", request=1, state="running")})
    node = NodeProcess("n1", remote.remote, tmp_path / "storage", tmp_path / "work" / "n1", "process",
                       ("--secrets", str(secrets)))
    try:
        wait_for(lambda: state_of(remote, "p") == "FAILED", 30, "the project to end")
        time.sleep(2)  # a few more heartbeats and cycles
    finally:
        node.stop()
    (run,) = remote.status("p")["runs"]
    assert "***" in run["reason"], run["reason"]
    objects = subprocess.run(["git", "--git-dir", str(remote.remote), "cat-file", "--batch-all-objects", "--batch"],
                             capture_output=True).stdout
    assert b"Sup3rS3cretValue" not in objects
    assert b"Sup3rS3c" not in objects and b"retValue-42xyz" not in objects  # not in halves either
