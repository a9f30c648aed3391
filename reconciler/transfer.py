"""Copying one file into or out of a storage: streamed, hashed as it passes, atomic, resumable, with progress.

`copy(source, writer)` moves the bytes in `CHUNK` pieces. A worker thread reads each
chunk and hands it to the writer while the calling thread hashes it, so reading,
writing and hashing overlap (hashlib and the system calls let go of the GIL). The
sha256 is that of the bytes as they pass, never a second read.

The bytes go to the writer's partial, which becomes the file (fsync, then rename) only
when it holds exactly the source's size, the source did not change meanwhile (same size
and mtime_ns as when the copy began), and the sha256 is what it must be where that is
known (the hash recorded beside a stored file, or a run's result manifest). A copy cut
short (Ctrl-C, a full disk, a lost connection) keeps its partial and says how much is
done; a copy whose bytes are wrong throws its partial away. Never is a truncated file
left under the final name.

Resuming: a writer opened on a partial of the same source starts at the partial's size.
Before going on, the partial's last MiB is compared with the source's bytes at the same
place, and the running sha256 is rebuilt by reading the bytes already copied once, from
whichever side is on this machine (hashlib's state cannot be saved, so this one read is
the price of resuming; at about 1 GB/s it is small beside the copy it saves).
"""
from __future__ import annotations

import hashlib
import mmap
import os
import queue
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from reconciler.errors import StorageError
from reconciler.sshstore import SshStorage, is_ssh_url
from reconciler.storage import CHUNK, Entry, LocalStorage, MiB, Stamp, Storage, Stream, Writer, os_error

CHECK = 1 * MiB      # the partial's last bytes compared with the source before resuming
DEPTH = 4            # chunks in flight between the worker and the hasher
JOIN_S = 10.0        # how long an interrupted copy waits for its worker to finish the chunk in hand


class Interrupted(StorageError):
    """Ctrl-C: the partial is kept."""

    def __init__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        super().__init__(f"interrupted; run the same command again to resume ({done} of {total} bytes done)")


@dataclass(frozen=True)
class Source:
    """What a copy reads: a file on this machine, or one in a storage."""

    name: str                                   # for messages
    stamp: Stamp
    local: bool                                 # on this machine: reading it again is cheap
    open: Callable[[int], Stream]               # a stream from an offset
    restat: Callable[[], Stamp]                 # its stamp now, to see whether it changed during the copy
    expected: str | None = None                 # the sha256 its bytes must have
    expected_from: str = ""                     # where that sha256 comes from, for messages
    remember: Callable[[str], None] | None = None  # record the sha256 beside it (it had no record)


def storage_at(spec: str) -> Storage:
    """A storage from `--storage`: a local folder, or ssh://[user@]host[:port]/path."""
    if is_ssh_url(spec):
        return SshStorage(spec)
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise StorageError(f"storage root {root} is not a folder on this machine")
    return LocalStorage(root)


def local_file(path: Path) -> Source:
    """A file on this machine (links followed: it is the user's own)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise StorageError(f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise StorageError(f"{path} is {'a folder' if os.path.isdir(path) else 'not a regular file'}; "
                           "files are copied one at a time")
    absolute = Path(os.path.abspath(path))

    def restat() -> Stamp:
        now = os.stat(absolute)
        return Stamp(absolute.as_uri(), now.st_size, now.st_mtime_ns)

    return Source(str(path), Stamp(absolute.as_uri(), st.st_size, st.st_mtime_ns), True,
                  lambda offset: _open_local(absolute, offset), restat)


def stored_file(storage: Storage, path: str) -> Source:
    """A file in a storage. Its recorded sha256 (when it has one) is what its bytes must hash to."""
    entry = storage.stat(path)
    if entry.kind == "link":
        raise StorageError(f"'{entry.path}' is a symbolic link; links are listed, never served")
    if entry.kind != "file":
        raise StorageError(f"'{entry.path}' is {'a folder' if entry.kind == 'dir' else 'not a regular file'}; "
                           "files are copied one at a time")
    expected, expected_from = (entry.sha256, "the sha256 recorded in storage") if entry.sha256 else (None, "")
    stamp = Stamp(f"{storage.url.rstrip('/')}/{entry.path}", entry.size, entry.mtime_ns)

    def restat() -> Stamp:
        now = storage.stat(entry.path)
        return Stamp(stamp.source, now.size, now.mtime_ns)

    def remember(sha256: str) -> None:
        storage.remember(entry.path, entry.size, entry.mtime_ns, sha256)

    return Source(entry.path, stamp, storage.local, lambda offset: storage.open(entry.path, offset), restat,
                  expected, expected_from, remember if entry.sha256 is None else None)


def expecting(source: Source, sha256: str, where: str) -> Source:
    """The source, whose bytes must hash to `sha256` (named by `where`, e.g. a result manifest)."""
    if source.expected is not None and source.expected != sha256:
        raise StorageError(f"{source.name} does not match {where}: storage records sha256 {source.expected}, "
                           f"{where} says {sha256}; not copied")
    return replace(source, expected=sha256, expected_from=where)


class Bar:
    """A rich progress bar on stderr (bytes, rate, time left) when `show`, and notes on stderr when `notes`."""

    def __init__(self, show: bool, notes: bool = True) -> None:
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                                  TransferSpeedColumn(), TimeRemainingColumn(),
                                  console=Console(stderr=True)) if show else None
        self._notes = notes
        self._task: Any = None

    def __enter__(self) -> Bar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def task(self, description: str, total: int, completed: int = 0) -> None:
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._task = self._progress.add_task(description, total=total, completed=completed)

    def advance(self, n: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def say(self, line: str) -> None:
        if not self._notes:
            return
        if self._progress is not None:
            self._progress.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)


def copy(source: Source, writer: Writer, bar: Bar | None = None, verb: str = "copying") -> Entry:
    """Copy `source` through `writer`, committing only a whole, unchanged, verified file; see the module's doc."""
    bar = bar or Bar(False, False)
    total = source.stamp.size
    pump: _Pump | None = None
    try:
        digest, start = _continue(source, writer, bar)
        bar.task(f"{verb} {writer.path}", total, start)
        pump = _Pump(source, writer, digest, start, total, bar)
        pump.run()
    except KeyboardInterrupt:
        _abort(writer)
        raise Interrupted(pump.done if pump else writer.offset, total) from None
    except StorageError as exc:
        _abort(writer)
        if pump is None:  # nothing was copied this time
            raise
        raise StorageError(f"{exc} ({pump.done} of {total} bytes done; the partial is kept: run the same command "
                           "again to resume)") from None
    except BaseException:
        _abort(writer)
        raise
    try:
        return _finish(source, writer, digest.hexdigest(), total)
    except KeyboardInterrupt:
        _abort(writer)
        raise Interrupted(total, total) from None
    except BaseException:
        _abort(writer)
        raise


def _finish(source: Source, writer: Writer, sha: str, total: int) -> Entry:
    if source.restat() != source.stamp:
        writer.discard()
        raise StorageError(f"{source.name} changed while it was being copied; not saved (run the same command again)")
    if source.expected is not None and sha != source.expected:
        writer.discard()
        raise StorageError(f"{source.name}: its bytes do not match {source.expected_from} (they hash to sha256 "
                           f"{sha}, expected {source.expected}); not saved")
    try:
        entry = writer.commit(total, sha)
    except OSError as exc:  # a disk that fills up on fsync (delayed allocation), an I/O error
        raise StorageError(f"{os_error(exc, writer.path)}; not saved") from None
    if source.remember is not None:
        source.remember(sha)
    return entry


def _continue(source: Source, writer: Writer, bar: Bar) -> tuple[Any, int]:
    """Where the copy starts (a partial of the same source is continued after a check) and the hash so far."""
    digest = hashlib.sha256()
    at = writer.offset
    if at == 0:
        return digest, 0
    if at > source.stamp.size:
        writer.restart()
        return digest, 0
    check = min(at, CHECK)
    stream = source.open(at - check)
    try:
        theirs = _read(stream, check)
    finally:
        stream.close()
    if writer.read_back(at - check, check) != theirs:
        bar.say(f"winslow: the partial copy of {writer.path} does not match {source.name}; starting again")
        writer.restart()
        return digest, 0
    bar.say(f"winslow: resuming {writer.path} after {at} of {source.stamp.size} bytes")
    bar.task(f"checking {writer.path}", at)
    if writer.local:
        for position in range(0, at, CHUNK):
            data = writer.read_back(position, min(CHUNK, at - position))
            digest.update(data)
            bar.advance(len(data))
        return digest, at
    stream = source.open(0)
    try:
        buffer = memoryview(bytearray(CHUNK))
        for position in range(0, at, CHUNK):
            n = _fill(stream, buffer[:min(CHUNK, at - position)])
            if n < min(CHUNK, at - position):
                raise StorageError(f"{source.name} ended early while the partial was checked")
            digest.update(buffer[:n])
            bar.advance(n)
    finally:
        stream.close()
    return digest, at


class _Pump:
    """One worker thread reads chunks and writes them; the calling thread hashes them meanwhile."""

    def __init__(self, source: Source, writer: Writer, digest: Any, start: int, total: int, bar: Bar) -> None:
        self.source = source
        self.writer = writer
        self.digest = digest
        self.start = start
        self.total = total
        self.bar = bar
        self.done = start          # bytes the writer has taken
        self.stream: Stream | None = None
        self._free: queue.Queue[memoryview | None] = queue.Queue()
        self._ready: queue.Queue[tuple[memoryview, int] | BaseException | None] = queue.Queue()
        for _ in range(DEPTH):  # page-aligned memory, as writes that skip the page cache want
            self._free.put(memoryview(mmap.mmap(-1, CHUNK)))

    def run(self) -> None:
        if self.start >= self.total:
            return
        self.stream = self.source.open(self.start)
        worker = threading.Thread(target=self._io, name="winslow-copy", daemon=True)
        worker.start()
        try:
            self._hash()
            worker.join()
        except BaseException:
            self._stop(worker)
            raise
        finally:
            self.stream.close()

    def _hash(self) -> None:
        while True:
            item = self._ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            buffer, n = item
            self.digest.update(buffer[:n])
            self._free.put(buffer)
            self.bar.advance(n)

    def _io(self) -> None:
        assert self.stream is not None
        position = self.start
        try:
            while position < self.total:
                buffer = self._free.get()
                if buffer is None:
                    return
                want = min(CHUNK, self.total - position)
                try:
                    n = _fill(self.stream, buffer[:want])
                except OSError as exc:
                    raise StorageError(f"reading {self.source.name}: {exc.strerror}") from None
                if n < want:
                    raise StorageError(f"{self.source.name} ended after {position + n} of {self.total} bytes "
                                       "(did it change?)")
                self._ready.put((buffer, n))
                try:
                    self.writer.write(buffer[:n])
                except OSError as exc:
                    raise StorageError(os_error(exc, self.writer.path)) from None
                position += n
                self.done = position
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread, which raises it
            self._ready.put(exc)
            return
        self._ready.put(None)

    def _stop(self, worker: threading.Thread) -> None:
        """Let the worker finish the chunk in hand (so the partial ends where a chunk ended), then stop it."""
        for _ in range(DEPTH + 1):
            self._free.put(None)
        for party in (self.stream, self.writer):  # a reader or writer stuck on a dead connection is cut off
            worker.join(JOIN_S)
            if not worker.is_alive():
                return
            cancel = getattr(party, "cancel", None)
            if cancel is not None:
                cancel()
        worker.join(JOIN_S)


def _abort(writer: Writer) -> None:
    try:
        writer.abort()
    except (OSError, StorageError):
        pass  # the error being reported is the one that matters


def _fill(stream: Stream, view: memoryview) -> int:
    """Read until `view` is full or the stream ends; how many bytes came."""
    got = 0
    while got < len(view):
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return got


def _read(stream: Stream, length: int) -> bytes:
    buffer = memoryview(bytearray(length))
    return bytes(buffer[:_fill(stream, buffer)])


def _open_local(path: Path, offset: int) -> Stream:
    handle = open(path, "rb", buffering=0)
    if offset:
        handle.seek(offset)
    try:
        os.posix_fadvise(handle.fileno(), offset, 0, os.POSIX_FADV_SEQUENTIAL)
    except (OSError, AttributeError):
        pass  # only a hint
    return handle
