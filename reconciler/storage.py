"""The storage root: the resource pool, run workspaces and full logs, behind one small interface.

Large files never enter git. `Storage` is what the node, the CLI and the viewer ask
of a storage root: `stat` (with the sha256 when known, or computed on request),
`list`, `open` (a stream, from an offset), `writer` (write atomically), `remove`,
and `folders` (where a stage's folders are). `LocalStorage` is a local folder or a
shared mount; `sshstore.SshStorage` is the same root through a node's SSH server; an
object store would be a third.

Paths are relative to the root, with `/`. None leaves it: `..` and absolute paths are
refused, and every folder on the way is opened without following a symbolic link, so a
link a stage left in its workspace is listed as a link, never followed, hashed or
served. (`inside()`, which the node uses for its own folders, allows a link that stays
inside the root, as before.)

Every file's sha256 is kept beside it, in a shadow tree that stages never see:
`.winslow/sha256/<path>.json` = {"sha256", "size", "mtime_ns"}, valid only while the
file's size and mtime_ns are those recorded. So a file is hashed once: while it is
uploaded, or the first time a node or `stat(..., hash=True)` asks.

A write goes to `.<name>.winslow-partial` in the destination's folder, beside a sidecar
`.<name>.winslow-partial.json` that names the source it copies (its name, size and
mtime_ns). It becomes `<name>` (fsync, then rename) only once whole and verified; a
copy cut short leaves the partial, and a later copy of the same source continues it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import io
import json
import logging
import os
import posixpath
import shutil
import stat as statmod
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar, Concatenate, ParamSpec, Protocol, TypeVar

from reconciler import layout
from reconciler.errors import StorageError
from reconciler.layout import escapes

log = logging.getLogger("winslow.storage")
P = ParamSpec("P")
R = TypeVar("R")

MiB = 1024 * 1024
CHUNK = 4 * MiB               # the unit every transfer reads, hashes and writes
WINSLOW_DIR = ".winslow"      # Winslow's own records at the root: stages never see it, `ls` hides it
SHADOW = f"{WINSLOW_DIR}/sha256"
PARTIAL = ".winslow-partial"
RACY_NS = 2_000_000_000       # a file changed this recently may change again within the same mtime tick
_HASH_TRIES = 3
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # no hanging on a FIFO a stage left


class NotFound(StorageError):
    """Nothing in storage at that path."""


@dataclass(frozen=True)
class Entry:
    """One thing in storage, as `stat` and `list` see it (a link is never followed)."""

    path: str                  # relative to the storage root
    kind: str                  # file | dir | link | other
    size: int
    mtime: float               # seconds since the epoch
    sha256: str | None = None  # files only, when recorded (or computed on request)
    mtime_ns: int = 0
    target: str | None = None  # a link's target, as written

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"path": self.path, "kind": self.kind, "size": self.size,
                                "mtime": datetime.fromtimestamp(self.mtime, timezone.utc).isoformat(timespec="seconds"),
                                "sha256": self.sha256}
        if self.target is not None:
            data["target"] = self.target
        return data


@dataclass(frozen=True)
class Stamp:
    """What a copy is a copy of. A partial continues only a copy of the same stamp."""

    source: str      # where it comes from, e.g. file:///home/me/big.bin
    size: int
    mtime_ns: int

    def to_json(self) -> bytes:
        return json.dumps({"source": self.source, "size": self.size, "mtime_ns": self.mtime_ns}).encode() + b"\n"

    def same(self, sidecar: bytes | None) -> bool:
        try:
            data = json.loads(sidecar or b"")
        except ValueError:
            return False
        return isinstance(data, dict) and data == json.loads(self.to_json())


@dataclass(frozen=True)
class StageFolders:
    """Where a run's folders are, relative to the storage root."""

    resources: str   # the pool, read-only at /resources
    workspace: str   # the run's own, at /workspace (the next stage sees it read-only at /input)
    log: str         # its full log


class Stream(Protocol):
    """A file being read: what `Storage.open` returns."""

    def readinto(self, buffer: Any) -> int | None: ...

    def close(self) -> None: ...


class Writer(Protocol):
    """An atomic write in progress: chunks go to a partial that becomes the file only at `commit`."""

    path: str     # the final path, for messages
    offset: int   # bytes already in the partial: where the copy goes on
    local: bool   # the partial is on this machine (reading it back is cheap)

    def write(self, data: Any) -> None: ...

    def read_back(self, offset: int, length: int) -> bytes: ...

    def restart(self) -> None:
        """Throw the partial's bytes away and start from 0."""

    def commit(self, size: int, sha256: str) -> Entry:
        """fsync, then rename to the final name; only when the partial holds exactly `size` bytes."""

    def abort(self) -> None:
        """Stop, keeping the partial (a later copy of the same source continues it)."""

    def discard(self) -> None:
        """Stop and remove the partial."""


class Storage(Protocol):
    """A storage root, local or remote."""

    @property
    def url(self) -> str:
        """Where it is, for messages: a folder or an ssh:// URL."""

    @property
    def local(self) -> bool:
        """Its files are on this machine (reading them again is cheap)."""

    def stat(self, path: str, hash: bool = False) -> Entry: ...

    def list(self, path: str) -> list[Entry]: ...

    def open(self, path: str, offset: int = 0) -> Stream: ...

    def writer(self, path: str, stamp: Stamp, resume: bool = False) -> Writer: ...

    def remove(self, path: str, recursive: bool = False) -> None: ...

    def remember(self, path: str, size: int, mtime_ns: int, sha256: str) -> None: ...

    def folders(self, project: str, run_id: str) -> StageFolders: ...

    def close(self) -> None: ...


def clean(path: str) -> str:
    """`path` normalised ('.' for the root); StorageError when it would leave the root or reach Winslow's records."""
    if path in ("", ".", "./"):
        return "."
    if escapes(path):
        raise StorageError(f"path '{path}' leaves the storage root")
    normal = posixpath.normpath(path)
    if normal == ".":
        return "."
    if normal.split("/")[0] == WINSLOW_DIR:
        raise StorageError(f"path '{path}' is not in the storage ({WINSLOW_DIR}/ holds Winslow's own records)")
    return normal


def partial_names(name: str) -> tuple[str, str]:
    """The partial of a file being written, and its sidecar."""
    return f".{name}{PARTIAL}", f".{name}{PARTIAL}.json"


def is_partial(name: str) -> bool:
    return name.startswith(".") and name.endswith((PARTIAL, PARTIAL + ".json"))


def shadow_of(path: str) -> str:
    """Where the recorded sha256 of `path` lives, relative to the root."""
    return f"{SHADOW}/{path}.json"


def record_bytes(sha256: str, size: int, mtime_ns: int) -> bytes:
    return json.dumps({"sha256": sha256, "size": size, "mtime_ns": mtime_ns}).encode() + b"\n"


def recorded_sha256(record: bytes | None, size: int, mtime_ns: int) -> str | None:
    """The sha256 in a shadow record, if it is still the file's: same size and mtime_ns."""
    try:
        data = json.loads(record or b"")
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("size") != size or data.get("mtime_ns") != mtime_ns:
        return None
    sha = data.get("sha256")
    return sha if isinstance(sha, str) and len(sha) == 64 else None


def kind_of(mode: int) -> str:
    if statmod.S_ISREG(mode):
        return "file"
    if statmod.S_ISDIR(mode):
        return "dir"
    return "link" if statmod.S_ISLNK(mode) else "other"


def _entry(path: str, st: os.stat_result, target: str | None = None) -> Entry:
    return Entry(path, kind_of(st.st_mode), st.st_size, st.st_mtime_ns / 1e9, None, st.st_mtime_ns, target)


def _child(folder: str, name: str) -> str:
    return name if folder == "." else f"{folder}/{name}"


def _is_link(folder_fd: int, name: str) -> bool:
    try:
        return statmod.S_ISLNK(os.lstat(name, dir_fd=folder_fd).st_mode)
    except OSError:
        return False


def _one_line(method: Callable[Concatenate[Any, str, P], R]) -> Callable[Concatenate[Any, str, P], R]:
    """An OSError of the file system (no permission, a full disk, an I/O error) as a one-line StorageError."""
    @functools.wraps(method)
    def wrapped(self: Any, path: str, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, path, *args, **kwargs)
        except OSError as exc:
            raise StorageError(os_error(exc, path)) from None
    return wrapped


def os_error(exc: OSError, path: str) -> str:
    """What went wrong with `path`, in words."""
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device writing {path}"
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded writing {path}"
    return f"{path}: {exc.strerror or exc}"


@dataclass(frozen=True)
class LocalStorage:
    """A local folder or a shared mount (NFS) at the same path on every node."""

    root: Path
    local: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def url(self) -> str:
        return str(self.root)

    def prepare(self) -> None:
        for name in layout.STORAGE_FOLDERS:
            (self.root / name).mkdir(parents=True, exist_ok=True)

    def inside(self, relative: str) -> Path:
        """The absolute path of `relative`; StorageError when it would leave the root."""
        if escapes(relative):
            raise StorageError(f"path '{relative}' leaves the storage root")
        path = (self.root / relative).resolve()
        if path != self.root and self.root not in path.parents:
            raise StorageError(f"path '{relative}' leaves the storage root (through a symlink)")
        return path

    @property
    def resources(self) -> Path:
        return self.root / layout.RESOURCES

    def workspace(self, project: str, run_id: str) -> Path:
        return self.inside(layout.workspace(project, run_id))

    def log_path(self, project: str, run_id: str) -> Path:
        return self.inside(layout.storage_log(project, run_id))

    def folders(self, project: str, run_id: str) -> StageFolders:
        return StageFolders(layout.RESOURCES, layout.workspace(project, run_id), layout.storage_log(project, run_id))

    def remove_project(self, project: str) -> list[Path]:
        """Delete a project's workspaces and logs, and nothing else."""
        removed = []
        for top in layout.PROJECT_STORAGE:
            target = self.inside(f"{top}/{project}")
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
                removed.append(target)
        return removed

    def projects_on_disk(self) -> set[str]:
        found: set[str] = set()
        for top in layout.PROJECT_STORAGE:
            base = self.root / top
            if base.is_dir():
                found.update(entry.name for entry in base.iterdir() if entry.is_dir())
        return found

    def close(self) -> None:
        pass

    # -- the interface ----------------------------------------------------------------------------
    @_one_line
    def stat(self, path: str, hash: bool = False) -> Entry:
        """What is at `path` (a link is not followed); with `hash`, a file's sha256 is computed and recorded
        when no valid record has it. NotFound when nothing is there."""
        rel = clean(path)
        if rel == ".":
            return _entry(".", os.stat(self.root))
        with self._folder_of(rel) as (folder, name):
            try:
                st = os.lstat(name, dir_fd=folder)
            except FileNotFoundError:
                raise NotFound(f"no such file or folder in storage: {rel}") from None
            target = os.readlink(name, dir_fd=folder) if statmod.S_ISLNK(st.st_mode) else None
        entry = _entry(rel, st, target)
        if entry.kind != "file":
            return entry
        sha = self._recorded(rel, entry.size, entry.mtime_ns)
        if sha is not None or not hash:
            return replace(entry, sha256=sha)
        return self._hash(rel)

    @_one_line
    def list(self, path: str) -> list[Entry]:
        """The entries of a folder, sorted by name; links as links, partials and Winslow's records left out."""
        rel = clean(path)
        fd = self._open_folder(rel)
        entries = []
        try:
            with os.scandir(fd) as found:
                for item in found:
                    if is_partial(item.name) or (rel == "." and item.name == WINSLOW_DIR):
                        continue
                    st = item.stat(follow_symlinks=False)
                    target = os.readlink(item.name, dir_fd=fd) if statmod.S_ISLNK(st.st_mode) else None
                    entries.append(_entry(_child(rel, item.name), st, target))
        finally:
            os.close(fd)
        return sorted((replace(e, sha256=self._recorded(e.path, e.size, e.mtime_ns)) if e.kind == "file" else e
                       for e in entries), key=lambda e: e.path)

    @_one_line
    def open(self, path: str, offset: int = 0) -> io.FileIO:
        """A regular file for reading, from `offset`; links are never served."""
        rel = clean(path)
        with self._folder_of(rel) as (folder, name):
            try:
                fd = os.open(name, _FILE, dir_fd=folder)
            except FileNotFoundError:
                raise NotFound(f"no such file in storage: {rel}") from None
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise StorageError(f"'{rel}' is a symbolic link; links are listed, never served") from None
                raise StorageError(f"{rel}: {exc.strerror}") from None
        st = os.fstat(fd)
        if not statmod.S_ISREG(st.st_mode):
            os.close(fd)
            raise StorageError(f"'{rel}' is {'a folder' if statmod.S_ISDIR(st.st_mode) else 'not a regular file'}")
        os.set_blocking(fd, True)
        if offset:
            os.lseek(fd, offset, os.SEEK_SET)
        with contextlib.suppress(OSError, AttributeError):
            os.posix_fadvise(fd, offset, 0, os.POSIX_FADV_SEQUENTIAL)
        return io.FileIO(fd, "rb")

    @_one_line
    def writer(self, path: str, stamp: Stamp, resume: bool = False) -> Writer:
        """An atomic write of `path` (its folders are made as needed); continues a partial of the same source,
        or with `resume` any partial no longer than the source."""
        rel = clean(path)
        check_writable(rel)
        folder, name = self._walk(rel, create=True)
        try:
            if _is_link(folder, name):
                raise StorageError(f"'{rel}' is a symbolic link; remove it first")
            return LocalWriter(folder, name, rel, stamp, resume,
                               lambda st, sha: self.remember(rel, st.st_size, st.st_mtime_ns, sha))
        except BaseException:
            os.close(folder)
            raise

    @_one_line
    def remove(self, path: str, recursive: bool = False) -> None:
        """Remove a file or link (a folder only with `recursive`), its recorded hashes and any partial of it."""
        rel = clean(path)
        if rel == ".":
            raise StorageError("refusing to remove the storage root")
        with self._folder_of(rel) as (folder, name):
            try:
                st = os.lstat(name, dir_fd=folder)
            except FileNotFoundError:
                raise NotFound(f"no such file or folder in storage: {rel}") from None
            if statmod.S_ISDIR(st.st_mode):
                if not recursive:
                    raise StorageError(f"'{rel}' is a folder (remove it with its contents: -r)")
                shutil.rmtree(self.root / rel)  # every folder on the way was just opened without following links
            else:
                os.unlink(name, dir_fd=folder)
            for leftover in partial_names(name):
                with contextlib.suppress(OSError):
                    os.unlink(leftover, dir_fd=folder)
        self._forget(rel)

    def remember(self, path: str, size: int, mtime_ns: int, sha256: str) -> None:
        """Record a file's sha256 in the shadow tree; a record that cannot be written is only logged."""
        try:
            folder, name = self._walk(shadow_of(clean(path)), create=True)
        except (OSError, StorageError) as exc:
            log.debug("cannot record the sha256 of %s: %s", path, exc)
            return
        temporary = f".{name}.{os.getpid()}.tmp"
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                         dir_fd=folder)
            try:
                os.write(fd, record_bytes(sha256, size, mtime_ns))
            finally:
                os.close(fd)
            os.rename(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
        except OSError as exc:
            log.debug("cannot record the sha256 of %s: %s", path, exc)
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=folder)
        finally:
            os.close(folder)

    # -- below the interface ------------------------------------------------------------------------
    def _walk(self, rel: str, create: bool = False) -> tuple[int, str]:
        """A descriptor of the folder holding `rel`'s last part, reached without following any link, and that part.
        The caller closes the descriptor."""
        parts = rel.split("/")
        fd = os.open(self.root, _DIR)
        for depth, part in enumerate(parts[:-1], 1):
            fd = self._step(fd, part, "/".join(parts[:depth]), create)  # closes the folder above, even on error
        return fd, parts[-1]

    @staticmethod
    def _step(fd: int, part: str, shown: str, create: bool) -> int:
        """Open folder `part` below `fd` without following a link, closing `fd`."""
        try:
            try:
                return os.open(part, _DIR, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise NotFound(f"no such folder in storage: {shown}") from None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=fd)
                return os.open(part, _DIR, dir_fd=fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR) and _is_link(fd, part):
                raise StorageError(f"'{shown}' is a symbolic link; links are listed, never followed") from None
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise StorageError(f"'{shown}' is not a folder") from None
            raise StorageError(f"{shown}: {exc.strerror}") from None
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _folder_of(self, rel: str) -> Iterator[tuple[int, str]]:
        folder, name = self._walk(rel)
        try:
            yield folder, name
        finally:
            os.close(folder)

    def _open_folder(self, rel: str) -> int:
        if rel == ".":
            return os.open(self.root, _DIR)
        with self._folder_of(rel) as (folder, name):
            return self._step(os.dup(folder), name, rel, create=False)

    def _recorded(self, rel: str, size: int, mtime_ns: int) -> str | None:
        try:
            with self._folder_of(shadow_of(rel)) as (folder, name):
                fd = os.open(name, _FILE, dir_fd=folder)
                try:
                    record = os.read(fd, 4096)
                finally:
                    os.close(fd)
        except (OSError, StorageError):
            return None
        return recorded_sha256(record, size, mtime_ns)

    def _forget(self, rel: str) -> None:
        shadow = self.root / shadow_of(rel)
        with contextlib.suppress(OSError):
            shadow.unlink()
        below = shadow.with_suffix("")  # the records of what was below a folder
        if below.is_dir() and not below.is_symlink():
            shutil.rmtree(below, ignore_errors=True)

    def _hash(self, rel: str) -> Entry:
        """Hash a file and record it (unless it changed too recently to trust its mtime)."""
        for _ in range(_HASH_TRIES):
            stream = self.open(rel)
            try:
                before = os.fstat(stream.fileno())
                digest = hashlib.sha256()
                buffer = memoryview(bytearray(CHUNK))
                while n := stream.readinto(buffer):
                    digest.update(buffer[:n])
                after = os.fstat(stream.fileno())
            finally:
                stream.close()
            if (before.st_size, before.st_mtime_ns) == (after.st_size, after.st_mtime_ns):
                sha = digest.hexdigest()
                if after.st_mtime_ns < time.time_ns() - RACY_NS:
                    self.remember(rel, after.st_size, after.st_mtime_ns, sha)
                return replace(_entry(rel, after), sha256=sha)
        raise StorageError(f"'{rel}' kept changing while it was being hashed (is something still writing it?)")


def check_writable(rel: str) -> None:
    if rel == ".":
        raise StorageError("the storage root is a folder, not a file to write")
    if is_partial(posixpath.basename(rel)):
        raise StorageError(f"'{rel}': names ending in {PARTIAL} are Winslow's partial copies")


class LocalWriter:
    """An atomic write into a folder on this machine: a storage root's, or the user's (a download).

    On a local disk file system the bytes go straight to the disk (O_DIRECT), skipping a copy into the page cache:
    that copy costs about as much CPU as hashing them, and a copy that is fsynced at the end gains nothing from
    it. Elsewhere (NFS, tmpfs), and for any write O_DIRECT refuses (an unaligned end), the page cache is used,
    with write-back started as the file grows so that the final fsync has little left to do.
    """

    local = True
    SYNC_EVERY = 64 * MiB

    def __init__(self, folder: int, name: str, shown: str, stamp: Stamp, resume: bool = False,
                 on_commit: Callable[[os.stat_result, str], None] | None = None) -> None:
        self.folder = folder   # owned: closed by commit, abort or discard
        self.name = name
        self.path = shown
        self.stamp = stamp
        self.on_commit = on_commit
        self.partial, self.sidecar = partial_names(name)
        self._unsynced = 0
        self._direct: bool | None = None   # None: not decided until the first write
        try:
            self.fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                              dir_fd=folder)
        except OSError as exc:
            raise StorageError(f"cannot write {shown}: {exc.strerror}") from None
        size = os.fstat(self.fd).st_size
        self.offset = 0
        if 0 < size <= stamp.size and (resume or stamp.same(self._read(self.sidecar))):
            self.offset = size
            os.lseek(self.fd, size, os.SEEK_SET)
        else:
            try:
                self.restart()
            except OSError as exc:
                os.close(self.fd)
                raise StorageError(os_error(exc, shown)) from None

    def _read(self, name: str) -> bytes | None:
        try:
            fd = os.open(name, _FILE, dir_fd=self.folder)
        except OSError:
            return None
        try:
            return os.read(fd, 65536)
        finally:
            os.close(fd)

    def restart(self) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.offset = 0
        temporary = f"{self.sidecar}.tmp"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644,
                     dir_fd=self.folder)
        try:
            os.write(fd, self.stamp.to_json())
        finally:
            os.close(fd)
        os.rename(temporary, self.sidecar, src_dir_fd=self.folder, dst_dir_fd=self.folder)

    def write(self, data: Any) -> None:
        if self._direct is None:
            self._direct = _go_direct(self.fd)
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except OSError as exc:
                if not (self._direct and exc.errno == errno.EINVAL):
                    raise
                self._buffered()   # O_DIRECT wants aligned buffers, lengths and offsets: this one is not
                continue
            view = view[written:]
            self._unsynced += written
        if not self._direct and self._unsynced >= self.SYNC_EVERY:
            end = os.lseek(self.fd, 0, os.SEEK_CUR)
            _write_back(self.fd, end - self._unsynced, self._unsynced)
            self._unsynced = 0

    def _buffered(self) -> None:
        fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_O_DIRECT)
        self._direct = False

    def read_back(self, offset: int, length: int) -> bytes:
        if self._direct:
            self._buffered()
        return os.pread(self.fd, length, offset)

    def commit(self, size: int, sha256: str) -> Entry:
        have = os.fstat(self.fd).st_size
        if have != size:
            raise StorageError(f"the partial of {self.path} holds {have} bytes, not {size}; not saved")
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        try:
            os.rename(self.partial, self.name, src_dir_fd=self.folder, dst_dir_fd=self.folder)
        except IsADirectoryError:
            raise StorageError(f"'{self.path}' is a folder; not replaced") from None
        with contextlib.suppress(OSError):
            os.unlink(self.sidecar, dir_fd=self.folder)
        os.fsync(self.folder)
        final = os.stat(self.name, dir_fd=self.folder, follow_symlinks=False)
        os.close(self.folder)
        self.folder = -1
        if self.on_commit is not None:
            self.on_commit(final, sha256)
        return replace(_entry(self.path, final), sha256=sha256)

    def abort(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.fdatasync(self.fd)
            os.close(self.fd)
            self.fd = -1
        if self.folder >= 0:
            os.close(self.folder)
            self.folder = -1

    def discard(self) -> None:
        if self.folder >= 0:
            for name in (self.partial, self.sidecar):
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=self.folder)
        self.abort()


def file_writer(path: Path, stamp: Stamp, resume: bool = False) -> LocalWriter:
    """An atomic write of a file on this machine (where a download lands); its folder must exist."""
    try:
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise StorageError(f"{path.parent}: {exc.strerror}") from None
    try:
        return LocalWriter(folder, path.name, str(path), stamp, resume)
    except BaseException:
        os.close(folder)
        raise


_O_DIRECT = getattr(os, "O_DIRECT", 0)
_DIRECT_FILE_SYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs"})


def _go_direct(fd: int) -> bool:
    """Switch `fd` to O_DIRECT when it is on a local disk file system (see LocalWriter); whether it did."""
    if not _O_DIRECT or _file_system(os.fstat(fd).st_dev) not in _DIRECT_FILE_SYSTEMS:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | _O_DIRECT)
    except OSError:
        return False
    return True


@functools.lru_cache(maxsize=16)
def _file_system(device: int) -> str | None:
    """The type of the file system on `device` (st_dev), from /proc/self/mountinfo; None when unknown."""
    key = f"{os.major(device)}:{os.minor(device)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                fields = line.split()
                if len(fields) > 2 and fields[2] == key and " - " in line:
                    return line.split(" - ", 1)[1].split()[0]
    except OSError:
        pass
    return None


def _write_back(fd: int, offset: int, length: int) -> None:
    """Start writing these bytes to disk without waiting for them (Linux), else wait for them."""
    if _SYNC_FILE_RANGE is not None:
        if _SYNC_FILE_RANGE(fd, offset, length, 2) == 0:  # SYNC_FILE_RANGE_WRITE: start, do not wait
            return
    with contextlib.suppress(OSError):
        os.fdatasync(fd)


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()


Mask = Callable[[bytes], bytes]


def _no_mask(data: bytes) -> bytes:
    return data


def _open_log(path: Path) -> int:
    """A log opened for reading: a regular file, never through a symbolic link (OSError otherwise)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    if not statmod.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd


def capped_log(path: Path, head: int, tail: int, mask: Mask = _no_mask, overlap: int = 0) -> bytes:
    """The first `head` and last `tail` bytes of a log, marked where it was cut, with `mask` applied.

    Masking comes before the cut: each kept part is read `overlap` bytes (the longest
    secret) beyond its edge, masked, then trimmed, so a secret across the cut is never
    kept in halves. A log that cannot be read (a symbolic link, a folder) says so instead;
    the error stays with its run.
    """
    try:
        fd = _open_log(path)
    except FileNotFoundError:
        return b""
    except OSError as exc:
        return f"[winslow: the log could not be read: {exc.strerror or exc}]\n".encode()
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size <= head + tail:
            return mask(handle.read())
        first = mask(handle.read(head + overlap))[:head]
        handle.seek(max(0, size - tail - overlap))
        last = mask(handle.read())
        last = last[-tail:] if tail else b""
    cut = size - head - tail
    marker = f"\n[... winslow: {cut} bytes cut here; the full log is in storage ...]\n".encode()
    return first + marker + last


def read_tail(path: Path, limit: int, mask: Mask = _no_mask, overlap: int = 0) -> str:
    """The last `limit` bytes of a log as text, masked before it is cut (see `capped_log`), starting at a line
    boundary when possible."""
    try:
        fd = _open_log(path)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        handle.seek(max(0, size - limit - overlap))
        data = mask(handle.read(limit + overlap))
    if size > limit:
        data = data[-limit:]
        if b"\n" in data:
            data = data[data.index(b"\n") + 1:]
    return data.decode("utf-8", "replace")
