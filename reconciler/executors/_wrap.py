"""Runs one stage's program for the process executor and leaves its exit code in a file.

    python -I -S _wrap.py [--ready-fd N] [--lease-file F] EXIT_FILE -- PROGRAM [ARGS...]

The process executor starts this wrapper as the leader of a new session (and so of
a new process group) and the program as its child, in the same group. The wrapper

- tells the executor through the `--ready-fd` pipe whether the program could be
  started (`ok <pid>`) or not (`error <errno> <text>`), so a missing program is an
  error of `start()` and not a run that fails later;
- relays SIGTERM and SIGINT to the whole process group exactly once (the program
  and whatever it started get one TERM, as `docker stop` gives a container);
- writes the program's return code (negative for a death by signal, as
  `subprocess` reports it) to EXIT_FILE, atomically, when the program ends; a
  reconciler that restarted meanwhile reads it from there, since it cannot wait
  for a process that is not its child;
- supervises the stage for the node: with `--lease-file`, once the time in that file
  (the node's lease, renewed by each heartbeat it pushes) has passed, the node is dead
  or frozen and cannot stop its own work, so the wrapper ends the program group (TERM,
  then KILL after a grace) and says why in EXIT_FILE.lapsed — before any other node
  may take the run over, since the node timeout is longer than the lease;
- ends whatever the program left running when it ends (TERM, then KILL): its process
  group, and — the wrapper being a child subreaper, so that orphans come to it even
  after `setsid` — every descendant still alive;
- then ends the same way as the program: the same exit code, or the same signal.

It imports only the standard library and runs with `-I -S`, so the stage's own
`PYTHON*` variables, which the program inherits, do not touch it.
"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from types import FrameType

_RELAYED = (signal.SIGTERM, signal.SIGINT)
_USAGE = "usage: _wrap.py [--ready-fd N] [--lease-file F] EXIT_FILE -- PROGRAM [ARGS...]"
LEASE_CHECK_S = 1.0  # how often the lease file is read
KILL_GRACE_S = 10.0  # from TERM to KILL when the lease lapsed
PR_SET_CHILD_SUBREAPER = 36  # prctl(2)
LEFTOVER_GRACE_S = 2.0  # from TERM to KILL for what a stage left running when it ended


class _Relay:
    """Passes TERM and INT on to the process group; holds them back until the program exists."""

    def __init__(self) -> None:
        self.started = False
        self.pending: list[int] = []

    def install(self) -> None:
        for signum in _RELAYED:
            signal.signal(signum, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if not self.started:
            self.pending.append(signum)
            return
        _signal_group(signum)

    def release(self) -> None:
        self.started = True
        for signum in self.pending:
            self.handle(signum, None)
        self.pending.clear()


def _parse(argv: list[str]) -> tuple[int | None, str | None, str, list[str]]:
    ready_fd: int | None = None
    lease_file: str | None = None
    while argv[:1] in (["--ready-fd"], ["--lease-file"]) and len(argv) > 1:
        if argv[0] == "--ready-fd":
            ready_fd = int(argv[1])
        else:
            lease_file = argv[1]
        argv = argv[2:]
    if len(argv) < 3 or argv[1] != "--":
        raise SystemExit(_USAGE)
    return ready_fd, lease_file, argv[0], argv[2:]


class Lease:
    """The node's lease as its supervisor sees it: the time in the lease file, read anew at each check.

    A file that cannot be read (removed with its work folder, a failing disk, a write caught
    half-way) does not extend the lease: the last time read stands, so the stage still ends
    once that has passed. Only before the first read is there nothing to judge by."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.expires: float | None = None

    def lapsed(self, now: float | None = None) -> float | None:
        """When the lease ran out, if it has; None while it holds or before it was first read."""
        if self.path is None:
            return None
        try:
            with open(self.path, encoding="ascii") as handle:
                self.expires = float(handle.read().strip())
        except (OSError, ValueError):
            pass
        if self.expires is None:
            return None
        return self.expires if (time.time() if now is None else now) > self.expires else None


def _supervise(child: subprocess.Popen[bytes], lease_file: str | None, exit_file: str) -> int:
    """Wait for the program; end its group when the node's lease lapses (the node dead or frozen)."""
    lease = Lease(lease_file)
    while True:
        try:
            return child.wait(timeout=LEASE_CHECK_S if lease_file else None)
        except subprocess.TimeoutExpired:
            pass
        expired = lease.lapsed()
        if expired is None:
            continue
        why = (f"the node's lease ran out at {time.strftime('%H:%M:%S', time.gmtime(expired))} UTC "
               f"(the node stopped or froze); its supervisor ended the stage before another node may take it over")
        print(f"winslow: {why}", file=sys.stderr, flush=True)
        _write_text(exit_file + ".lapsed", why)
        _signal_group(signal.SIGTERM)
        try:
            return child.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            _signal_group(signal.SIGKILL)
            return child.wait()


def _signal_group(signum: int) -> None:
    """Send `signum` to the stage's group; the wrapper, in the group too, ignores it for the moment of the send."""
    previous = signal.signal(signum, signal.SIG_IGN) if signum != signal.SIGKILL else None
    try:
        if signum == signal.SIGKILL:  # the wrapper is in the group too: kill the others by pid
            for pid in _group_members():
                os.kill(pid, signal.SIGKILL)
        else:
            os.killpg(os.getpgrp(), signum)
    except OSError:
        pass
    finally:
        if previous is not None:
            signal.signal(signum, previous)


def _end_leftovers() -> None:
    """The stage is over: whatever it left running in its group (`sleep 77 &`) ends with it."""
    if not _group_members():
        return
    _signal_group(signal.SIGTERM)
    deadline = time.monotonic() + LEFTOVER_GRACE_S
    while _group_members() and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal_group(signal.SIGKILL)


def _live(keep: int, value: int) -> list[int]:
    """Live processes (zombies, already ended, left out) but the wrapper whose /proc stat field `keep` (1: ppid,
    2: pgrp, counted after the state) is `value`."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()  # state, ppid, pgrp, ...
        except OSError:
            continue
        if fields[0] != b"Z" and int(fields[keep]) == value:
            found.append(int(entry))
    return found


def _group_members() -> list[int]:
    """The live processes of the wrapper's group but itself."""
    return _live(2, os.getpgrp())


def _tell(ready_fd: int | None, message: str) -> None:
    if ready_fd is None:
        return
    try:
        os.write(ready_fd, (message + "\n").encode("utf-8", "replace"))
    except OSError:
        pass  # the executor gave up waiting; the exit file still tells the outcome
    finally:
        os.close(ready_fd)


def _write_exit_code(path: str, returncode: int) -> None:
    _write_text(path, f"{returncode}")


def _write_text(path: str, text: str) -> None:
    temp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temp, "w", encoding="utf-8") as out:
            out.write(f"{text}\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except OSError as exc:
        print(f"winslow: cannot write {path}: {exc}", file=sys.stderr)


def _end_like(returncode: int) -> int:
    """Exit with the program's code, or die of the signal that killed it."""
    if returncode >= 0:
        return returncode
    signum = -returncode
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the program's crash, not ours
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    except (OSError, ValueError):
        pass
    return 128 + signum


def _become_subreaper() -> None:
    """Orphaned descendants (even those that left the group with setsid) are reparented to the wrapper."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the process group is all that is ended


def _children() -> list[int]:
    """The wrapper's live children (orphans of the stage come here: it is their subreaper)."""
    return _live(1, os.getpid())


def _end_descendants() -> None:
    """TERM, then KILL, whatever of the stage is still alive below the wrapper; reap as they end."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + (LEFTOVER_GRACE_S if signum == signal.SIGTERM else 5.0)
        while time.monotonic() < deadline:
            _reap()
            children = _children()
            if not children:
                return
            for pid in children:
                try:
                    os.kill(pid, signum)
                except OSError:
                    pass
            time.sleep(0.05)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main(argv: list[str]) -> int:
    ready_fd, lease_file, exit_file, command = _parse(argv)
    _become_subreaper()
    relay = _Relay()
    relay.install()
    try:
        child = subprocess.Popen(command)
    except OSError as exc:
        _tell(ready_fd, f"error {exc.errno or 0} {exc.strerror or exc}")
        return 127 if isinstance(exc, FileNotFoundError) else 126
    _tell(ready_fd, f"ok {child.pid}")
    relay.release()
    returncode = _supervise(child, lease_file, exit_file)
    _end_leftovers()
    _end_descendants()
    _write_exit_code(exit_file, returncode)
    return _end_like(returncode)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
