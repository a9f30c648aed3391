"""The node's view of the state repo: fetch, read a commit, commit on a tip, push.

Each node keeps a bare mirror of the remote in its work folder. It never has
a work tree: a commit is built from the fetched tip's tree with a temporary
index, so a node's commit changes exactly the files it means to change, and a
push of it is a compare-and-swap on the branch.
"""
from __future__ import annotations

import os
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Mapping

from reconciler.errors import GitError
from reconciler.gitcmd import git, git_env, push

MAIN = "refs/remotes/origin/main"
NODES = "refs/remotes/origin/winslow/nodes/"
REFSPECS = ("+refs/heads/main:refs/remotes/origin/main",
            "+refs/heads/winslow/nodes/*:refs/remotes/origin/winslow/nodes/*",
            "+refs/heads/resume/*:refs/remotes/origin/resume/*")
_WANTED = ("winslow.yaml",)


def _wanted(path: str, with_results: bool) -> bool:
    if path in _WANTED:
        return True
    parts = path.split("/")
    if parts[0] == "pipelines":
        return len(parts) == 2
    if parts[0] == "projects" and len(parts) == 3:
        return parts[2] in ("project.yaml", "status.yaml", "pipeline.lock.yaml")
    return with_results and parts[0] == "projects" and len(parts) == 4 and parts[2] == "results"


class _CatFile:
    """One long-lived `git cat-file --batch`: reading a blob costs no new process."""

    def __init__(self, git_dir: Path) -> None:
        self._git_dir = git_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def read(self, sha: str) -> bytes:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._proc = subprocess.Popen(["git", "cat-file", "--batch"], cwd=self._git_dir, stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, env=git_env())
            assert self._proc.stdin and self._proc.stdout
            self._proc.stdin.write(sha.encode() + b"\n")
            self._proc.stdin.flush()
            header = self._proc.stdout.readline().split()
            if len(header) < 3:
                raise GitError(f"object {sha} is missing from {self._git_dir}")
            data = self._proc.stdout.read(int(header[2]))
            self._proc.stdout.read(1)
            return data

    def close(self) -> None:
        if self._proc and self._proc.poll() is None:
            self._proc.stdin.close()  # type: ignore[union-attr]
            self._proc.wait(timeout=5)


class GitTree:
    """One commit of the state repo, as the `Tree` that `state.StateReader` reads."""

    def __init__(self, entries: Mapping[str, str], cat: _CatFile) -> None:
        self._entries = entries
        self._cat = cat

    def entries(self) -> Mapping[str, str]:
        return self._entries

    def read(self, path: str) -> bytes:
        return self._cat.read(self._entries[path])


class StateRepo:
    """A bare mirror of the remote state repo in a node's (or viewer's) work folder."""

    def __init__(self, url: str, path: Path, identity: Mapping[str, str] | None = None) -> None:
        self.url = url
        self.path = Path(path)
        self.env = git_env(identity)
        self._cat = _CatFile(self.path)
        self._entries: tuple[str, dict[str, str]] | None = None

    def open(self) -> None:
        if not (self.path / "HEAD").exists():
            self.path.mkdir(parents=True, exist_ok=True)
            git(self.path, "init", "-q", "--bare")
            git(self.path, "config", "remote.origin.url", self.url)
        else:
            git(self.path, "remote", "set-url", "origin", self.url)

    def git(self, *args: str, input: bytes | None = None, timeout: float = 60.0) -> str:
        return git(self.path, *args, input=input, env=self.env, timeout=timeout)

    def fetch(self, timeout: float = 30.0, skip_node: str | None = None) -> None:
        """Fetch main, node and resume branches; `skip_node` leaves out the branch this process pushes itself."""
        skip = (f"^refs/heads/winslow/nodes/{skip_node}",) if skip_node else ()
        self.git("fetch", "-q", "--prune", "--no-tags", "origin", *REFSPECS, *skip, timeout=timeout)

    def refs(self, prefix: str = "refs/remotes/origin/") -> dict[str, str]:
        out = self.git("for-each-ref", "--format=%(objectname) %(refname)", prefix)
        return {ref: sha for sha, ref in (line.split(" ", 1) for line in out.splitlines())}

    def tip(self) -> str | None:
        return self.refs(MAIN).get(MAIN)

    def node_tips(self) -> dict[str, str]:
        return {ref[len(NODES):]: sha for ref, sha in self.refs(NODES).items()}

    def tree(self, commit: str, with_results: bool = False) -> GitTree:
        if self._entries is None or self._entries[0] != commit:
            out = subprocess.run(["git", "ls-tree", "-r", "-z", "--full-tree", commit], cwd=self.path,
                                 capture_output=True, env=self.env, check=False)
            if out.returncode != 0:
                raise GitError(f"cannot list commit {commit[:12]}: {out.stderr.decode().strip()}")
            entries = {}
            for record in out.stdout.split(b"\0"):
                if not record:
                    continue
                meta, path = record.split(b"\t", 1)
                name = path.decode("utf-8", "replace")
                if meta.split()[1] == b"blob" and _wanted(name, with_results):
                    entries[name] = meta.split()[2].decode()
            self._entries = (commit, entries)
        return GitTree(self._entries[1], self._cat)

    def read(self, commit: str, path: str) -> bytes | None:
        out = subprocess.run(["git", "cat-file", "blob", f"{commit}:{path}"], cwd=self.path, capture_output=True,
                             env=self.env, check=False)
        return out.stdout if out.returncode == 0 else None

    def commit(self, parent: str | None, changes: Mapping[str, bytes | None], message: str) -> str:
        """A new commit: `parent`'s tree with `changes` (None deletes a path)."""
        with tempfile.TemporaryDirectory(dir=self.path) as tmp:
            env = dict(self.env, GIT_INDEX_FILE=os.path.join(tmp, "index"))
            if parent:
                git(self.path, "read-tree", parent, env=env)
            written = sorted(p for p, data in changes.items() if data is not None)
            blob_files = []
            for i, path in enumerate(written):
                blob_file = os.path.join(tmp, str(i))
                with open(blob_file, "wb") as handle:
                    handle.write(changes[path])  # type: ignore[arg-type]
                blob_files.append(blob_file)
            shas = git(self.path, "hash-object", "-w", "--stdin-paths", input="\n".join(blob_files).encode(),
                       env=env).split() if blob_files else []
            lines = [f"100644 {sha}\t{path}" for path, sha in zip(written, shas)]
            lines += [f"0 {'0' * 40}\t{p}" for p, data in changes.items() if data is None]
            git(self.path, "update-index", "--index-info", input=("\n".join(lines) + "\n").encode(), env=env)
            tree = git(self.path, "write-tree", env=env).strip()
            args = ["commit-tree", tree, "-m", message] + (["-p", parent] if parent else [])
            return git(self.path, *args, env=env).strip()

    def push(self, refspecs: list[str], timeout: float = 30.0) -> None:
        push(self.path, "origin", refspecs, env=self.env, timeout=timeout)

    def push_main(self, commit: str, timeout: float = 30.0) -> None:
        """Compare-and-swap main: accepted only if the remote is still at this commit's parent."""
        self.push([f"{commit}:refs/heads/main"], timeout=timeout)
        self.git("update-ref", MAIN, commit)

    def close(self) -> None:
        self._cat.close()
