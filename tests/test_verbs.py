"""The user's verbs against real git: a bare remote, the user's clone, and someone else's clone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

PIPELINE = """\
name: three
stages:
  - {name: a, image: busybox, command: [echo, a]}
  - {name: b, image: busybox, command: [echo, b]}
  - {name: c, image: busybox, command: [echo, c]}
"""

PROJECT = """\
# My project; the comments are mine.
name: P
pipeline: three   # pipelines/three.yaml
env:
  VIDEO: clip.mp4   # under resources/

# What I want.
run:
  request: 0       # bump it
  from: a          # the first stage
  state: running   # running | paused | aborted
"""


def _isolated_env(home: Path) -> dict[str, str]:
    """No global git config (so no identity), and the checkout's package on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    home.mkdir(exist_ok=True)
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), GIT_CONFIG_NOSYSTEM="1",
               PYTHONPATH=str(REPO_ROOT), LC_ALL="C")
    return env


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return _isolated_env(tmp_path / "home")


def git(cwd: Path, *args: str, env: dict[str, str], who: str = "Someone Else") -> str:
    identity = {"GIT_AUTHOR_NAME": who, "GIT_AUTHOR_EMAIL": "someone@example.com",
                "GIT_COMMITTER_NAME": who, "GIT_COMMITTER_EMAIL": "someone@example.com"}
    result = subprocess.run(["git", *args], cwd=cwd, env={**env, **identity}, capture_output=True, text=True)
    assert result.returncode == 0, f"git {' '.join(args)}: {result.stderr}"
    return result.stdout


def winslow(clone: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", *args], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=60)


def write(root: Path, path: str, text: str) -> None:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(text)


@pytest.fixture
def remote(tmp_path: Path, env: dict[str, str]) -> Path:
    """A bare state repo holding winslow.yaml, pipeline `three` (stages a, b, c) and project `p`."""
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare), env=env)
    seed = tmp_path / "seed"
    git(tmp_path, "init", "-q", "-b", "main", str(seed), env=env)
    write(seed, "winslow.yaml", "version: 1\n")
    write(seed, "pipelines/three.yaml", PIPELINE)
    write(seed, "projects/p/project.yaml", PROJECT)
    git(seed, "add", "-A", env=env)
    git(seed, "commit", "-q", "-m", "Seed", env=env)
    git(seed, "push", "-q", str(bare), "main", env=env)
    return bare


def clone_of(remote: Path, where: Path, env: dict[str, str]) -> Path:
    git(where.parent, "clone", "-q", str(remote), str(where), env=env)
    return where


@pytest.fixture
def clone(remote: Path, tmp_path: Path, env: dict[str, str]) -> Path:
    """The user's clone; no git identity is configured anywhere."""
    return clone_of(remote, tmp_path / "clone", env)


@pytest.fixture
def other(remote: Path, tmp_path: Path, env: dict[str, str]) -> Path:
    """Someone else's clone of the same remote."""
    return clone_of(remote, tmp_path / "other", env)


def on_remote(remote: Path, path: str, env: dict[str, str], ref: str = "main") -> str:
    return git(remote, "show", f"{ref}:{path}", env=env)


def project_on_remote(remote: Path, env: dict[str, str]) -> str:
    return on_remote(remote, "projects/p/project.yaml", env)


def head(remote: Path, env: dict[str, str]) -> str:
    return git(remote, "rev-parse", "main", env=env).strip()


def assert_refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


# --- start, pause, resume, abort -------------------------------------------------------------

def test_start_bumps_the_request_sets_from_and_keeps_comments(remote: Path, clone: Path, env: dict[str, str]) -> None:
    result = winslow(clone, "start", "p", "--from", "b", env=env)

    assert result.returncode == 0, result.stderr
    text = project_on_remote(remote, env)
    assert text == PROJECT.replace("request: 0       # bump it", "request: 1       # bump it") \
        .replace("from: a          # the first", "from: b          # the first")
    assert yaml.safe_load(text)["run"] == {"request": 1, "from": "b", "state": "running"}
    subject, author = git(remote, "log", "-1", "--format=%s%n%an", "main", env=env).splitlines()
    assert subject == "p: start request 1 from b"
    assert author == "Winslow"  # no identity configured: Winslow's own
    assert "p: start request 1 from b" in result.stdout


def test_start_with_until_and_step_adds_keys_and_uses_the_users_identity(remote: Path, clone: Path,
                                                                          env: dict[str, str]) -> None:
    git(clone, "config", "user.name", "Ada", env=env)
    git(clone, "config", "user.email", "ada@example.com", env=env)

    result = winslow(clone, "start", "p", "--until", "b", "--step", env=env)

    assert result.returncode == 0, result.stderr
    text = project_on_remote(remote, env)
    assert yaml.safe_load(text)["run"] == {"request": 1, "from": "a", "until": "b", "step": True, "state": "running"}
    assert text == PROJECT.replace("request: 0 ", "request: 1 ") + "  until: b\n  step: true\n"
    assert git(remote, "log", "-1", "--format=%an|%s", "main", env=env).strip() == \
        "Ada|p: start request 1 from a until b, step by step"


def test_pause_resume_abort_set_the_state(remote: Path, clone: Path, env: dict[str, str]) -> None:
    for verb, state in (("pause", "paused"), ("resume", "running"), ("abort", "aborted")):
        result = winslow(clone, verb, "p", env=env)
        assert result.returncode == 0, result.stderr
        text = project_on_remote(remote, env)
        assert yaml.safe_load(text)["run"] == {"request": 0, "from": "a", "state": state}
        assert f"state: {state}" in text and "# running | paused | aborted" in text
    subjects = git(remote, "log", "--format=%s", "-3", "main", env=env).splitlines()
    assert subjects == ["p: abort request 0", "p: resume request 0", "p: pause request 0"]


def test_pausing_a_paused_project_commits_nothing(remote: Path, clone: Path, env: dict[str, str]) -> None:
    assert winslow(clone, "pause", "p", env=env).returncode == 0
    before = head(remote, env)

    result = winslow(clone, "pause", "p", env=env)

    assert result.returncode == 0
    assert "already paused" in result.stdout
    assert head(remote, env) == before


def test_resume_with_env_and_from_makes_a_new_request(remote: Path, clone: Path, env: dict[str, str]) -> None:
    result = winslow(clone, "resume", "p", "--from", "c", "--env", "VIDEO=other.mp4", "--env", "MODE=2", env=env)

    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(project_on_remote(remote, env))
    assert data["env"] == {"VIDEO": "other.mp4", "MODE": "2"}
    assert data["run"] == {"request": 1, "from": "c", "state": "running"}
    assert "  VIDEO: other.mp4  # under resources/" in project_on_remote(remote, env)
    assert git(remote, "log", "-1", "--format=%s", "main", env=env).strip() == \
        "p: resume as request 1 from c with VIDEO=other.mp4 MODE=2"


def test_unknown_project_is_refused_in_one_line_without_a_commit(remote: Path, clone: Path,
                                                                 env: dict[str, str]) -> None:
    before = head(remote, env)

    result = winslow(clone, "start", "pp", env=env)

    assert_refused(result, "no project 'pp'", "did you mean p?")
    assert head(remote, env) == before
    assert git(clone, "status", "--porcelain", env=env) == ""


def test_from_that_names_no_stage_is_refused_with_the_stage_list(remote: Path, clone: Path,
                                                                 env: dict[str, str]) -> None:
    before = head(remote, env)

    result = winslow(clone, "start", "p", "--from", "zz", env=env)

    assert_refused(result, "--from zz", "stages: a, b, c")
    assert head(remote, env) == before
    assert git(clone, "rev-parse", "HEAD", env=env).strip() == before
    assert git(clone, "status", "--porcelain", env=env) == ""


def test_a_push_by_someone_else_in_between_is_built_upon(remote: Path, clone: Path, other: Path,
                                                         env: dict[str, str], tmp_path: Path) -> None:
    # Someone bumps the request by hand; their push lands while ours is on its way (from our pre-push hook).
    text = (other / "projects/p/project.yaml").read_text().replace("request: 0 ", "request: 5 ")
    (other / "projects/p/project.yaml").write_text(text)
    git(other, "commit", "-q", "-am", "p: request 5 by hand", env=env)
    mark = tmp_path / "pushed-once"
    hook = clone / ".git/hooks/pre-push"
    hook.write_text(f"#!/bin/sh\nunset GIT_DIR GIT_WORK_TREE GIT_INDEX_FILE\n"
                    f"if [ ! -e '{mark}' ]; then touch '{mark}'; git -C '{other}' push -q origin main; fi\n")
    hook.chmod(0o755)

    result = winslow(clone, "start", "p", env=env)

    assert result.returncode == 0, result.stderr
    assert mark.exists()
    assert yaml.safe_load(project_on_remote(remote, env))["run"]["request"] == 6
    assert git(remote, "log", "--format=%s", "-2", "main", env=env).splitlines() == \
        ["p: start request 6 from a", "p: request 5 by hand"]
    assert "# bump it" in project_on_remote(remote, env)


# --- approve ---------------------------------------------------------------------------------

def push_resume_branch(other: Path, env: dict[str, str], number: int, request: str) -> None:
    """What a reconciler pushes at a gate: a commit on main's tip that continues the project."""
    git(other, "pull", "-q", "--rebase", "origin", "main", env=env)
    git(other, "switch", "-q", "-c", f"resume/p/{number}", env=env)
    path = other / "projects/p/project.yaml"
    path.write_text(path.read_text().replace("request: 0 ", f"request: {request} "))
    git(other, "commit", "-q", "-am", f"Resume p request {request}", env=env, who="Winslow")
    git(other, "push", "-q", "origin", f"resume/p/{number}", env=env)
    git(other, "switch", "-q", "main", env=env)


def test_approve_merges_the_newest_resume_branch_and_deletes_it(remote: Path, clone: Path, other: Path,
                                                                env: dict[str, str]) -> None:
    push_resume_branch(other, env, 1, "1")
    push_resume_branch(other, env, 2, "2")

    result = winslow(clone, "approve", "p", env=env)

    assert result.returncode == 0, result.stderr
    assert git(remote, "log", "-1", "--format=%s", "main", env=env).strip() == "Approve p: merge resume/p/2"
    assert len(git(remote, "log", "-1", "--format=%P", "main", env=env).split()) == 2  # a merge commit
    assert yaml.safe_load(project_on_remote(remote, env))["run"]["request"] == 2
    branches = git(remote, "for-each-ref", "--format=%(refname)", "refs/heads/resume", env=env).split()
    assert branches == ["refs/heads/resume/p/1"]


def test_second_approve_says_there_is_no_gate(remote: Path, clone: Path, other: Path, env: dict[str, str]) -> None:
    push_resume_branch(other, env, 1, "1")
    assert winslow(clone, "approve", "p", env=env).returncode == 0
    before = head(remote, env)

    result = winslow(clone, "approve", "p", env=env)

    assert_refused(result, "p is not waiting at a gate: no resume branch on origin")
    assert head(remote, env) == before


def test_approve_of_a_branch_merged_by_hand_only_deletes_it(remote: Path, clone: Path, other: Path,
                                                            env: dict[str, str]) -> None:
    push_resume_branch(other, env, 1, "1")
    git(other, "merge", "-q", "--no-ff", "-m", "Merge request: resume/p/1", "resume/p/1", env=env)
    git(other, "push", "-q", "origin", "main", env=env)
    before = head(remote, env)

    result = winslow(clone, "approve", "p", env=env)

    assert result.returncode == 0, result.stderr
    assert "already merged" in result.stdout
    assert head(remote, env) == before
    assert git(remote, "for-each-ref", "refs/heads/resume", env=env) == ""


def test_approve_with_a_conflict_aborts_the_merge(remote: Path, clone: Path, other: Path,
                                                  env: dict[str, str]) -> None:
    push_resume_branch(other, env, 1, "1")
    path = other / "projects/p/project.yaml"
    path.write_text(path.read_text().replace("request: 0 ", "request: 7 "))
    git(other, "commit", "-q", "-am", "p: request 7 by hand", env=env)
    git(other, "push", "-q", "origin", "main", env=env)
    before = head(remote, env)

    result = winslow(clone, "approve", "p", env=env)

    assert_refused(result, "conflicts", "merge aborted")
    assert head(remote, env) == before
    assert git(clone, "status", "--porcelain", env=env) == ""
    assert not (clone / ".git/MERGE_HEAD").exists()


# --- status and logs -------------------------------------------------------------------------

STATUS = """\
state: WAITING
message: waiting for approval after a
observed_request: 1
request: {number: 1, from: a, until: c, step: false, next: b, since: "2024-05-01T10:00:00+00:00",
          waiting_since: "2024-05-01T11:00:00+00:00", env: {VIDEO: clip.mp4}}
updated: "2024-05-01T11:00:00+00:00"
runs:
  - id: 1-a-1
    request: 1
    stage: a
    attempt: 1
    state: SUCCEEDED
    node: n1
    gpus: [0]
    started: "2024-05-01T10:00:00+00:00"
    finished: "2024-05-01T11:00:00+00:00"
    exit_code: 0
    log: projects/p/logs/1-a-1.log
"""

RUNNING_STATUS = """\
state: RUNNING
observed_request: 1
request: {number: 1, from: a, until: c, next: null, since: "2024-05-01T10:00:00+00:00"}
runs:
  - {id: 1-a-1, request: 1, stage: a, attempt: 1, state: RUNNING, node: n1, gpus: [0],
     started: "2024-05-01T10:00:00+00:00"}
"""

FINISHED_STATUS = RUNNING_STATUS.replace("state: RUNNING", "state: SUCCEEDED").replace(
    'started: "2024-05-01T10:00:00+00:00"}',
    'started: "2024-05-01T10:00:00+00:00", finished: "2024-05-01T10:05:00+00:00", exit_code: 0}')


def push_status(other: Path, env: dict[str, str], project: str, status: str, logs: dict[str, str] | None = None) -> None:
    """What a reconciler commits on main: status.yaml and final logs."""
    write(other, f"projects/{project}/status.yaml", status)
    for run, text in (logs or {}).items():
        write(other, f"projects/{project}/logs/{run}.log", text)
    git(other, "add", "-A", env=env)
    git(other, "commit", "-q", "-m", f"{project}: status", env=env, who="Winslow")
    git(other, "push", "-q", "origin", "main", env=env)


def push_node(other: Path, env: dict[str, str], node: str, tails: dict[str, str]) -> None:
    """A node's heartbeat branch winslow/nodes/<node> with the live tails of its runs, amended each time."""
    heartbeat = {"name": node, "tick": 1, "runs": [{"project": "p", "run": run, "stage": run.split("-")[1],
                                                    "log_tail": tail} for run, tail in tails.items()]}
    blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=other, input=yaml.safe_dump(heartbeat),
                          capture_output=True, text=True, check=True).stdout.strip()
    tree = subprocess.run(["git", "mktree"], cwd=other, input=f"040000 tree {_subtree(other, node, blob)}\tnodes\n",
                          capture_output=True, text=True, check=True).stdout.strip()
    commit = git(other, "commit-tree", tree, "-m", f"heartbeat {node}", env=env).strip()
    git(other, "push", "-q", "-f", "origin", f"{commit}:refs/heads/winslow/nodes/{node}", env=env)


def _subtree(repo: Path, node: str, blob: str) -> str:
    return subprocess.run(["git", "mktree"], cwd=repo, input=f"100644 blob {blob}\t{node}.yaml\n",
                          capture_output=True, text=True, check=True).stdout.strip()


def test_status_prints_a_table_with_waiting_first_without_touching_the_work_tree(
        remote: Path, clone: Path, other: Path, env: dict[str, str]) -> None:
    write(other, "projects/a-first/project.yaml", "pipeline: three\n")
    push_status(other, env, "p", STATUS)

    result = winslow(clone, "status", env=env)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["PROJECT", "PIPELINE", "STATE", "STAGE", "RUN", "NODE", "AGE", "MESSAGE"]
    assert lines[1].split()[:6] == ["p", "three", "WAITING", "a", "1-a-1", "n1"]
    assert lines[1].endswith("waiting for approval after a")
    assert lines[2].split()[:3] == ["a-first", "three", "IDLE"]
    assert not (clone / "projects/p/status.yaml").exists()  # read from origin/main, the clone is untouched

    data = json.loads(winslow(clone, "status", "--json", env=env).stdout)
    assert [(p["project"], p["state"], p["run"]) for p in data["projects"]] == \
        [("p", "WAITING", "1-a-1"), ("a-first", "IDLE", None)]


def test_status_of_one_project_lists_its_runs_and_how_to_approve(remote: Path, clone: Path, other: Path,
                                                                 env: dict[str, str]) -> None:
    push_status(other, env, "p", STATUS)

    result = winslow(clone, "status", "p", env=env)

    assert result.returncode == 0, result.stderr
    assert "ID" in result.stdout and "DURATION" in result.stdout and "REASON" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("1-a-1"))
    assert row.split()[:5] == ["1-a-1", "a", "SUCCEEDED", "n1", "0"]
    assert "60m" in row
    assert "winslow approve p" in result.stdout
    data = json.loads(winslow(clone, "status", "p", "--json", env=env).stdout)
    assert data["state"] == "WAITING" and data["approve"] == "winslow approve p"
    assert data["runs"][0]["id"] == "1-a-1" and data["runs"][0]["duration_seconds"] == 3600
    assert data["request"]["next"] == "b"

    assert_refused(winslow(clone, "status", "q", env=env), "no project 'q'")


def test_logs_prints_the_final_log_of_a_finished_run(remote: Path, clone: Path, other: Path,
                                                     env: dict[str, str]) -> None:
    push_status(other, env, "p", STATUS, {"1-a-1": "detected 12 cars\ndone\n"})

    result = winslow(clone, "logs", "p", env=env)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "detected 12 cars\ndone\n"
    assert_refused(winslow(clone, "logs", "p", "--run", "1-a-2", env=env), "no run '1-a-2'", "1-a-1")


def test_logs_prints_the_live_tail_of_a_running_run(remote: Path, clone: Path, other: Path,
                                                    env: dict[str, str]) -> None:
    push_status(other, env, "p", RUNNING_STATUS)
    push_node(other, env, "n1", {"1-a-1": "frame 1\nframe 2\n"})

    result = winslow(clone, "logs", "p", "--run", "1-a-1", env=env)

    assert result.returncode == 0, result.stderr
    assert result.stdout == "frame 1\nframe 2\n"


def test_logs_follow_prints_only_new_text_and_ends_with_the_run(remote: Path, clone: Path, other: Path,
                                                                env: dict[str, str]) -> None:
    push_status(other, env, "p", RUNNING_STATUS)
    push_node(other, env, "n1", {"1-a-1": "frame 1\nframe 2\n"})
    follower = subprocess.Popen([sys.executable, "-m", "reconciler", "logs", "p", "--follow"], cwd=clone, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        push_node(other, env, "n1", {"1-a-1": "frame 2\nframe 3\n"})  # the window slid
        time.sleep(1.5)
        push_status(other, env, "p", FINISHED_STATUS, {"1-a-1": "frame 1\nframe 2\nframe 3\nframe 4\ndone\n"})
        out, err = follower.communicate(timeout=30)
    finally:
        follower.kill()

    assert follower.returncode == 0, err
    assert out == "frame 1\nframe 2\nframe 3\nframe 4\ndone\n"
