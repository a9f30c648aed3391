"""The storage root as the viewer shows it: listings, previews, and downloads with HTTP Range.

A thin layer over `reconciler.storage.Storage`, a local folder or mount (`LocalStorage`)
or a node's SSH server (`sshstore.SshStorage`), so the viewer follows the storage's
rules: no path leaves the root, Winslow's own records (`.winslow/`) are not shown, and a
symbolic link is listed with its target, never followed, entered, hashed or served.

A file's sha256 is the one recorded beside it (by an upload, a node, or an earlier
`?hash=1`). On a local root, a file of up to `HASH_AT_ONCE` bytes without a record is
hashed (and recorded) when its folder is listed, up to `HASH_PER_LISTING` bytes in all,
so a page never waits long, even on a read-only mount where nothing can be recorded and
every listing hashes again. Over SSH that would cost a round trip per file, so a listing
stays one command and a hash is computed when asked.
"""
from __future__ import annotations

import email.utils
import logging
import re
from typing import Any

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from reconciler.errors import StorageError
from reconciler.storage import Entry, Storage, Stream

log = logging.getLogger("winslow.viewer")

CHUNK = 256 * 1024
HASH_AT_ONCE = 16 * 1024 * 1024        # local files up to this size are hashed when listed; larger ones when asked
HASH_PER_LISTING = 256 * 1024 * 1024   # bytes hashed for one listing at most; the rest when asked
LIST_MAX = 5000                        # entries listed of one folder
_RANGE = re.compile(r"bytes=(\d*)-(\d*)\Z")


def entry_dict(entry: Entry) -> dict[str, Any]:
    """An entry as the pages and /api/files show it."""
    data: dict[str, Any] = {"path": entry.path, "kind": entry.kind, "size": entry.size if entry.kind == "file" else 0,
                            "mtime": entry.mtime}
    if entry.sha256 is not None:
        data["sha256"] = entry.sha256
    if entry.target is not None:
        data["target"] = entry.target
    return data


def _read(stream: Stream, limit: int) -> bytes:
    """Up to `limit` bytes of `stream`; fewer only at its end."""
    buffer = bytearray(limit)
    view = memoryview(buffer)
    got = 0
    while got < limit:
        n = stream.readinto(view[got:])
        if not n:
            break
        got += n
    return bytes(view[:got])


class Files:
    """What the viewer asks of storage. Paths are relative to the root; '' is the root."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    @property
    def root(self) -> str:
        return self.storage.url

    def check(self) -> None:
        """StorageError unless the root is a folder that can be read (over SSH: opens the shared connection)."""
        if self.storage.stat(".").kind != "dir":
            raise StorageError(f"storage root {self.root} is not a folder")

    def stat(self, relative: str, hash: bool = False) -> Entry:
        """What `relative` is, without following it; with `hash`, a file's sha256 is computed unless recorded."""
        return self.storage.stat(relative or ".", hash=hash)

    def list(self, relative: str) -> list[Entry]:
        """A folder's entries, folders first, at most LIST_MAX; links listed as links, never entered."""
        entries = sorted(self.storage.list(relative or "."), key=lambda e: (e.kind != "dir", e.path))[:LIST_MAX]
        if not self.storage.local:
            return entries
        budget, listed = HASH_PER_LISTING, []
        for entry in entries:
            if entry.kind == "file" and entry.sha256 is None and entry.size <= min(HASH_AT_ONCE, budget):
                budget -= entry.size
                entry = self._hashed(entry)
            listed.append(entry)
        return listed

    def _hashed(self, entry: Entry) -> Entry:
        try:
            return self.storage.stat(entry.path, hash=True)
        except StorageError:  # gone, or changing while hashed: listed without its hash
            return entry

    def file(self, relative: str) -> Entry:
        """The entry of a regular file; StorageError for a folder, a link or anything else."""
        entry = self.storage.stat(relative or ".")
        if entry.kind == "link":
            raise StorageError(f"'{entry.path}' is a symbolic link; links are listed, never served")
        if entry.kind != "file":
            raise StorageError(f"'{entry.path}' is {'a folder' if entry.kind == 'dir' else 'not a regular file'}")
        return entry

    def head(self, relative: str, limit: int) -> bytes:
        """The first `limit` bytes of a file."""
        stream = self.storage.open(relative)
        try:
            return _read(stream, limit)
        finally:
            stream.close()

    def close(self) -> None:
        self.storage.close()


# -- downloads -----------------------------------------------------------------------------------
def parse_range(header: str | None, size: int) -> tuple[int, int] | None | bool:
    """(start, end inclusive) of a single `bytes=` range; None: no (usable) range, serve it all;
    False: the range cannot be satisfied (416)."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if match is None:
        return None  # several ranges or another unit: the whole file, as RFC 9110 allows
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # the last N bytes
        length = int(last)
        if length == 0:
            return False
        return max(0, size - length), size - 1
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if start >= size or end < start:
        return False
    return start, end


class FileDownload(Response):
    """A storage file as the body, streamed from `Storage.open(path, offset)` up to the range's end; one byte
    range when asked (206), `Accept-Ranges`, an ETag and `If-Range`, so a browser or `curl -C -` resumes where
    it stopped. The file is opened only when bytes are sent (not for HEAD, a 416 or an empty file)."""

    def __init__(self, files: Files, entry: Entry, media_type: str, method: str, range_header: str | None,
                 if_range: str | None, attachment: bool = True, csp: str | None = None) -> None:
        self.files = files
        self.path = entry.path
        self.method = method
        etag = f'"{entry.size:x}-{entry.mtime_ns:x}"'
        modified = email.utils.formatdate(entry.mtime, usegmt=True)
        wanted = parse_range(range_header, entry.size)
        if wanted is not None and if_range and if_range.strip() not in (etag, modified):
            wanted = None  # the file changed since the first part was fetched: send it whole
        super().__init__(status_code=200, media_type=media_type)
        self.body = b""
        headers = {"accept-ranges": "bytes", "etag": etag, "last-modified": modified}
        disposition = "attachment" if attachment else "inline"
        quoted = entry.name.replace("\\", "_").replace('"', "_")
        headers["content-disposition"] = f'{disposition}; filename="{quoted}"'
        if csp:
            headers["content-security-policy"] = csp
        if wanted is False:
            self.status_code = 416
            self.start, self.end = 0, -1
            headers["content-range"] = f"bytes */{entry.size}"
        elif wanted is None:
            self.start, self.end = 0, entry.size - 1
        else:
            assert isinstance(wanted, tuple)
            self.status_code = 206
            self.start, self.end = wanted
            headers["content-range"] = f"bytes {self.start}-{self.end}/{entry.size}"
        headers["content-length"] = str(max(0, self.end - self.start + 1))
        self.headers.update(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if self.method == "HEAD" or self.end < self.start:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        at = self.start
        stream: Stream | None = None
        try:
            stream = await anyio.to_thread.run_sync(self.files.storage.open, self.path, at)
            while at <= self.end:
                data = await anyio.to_thread.run_sync(_read, stream, min(CHUNK, self.end - at + 1))
                if not data:
                    break  # the file shrank while it was sent
                at += len(data)
                await send({"type": "http.response.body", "body": data, "more_body": at <= self.end})
        except StorageError as exc:
            log.warning("download of %s stopped at byte %d: %s", self.path, at, exc)
        finally:
            if stream is not None:
                stream.close()  # over SSH this ends the transfer on the server too
        if at <= self.end:  # cut short: the client sees fewer bytes than announced and can resume
            await send({"type": "http.response.body", "body": b"", "more_body": False})
