"""The user's clone of the state repo, as the verbs use it: find it, pull, fetch, and name projects.

Shared plumbing of `start`/`pause`/`resume`/`abort`/`approve` (verbs.py), `status`
(status.py) and `logs` (logs.py): the `--repo-dir` option, the git calls run in the
clone, and the one-line errors for a bad or unknown project id.
"""
from __future__ import annotations

import argparse
import difflib
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import ConfigError, GitError
from reconciler.gitcmd import IDENTITY, git, git_env, has_identity
from reconciler.gitread import GitReader
from reconciler.layout import MAIN, PROJECT_FILE, PROJECTS, project_file
from reconciler.repoview import RepoView
from reconciler.validation import is_safe_id

RETRY_FOR_S = 60.0  # how long a verb keeps trying while origin/main keeps moving under it


def retries(for_s: float = RETRY_FOR_S) -> Iterator[int]:
    """Attempts for a push that may lose the race to others: the first at once, then after a growing,
    jittered pause (0.1 s doubling to 2 s, like a node's), for a bounded time rather than a count."""
    deadline = time.monotonic() + for_s
    attempt = 0
    while True:
        yield attempt
        attempt += 1
        pause = random.uniform(0.5, 1.0) * min(2.0, 0.1 * 2 ** attempt)
        if time.monotonic() + pause > deadline:
            return
        time.sleep(pause)


def kept_moving(attempts: int) -> str:
    return (f"origin/{MAIN} kept moving: {attempts} pushes in {RETRY_FOR_S:.0f}s were rejected because others "
            f"pushed first; try again in a moment")


def add_verb(sub: argparse._SubParsersAction, name: str, help: str, description: str,
             func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """One verb's parser, with the `--repo-dir` option every verb shares."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--repo-dir", metavar="DIR",
                        help="the clone of the state repo (default: the git top level of the current folder)")
    parser = sub.add_parser(name, help=help, description=description, parents=[common])
    parser.set_defaults(func=func)
    return parser


@dataclass(frozen=True)
class Clone:
    root: Path
    env: Mapping[str, str]

    def git(self, *args: str) -> str:
        return git(self.root, *args, env=self.env)

    def bytes(self, *args: str) -> bytes | None:
        """stdout of a git command as bytes, or None when it fails (a missing file or ref)."""
        result = subprocess.run(["git", *args], cwd=self.root, capture_output=True, env=dict(self.env))
        return result.stdout if result.returncode == 0 else None

    def view(self) -> RepoView:
        """The clone's git repository (its origin/main and node branches) through the one read path."""
        return RepoView(git=GitReader(self.root, self.env))

    def folder_view(self) -> RepoView:
        """The clone's work tree, as `winslow validate` reads it."""
        return RepoView(folder=self.root)

    def has_ref(self, ref: str) -> bool:
        return self.bytes("rev-parse", "-q", "--verify", ref + "^{commit}") is not None


def open_clone(repo_dir: str | None) -> Clone:
    start = Path(repo_dir or ".")
    if not start.is_dir():
        raise ConfigError(f"{start}: no such folder")
    try:
        top = Path(git(start, "rev-parse", "--show-toplevel").strip())
    except GitError:
        raise ConfigError(f"{start.resolve()} is not inside a git clone of a state repo (use --repo-dir DIR)") from None
    return Clone(top, git_env(None if has_identity(top) else IDENTITY))


def check_name(project: str) -> None:
    if not is_safe_id(project):
        raise ConfigError(f"'{project}' is not a project id (letters, digits, '_', '.', '-'; at most 64)")


def no_project(project: str, known: Sequence[str], where: str = "") -> ConfigError:
    close = difflib.get_close_matches(project, known, n=3, cutoff=0.5)
    names = sorted(known)
    hint = (f"did you mean {', '.join(close)}?" if close else
            f"known: {', '.join(names[:10]) + (', ...' if len(names) > 10 else '') or 'none'}")
    return ConfigError(f"no project '{project}': {project_file(project)} does not exist{where} ({hint})")


def local_projects(root: Path) -> list[str]:
    base = root / PROJECTS
    return [p.name for p in base.iterdir() if (p / PROJECT_FILE).is_file()] if base.is_dir() else []


def require_main(clone: Clone) -> None:
    branch = clone.bytes("symbolic-ref", "--short", "-q", "HEAD")
    name = branch.decode().strip() if branch else "a detached HEAD"
    if name != MAIN:
        raise ConfigError(f"the clone at {clone.root} is on {name}, not {MAIN}; switch with `git switch {MAIN}`")


def pull(clone: Clone) -> None:
    try:
        clone.git("pull", "-q", "--rebase", "--autostash", "origin", MAIN)
    except GitError as exc:
        rebasing = clone.bytes("rev-parse", "-q", "--verify", "REBASE_HEAD") is not None
        if rebasing:
            clone.bytes("rebase", "--abort")
            raise GitError(f"your local commits conflict with origin/{MAIN}; run `git pull --rebase` and resolve "
                           "them, then try again") from None
        raise exc


def fetch(clone: Clone, *refspecs: str, warn: bool = True) -> bool:
    try:
        clone.git("fetch", "-q", "origin", *refspecs)
        return True
    except GitError as exc:
        if warn:
            print(f"winslow: warning: {exc}; showing what this clone already has", file=sys.stderr)
        return False
