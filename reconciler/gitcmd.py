"""Running git: one place that turns its failures into readable errors.

Winslow calls the git binary directly: every operation it needs (fetch, a
commit built from a tree, a push that is a compare-and-swap) is one short
command, and the binary is what users run too.
"""
from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from reconciler.errors import GitError, PushRejected

IDENTITY = {
    "GIT_AUTHOR_NAME": "Winslow",
    "GIT_AUTHOR_EMAIL": "winslow@localhost",
    "GIT_COMMITTER_NAME": "Winslow",
    "GIT_COMMITTER_EMAIL": "winslow@localhost",
}
TIMEOUT = 60.0


def git_env(identity: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GIT_TERMINAL_PROMPT", "0")
    env["LC_ALL"] = "C"
    for key, value in (identity or {}).items():
        env.setdefault(key, value)
    return env


def local_remote(url: str) -> Path | None:
    """The folder of a remote on this machine's disk, if it is one."""
    path = Path(url[len("file://"):] if url.startswith("file://") else url)
    if "://" in url and not url.startswith("file://") or ":" in url.split("/")[0]:
        return None
    return path if (path / "refs").is_dir() or (path / ".git" / "refs").is_dir() else None


def has_identity(cwd: Path) -> bool:
    result = subprocess.run(["git", "config", "user.email"], cwd=cwd, capture_output=True, text=True)
    return result.returncode == 0 and bool(result.stdout.strip())


def git(cwd: Path | str, *args: str, input: bytes | None = None, env: Mapping[str, str] | None = None,
        timeout: float = TIMEOUT, check: bool = True) -> str:
    """Run `git args...` in `cwd` and return its stdout; GitError on failure."""
    try:
        result = subprocess.run(["git", *args], cwd=cwd, input=input, capture_output=True,
                                env=dict(env) if env is not None else git_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise GitError(f"git {args[0]} timed out after {timeout:.0f}s in {cwd}") from None
    except FileNotFoundError:
        raise GitError("git is not installed (or not on PATH)") from None
    if check and result.returncode != 0:
        message = _last_line(result.stderr) or f"exit code {result.returncode}"
        raise GitError(f"git {args[0]} failed in {cwd}: {message}")
    return result.stdout.decode("utf-8", "replace")


def push(cwd: Path | str, remote: str, refspecs: Sequence[str], env: Mapping[str, str] | None = None,
         timeout: float = TIMEOUT) -> None:
    """Push; PushRejected when the remote moved on (the compare-and-swap lost)."""
    try:
        result = subprocess.run(["git", "push", "--porcelain", remote, *refspecs], cwd=cwd, capture_output=True,
                                env=dict(env) if env is not None else git_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise GitError(f"git push timed out after {timeout:.0f}s") from None
    if result.returncode == 0:
        return
    out = (result.stdout + result.stderr).decode("utf-8", "replace")
    if "[rejected]" in out or "non-fast-forward" in out or "stale info" in out or "fetch first" in out \
            or "failed to update ref" in out or "cannot lock ref" in out:
        raise PushRejected(f"push to {remote} rejected: the branch moved on")
    raise GitError(f"git push to {remote} failed: {_last_line(result.stderr) or out.strip()}")


def _last_line(data: bytes) -> str:
    """What git said, in one line: its `fatal:`/`error:` lines (the first says what is wrong; the advice
    that follows them, like "Please make sure you have the correct access rights", is left out), else
    its last line."""
    lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("hint:")]
    errors = [line.split(":", 1)[1].strip() for line in lines if line.startswith(("fatal:", "error:"))]
    if errors:
        return "; ".join(dict.fromkeys(errors))
    return lines[-1] if lines else ""
