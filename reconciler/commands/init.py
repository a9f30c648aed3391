"""`winslow init DIR [--remote PATH]`: a new state repo from the template."""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from reconciler.errors import ConfigError
from reconciler.gitcmd import IDENTITY, git, git_env, has_identity
from reconciler.resources import schema_dir, template_dir


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("init", help="create a new state repo from the template",
                            description="Create a state repo from Winslow's template with a first commit on main; "
                                        "with --remote, also create a bare repo there (if needed) and push to it.")
    parser.add_argument("dir", help="folder to create (must not exist or be empty)")
    parser.add_argument("--remote", help="path of a bare remote to create and push to (becomes 'origin')")
    parser.set_defaults(func=run)


def init_repo(target: Path, remote: Path | None = None) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{target}: exists and is not an empty folder")
    if remote is not None:
        _check_remote(remote)
    shutil.copytree(template_dir(), target, dirs_exist_ok=True)
    # The files' `$schema` lines point here: an editor with a YAML language server checks them as they are typed.
    shutil.copytree(schema_dir(), target / "schema", dirs_exist_ok=True)
    git(target, "init", "-q", "-b", "main")
    env = git_env(None if has_identity(target) else IDENTITY)
    git(target, "add", "-A", env=env)
    git(target, "commit", "-q", "-m", "Start a Winslow state repo from the template", env=env)
    if remote is None:
        return
    if not (remote / "HEAD").exists():
        remote.mkdir(parents=True, exist_ok=True)
        git(remote, "init", "-q", "--bare", "-b", "main")
    git(target, "remote", "add", "origin", str(remote.resolve()))
    git(target, "push", "-q", "-u", "origin", "main")


def _check_remote(remote: Path) -> None:
    """Refuse a remote that cannot be used before anything is created."""
    if (remote / "HEAD").exists():
        return
    if remote.exists() and (not remote.is_dir() or any(remote.iterdir())):
        raise ConfigError(f"{remote}: exists and is not a bare git repo")
    parent = remote.parent if not remote.exists() else remote
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"{remote}: cannot create it ({parent} is not writable)")


def run(args: argparse.Namespace) -> int:
    target = Path(args.dir)
    remote = Path(args.remote) if args.remote else None
    init_repo(target, remote)
    print(f"created state repo {target}" + (f", pushed to {remote}" if remote else ""))
    return 0
