"""The node's view of the state repo: fetch, read a commit, commit on a tip, push.

Each node keeps a bare mirror of the remote in its work folder. It never has
a work tree: a commit is built from the fetched tip's tree with a temporary
index, so a node's commit changes exactly the files it means to change, and a
push of it is a compare-and-swap on the branch.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
import zlib
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


def _parse_tree(data: bytes) -> dict[str, tuple[str, str]]:
    """A tree object's entries: name -> (mode, sha)."""
    entries = {}
    at = 0
    while at < len(data):
        space = data.index(b" ", at)
        nul = data.index(b"\0", space)
        mode = data[at:space].decode()
        entries[data[space + 1:nul].decode("utf-8", "surrogateescape")] = (mode, data[nul + 1:nul + 21].hex())
        at = nul + 21
    return entries


def _wanted(path: str, with_results: bool) -> bool:
    if path in _WANTED:
        return True
    parts = path.split("/")
    if parts[0] == "pipelines":
        return len(parts) == 2
    if parts[0] == "projects" and len(parts) == 3:
        return parts[2] in ("project.yaml", "status.yaml", "pipeline.lock.yaml")
    return with_results and parts[0] == "projects" and len(parts) == 4 and parts[2] == "results"


class CatFile:
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

    def __init__(self, entries: Mapping[str, str], cat: CatFile) -> None:
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
        self._cat = CatFile(self.path)
        self._entries: tuple[str, dict[str, str]] | None = None

    def open(self) -> None:
        if not (self.path / "HEAD").exists():
            self.path.mkdir(parents=True, exist_ok=True)
            git(self.path, "init", "-q", "--bare")
            git(self.path, "config", "remote.origin.url", self.url)
            # Heartbeat commits are replaced every few seconds; do not keep them for two weeks.
            git(self.path, "config", "gc.pruneExpire", "1.hour.ago")
            git(self.path, "config", "gc.reflogExpireUnreachable", "1.hour.ago")
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
        """A new commit: `parent`'s tree with `changes` (None deletes a path).

        The objects are written straight into the mirror's object store (zlib
        loose objects, the format every git reads): a cycle's commit costs no
        process, which matters on the path from a push to a running container.
        """
        root = self._cat.read(f"{parent}^{{tree}}") if parent else None
        tree = self._tree(root, dict(changes)) or self._write(b"tree", b"")
        when = f"{int(time.time())} +0000"
        author = f"{self.env.get('GIT_AUTHOR_NAME', 'Winslow')} <{self.env.get('GIT_AUTHOR_EMAIL', 'winslow@localhost')}>"
        committer = (f"{self.env.get('GIT_COMMITTER_NAME', 'Winslow')} "
                     f"<{self.env.get('GIT_COMMITTER_EMAIL', 'winslow@localhost')}>")
        lines = [f"tree {tree}"] + ([f"parent {parent}"] if parent else [])
        lines += [f"author {author} {when}", f"committer {committer} {when}", "", message.rstrip("\n"), ""]
        return self._write(b"commit", "\n".join(lines).encode("utf-8"))

    def _tree(self, data: bytes | None, changes: dict[str, bytes | None]) -> str | None:
        entries = _parse_tree(data) if data is not None else {}
        nested: dict[str, dict[str, bytes | None]] = {}
        for path, content in changes.items():
            head, _, rest = path.partition("/")
            if rest:
                nested.setdefault(head, {})[rest] = content
            elif content is None:
                entries.pop(head, None)
            else:
                entries[head] = ("100644", self._write(b"blob", content))
        for name, sub in nested.items():
            old = entries.get(name)
            inner = self._cat.read(old[1]) if old and old[0] == "40000" else None
            sha = self._tree(inner, sub)
            if sha is None:
                entries.pop(name, None)
            else:
                entries[name] = ("40000", sha)
        if not entries:
            return None
        order = sorted(entries, key=lambda n: n + "/" if entries[n][0] == "40000" else n)
        body = b"".join(f"{entries[n][0]} {n}".encode() + b"\0" + bytes.fromhex(entries[n][1]) for n in order)
        return self._write(b"tree", body)

    def _write(self, kind: bytes, data: bytes) -> str:
        raw = kind + b" " + str(len(data)).encode() + b"\0" + data
        sha = hashlib.sha1(raw).hexdigest()
        target = self.path / "objects" / sha[:2] / sha[2:]
        if not target.exists():
            target.parent.mkdir(exist_ok=True)
            tmp = target.parent / f"tmp_{sha[2:]}_{os.getpid()}_{threading.get_ident()}"
            tmp.write_bytes(zlib.compress(raw, 1))
            os.replace(tmp, target)
        return sha

    def push(self, refspecs: list[str], timeout: float = 30.0) -> None:
        push(self.path, "origin", refspecs, env=self.env, timeout=timeout)

    def push_main(self, commit: str, timeout: float = 30.0) -> None:
        """Compare-and-swap main: accepted only if the remote is still at this commit's parent."""
        self.push([f"{commit}:refs/heads/main"], timeout=timeout)
        self.git("update-ref", MAIN, commit)

    def close(self) -> None:
        self._cat.close()
