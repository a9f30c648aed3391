"""A storage root reached through a node's SSH server: `ssh://[user@]host[:port]/path`.

It runs the system's OpenSSH client, so the user's keys, agent and `~/.ssh/config` work
as they do for `ssh` itself; `BatchMode=yes` means it never prompts (a missing key or
an unknown host key is a one-line error). The first command opens one shared
connection (ControlMaster, its socket in a private temporary folder) that later
commands ride on without a handshake of their own; `close()` ends it. The environment
variable `WINSLOW_SSH_COMMAND` replaces `ssh` (and may add options), as
`GIT_SSH_COMMAND` does for git: `WINSLOW_SSH_COMMAND="ssh -F ~/.ssh/lab_config"`.

Nothing Winslow-specific runs on the server: each operation is a short `sh` script
using POSIX tools plus GNU coreutils and findutils (dd, find -printf, stat, sync),
which every Linux node has. The data itself streams through `dd`. The server side
checks each path again: it walks the folders one by one, refusing `..` and any
symbolic link, as `LocalStorage` does. The layout on the server is the same as a
local root's: partials, sidecars and the `.winslow/sha256` shadow tree included, so a
node and a laptop share the recorded hashes.
"""
from __future__ import annotations

import builtins
import contextlib
import fcntl
import io
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO, Any, ClassVar, cast
from urllib.parse import unquote, urlsplit

from reconciler import layout
from reconciler.errors import StorageError
from reconciler.storage import (
    RACY_NS,
    WINSLOW_DIR,
    Entry,
    NotFound,
    StageFolders,
    Stamp,
    check_writable,
    clean,
    is_partial,
    record_bytes,
    recorded_sha256,
    shadow_of,
)

log = logging.getLogger("winslow.sshstore")

SSH_COMMAND_ENV = "WINSLOW_SSH_COMMAND"
CONNECT_S = 60     # the longest the first connection may take
COMMAND_S = 120    # the longest a small remote command may take
STREAM_END_S = 120  # the longest a stream's remote end may take to finish once its input ended
PIPE_SIZE = 1024 * 1024
_KINDS = {b"f": "file", b"d": "dir", b"l": "link"}

# Every script starts here: $1 the root, $2 the path below it (normalised, '.' for the root), $3 1 to make
# missing folders. It leaves the shell in the folder holding the path's last part, `name`, reached without
# following any link, with `top` the root's physical path.
_PRELUDE = r"""
set -f
fail() { printf 'winslow-remote: %s\n' "$1" >&2; exit 3; }
missing() { printf 'winslow-remote-missing: %s\n' "$1" >&2; exit 4; }
root=$1 rel=$2 make=$3
shift 3
cd -P -- "$root" 2>/dev/null || fail "storage root $root is not a folder on $(uname -n)"
top=$(pwd -P)
name=$rel
if [ "$rel" != . ]; then
  case /$rel/ in *//*|*/./*|*/../*) fail "path '$rel' leaves the storage root" ;; esac
  name=${rel##*/}
  folders=
  case $rel in */*) folders=${rel%/*} ;; esac
  at=
  IFS=/
  for part in $folders; do
    at=${at:+$at/}$part
    if [ -L "$part" ]; then fail "'$at' is a symbolic link; links are listed, never followed"; fi
    if [ ! -d "$part" ]; then
      if [ -e "$part" ]; then fail "'$at' is not a folder"; fi
      [ "$make" = 1 ] || missing "$rel"
      mkdir -- "$part" 2>/dev/null || [ -d "$part" ] || fail "cannot make the folder '$at'"
    fi
    cd -P -- "./$part" || fail "cannot enter the folder '$at'"
  done
  unset IFS
fi
here="./$name"
part="./.$name.winslow-partial"
"""

_STAT = r"""
if [ ! -e "$here" ] && [ ! -L "$here" ]; then missing "$rel"; fi
find "$here" -maxdepth 0 -printf '%y\0%s\0%T@\0%l\0'
printf 'shadow\0'
[ "$rel" = . ] || cat -- "$top/.winslow/sha256/$rel.json" 2>/dev/null
exit 0
"""

_LIST = r"""
shadow="$top/.winslow/sha256"
if [ "$rel" != . ]; then
  if [ -L "$here" ]; then fail "'$rel' is a symbolic link; links are listed, never followed"; fi
  if [ ! -d "$here" ]; then [ -e "$here" ] || missing "$rel"; fail "'$rel' is not a folder"; fi
  cd -P -- "$here" || fail "cannot enter the folder '$rel'"
  shadow="$shadow/$rel"
fi
find . -mindepth 1 -maxdepth 1 -printf '%y\0%s\0%T@\0%f\0%l\0'
printf 'shadows\0'
if [ -d "$shadow" ] && cd -P -- "$shadow" 2>/dev/null; then
  find . -mindepth 1 -maxdepth 1 -type f -name '*.json' -print0 | xargs -0 -r grep -H --null -m1 ''
fi
exit 0
"""

_FILE_CHECK = r"""
if [ -L "$here" ]; then fail "'$rel' is a symbolic link; links are listed, never served"; fi
if [ ! -f "$here" ]; then [ -e "$here" ] || missing "$rel"; fail "'$rel' is not a regular file"; fi
"""

_READ = _FILE_CHECK + r"""
exec dd if="$here" bs=4M skip="$1" iflag=skip_bytes,nofollow status=none
"""

_HASH = _FILE_CHECK + r"""
find "$here" -maxdepth 0 -printf '%s\0%T@\0'
sha256sum < "$here" | cut -c1-64 | tr -d '\n'
find "$here" -maxdepth 0 -printf '\0%s\0%T@\0'
date +%s%N
"""

_READ_PARTIAL = r"""
exec dd if="$part" bs=1M skip="$1" count="$2" iflag=skip_bytes,count_bytes,nofollow status=none
"""

_PROBE = r"""
if [ "$rel" = . ]; then fail "the storage root is a folder, not a file to write"; fi
if [ -L "$here" ]; then fail "'$rel' is a symbolic link; remove it first"; fi
if [ -d "$here" ]; then fail "'$rel' is a folder"; fi
if [ -f "$part" ] && [ ! -L "$part" ]; then
  find "$part" -maxdepth 0 -printf '%s\0'
  cat -- "$part.json" 2>/dev/null
else
  printf -- '-1\0'
fi
exit 0
"""

_WRITE = r"""
if [ "$1" = fresh ]; then
  rm -f -- "$part" "$part.json" || fail "cannot remove the old partial of '$rel'"
  { printf '%s\n' "$2" > "$part.json.tmp" && mv -f -- "$part.json.tmp" "$part.json"; } \
    || fail "cannot write the partial of '$rel'"
fi
exec dd of="$part" bs=4M oflag=append,nofollow conv=notrunc status=none
"""

# $1 the size the partial must have, $2 its sha256: recorded in the shadow tree once it is the file.
_COMMIT = r"""
if [ ! -f "$part" ] || [ -L "$part" ]; then fail "the partial of '$rel' is gone"; fi
have=$(find "$part" -maxdepth 0 -printf '%s')
[ "$have" = "$1" ] || fail "the partial of '$rel' holds $have bytes, not $1; not saved"
if [ -d "$here" ] && [ ! -L "$here" ]; then fail "'$rel' is a folder; not replaced"; fi
sync -- "$part" || fail "cannot flush '$rel' to disk"
mv -f -T -- "$part" "$here" || fail "cannot rename the partial of '$rel'"
rm -f -- "$part.json"
sync -- . 2>/dev/null
st=$(stat -c '%s %.9Y' -- "$here") || fail "cannot stat '$rel'"
size=${st% *} t=${st#* }
ns=${t%.*}${t#*.}
printf '%s\0%s\0' "$size" "$ns"
record="$top/.winslow/sha256/$rel.json"
{ mkdir -p -- "${record%/*}" && printf '{"sha256": "%s", "size": %s, "mtime_ns": %s}\n' "$2" "$size" "$ns" \
    > "$record.tmp" && mv -f -- "$record.tmp" "$record"; } 2>/dev/null
exit 0
"""

_DISCARD = r"""
rm -f -- "$part" "$part.json"
"""

_REMOVE = r"""
if [ "$rel" = . ]; then fail "refusing to remove the storage root"; fi
if [ -d "$here" ] && [ ! -L "$here" ]; then
  [ "$1" = 1 ] || fail "'$rel' is a folder (remove it with its contents: -r)"
  rm -rf -- "$here" || fail "cannot remove '$rel'"
elif [ -e "$here" ] || [ -L "$here" ]; then
  rm -f -- "$here" || fail "cannot remove '$rel'"
else
  missing "$rel"
fi
rm -f -- "$part" "$part.json"
rm -rf -- "$top/.winslow/sha256/$rel.json" "$top/.winslow/sha256/$rel"
"""

_REMEMBER = r"""
{ printf '%s\n' "$1" > "./.$name.tmp" && mv -f -- "./.$name.tmp" "$here"; } || fail "cannot record the sha256"
"""


def is_ssh_url(spec: str) -> bool:
    return spec.startswith("ssh://")


@dataclass(frozen=True)
class SshUrl:
    """`ssh://[user@]host[:port]/path`, taken apart."""

    host: str
    root: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, url: str) -> SshUrl:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError:
            raise StorageError(f"'{url}': the port is not a number") from None
        host = parts.hostname
        if parts.scheme != "ssh" or not host or host.startswith("-") or parts.query or parts.fragment:
            raise StorageError(f"'{url}' is not a storage URL: ssh://[user@]host[:port]/path")
        root = unquote(parts.path)
        if not root.startswith("/"):
            raise StorageError(f"'{url}': the storage root must be an absolute path (ssh://{host}/srv/winslow)")
        return cls(host, root, unquote(parts.username) if parts.username else None, port)

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


def _ns(text: bytes) -> int:
    """find's %T@ (seconds with a fraction) as nanoseconds."""
    seconds, _, fraction = text.decode().partition(".")
    return int(seconds) * 1_000_000_000 + int((fraction + "000000000")[:9])


class SshStorage:
    """A storage root on another machine, through its SSH server."""

    local: ClassVar[bool] = False

    def __init__(self, url: str, command: Sequence[str] | None = None) -> None:
        self.url = url.rstrip("/") or url
        self.target = SshUrl.parse(url)
        self.command = list(command) if command else shlex.split(os.environ.get(SSH_COMMAND_ENV) or "ssh")
        self._control: str | None = None   # the private folder of the shared connection's socket
        self._shared = False

    # -- the interface ----------------------------------------------------------------------------
    def stat(self, path: str, hash: bool = False) -> Entry:
        rel = clean(path)
        fields = self._run(_STAT, rel).split(b"\0", 5)
        kind, size, mtime, target = fields[0], int(fields[1]), _ns(fields[2]), fields[3]
        entry = Entry(rel, _KINDS.get(kind, "other"), size, mtime / 1e9, None, mtime,
                      os.fsdecode(target) if kind == b"l" else None)
        if entry.kind != "file":
            return entry
        sha = recorded_sha256(fields[5] if len(fields) > 5 else None, size, mtime)
        if sha is None and hash:
            return self._hash(rel)
        return Entry(rel, "file", size, mtime / 1e9, sha, mtime)

    def list(self, path: str) -> list[Entry]:
        rel = clean(path)
        out = self._run(_LIST, rel)
        entries, at = [], 0
        while True:
            fields, at = _fields(out, at, 1)
            if fields[0] == b"shadows":
                break
            more, at = _fields(out, at, 4)
            kind, size, mtime, name, target = fields[0], int(more[0]), _ns(more[1]), os.fsdecode(more[2]), more[3]
            if is_partial(name) or (rel == "." and name == WINSLOW_DIR):
                continue
            entries.append(Entry(name if rel == "." else f"{rel}/{name}", _KINDS.get(kind, "other"), size,
                                 mtime / 1e9, None, mtime, os.fsdecode(target) if kind == b"l" else None))
        records = _records(out[at:])
        return sorted((Entry(e.path, e.kind, e.size, e.mtime, recorded_sha256(records.get(e.name), e.size, e.mtime_ns),
                             e.mtime_ns) if e.kind == "file" else e for e in entries), key=lambda e: e.path)

    def open(self, path: str, offset: int = 0) -> SshStream:
        rel = clean(path)
        errors = tempfile.TemporaryFile()
        proc = subprocess.Popen(self._argv(_READ, rel, False, str(offset)), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=errors, start_new_session=True)
        assert proc.stdout is not None
        _widen(proc.stdout)
        return SshStream(self, proc, errors)

    def writer(self, path: str, stamp: Stamp, resume: bool = False) -> SshWriter:
        rel = clean(path)
        check_writable(rel)
        size, _, sidecar = self._run(_PROBE, rel, True).partition(b"\0")
        have = int(size)
        go_on = 0 < have <= stamp.size and (resume or stamp.same(sidecar))
        return SshWriter(self, rel, stamp, have if go_on else 0)

    def remove(self, path: str, recursive: bool = False) -> None:
        self._run(_REMOVE, clean(path), False, "1" if recursive else "0")

    def remember(self, path: str, size: int, mtime_ns: int, sha256: str) -> None:
        try:
            self._run(_REMEMBER, shadow_of(clean(path)), True, record_bytes(sha256, size, mtime_ns).decode().strip())
        except StorageError as exc:
            log.debug("cannot record the sha256 of %s: %s", path, exc)

    def folders(self, project: str, run_id: str) -> StageFolders:
        return StageFolders(layout.RESOURCES, layout.workspace(project, run_id), layout.storage_log(project, run_id))

    def close(self) -> None:
        """End the shared connection and remove its socket's folder."""
        if self._control is None:
            return
        if self._shared:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run([*self._base(), "-O", "exit", "--", self.target.destination], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
        shutil.rmtree(self._control, ignore_errors=True)
        self._control, self._shared = None, False

    def __enter__(self) -> SshStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running scripts on the server -----------------------------------------------------------------
    def _base(self) -> builtins.list[str]:
        argv = [*self.command, "-T", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=15",
                "-o", "ServerAliveCountMax=4", "-o", "ConnectTimeout=30", "-o", "LogLevel=ERROR"]
        if self.target.port:
            argv += ["-p", str(self.target.port)]
        if self._control is not None:
            argv += ["-o", f"ControlPath={self._control}/%C"]
        return argv

    def _share(self) -> None:
        """Open the shared connection, once; if it cannot be had, every command connects on its own."""
        if self._shared:
            return
        if self._control is None:
            self._control = tempfile.mkdtemp(prefix="winslow-ssh-")
        with tempfile.TemporaryFile() as errors:
            try:
                done = subprocess.run([*self._base(), "-o", "ControlMaster=yes", "-o", "ControlPersist=60", "-f", "-N",
                                       "--", self.target.destination], stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=errors, timeout=CONNECT_S,
                                      start_new_session=True)
            except subprocess.TimeoutExpired:
                raise StorageError(f"cannot reach {self.target.host} over ssh: no answer within {CONNECT_S} s") from None
            if done.returncode != 0:
                errors.seek(0)
                raise self._error(done.returncode, errors.read())
        self._shared = True

    def _argv(self, script: str, rel: str, make: bool, *args: str) -> builtins.list[str]:
        self._share()
        remote = " ".join(["sh", "-c", shlex.quote(_PRELUDE + script), "winslow",
                           *(shlex.quote(a) for a in (self.target.root, rel, "1" if make else "0", *args))])
        return [*self._base(), "-o", "ControlMaster=no", "--", self.target.destination, remote]

    def _run(self, script: str, rel: str, make: bool = False, *args: str) -> bytes:
        try:
            done = subprocess.run(self._argv(script, rel, make, *args), stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=COMMAND_S, start_new_session=True)
        except subprocess.TimeoutExpired:
            raise StorageError(f"{self.target.host} did not answer within {COMMAND_S} s") from None
        if done.returncode != 0:
            raise self._error(done.returncode, done.stderr)
        return done.stdout

    def _error(self, code: int, stderr: bytes, during: bool = False) -> StorageError:
        lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
        for line in lines:
            if line.startswith("winslow-remote-missing: "):
                return NotFound(f"no such file or folder in storage: {line.split(': ', 1)[1]}")
            if line.startswith("winslow-remote: "):
                return StorageError(line.split(": ", 1)[1])
        last = lines[-1] if lines else f"ssh exited with {code}"
        if code == 255:
            if "Host key verification failed" in last:
                last += f" (connect once with `ssh {self.target.destination}` to check and accept its host key)"
            what = "lost the connection to" if during else "cannot reach"
            return StorageError(f"{what} {self.target.host} over ssh" + (f": {last}" if lines else ""))
        if "No space left on device" in last:
            return StorageError(f"no space left on the device on {self.target.host}: {last}")
        return StorageError(f"on {self.target.host}: {last}")

    def _hash(self, rel: str) -> Entry:
        fields = self._run(_HASH, rel).split(b"\0")
        before, after = (int(fields[0]), _ns(fields[1])), (int(fields[3]), _ns(fields[4]))
        if before != after:
            raise StorageError(f"'{rel}' kept changing while it was being hashed (is something still writing it?)")
        sha = fields[2].decode()
        if after[1] < int(fields[5]) - RACY_NS:  # the server's clock: a file changed just now may change unseen
            self.remember(rel, after[0], after[1], sha)
        return Entry(rel, "file", after[0], after[1] / 1e9, sha, after[1])


def _fields(data: bytes, at: int, count: int) -> tuple[list[bytes], int]:
    """`count` NUL-terminated fields of `data` from `at`, and where the next one starts."""
    fields = []
    for _ in range(count):
        end = data.index(b"\0", at)
        fields.append(data[at:end])
        at = end + 1
    return fields, at


def _records(data: bytes) -> dict[str, bytes]:
    """grep -H --null output (`./<name>.json\\0<record>\\n`...) as {name: record}."""
    records, at = {}, 0
    while at < len(data):
        end = data.find(b"\0", at)
        if end == -1:
            break
        line_end = data.find(b"\n", end)
        line_end = len(data) if line_end == -1 else line_end
        name = os.fsdecode(data[at:end]).removeprefix("./").removesuffix(".json")
        records[name] = data[end + 1:line_end]
        at = line_end + 1
    return records


def _widen(pipe: IO[Any]) -> None:
    """A 1 MiB pipe instead of 64 KiB: fewer, larger reads and writes."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def _finish(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class SshStream:
    """A file streaming out of `dd` on the server."""

    def __init__(self, storage: SshStorage, proc: subprocess.Popen[bytes], errors: IO[bytes]) -> None:
        self.storage = storage
        self.proc = proc
        self.errors = errors
        self.out = cast(io.BufferedReader, proc.stdout)

    def readinto(self, buffer: Any) -> int:
        n = self.out.readinto(buffer)
        if not n:
            code = _finish(self.proc, STREAM_END_S)
            if code != 0:
                self.errors.seek(0)
                raise self.storage._error(code, self.errors.read(), during=True)
        return n or 0

    def cancel(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.cancel()
        self.proc.wait()
        self.out.close()
        self.errors.close()


class SshWriter:
    """An atomic write on the server: bytes stream into the partial through `dd`; commit syncs and renames there."""

    local = False

    def __init__(self, storage: SshStorage, rel: str, stamp: Stamp, offset: int) -> None:
        self.storage = storage
        self.path = rel
        self.stamp = stamp
        self.offset = offset
        self._fresh = offset == 0   # the stream starts by replacing any old partial and its sidecar
        self.proc: subprocess.Popen[bytes] | None = None
        self.errors: IO[bytes] | None = None

    def restart(self) -> None:
        if self.proc is not None:
            raise StorageError(f"{self.path}: cannot start again once bytes were sent")
        self.offset, self._fresh = 0, True

    def _start(self) -> subprocess.Popen[bytes]:
        sidecar = self.stamp.to_json().decode().strip()
        self.errors = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.storage._argv(_WRITE, self.path, False, "fresh" if self._fresh else "append",
                                                        sidecar),
                                     stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.errors,
                                     start_new_session=True)
        assert self.proc.stdin is not None
        _widen(self.proc.stdin)
        return self.proc

    def write(self, data: Any) -> None:
        proc = self.proc or self._start()
        assert proc.stdin is not None
        try:
            proc.stdin.write(data)
        except (BrokenPipeError, ConnectionResetError):
            raise self._ended() from None

    def _ended(self) -> StorageError:
        assert self.proc is not None and self.errors is not None
        code = _finish(self.proc, STREAM_END_S)
        self.errors.seek(0)
        return self.storage._error(code, self.errors.read(), during=True)

    def _close_stream(self) -> None:
        proc = self.proc or self._start()
        assert proc.stdin is not None
        try:
            proc.stdin.close()
        except (BrokenPipeError, ConnectionResetError):
            pass
        if _finish(proc, STREAM_END_S) != 0:
            raise self._ended()

    def read_back(self, offset: int, length: int) -> bytes:
        return self.storage._run(_READ_PARTIAL, self.path, False, str(offset), str(length))

    def commit(self, size: int, sha256: str) -> Entry:
        self._close_stream()
        fields = self.storage._run(_COMMIT, self.path, False, str(size), sha256).split(b"\0")
        final, mtime = int(fields[0]), int(fields[1])
        return Entry(self.path, "file", final, mtime / 1e9, sha256, mtime)

    def abort(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(OSError):
                self.proc.stdin.close()  # the server's dd writes what it got, then ends
            _finish(self.proc, STREAM_END_S)
        if self.errors is not None:
            self.errors.close()
            self.errors = None

    def discard(self) -> None:
        self.abort()
        self.storage._run(_DISCARD, self.path)

    def cancel(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(OSError):
                self.proc.kill()
