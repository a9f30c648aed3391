"""`winslow init DIR [--remote PATH]`: a new state repo from the template, run as a real CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = REPO_ROOT / "state-repo-template"
IDENTITY = {"GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
            "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """A git with no user or system config (HOME is empty), and a committer identity."""
    home = tmp_path / "home"
    home.mkdir()
    base = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return dict(base, **IDENTITY, HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull,
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))


def winslow(env: dict[str, str], *args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def git(env: dict[str, str], cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


def template_files() -> set[str]:
    return {p.relative_to(TEMPLATE).as_posix() for p in TEMPLATE.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_init_commits_the_template_once_on_main(env, tmp_path):
    repo = tmp_path / "state"
    result = winslow(env, "init", str(repo))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert result.stdout.count("\n") == 1 and str(repo) in result.stdout
    assert git(env, repo, "symbolic-ref", "--short", "HEAD").strip() == "main"
    assert git(env, repo, "rev-list", "--count", "--all").strip() == "1"
    schemas = {f"schema/{p.name}" for p in (REPO_ROOT / "schema").glob("*.json")}
    assert set(git(env, repo, "ls-tree", "-r", "--name-only", "main").splitlines()) == template_files() | schemas
    assert git(env, repo, "status", "--porcelain") == ""
    for name in template_files():
        assert (repo / name).read_bytes() == (TEMPLATE / name).read_bytes(), name


def test_init_works_without_any_git_identity(env, tmp_path):
    """A fresh machine has no user.email; init falls back to Winslow's own identity."""
    bare_env = {k: v for k, v in env.items() if k not in IDENTITY}
    repo = tmp_path / "state"
    result = winslow(bare_env, "init", str(repo))
    assert result.returncode == 0, result.stderr
    assert git(bare_env, repo, "log", "-1", "--format=%an <%ae>").strip() == "Winslow <winslow@localhost>"


def test_new_repo_validates_clean(env, tmp_path):
    repo = tmp_path / "state"
    assert winslow(env, "init", str(repo)).returncode == 0
    result = winslow(env, "validate", str(repo))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout.startswith("ok: ")


def test_init_into_an_existing_empty_folder(env, tmp_path):
    repo = tmp_path / "state"
    repo.mkdir()
    assert winslow(env, "init", str(repo)).returncode == 0
    assert (repo / "winslow.yaml").is_file()


def test_init_with_remote_creates_a_bare_repo_and_pushes_main(env, tmp_path):
    repo, remote = tmp_path / "state", tmp_path / "remote.git"
    result = winslow(env, "init", str(repo), "--remote", str(remote))
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert git(env, remote, "rev-parse", "--is-bare-repository").strip() == "true"
    head = git(env, repo, "rev-parse", "main").strip()
    remote_refs = dict(reversed(line.split("\t")) for line in git(env, tmp_path, "ls-remote", str(remote)).splitlines())
    assert remote_refs["refs/heads/main"] == head
    assert git(env, repo, "rev-parse", "--abbrev-ref", "main@{upstream}").strip() == "origin/main"
    assert Path(git(env, repo, "remote", "get-url", "origin").strip()) == remote.resolve()


def test_init_with_an_existing_empty_bare_remote_pushes_to_it(env, tmp_path):
    remote = tmp_path / "remote.git"
    git(env, tmp_path, "init", "-q", "--bare", str(remote))
    repo = tmp_path / "state"
    assert winslow(env, "init", str(repo), "--remote", str(remote)).returncode == 0
    assert git(env, remote, "rev-parse", "refs/heads/main").strip() == git(env, repo, "rev-parse", "HEAD").strip()


def test_init_into_a_non_empty_folder_fails_with_one_line(env, tmp_path):
    repo = tmp_path / "state"
    repo.mkdir()
    (repo / "notes.txt").write_text("mine\n")
    result = winslow(env, "init", str(repo))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and str(repo) in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in repo.iterdir()) == ["notes.txt"]


def test_init_onto_a_file_fails_with_one_line(env, tmp_path):
    target = tmp_path / "state"
    target.write_text("not a folder\n")
    result = winslow(env, "init", str(target))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr


def test_init_with_an_unusable_remote_creates_nothing(env, tmp_path):
    remote = tmp_path / "not-a-repo"
    remote.mkdir()
    (remote / "file.txt").write_text("x\n")
    repo = tmp_path / "state"
    result = winslow(env, "init", str(repo), "--remote", str(remote))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and str(remote) in result.stderr
    assert not repo.exists() or not any(repo.iterdir())


def test_every_schema_line_resolves_in_a_new_state_repo_also_in_the_files_nodes_write(env, tmp_path):
    """An editor's YAML language server resolves `$schema=` relative to the file: each must lead to a schema."""
    from reconciler import layout
    from reconciler.report import schema_line

    repo = tmp_path / "state"
    assert winslow(env, "init", str(repo)).returncode == 0
    lines = [(path, line) for path in sorted(repo.rglob("*.yaml")) for line in path.read_text().splitlines()
             if "$schema=" in line]
    assert len(lines) == 4  # winslow.yaml, two pipelines, the example project
    written = {layout.status_file("p"): "status", layout.lock_file("p"): "pipeline-lock",
               layout.result_file("p", "1-a-1"): "result"}
    lines += [(repo / path, schema_line(kind, path).strip()) for path, kind in written.items()]
    for path, line in lines:
        target = (path.parent / line.split("$schema=", 1)[1].strip()).resolve()
        assert target.is_file() and target.parent == (repo / "schema").resolve(), f"{path}: {line}"
