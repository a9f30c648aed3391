"""Reading a git repository of the state repo without changing it: refs, trees, blobs, history.

Both a node's bare mirror and a user's clone are read through `GitReader`; it
never writes a ref or an object. One long-lived `git cat-file --batch` serves
every blob, so reading a file costs no new process.
"""
from __future__ import annotations

import subprocess
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from reconciler import layout
from reconciler.errors import GitError
from reconciler.gitcmd import git, git_env


class CatFile:
    """One long-lived `git cat-file --batch`: reading a blob costs no new process."""

    def __init__(self, git_dir: Path, env: Mapping[str, str] | None = None) -> None:
        self._git_dir = git_dir
        self._env = dict(env) if env is not None else git_env()
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def read(self, sha: str) -> bytes:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = subprocess.Popen(["git", "cat-file", "--batch"], cwd=self._git_dir, stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, env=self._env)
            stdin, stdout = self._proc.stdin, self._proc.stdout
            assert stdin is not None and stdout is not None
            stdin.write(sha.encode() + b"\n")
            stdin.flush()
            header = stdout.readline().split()
            if len(header) < 3:
                raise GitError(f"object {sha} is missing from {self._git_dir}")
            data = stdout.read(int(header[2]))
            stdout.read(1)
            return data

    def close(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(timeout=5)


class GitTree:
    """One commit of the state repo, as the `Tree` that `state.StateReader` reads.

    When it was listed as the difference from an earlier commit, `base` names that
    commit and `changed` the state files that differ (added, changed or deleted), so a
    reader that has read `base` needs to look at those only.
    """

    def __init__(self, entries: Mapping[str, str], cat: CatFile, base: str | None = None,
                 changed: frozenset[str] | None = None) -> None:
        self._entries = entries
        self._cat = cat
        self.base = base
        self.changed = changed

    def entries(self) -> Mapping[str, str]:
        return self._entries

    def read(self, path: str) -> bytes:
        return self._cat.read(self._entries[path])


def state_entries(listing: bytes, results: bool = False) -> dict[str, str]:
    """The state files (`layout.is_state_file`) of `git ls-tree -r -z` output, with their blob ids."""
    entries = {}
    for record in listing.split(b"\0"):
        meta, _, raw_path = record.partition(b"\t")
        parts = meta.split()
        if len(parts) != 3 or parts[1] != b"blob":
            continue
        path = raw_path.decode("utf-8", "replace")
        if layout.is_state_file(path, results):
            entries[path] = parts[2].decode()
    return entries


@dataclass(frozen=True)
class Change:
    """One commit that touched a file: who, when, what it said."""

    commit: str
    author: str
    email: str
    time: str     # ISO 8601 as git recorded it (the author's clock)
    subject: str


class GitReader:
    """Read-only access to a repository (bare or not) at `path`."""

    def __init__(self, path: Path, env: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.env = dict(env) if env is not None else git_env()
        self.cat = CatFile(self.path, self.env)
        self._listing: tuple[tuple[str, bool], dict[str, str]] | None = None

    def git(self, *args: str, timeout: float = 60.0) -> str:
        return git(self.path, *args, env=self.env, timeout=timeout)

    def refs(self, prefix: str = layout.ORIGIN) -> dict[str, str]:
        """Every ref under `prefix` with the commit it points at."""
        out = self.git("for-each-ref", "--format=%(objectname) %(refname)", prefix)
        return {ref: sha for sha, ref in (line.split(" ", 1) for line in out.splitlines())}

    def resolve(self, rev: str) -> str | None:
        out = subprocess.run(["git", "rev-parse", "-q", "--verify", f"{rev}^{{commit}}"], cwd=self.path,
                             capture_output=True, env=self.env, check=False)
        return out.stdout.decode().strip() or None if out.returncode == 0 else None

    def tree(self, commit: str, results: bool = False) -> GitTree:
        """The state files of `commit`.

        The listing of the last commit asked for is kept; the next one is that listing
        plus `git diff-tree` from it, so a commit that changed one project costs one
        project's worth, not a listing of every file in the repo.
        """
        if self._listing is not None and self._listing[0][1] == results:
            (base, _), entries = self._listing
            if base == commit:
                return GitTree(entries, self.cat, base, frozenset())
            updated = dict(entries)
            changed = self._diff(base, commit, updated, results)
            if changed is not None:
                self._listing = ((commit, results), updated)
                return GitTree(updated, self.cat, base, changed)
        self._listing = ((commit, results), self._list(commit, results))
        return GitTree(self._listing[1], self.cat)

    def _diff(self, base: str, commit: str, entries: dict[str, str], results: bool) -> frozenset[str] | None:
        """Apply the changes from `base` to `commit` to `entries`; the state files changed, None when git cannot say."""
        out = subprocess.run(["git", "diff-tree", "-r", "-z", "--no-renames", base, commit], cwd=self.path,
                             capture_output=True, env=self.env, check=False)
        if out.returncode != 0:
            return None
        fields = out.stdout.split(b"\0")
        changed = set()
        for meta, raw_path in zip(fields[0::2], fields[1::2]):
            parts = meta.split()
            if len(parts) != 5:
                continue
            path = raw_path.decode("utf-8", "replace")
            if not layout.is_state_file(path, results):
                continue
            changed.add(path)
            if parts[4] == b"D" or parts[1][:2] not in (b"10", b"12"):
                entries.pop(path, None)  # deleted, or no longer a blob (a submodule), as `ls-tree` would list it
            else:
                entries[path] = parts[3].decode()
        return frozenset(changed)

    def subtree(self, commit: str, paths: tuple[str, ...], results: bool = False) -> GitTree:
        """The state files of `commit` below `paths` only: one project without listing all the others."""
        return GitTree(self._list(commit, results, paths), self.cat)

    def _list(self, commit: str, results: bool, paths: tuple[str, ...] = ()) -> dict[str, str]:
        out = subprocess.run(["git", "ls-tree", "-r", "-z", "--full-tree", commit, "--", *paths], cwd=self.path,
                             capture_output=True, env=self.env, check=False)
        if out.returncode != 0:
            raise GitError(f"cannot list commit {commit[:12]}: {out.stderr.decode().strip()}")
        return state_entries(out.stdout, results)

    def read(self, commit: str, path: str) -> bytes | None:
        """A file of a commit; None when the commit has no such file."""
        try:
            return self.cat.read(f"{commit}:{path}")
        except GitError:
            return None

    def committed(self, commit: str) -> int | None:
        """The committer time of a commit, in seconds since the epoch."""
        out = subprocess.run(["git", "show", "-s", "--format=%ct", commit], cwd=self.path, capture_output=True,
                             env=self.env, check=False)
        text = out.stdout.decode().strip()
        return int(text) if out.returncode == 0 and text.isdigit() else None

    def history(self, rev: str, path: str, limit: int = 50) -> list[Change]:
        """The commits on `rev` that changed `path`, newest first."""
        out = subprocess.run(["git", "log", f"-{limit}", "--format=%H%x00%an%x00%ae%x00%aI%x00%s", rev, "--", path],
                             cwd=self.path, capture_output=True, env=self.env, check=False)
        if out.returncode != 0:
            return []
        changes = []
        for line in out.stdout.decode("utf-8", "replace").splitlines():
            fields = line.split("\0")
            if len(fields) == 5:
                changes.append(Change(*fields))
        return changes

    def versions(self, rev: str, path: str, limit: int = 50) -> list[tuple[str, bytes | None]]:
        """The versions of `path` on `rev`, newest first: (the commit that made it, its bytes; None where that
        commit deleted it). When the history is shorter than `limit`, it ends with the commit before the file
        was added, and None."""
        out = subprocess.run(["git", "log", f"-{limit}", "--format=%H %P", rev, "--", path], cwd=self.path,
                             capture_output=True, env=self.env, check=False)
        if out.returncode != 0:
            return []
        lines = [line.split() for line in out.stdout.decode().splitlines() if line.strip()]
        found: list[tuple[str, bytes | None]] = []
        for commit, *_ in lines:
            try:
                found.append((commit, self.cat.read(f"{commit}:{path}")))
            except GitError:
                found.append((commit, None))
        if lines and len(lines) < limit and len(lines[-1]) > 1:
            found.append((lines[-1][1], None))  # before the oldest version there was none
        return found

    def close(self) -> None:
        self.cat.close()
