"""Result manifests: what a finished run left in its workspace, file by file.

When a stage ends, Winslow commits `projects/<p>/results/<run>.yaml` to the state repo:
the path, size and sha256 of every file the run left in its workspace
(`workspaces/<p>/<run>/` on the storage root). The bytes stay in storage; git holds only
these pointers. `build_manifest()` makes that document; it reads every byte of the
workspace, so it belongs on a background worker, never on the executor's exit path: a
50 GB workspace takes minutes to hash, and the exit fact (and with it the next stage)
must not wait for that.

`HashCache` remembers the sha256 of files already hashed, keyed by their path and their
stat stamp (size, mtime_ns, inode, ctime_ns), so an unchanged file is never hashed twice:
not when a manifest is built again, and, when the cache is kept in a file in the node's
work folder, not after the node restarts either.

The rules of a manifest (those `LocalStorage.manifest` had):

* paths are relative to the workspace, with `/`, in sorted order (plain string order
  of the whole path, as `sorted()` gives);
* a regular file is listed; a symlink is listed (with its target's size and sha256)
  only when it leads to a regular file inside the workspace. A link is never followed
  out of the workspace, a symlinked folder is never entered, and FIFOs, sockets and
  devices are never opened: those are skipped without a word, as before;
* at most `max_files` files (10,000) are listed; when the workspace holds more,
  `truncated` is true and the walk stops there.

Whatever a stage leaves behind, `build_manifest()` does not raise. An entry that should
have been listed but could not be (a symlink loop, a link to a missing file inside the
workspace, an unreadable file or folder, a file that vanished or kept changing during
the walk, a name that is not UTF-8) is named under `unlisted` with a short reason, so a
person reading the manifest knows it is incomplete and why. `unlisted` is present only
when something is in it, and holds at most `UNLISTED_MAX` entries.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any, NamedTuple, Union

log = logging.getLogger(__name__)

MANIFEST_MAX_FILES = 10_000
UNLISTED_MAX = 100
LINKS_MAX = 1000  # symbolic links named in one manifest
LINK_TARGET_MAX = 1024  # characters of a link's target kept
CHUNK = 4 * 1024 * 1024
RACY_S = 2.0  # a file changed this recently is hashed but not cached (see HashCache)
CACHE_MAX_ENTRIES = 200_000  # about 60 MB of memory at most
_HASH_TRIES = 3
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | _CLOEXEC
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW | _CLOEXEC
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")

LOOP = "symbolic link loop: it never leads to a file"
VANISHED = "disappeared while the workspace was being listed"
WORKSPACE_LINK = "the workspace itself was replaced by a symbolic link: not followed, nothing listed"
REPLACED = "was replaced while the workspace was being listed"
CHANGING = "kept changing while it was being hashed (is something still writing it?)"
NOT_UTF8 = "name is not valid UTF-8"
NOT_A_FOLDER = "the workspace is not a folder"
INSIDE_NOT_LISTED = "; nothing inside it is listed"

PathLike = Union[str, "os.PathLike[str]"]


class Stamp(NamedTuple):
    """What must stay the same for a file's cached sha256 to still be its sha256."""

    size: int
    mtime_ns: int
    inode: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)


class HashCache:
    """sha256 of files by (absolute path, size, mtime_ns, inode, ctime_ns); thread-safe, bounded.

    One entry per path (a newer stamp replaces the older one), the least recently used
    dropped beyond `max_entries`. ctime is part of the stamp because nothing can set it
    back: a file rewritten in place with the same size and its mtime restored is still
    hashed again.

    A file whose last change (mtime or ctime) is less than `racy_s` before the moment it
    was hashed is not cached: a write within the same timestamp tick could otherwise go
    unseen (git's "racy" entries). For the files that matter that never bites: hashing a
    large file takes longer than that.

    With `path`, entries are kept in that file (JSON lines, one `[path, size, mtime_ns,
    inode, ctime_ns, sha256]` per line): read once here, appended one line per new
    digest, and rewritten whole when it holds more than twice the live entries. A line
    it cannot read (a write cut by a crash) is skipped. Problems with the file are
    logged and leave a cache in memory only; it never makes a manifest fail. One
    process per file.
    """

    def __init__(self, path: PathLike | None = None, max_entries: int = CACHE_MAX_ENTRIES,
                 racy_s: float = RACY_S) -> None:
        self.path = Path(path) if path is not None else None
        self.max_entries = max(1, max_entries)
        self.racy_ns = int(racy_s * 1e9)
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[Stamp, str]] = OrderedDict()
        self._lines = 0
        self._file: IO[str] | None = None
        if self.path is not None:
            with self._lock:
                self._load()

    # -- lookups ---------------------------------------------------------------------------------
    def get(self, path: str, st: os.stat_result) -> str | None:
        """The cached sha256 of `path`, if it was hashed with exactly this stamp."""
        stamp = Stamp.of(st)
        with self._lock:
            found = self._entries.get(path)
            if found is None or found[0] != stamp:
                self.misses += 1
                return None
            self._entries.move_to_end(path)
            self.hits += 1
            return found[1]

    def put(self, path: str, st: os.stat_result, sha256: str, hashed_at_ns: int | None = None) -> bool:
        """Remember a digest; False (and nothing kept) when the file changed too recently to trust its stamp."""
        now = time.time_ns() if hashed_at_ns is None else hashed_at_ns
        if max(st.st_mtime_ns, st.st_ctime_ns) > now - self.racy_ns:
            return False
        stamp = Stamp.of(st)
        with self._lock:
            if self._entries.get(path) == (stamp, sha256):
                self._entries.move_to_end(path)
                return True
            self._entries[path] = (stamp, sha256)
            self._entries.move_to_end(path)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            self._append(path, stamp, sha256)
        return True

    def forget(self, folder: PathLike) -> int:
        """Drop every entry at or below `folder` (a deleted project's workspaces); how many went."""
        prefix = os.fspath(folder).rstrip(os.sep)
        below = prefix + os.sep
        with self._lock:
            gone = [p for p in self._entries if p == prefix or p.startswith(below)]
            for p in gone:
                del self._entries[p]
            if gone and self.path is not None:
                self._compact()
        return len(gone)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def close(self) -> None:
        with self._lock:
            self._close_file()

    def __enter__(self) -> HashCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the file (called with the lock held) ------------------------------------------------------
    def _load(self) -> None:
        assert self.path is not None
        try:
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    self._lines += 1
                    entry = _parse_line(line)
                    if entry is not None:
                        path, stamp, digest = entry
                        self._entries[path] = (stamp, digest)
                        self._entries.move_to_end(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("hash cache %s cannot be read (%s); starting empty", self.path, exc)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        if self._lines > 2 * len(self._entries) + 1000:
            self._compact()

    def _append(self, path: str, stamp: Stamp, digest: str) -> None:
        if self.path is None:
            return
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = open(self.path, "a", encoding="utf-8")
            self._file.write(_line(path, stamp, digest))
            self._file.flush()
        except OSError as exc:
            log.warning("hash cache %s cannot be written (%s); keeping it in memory only", self.path, exc)
            self._drop_file()
            return
        self._lines += 1
        if self._lines > 2 * len(self._entries) + 1000:
            self._compact()

    def _compact(self) -> None:
        assert self.path is not None
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                handle.writelines(_line(p, stamp, digest) for p, (stamp, digest) in self._entries.items())
            if self._file is not None:
                self._file.close()
                self._file = None
            os.replace(temporary, self.path)
        except OSError as exc:
            log.warning("hash cache %s cannot be rewritten (%s); keeping it in memory only", self.path, exc)
            self._drop_file()
            try:
                os.unlink(temporary)
            except OSError:
                pass
            return
        self._lines = len(self._entries)

    def _close_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
        self._file = None

    def _drop_file(self) -> None:
        self._close_file()
        self.path = None


def _line(path: str, stamp: Stamp, digest: str) -> str:
    return json.dumps([path, *stamp, digest], separators=(",", ":")) + "\n"


def _parse_line(line: str) -> tuple[str, Stamp, str] | None:
    try:
        fields = json.loads(line)
    except ValueError:
        return None
    if (not isinstance(fields, list) or len(fields) != 6 or not isinstance(fields[0], str)
            or not all(type(v) is int for v in fields[1:5]) or not isinstance(fields[5], str)
            or not _SHA256.match(fields[5])):
        return None
    return fields[0], Stamp(*fields[1:5]), fields[5]


def sha256_fd(fd: int) -> tuple[int, str]:
    """The size and sha256 of an open file's content, read from its start in CHUNK pieces.

    hashlib lets go of the GIL while it hashes, so other threads of the node run on.
    """
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(CHUNK))
    size = 0
    os.lseek(fd, 0, os.SEEK_SET)
    if hasattr(os, "posix_fadvise"):
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass
    with open(fd, "rb", buffering=0, closefd=False) as handle:
        while n := handle.readinto(buffer):
            digest.update(buffer[:n])
            size += n
    return size, digest.hexdigest()


def build_manifest(workspace: PathLike, workspace_key: str, cache: HashCache | None = None,
                   max_files: int = MANIFEST_MAX_FILES) -> dict[str, Any]:
    """The result manifest of the workspace at `workspace` (named `workspace_key` in it); never raises.

    Returns {"workspace", "total_size", "truncated", "files": [{"path", "size", "sha256"}],
    "links": [{"path", "target"}] when the run left symbolic links (listed as links, never
    followed, hashed or served), and "unlisted": [{"path", "reason"}] when something could
    not be listed}. A workspace that does not exist gives an empty manifest.
    """
    builder = _Builder(cache, max_files)
    try:
        builder.walk(os.fspath(workspace))
    except Exception as exc:  # a bug here must not lose the run's exit: say so in the manifest
        log.exception("listing workspace %s failed", workspace)
        builder.unlist(".", f"listing stopped early: {type(exc).__name__}: {exc}")
    manifest: dict[str, Any] = {"workspace": workspace_key, "total_size": builder.total,
                                "truncated": builder.truncated, "files": builder.files}
    if builder.links:
        manifest["links"] = builder.links
    if builder.unlisted:
        if builder.more:
            last = builder.unlisted[-1]
            last["reason"] += f"; {builder.more} more entries could not be listed either (not named here)"
        manifest["unlisted"] = builder.unlisted
    return manifest


class _Builder:
    """One walk of one workspace: depth first, each folder's entries in the order that sorts whole paths."""

    def __init__(self, cache: HashCache | None, max_files: int) -> None:
        self.cache = cache
        self.max_files = max_files
        self.files: list[dict[str, Any]] = []
        self.unlisted: list[dict[str, str]] = []
        self.links: list[dict[str, str]] = []
        self.more = 0
        self.total = 0
        self.truncated = False
        self.base = ""

    def unlist(self, path: str, reason: str) -> None:
        if len(self.unlisted) < UNLISTED_MAX:
            self.unlisted.append({"path": path, "reason": reason})
        else:
            self.more += 1

    def walk(self, workspace: str) -> None:
        try:
            if stat.S_ISLNK(os.lstat(workspace).st_mode):
                # The node made it a folder; a run that swapped it for a link (into storage, say) lists nothing.
                target = os.readlink(workspace)
                self.links.append({"path": ".", "target": target[:LINK_TARGET_MAX]})
                self.unlist(".", WORKSPACE_LINK)
                return
            st = os.stat(workspace)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            self.unlist(".", _reason(exc, folder=True))
            return
        if not stat.S_ISDIR(st.st_mode):
            self.unlist(".", NOT_A_FOLDER)
            return
        self.base = os.path.realpath(workspace)
        top = self._entries(self.base, ".")
        if top is None:
            return
        stack = [("", self.base, iter(top))]
        while stack and not self.truncated:
            prefix, folder, entries = stack[-1]
            name = next(entries, None)
            if name is None:
                stack.pop()
                continue
            full = os.path.join(folder, name)
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                shown = prefix + os.fsencode(name).decode("utf-8", "backslashreplace")
                self.unlist(shown, NOT_UTF8 + (INSIDE_NOT_LISTED if _is_folder(full) else ""))
                continue
            rel = prefix + name
            try:
                st = os.lstat(full)
            except OSError as exc:
                self.unlist(rel, _reason(exc))
                continue
            if stat.S_ISDIR(st.st_mode):
                children = self._entries(full, rel)
                if children:
                    stack.append((rel + "/", full, iter(children)))
            elif stat.S_ISREG(st.st_mode):
                self._add(rel, full)
            elif stat.S_ISLNK(st.st_mode):
                self._link(rel, full)
            # FIFOs, sockets, devices: not files a run leaves for the next one; never opened

    def _entries(self, folder: str, rel: str) -> list[str] | None:
        """The names in a folder, ordered so that the walk lists whole paths in sorted order."""
        try:
            fd = os.open(folder, _DIR_FLAGS)
        except OSError as exc:
            self.unlist(rel, _reason(exc, folder=True))
            return None
        try:
            with os.scandir(fd) as scan:
                keyed = [(entry.name + "/" if _is_dir(entry) else entry.name, entry.name) for entry in scan]
        except OSError as exc:
            self.unlist(rel, _reason(exc, folder=True))
            return None
        finally:
            os.close(fd)
        keyed.sort()
        return [name for _, name in keyed]

    def _link(self, rel: str, full: str) -> None:
        """A symbolic link is listed as one, with what it points at: never followed, hashed or served."""
        try:
            target = os.readlink(full)
        except OSError as exc:
            self.unlist(rel, _reason(exc))
            return
        if len(self.links) < LINKS_MAX:
            self.links.append({"path": rel, "target": target[:LINK_TARGET_MAX].encode("utf-8", "surrogateescape")
                               .decode("utf-8", "backslashreplace")})

    def _add(self, rel: str, path: str) -> None:
        """Hash a regular file (opened without following a link: one swapped in meanwhile is refused)."""
        if len(self.files) >= self.max_files:
            self.truncated = True
            return
        for _ in range(_HASH_TRIES):
            try:
                fd = os.open(path, _FILE_FLAGS)
            except OSError as exc:  # ELOOP: O_NOFOLLOW met a link where a file was a moment ago
                self.unlist(rel, REPLACED if exc.errno == errno.ELOOP else _reason(exc))
                return
            try:
                before = os.fstat(fd)
                if not stat.S_ISREG(before.st_mode):
                    return  # replaced by something that is not a file since it was looked at
                digest = self.cache.get(path, before) if self.cache is not None else None
                if digest is not None:
                    self._listed(rel, before.st_size, digest)
                    return
                size, digest = sha256_fd(fd)
                after = os.fstat(fd)
                hashed_at = time.time_ns()
            except OSError as exc:
                self.unlist(rel, _reason(exc))
                return
            finally:
                os.close(fd)
            if Stamp.of(before) == Stamp.of(after) and size == after.st_size:
                if self.cache is not None:
                    self.cache.put(path, after, digest, hashed_at)
                self._listed(rel, size, digest)
                return
        self.unlist(rel, CHANGING)

    def _listed(self, rel: str, size: int, digest: str) -> None:
        self.files.append({"path": rel, "size": size, "sha256": digest})
        self.total += size


def _is_folder(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _reason(exc: OSError, folder: bool = False) -> str:
    """A short sentence for a person: why an entry is not in the manifest."""
    code = exc.errno
    if code in (errno.ENOENT, errno.ESTALE):
        return VANISHED
    if code == errno.ELOOP:
        return f"folder is a symbolic link loop{INSIDE_NOT_LISTED}" if folder else LOOP
    if code in (errno.EACCES, errno.EPERM):
        why = "permission denied"
    else:
        why = os.strerror(code) if code else str(exc)
    if folder:
        return f"folder cannot be read: {why}{INSIDE_NOT_LISTED}"
    return f"cannot be read: {why}"
