"""`winslow project ...` and `winslow pipeline delete` against real git: a bare remote, the user's clone, someone else's."""
from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reconciler.edit import add_items, remove_items
from reconciler.model import Pipeline
from reconciler.report import lock_file
from tests.cluster import NodeProcess, StateRemote, wait_for
from tests.test_verbs import _isolated_env, assert_refused, clone_of, git, head, on_remote, winslow, write

CONFIG = """\
version: 1
timeouts:
  cleanup: 2h   # keep a deleted project's files a while
"""

THREE = """\
name: three
stages:
  - {name: a, image: busybox, command: [echo, a]}
  - {name: b, image: busybox, command: [echo, b]}
  - {name: c, image: busybox, command: [echo, c]}
"""

OTHER = """\
name: other
stages:
  - {name: x, image: busybox, command: [echo, x]}
  - {name: y, image: busybox, command: [echo, y]}
"""

PROJECT = """\
# My project; the comments are mine.
name: P            # shown in the viewer
pipeline: three    # pipelines/three.yaml
tags: [ulm, drone] # for finding it
env:
  VIDEO: clip.mp4  # under resources/

# What I want.
run:
  request: 0       # bump it
  from: b          # the second stage
  state: running   # running | paused | aborted
"""

# q began request 2 on pipeline three: it runs on the copy locked in pipeline.lock.yaml.
LOCKED = """\
pipeline: three
run: {request: 2, from: b, state: running}
"""

RUNNING_STATUS = """\
state: RUNNING
observed_request: 2
request: {number: 2, from: b, until: c, next: null, since: "2024-05-01T10:00:00+00:00"}
runs:
  - {id: 2-b-1, request: 2, stage: b, attempt: 1, state: RUNNING, node: n1, gpus: [],
     started: "2024-05-01T10:00:00+00:00"}
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return _isolated_env(tmp_path / "home")


@pytest.fixture
def remote(tmp_path: Path, env: dict[str, str]) -> Path:
    """A bare state repo: pipelines `three` (a, b, c) and `other` (x, y); project p (request 0) and project q,
    which began request 2 on `three` (its lock, a RUNNING run and a final log)."""
    bare = tmp_path / "remote.git"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare), env=env)
    seed = tmp_path / "seed"
    git(tmp_path, "init", "-q", "-b", "main", str(seed), env=env)
    write(seed, "winslow.yaml", CONFIG)
    write(seed, "pipelines/three.yaml", THREE)
    write(seed, "pipelines/other.yaml", OTHER)
    write(seed, "projects/p/project.yaml", PROJECT)
    write(seed, "projects/q/project.yaml", LOCKED)
    write(seed, "projects/q/pipeline.lock.yaml", lock_file(2, Pipeline.from_dict(yaml.safe_load(THREE)), None).decode())
    write(seed, "projects/q/status.yaml", RUNNING_STATUS)
    write(seed, "projects/q/logs/1-a-1.log", "done\n")
    git(seed, "add", "-A", env=env)
    git(seed, "commit", "-q", "-m", "Seed", env=env)
    git(seed, "push", "-q", str(bare), "main", env=env)
    return bare


@pytest.fixture
def clone(remote: Path, tmp_path: Path, env: dict[str, str]) -> Path:
    return clone_of(remote, tmp_path / "clone", env)


@pytest.fixture
def other(remote: Path, tmp_path: Path, env: dict[str, str]) -> Path:
    return clone_of(remote, tmp_path / "other", env)


def subject(remote: Path, env: dict[str, str]) -> str:
    return git(remote, "log", "-1", "--format=%s", "main", env=env).strip()


def files_on_remote(remote: Path, folder: str, env: dict[str, str]) -> list[str]:
    return git(remote, "ls-tree", "-r", "--name-only", "main", "--", folder, env=env).split()


def assert_nothing_committed(remote: Path, clone: Path, before: str, env: dict[str, str]) -> None:
    assert head(remote, env) == before
    assert git(clone, "rev-parse", "HEAD", env=env).strip() == before
    assert git(clone, "status", "--porcelain", "--untracked-files=all", env=env) == ""


# --- create --------------------------------------------------------------------------------------

def test_create_writes_a_project_that_starts_nothing_until_started(remote: Path, clone: Path,
                                                                   env: dict[str, str]) -> None:
    result = winslow(clone, "project", "create", "ulm-0813", "--pipeline", "three", "--tag", "ulm", "--tag", "night",
                     "--env", "VIDEO=ulm/DJI_0002.MP4", "--env", "COUNT=3", "--display-name", "Ulm: day 2", env=env)

    assert result.returncode == 0, result.stderr
    text = on_remote(remote, "projects/ulm-0813/project.yaml", env)
    assert text.startswith("# yaml-language-server: $schema=../../schema/project.schema.json\n")
    assert yaml.safe_load(text) == {"name": "Ulm: day 2", "pipeline": "three", "tags": ["ulm", "night"],
                                    "env": {"VIDEO": "ulm/DJI_0002.MP4", "COUNT": "3"},
                                    "run": {"request": 0, "state": "running"}}
    assert subject(remote, env) == "ulm-0813: create on pipeline three; tags ulm, night; env VIDEO=ulm/DJI_0002.MP4 COUNT=3"
    assert "nothing runs until you start it: winslow start ulm-0813" in result.stdout
    assert winslow(clone, "validate", env=env).returncode == 0
    # The file reads like the template's: the keys a person edits next are there, commented.
    assert "  # from: a" in text and "  # until: c" in text and "# running | paused | aborted" in text

    started = winslow(clone, "start", "ulm-0813", env=env)
    assert started.returncode == 0, started.stderr
    assert yaml.safe_load(on_remote(remote, "projects/ulm-0813/project.yaml", env))["run"] == \
        {"request": 1, "state": "running"}


def test_create_without_options_names_the_project_after_its_folder(remote: Path, clone: Path,
                                                                   env: dict[str, str]) -> None:
    result = winslow(clone, "project", "create", "bare", "--pipeline", "other", env=env)

    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(on_remote(remote, "projects/bare/project.yaml", env))
    assert data == {"name": "bare", "pipeline": "other", "tags": [], "env": {}, "run": {"request": 0, "state": "running"}}
    assert subject(remote, env) == "bare: create on pipeline other"


@pytest.mark.parametrize("args, words", [
    (["new", "--pipeline", "thre"], ["no pipeline 'thre'", "pipelines/thre.yaml does not exist", "did you mean three"]),
    (["../new", "--pipeline", "three"], ["'../new' is not a project id"]),
    (["new project", "--pipeline", "three"], ["'new project' is not a project id"]),
    ([".new", "--pipeline", "three"], ["'.new' is not a project id"]),
    (["p", "--pipeline", "three"], ["project 'p' already exists", "projects/p/project.yaml"]),
    (["new", "--pipeline", "three", "--env", "VIDEO"], ["--env VIDEO", "KEY=VALUE"]),
    (["new", "--pipeline", "three", "--env", "1X=a"], ["--env 1X=a"]),
    (["new", "--pipeline", "three", "--tag", "two words"], ["'two words' is not a tag"]),
    (["new", "--pipeline", "three", "--display-name", " "], ["--display-name must not be empty"]),
])
def test_create_is_refused_in_one_line_without_a_commit(remote: Path, clone: Path, env: dict[str, str],
                                                        args: list[str], words: list[str]) -> None:
    before = head(remote, env)

    result = winslow(clone, "project", "create", *args, env=env)

    assert_refused(result, *words)
    assert_nothing_committed(remote, clone, before, env)
    assert not (clone / "projects/new").exists()


def test_create_over_the_files_a_deleted_project_left_is_refused(remote: Path, clone: Path, other: Path,
                                                                 env: dict[str, str]) -> None:
    # project.yaml removed by hand; the nodes' status.yaml stayed. A new project would inherit its requests.
    git(other, "rm", "-q", "projects/q/project.yaml", env=env)
    git(other, "commit", "-q", "-m", "Remove q by hand", env=env)
    git(other, "push", "-q", "origin", "main", env=env)
    before = head(remote, env)

    result = winslow(clone, "project", "create", "q", "--pipeline", "three", env=env)

    assert_refused(result, "projects/q/ still holds 3 files of a deleted project", "winslow project delete q")
    assert_nothing_committed(remote, clone, before, env)


def test_create_is_built_on_a_push_that_came_in_between(remote: Path, clone: Path, other: Path,
                                                        env: dict[str, str], tmp_path: Path) -> None:
    write(other, "projects/theirs/project.yaml", "pipeline: three\n")
    git(other, "add", "-A", env=env)
    git(other, "commit", "-q", "-m", "theirs: create by hand", env=env)
    mark = tmp_path / "pushed-once"
    hook = clone / ".git/hooks/pre-push"
    hook.write_text(f"#!/bin/sh\nunset GIT_DIR GIT_WORK_TREE GIT_INDEX_FILE\n"
                    f"if [ ! -e '{mark}' ]; then touch '{mark}'; git -C '{other}' push -q origin main; fi\n")
    hook.chmod(0o755)

    result = winslow(clone, "project", "create", "mine", "--pipeline", "three", env=env)

    assert result.returncode == 0, result.stderr
    assert mark.exists()
    assert git(remote, "log", "--format=%s", "-2", "main", env=env).splitlines() == \
        ["mine: create on pipeline three", "theirs: create by hand"]


def test_create_refused_by_a_commit_hook_leaves_no_file_behind(remote: Path, clone: Path, env: dict[str, str]) -> None:
    hook = clone / ".git/hooks/pre-commit"
    hook.write_text("#!/bin/sh\necho 'no new projects today' >&2\nexit 1\n")
    hook.chmod(0o755)
    before = head(remote, env)

    result = winslow(clone, "project", "create", "new", "--pipeline", "three", env=env)

    assert result.returncode == 1
    assert_nothing_committed(remote, clone, before, env)
    assert not (clone / "projects/new").exists()


# --- rename, tag, untag --------------------------------------------------------------------------

def test_rename_sets_the_display_name_and_keeps_the_folder_and_comments(remote: Path, clone: Path,
                                                                        env: dict[str, str]) -> None:
    result = winslow(clone, "project", "rename", "p", "--display-name", "Ulm: day 2", env=env)

    assert result.returncode == 0, result.stderr
    text = on_remote(remote, "projects/p/project.yaml", env)
    assert text == PROJECT.replace("name: P            # shown", "name: 'Ulm: day 2' # shown")
    assert subject(remote, env) == 'p: rename to "Ulm: day 2"'
    assert files_on_remote(remote, "projects/p", env) == ["projects/p/project.yaml"]

    again = winslow(clone, "project", "rename", "p", "--display-name", "Ulm: day 2", env=env)
    assert again.returncode == 0 and "already named" in again.stdout


def test_tag_adds_only_new_tags_and_keeps_comments(remote: Path, clone: Path, env: dict[str, str]) -> None:
    result = winslow(clone, "project", "tag", "p", "night", "ulm", env=env)

    assert result.returncode == 0, result.stderr
    text = on_remote(remote, "projects/p/project.yaml", env)
    assert text == PROJECT.replace("tags: [ulm, drone] # for", "tags: [ulm, drone, night] # for")
    assert subject(remote, env) == "p: tag night"
    before = head(remote, env)

    again = winslow(clone, "project", "tag", "p", "night", env=env)

    assert again.returncode == 0
    assert "p: already tagged night; nothing to change" in again.stdout
    assert head(remote, env) == before


def test_untag_removes_tags_and_says_which_were_not_there(remote: Path, clone: Path, env: dict[str, str]) -> None:
    result = winslow(clone, "project", "untag", "p", "drone", "rain", env=env)

    assert result.returncode == 0, result.stderr
    text = on_remote(remote, "projects/p/project.yaml", env)
    assert text == PROJECT.replace("tags: [ulm, drone] # for", "tags: [ulm]        # for")
    assert subject(remote, env) == "p: untag drone"
    assert "p was not tagged rain" in result.stdout
    before = head(remote, env)

    missing = winslow(clone, "project", "untag", "p", "rain", env=env)

    assert missing.returncode == 0
    assert "p: not tagged rain; nothing to change" in missing.stdout
    assert head(remote, env) == before


def test_tags_of_an_unknown_project_are_refused(remote: Path, clone: Path, env: dict[str, str]) -> None:
    before = head(remote, env)

    assert_refused(winslow(clone, "project", "tag", "pp", "x", env=env), "no project 'pp'", "did you mean p?")
    assert_refused(winslow(clone, "project", "tag", "p", "no/slash", env=env), "'no/slash' is not a tag")
    assert_nothing_committed(remote, clone, before, env)


BLOCK = """\
pipeline: three
tags:              # labels
  - ulm            # the city
  - drone
    # filmed from above
# what I want
run: {request: 0}
"""


def test_block_lists_gain_and_lose_items_line_by_line() -> None:
    added = add_items(BLOCK, ("tags",), ["night", "ulm"])
    assert added == BLOCK.replace("    # filmed from above\n", "    # filmed from above\n  - night\n")

    removed = remove_items(BLOCK, ("tags",), ["drone"])
    assert removed == BLOCK.replace("  - drone\n    # filmed from above\n", "")

    emptied = remove_items(BLOCK, ("tags",), ["drone", "ulm"])
    assert emptied == "pipeline: three\ntags: []              # labels\n# what I want\nrun: {request: 0}\n"
    assert yaml.safe_load(emptied)["tags"] == []


def test_a_missing_or_empty_list_is_written_in_flow_style() -> None:
    assert add_items("pipeline: t\ntags:\nrun: {}\n", ("tags",), ["a"]) == "pipeline: t\ntags: [a]\nrun: {}\n"
    assert add_items("pipeline: t\n", ("tags",), ["a", "b"]) == "pipeline: t\ntags: [a, b]\n"
    assert add_items("tags: []   # none yet\n", ("tags",), ["a"]) == "tags: [a]  # none yet\n"  # the comment stays put
    assert remove_items("pipeline: t\n", ("tags",), ["a"]) == "pipeline: t\n"


# --- set-pipeline --------------------------------------------------------------------------------

def test_set_pipeline_of_a_running_request_applies_from_the_next_one(remote: Path, clone: Path,
                                                                     env: dict[str, str]) -> None:
    lock = on_remote(remote, "projects/q/pipeline.lock.yaml", env)

    result = winslow(clone, "project", "set-pipeline", "q", "other", env=env)

    assert result.returncode == 0, result.stderr
    data = yaml.safe_load(on_remote(remote, "projects/q/project.yaml", env))
    assert data == {"pipeline": "other", "run": {"request": 2, "state": "running"}}  # `from: b` is no stage of other
    assert subject(remote, env) == "q: set pipeline other (was three), from the next request"
    assert "request 2 goes on with the pipeline it locked (three, in projects/q/pipeline.lock.yaml)" in result.stdout
    assert "other applies from the next request" in result.stdout
    assert "run.from 'b' removed: other has no such stage (stages: x, y)" in result.stdout
    assert on_remote(remote, "projects/q/pipeline.lock.yaml", env) == lock
    assert winslow(clone, "validate", env=env).returncode == 0

    started = winslow(clone, "start", "q", env=env)  # the next request runs on `other`
    assert started.returncode == 0, started.stderr
    assert "q: start request 3 from x" in started.stdout


def test_set_pipeline_of_a_project_never_started_keeps_comments(remote: Path, clone: Path,
                                                                env: dict[str, str]) -> None:
    result = winslow(clone, "project", "set-pipeline", "p", "other", env=env)

    assert result.returncode == 0, result.stderr
    assert on_remote(remote, "projects/p/project.yaml", env) == \
        PROJECT.replace("pipeline: three    #", "pipeline: other    #").replace("  from: b          # the second stage\n", "")
    assert "other applies from its first request: winslow start p" in result.stdout


def test_set_pipeline_to_a_missing_pipeline_is_refused(remote: Path, clone: Path, env: dict[str, str]) -> None:
    before = head(remote, env)

    assert_refused(winslow(clone, "project", "set-pipeline", "p", "othr", env=env),
                   "no pipeline 'othr'", "did you mean other")
    assert_nothing_committed(remote, clone, before, env)


# --- delete --------------------------------------------------------------------------------------

def test_delete_removes_the_whole_folder_and_says_when_storage_goes(remote: Path, clone: Path,
                                                                    env: dict[str, str]) -> None:
    result = winslow(clone, "project", "delete", "q", "--yes", env=env)

    assert result.returncode == 0, result.stderr
    assert files_on_remote(remote, "projects/q", env) == []
    assert files_on_remote(remote, "projects/p", env) == ["projects/p/project.yaml"]
    message = git(remote, "log", "-1", "--format=%B", "main", env=env)
    assert message.startswith("q: delete the project\n\nRemoves projects/q/ (4 files).")
    assert "workspaces/q/ and logs/q/" in " ".join(message.split())
    assert "its running run 2-b-1 will be stopped" in result.stdout
    assert "the nodes remove workspaces/q/ and logs/q/ from storage 2h after they see this" in result.stdout
    assert "nothing else in storage is touched" in result.stdout
    assert not (clone / "projects/q").exists()


def test_delete_without_a_terminal_needs_yes(remote: Path, clone: Path, env: dict[str, str]) -> None:
    before = head(remote, env)

    result = subprocess.run([sys.executable, "-m", "reconciler", "project", "delete", "q"], cwd=clone, env=env,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)

    assert_refused(result, "needs --yes when stdin is not a terminal")
    assert_nothing_committed(remote, clone, before, env)


def delete_on_a_terminal(clone: Path, env: dict[str, str], answer: str) -> subprocess.CompletedProcess[str]:
    controller, terminal = pty.openpty()
    try:
        os.write(controller, answer.encode() + b"\n")
        return subprocess.run([sys.executable, "-m", "reconciler", "project", "delete", "q"], cwd=clone, env=env,
                              stdin=terminal, capture_output=True, text=True, timeout=60)
    finally:
        os.close(terminal)
        os.close(controller)


def test_delete_on_a_terminal_asks_first(remote: Path, clone: Path, env: dict[str, str]) -> None:
    before = head(remote, env)

    declined = delete_on_a_terminal(clone, env, "n")

    assert_refused(declined, "nothing was deleted")
    assert "This removes projects/q/ (4 files) from git" in declined.stdout
    assert "2h after they see this" in declined.stdout and "Delete project q? [y/N]" in declined.stdout
    assert_nothing_committed(remote, clone, before, env)

    accepted = delete_on_a_terminal(clone, env, "y")

    assert accepted.returncode == 0, accepted.stderr
    assert files_on_remote(remote, "projects/q", env) == []


def test_delete_refused_by_a_commit_hook_puts_every_file_back(remote: Path, clone: Path, env: dict[str, str]) -> None:
    hook = clone / ".git/hooks/pre-commit"
    hook.write_text("#!/bin/sh\nexit 1\n")
    hook.chmod(0o755)
    before = head(remote, env)

    result = winslow(clone, "project", "delete", "q", "--yes", env=env)

    assert result.returncode == 1
    assert_nothing_committed(remote, clone, before, env)
    assert (clone / "projects/q/logs/1-a-1.log").read_text() == "done\n"


def test_delete_of_an_unknown_project_is_refused(remote: Path, clone: Path, env: dict[str, str]) -> None:
    before = head(remote, env)

    assert_refused(winslow(clone, "project", "delete", "qq", "--yes", env=env), "no project 'qq'", "did you mean q?")
    assert_nothing_committed(remote, clone, before, env)


# --- pipeline delete -----------------------------------------------------------------------------

def test_pipeline_delete_is_refused_with_the_projects_that_name_it(remote: Path, clone: Path,
                                                                   env: dict[str, str]) -> None:
    before = head(remote, env)

    result = winslow(clone, "pipeline", "delete", "three", env=env)

    assert_refused(result, "pipeline 'three' is used by 2 projects: p, q", "--force")
    assert_nothing_committed(remote, clone, before, env)
    assert files_on_remote(remote, "pipelines/three.yaml", env) == ["pipelines/three.yaml"]


def test_pipeline_delete_with_force_leaves_a_locked_project_valid(remote: Path, clone: Path,
                                                                  env: dict[str, str]) -> None:
    assert winslow(clone, "project", "set-pipeline", "p", "other", env=env).returncode == 0

    result = winslow(clone, "pipeline", "delete", "three", "--force", env=env)

    assert result.returncode == 0, result.stderr
    assert files_on_remote(remote, "pipelines", env) == ["pipelines/other.yaml"]
    assert subject(remote, env) == "Delete pipeline three (still named by q)"
    assert "q: its request goes on with its locked copy (projects/q/pipeline.lock.yaml)" in result.stdout
    checked = winslow(clone, "validate", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr  # q runs request 2 on its lock
    # A new request of q needs a pipeline that exists.
    assert_refused(winslow(clone, "start", "q", env=env), "pipeline 'three' does not exist")


def test_pipeline_delete_with_force_says_which_projects_it_breaks(remote: Path, clone: Path,
                                                                  env: dict[str, str]) -> None:
    result = winslow(clone, "pipeline", "delete", "three", "--force", env=env)

    assert result.returncode == 0, result.stderr
    assert "p: INVALID until it names another pipeline: winslow project set-pipeline p P" in result.stdout
    checked = winslow(clone, "validate", env=env)
    assert checked.returncode == 1
    assert "projects/p/project.yaml" in checked.stdout and "projects/q/" not in checked.stdout


def test_pipeline_delete_of_an_unused_pipeline_and_of_a_missing_one(remote: Path, clone: Path,
                                                                    env: dict[str, str]) -> None:
    result = winslow(clone, "pipeline", "delete", "other", env=env)

    assert result.returncode == 0, result.stderr
    assert subject(remote, env) == "Delete pipeline other"
    before = head(remote, env)
    assert_refused(winslow(clone, "pipeline", "delete", "other", env=env),
                   "no pipeline 'other'", "pipelines/other.yaml does not exist")
    assert_nothing_committed(remote, clone, before, env)


# --- help ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("verb", [["project", "create"], ["project", "rename"], ["project", "tag"],
                                  ["project", "untag"], ["project", "set-pipeline"], ["project", "delete"],
                                  ["pipeline", "delete"], ["project"], ["pipeline"]])
def test_every_verb_has_help_with_an_example(verb: list[str], tmp_path: Path, env: dict[str, str]) -> None:
    result = winslow(tmp_path, *verb, "--help", env=env)

    assert result.returncode == 0, result.stderr
    assert "example" in result.stdout
    assert f"  winslow {' '.join(verb)} " in result.stdout


def test_a_group_without_a_verb_prints_its_usage(tmp_path: Path, env: dict[str, str]) -> None:
    result = winslow(tmp_path, "project", env=env)

    assert result.returncode == 2
    assert "create" in result.stderr and "set-pipeline" in result.stderr


# --- the nodes' side of a delete -----------------------------------------------------------------

SLEEPER = """\
name: sleeper
stages:
  - name: work
    image: none
    command: [sh, -c, 'echo started > "$WINSLOW_WORKSPACE/out.txt"; sleep 60']
"""


def test_a_node_stops_a_deleted_project_and_removes_exactly_its_storage(tmp_path: Path) -> None:
    state = StateRemote(tmp_path / "state")
    state.write({"winslow.yaml": "version: 1\ntimeouts: {cleanup: 1s}\n", "pipelines/sleeper.yaml": SLEEPER,
                 "projects/gone/project.yaml": "pipeline: sleeper\nrun: {request: 1, state: running}\n"})
    storage = tmp_path / "storage"
    for path in ("resources/clip.mp4", "workspaces/ulm-0812/1-detect-1/tracks.csv", "logs/ulm-0812/1-detect-1.log"):
        (storage / path).parent.mkdir(parents=True, exist_ok=True)
        (storage / path).write_text("kept\n")
    node = NodeProcess("n1", state.remote, storage, tmp_path / "work" / "n1")
    try:
        wait_for(lambda: (storage / "workspaces/gone/1-work-1/out.txt").is_file(), 30, "the run of gone")
        result = winslow(state.clone, "project", "delete", "gone", "--yes", env=_isolated_env(tmp_path / "home"))

        assert result.returncode == 0, result.stderr
        assert "its running run 1-work-1 will be stopped" in result.stdout
        assert "from storage 1s after they see this" in result.stdout
        wait_for(lambda: not (storage / "workspaces/gone").exists() and not (storage / "logs/gone").exists(),
                 30, "the nodes to remove gone's storage")
    finally:
        node.stop()
    assert "gone/1-work-1 on n1: stopping (project deleted)" in node.log()  # storage goes only once nothing runs there
    assert state.read("projects/gone/status.yaml") is None  # the folder stays gone: nothing is left to a new `gone`
    kept = sorted(str(p.relative_to(storage)) for p in storage.rglob("*") if p.is_file())
    assert kept == ["logs/ulm-0812/1-detect-1.log", "resources/clip.mp4", "workspaces/ulm-0812/1-detect-1/tracks.csv"]
