"""The node's side of the state repo that writes: its bare mirror, fetching, commits, pushes.

Each node keeps a bare mirror of the remote in its work folder. It never has
a work tree: a commit is built from the fetched tip's tree with a temporary
index, so a node's commit changes exactly the files it means to change, and a
push of it is a compare-and-swap on the branch.

A remote that is a bare repository on this machine's disk (a folder, or an NFS mount
shared by the nodes) and has no hooks is written without `git push`: the commit's new
objects are copied into its object store and main is moved with `git update-ref NEW OLD`,
the same compare-and-swap under the same lock that receive-pack takes, without the walk
of the whole tree that a push costs at thousands of projects (about 100 ms at 10,000).
Heartbeats move the node's branch the same way (forced, as their push is). Fetching from
any remote on this disk reads its refs and sets the mirror's tracking refs (the objects are
borrowed through git's alternates): two git processes instead of the five a `git fetch`
starts (upload-pack, a connectivity walk, automatic maintenance), which the mirror then
runs itself every GC_EVERY commits.
A remote with hooks, served over a network, or not bare always gets a real push. Reading the mirror is
`gitread.GitReader`'s job (`Mirror.reader`); this module is the only one that
changes it.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

from reconciler import layout
from reconciler.errors import GitError, PushRejected
from reconciler.gitcmd import git, git_env, local_remote, push
from reconciler.gitread import GitReader


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


SPLICE_FROM = 16 * 1024  # trees at least this large are edited in place rather than rebuilt
GC_EVERY = 50  # writes to a same-disk remote (or commits in the mirror) between two `git gc --auto` of it
_FETCHED = {  # the remote's refs a fetch brings, and where they go in the mirror (layout.REFSPECS)
    layout.MAIN_REF: layout.ORIGIN_MAIN,
    f"refs/heads/{layout.NODE_BRANCHES}": layout.ORIGIN_NODES,
    f"refs/heads/{layout.RESUME_BRANCHES}": layout.ORIGIN_RESUMES,
}
_ENTRY = re.compile(rb"([0-7]{5,6}) ([^\0]+)\0(.{20})", re.S)


class _Rebuild(Exception):
    """The tree cannot be edited in place."""


def _plain_bare(remote: Path) -> bool:
    """A bare repository with no hooks that would run on a push (only git's own `*.sample` files)."""
    if not (remote / "refs").is_dir() or not (remote / "objects").is_dir() or (remote / ".git").exists():
        return False
    hooks = remote / "hooks"
    try:
        return not any(not entry.name.endswith(".sample") for entry in hooks.iterdir()) if hooks.is_dir() else True
    except OSError:
        return False


def _copy_object(source: Path, target: Path, sha: str) -> None:
    """A loose object of this mirror into the remote's store (atomically; kept if it is there already)."""
    into = target / sha[:2] / sha[2:]
    if into.exists():
        return
    data = (source / sha[:2] / sha[2:]).read_bytes()
    into.parent.mkdir(exist_ok=True)
    tmp = into.parent / f"tmp_obj_{sha[2:]}_{os.getpid()}_{threading.get_ident()}"
    tmp.write_bytes(data)
    os.chmod(tmp, 0o444)
    os.replace(tmp, into)


def _under(ref: str, prefix: str) -> bool:
    """`ref` is `prefix` itself, or below it when `prefix` names a folder (ends with a slash)."""
    return ref == prefix or prefix.endswith("/") and ref.startswith(prefix)


def _gc_later(repo: Path, env: Mapping[str, str]) -> None:
    """`git gc --auto` of `repo` on a thread of its own: it packs loose objects once there are many."""
    threading.Thread(target=git, args=(repo, "gc", "--auto", "--quiet"), kwargs={"env": env, "timeout": 3600,
                     "check": False}, name="gc", daemon=True).start()


class Mirror:
    """A bare mirror of the remote state repo in a node's work folder: fetch into it, commit and push from it."""

    def __init__(self, url: str, path: Path, identity: Mapping[str, str] | None = None) -> None:
        self.url = url
        self.path = Path(path)
        self.env = git_env(identity)
        self.reader = GitReader(self.path, self.env)
        self._direct: Path | None = None  # a bare remote on this disk without hooks: see the module's doc
        self._borrowed: Path | None = None  # the git folder of a remote on this disk whose objects the mirror borrows
        self._tracking: dict[str, str] | None = None  # the tracking refs as this mirror last read or wrote them
        self._refs_lock = threading.Lock()  # held while the tracking refs change, so that _tracking stays true
        self._commits_made = 0
        self._made = threading.local()  # the objects the commit being built writes, per thread
        self._commits: dict[str, tuple[str | None, tuple[str, ...]]] = {}  # commit -> (parent, its objects)
        self._lock = threading.Lock()
        self._direct_pushes = 0

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
        self._share_objects()

    def _share_objects(self) -> None:
        """A remote on this machine's disk lends its object store (git's alternates): a fetch then moves
        only refs, not a pack of what the remote already holds (12 ms against 80 ms at 10,000 projects)."""
        alternates = self.path / "objects" / "info" / "alternates"
        remote = local_remote(self.url)
        store = None
        if remote is not None:
            store = (remote / ".git" / "objects") if (remote / ".git" / "objects").is_dir() else remote / "objects"
        if store is None or not store.is_dir():
            alternates.unlink(missing_ok=True)
            return
        alternates.parent.mkdir(parents=True, exist_ok=True)
        alternates.write_text(f"{store.resolve()}\n")
        assert remote is not None
        self._direct = remote if _plain_bare(remote) else None
        self._borrowed = store.parent

    def git(self, *args: str, input: bytes | None = None, timeout: float = 60.0) -> str:
        return git(self.path, *args, input=input, env=self.env, timeout=timeout)

    def fetch(self, timeout: float = 30.0, skip_node: str | None = None) -> None:
        """Fetch main, node and resume branches; `skip_node` leaves out the branch this process pushes itself."""
        if self._borrowed is not None:
            self._fetch_refs(self._borrowed, skip_node, timeout)
            return
        skip = (f"^refs/heads/{layout.node_branch(skip_node)}",) if skip_node else ()
        self.git("fetch", "-q", "--prune", "--no-tags", "origin", *layout.REFSPECS, *skip, timeout=timeout)

    def _fetch_refs(self, remote: Path, skip_node: str | None, timeout: float) -> None:
        """A fetch from a remote on this disk whose objects the mirror borrows: only refs move, and only
        those that changed (one `update-ref --stdin` for all of them, pruned ones deleted)."""
        listed = self.git(f"--git-dir={remote}", "for-each-ref", "--format=%(objectname) %(refname)",
                          *(prefix.rstrip("/") for prefix in _FETCHED), timeout=timeout)
        with self._refs_lock:
            self._set_tracking(listed, skip_node, timeout)

    def _set_tracking(self, listed: str, skip_node: str | None, timeout: float) -> None:
        """The tracking refs to what the remote `listed` (for-each-ref's lines); this node's own branch stays."""
        own = layout.ORIGIN + layout.node_branch(skip_node) if skip_node else None
        theirs: dict[str, str] = {}
        for line in listed.splitlines():
            sha, ref = line.split(" ", 1)
            for prefix, into in _FETCHED.items():
                if _under(ref, prefix):
                    theirs[into + ref[len(prefix):]] = sha
        if own is not None:
            theirs.pop(own, None)
        every = self._tracking if self._tracking is not None else self.reader.refs(layout.ORIGIN)
        ours = {ref: sha for ref, sha in every.items()
                if ref != own and any(_under(ref, into) for into in _FETCHED.values())}
        commands = [f"update {ref} {sha}" for ref, sha in theirs.items() if ours.get(ref) != sha]
        commands += [f"delete {ref}" for ref in ours if ref not in theirs]
        if commands:
            self._tracking = None  # unknown until update-ref has done all of it
            self.git("update-ref", "--stdin", input="\n".join(commands).encode() + b"\n", timeout=timeout)
        self._tracking = {**{ref: sha for ref, sha in every.items() if ref not in ours}, **theirs}

    def refs(self) -> dict[str, str]:
        """The tracking refs (`refs/remotes/origin/...`) with their commits: what `reader.refs()` lists, without
        a git process while this mirror knows them (it fetched them itself and wrote every change since)."""
        with self._refs_lock:
            if self._tracking is not None:
                return dict(self._tracking)
        return self.reader.refs(layout.ORIGIN)

    def set_tracking_ref(self, ref: str, commit: str | None) -> None:
        """Point a tracking ref at `commit`, or delete it (None)."""
        with self._refs_lock:
            known, self._tracking = self._tracking, None
            if commit is None:
                self.git("update-ref", "-d", ref)
            else:
                self.git("update-ref", ref, commit)
            if known is not None:
                known.pop(ref, None)
                self._tracking = {**known, ref: commit} if commit is not None else known

    def commit(self, parent: str | None, changes: Mapping[str, bytes | None], message: str) -> str:
        """A new commit: `parent`'s tree with `changes` (None deletes a path).

        The objects are written straight into the mirror's object store (zlib
        loose objects, the format every git reads): a cycle's commit costs no
        process, which matters on the path from a push to a running container.
        """
        self._made.shas = []
        root = self.reader.cat.read(f"{parent}^{{tree}}") if parent else None
        tree = self._tree(root, dict(changes)) or self._write(b"tree", b"")
        when = f"{int(time.time())} +0000"
        author = f"{self.env.get('GIT_AUTHOR_NAME', 'Winslow')} <{self.env.get('GIT_AUTHOR_EMAIL', 'winslow@localhost')}>"
        committer = (f"{self.env.get('GIT_COMMITTER_NAME', 'Winslow')} "
                     f"<{self.env.get('GIT_COMMITTER_EMAIL', 'winslow@localhost')}>")
        lines = [f"tree {tree}"] + ([f"parent {parent}"] if parent else [])
        lines += [f"author {author} {when}", f"committer {committer} {when}", "", message.rstrip("\n"), ""]
        commit = self._write(b"commit", "\n".join(lines).encode("utf-8"))
        self._commits_made += 1
        if self._borrowed is not None and self._commits_made % GC_EVERY == 0:  # no `git fetch` runs maintenance
            _gc_later(self.path, self.env)
        if self._direct is not None:
            with self._lock:
                while len(self._commits) >= 64:  # commits never pushed (a cycle that lost its race)
                    self._commits.pop(next(iter(self._commits)))
                self._commits[commit] = (parent, tuple(self._made.shas))
        self._made.shas = []
        return commit

    def _tree(self, data: bytes | None, changes: dict[str, bytes | None]) -> str | None:
        if data is not None and len(data) >= SPLICE_FROM:
            try:
                return self._splice(data, changes)
            except _Rebuild:
                pass
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
            inner = self.reader.cat.read(old[1]) if old and old[0] == "40000" else None
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

    def _splice(self, data: bytes, changes: dict[str, bytes | None]) -> str | None:
        """A large tree (`projects/` of thousands of projects) edited in place: only the changed entries are
        rewritten, in the order they already have. `_Rebuild` when an entry would be added or change kind
        (its place in git's order could move): then the tree is built whole."""
        wanted = {path.partition("/")[0].encode("utf-8", "surrogateescape") for path in changes}
        found: dict[bytes, re.Match[bytes]] = {}
        at = 0
        for match in _ENTRY.finditer(data):  # one pass, checking the entries follow each other exactly
            if match.start() != at:
                raise _Rebuild
            at = match.end()
            if match.group(2) in wanted:
                found[match.group(2)] = match
        if at != len(data):
            raise _Rebuild
        nested: dict[bytes, dict[str, bytes | None]] = {}
        edits: list[tuple[int, int, bytes]] = []
        for path, content in changes.items():
            head, _, rest = path.partition("/")
            name = head.encode("utf-8", "surrogateescape")
            entry = found.get(name)
            if rest:
                nested.setdefault(name, {})[rest] = content
            elif entry is None:
                if content is not None:
                    raise _Rebuild
            elif content is None:
                edits.append((entry.start(), entry.end(), b""))
            elif entry.group(1) == b"40000":
                raise _Rebuild
            else:
                edits.append((entry.start(), entry.end(),
                              b"100644 " + name + b"\0" + bytes.fromhex(self._write(b"blob", content))))
        for name, inner_changes in nested.items():
            entry = found.get(name)
            if entry is None or entry.group(1) != b"40000":
                raise _Rebuild
            sha = self._tree(self.reader.cat.read(entry.group(3).hex()), inner_changes)
            new = b"" if sha is None else b"40000 " + name + b"\0" + bytes.fromhex(sha)
            edits.append((entry.start(), entry.end(), new))
        pieces, at = [], 0
        for start, end, new in sorted(edits):
            pieces += [data[at:start], new]
            at = end
        body = b"".join(pieces) + data[at:]
        return self._write(b"tree", body) if body else None

    def _write(self, kind: bytes, data: bytes) -> str:
        raw = kind + b" " + str(len(data)).encode() + b"\0" + data
        sha = hashlib.sha1(raw).hexdigest()
        made = getattr(self._made, "shas", None)
        if made is not None:
            made.append(sha)
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
        with self._lock:
            made = self._commits.pop(commit, None)
        parent, shas = made if made is not None else (None, ())
        if not (self._direct is not None and parent and self._swap_main(commit, parent, shas)):
            self.push([f"{commit}:{layout.MAIN_REF}"], timeout=timeout)
        self.set_tracking_ref(layout.ORIGIN_MAIN, commit)

    def _swap_main(self, commit: str, parent: str, shas: tuple[str, ...]) -> bool:
        """Move the same-disk remote's main from `parent` to `commit` itself; False: push instead.
        PushRejected when main is no longer at `parent`."""
        remote = self._direct
        assert remote is not None
        if not _plain_bare(remote):  # hooks added since the node started: they must run
            self._direct = None
            return False
        try:
            self._copy_objects(remote, shas)
        except OSError:
            return False  # an object not loose here, or the store not writable: a push knows better
        try:
            git(remote, "update-ref", "-m", "winslow: compare-and-swap", layout.MAIN_REF, commit, parent, env=self.env)
        except GitError as exc:
            if "but expected" in str(exc) or "cannot lock ref" in str(exc):
                raise PushRejected(f"main of {remote} moved on: {exc}") from None
            raise
        self._wrote_directly(remote)
        return True

    def _copy_objects(self, remote: Path, shas: tuple[str, ...]) -> None:
        for sha in dict.fromkeys(shas):
            _copy_object(self.path / "objects", remote / "objects", sha)

    def _wrote_directly(self, remote: Path) -> None:
        self._direct_pushes += 1
        if self._direct_pushes % GC_EVERY == 0:  # what receive-pack would do after a push
            _gc_later(remote, self.env)

    def push_heartbeat(self, branch: str, commit: str, timeout: float = 30.0) -> None:
        """Move (force) the node's own branch on the remote to `commit`."""
        with self._lock:
            made = self._commits.pop(commit, None)
        remote = self._direct
        if remote is not None and made is not None and _plain_bare(remote):
            try:
                self._copy_objects(remote, made[1])
                git(remote, "update-ref", "-m", "winslow: heartbeat", f"refs/heads/{branch}", commit, env=self.env,
                    timeout=timeout)
            except OSError:
                pass  # a push knows better
            else:
                self._wrote_directly(remote)
                return
        self.push([f"+{commit}:refs/heads/{branch}"], timeout=timeout)

    def push_branch(self, branch: str, commit: str) -> None:
        """Create or move a branch on the remote (no force: it must move forward), and its tracking ref here."""
        self.push([f"{commit}:refs/heads/{branch}"])
        self.set_tracking_ref(layout.ORIGIN + branch, commit)

    def close(self) -> None:
        self.reader.close()
