"""Building blocks for tests that run real nodes against a real remote.

`StateRemote` is a bare repo plus a user's clone of it; `NodeProcess` is a
`winslow node` started as a separate process and ended by its PID; `GitDaemon`
serves the remote on 127.0.0.1 (stopped and started for an outage); `TcpProxy`
stands between one node and the daemon, so that one node alone can be cut off.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from reconciler.commands.init import init_repo
from reconciler.gitcmd import IDENTITY

GIT_ENV = {**os.environ, **IDENTITY}


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True, text=True).stdout


@dataclass
class StateRemote:
    root: Path
    remote: Path = field(init=False)
    clone: Path = field(init=False)

    def __post_init__(self) -> None:
        self.remote = self.root / "remote.git"
        self.clone = self.root / "clone"
        init_repo(self.clone, self.remote)

    def write(self, files: dict[str, str | None], message: str = "edit") -> None:
        """Commit files (None deletes) on top of the remote's main and push, retrying if nodes pushed first."""
        for _ in range(50):
            git(self.clone, "fetch", "-q", "origin")
            git(self.clone, "reset", "-q", "--hard", "origin/main")
            for path, text in files.items():
                target = self.clone / path
                if text is None:
                    subprocess.run(["git", "rm", "-rq", path], cwd=self.clone, env=GIT_ENV, check=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)
                git(self.clone, "add", path)
            git(self.clone, "commit", "-qm", message)
            if subprocess.run(["git", "push", "-q", "origin", "main"], cwd=self.clone, env=GIT_ENV,
                              capture_output=True).returncode == 0:
                return
        raise AssertionError("could not push to the remote in 50 tries")

    def read(self, path: str, ref: str = "main") -> str | None:
        result = subprocess.run(["git", "--git-dir", str(self.remote), "show", f"{ref}:{path}"], capture_output=True,
                                text=True)
        return result.stdout if result.returncode == 0 else None

    def status(self, project: str) -> dict:
        text = self.read(f"projects/{project}/status.yaml")
        return yaml.safe_load(text) if text else {}

    def refs(self, prefix: str = "refs/heads/") -> dict[str, str]:
        out = git(self.remote, "for-each-ref", "--format=%(objectname) %(refname)", prefix)
        return {ref: sha for sha, ref in (line.split(" ", 1) for line in out.splitlines())}

    def commits(self, ref: str = "main") -> int:
        return int(git(self.remote, "rev-list", "--count", ref).strip())


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class NodeProcess:
    """`python -m reconciler node ...` in its own process; stopped by PID in `stop()`."""

    def __init__(self, name: str, remote: Path | str, storage: Path, work: Path, executor: str = "process",
                 extra: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = work.parent / f"{name}.log"
        work.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # a node started again adds to its log
        args = [sys.executable, "-m", "reconciler", "node", "--repo", str(remote), "--storage", str(storage),
                "--name", name, "--executor", executor, "--work", str(work), "--heartbeat", "1s",
                "--node-timeout", "6s", "--lease", "4s", "--poll", "1s", *extra]
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env={**GIT_ENV, **(env or {})})

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class GitDaemon:
    """`git daemon` on 127.0.0.1 serving the remote (push included); stopped and started again for an outage."""

    def __init__(self, base: Path, log: Path) -> None:
        self.base = base
        self.port = free_port()
        self.url = f"git://127.0.0.1:{self.port}/remote.git"
        self._log = open(log, "ab")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["git", "daemon", "--reuseaddr", "--listen=127.0.0.1", f"--port={self.port}", f"--base-path={self.base}",
             "--export-all", "--enable=receive-pack", "--informative-errors", str(self.base)],
            stdout=self._log, stderr=subprocess.STDOUT, env=GIT_ENV)

        def answers() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.port)) == 0
        wait_for(answers, 10, "git daemon to listen", interval=0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        self._log.close()


class TcpProxy:
    """Forwards 127.0.0.1:<port> to `target` (one thread per direction of each connection). `cut()` closes the
    listener and every connection, as a cable pulled on one machine would; `restore()` listens again on the same port."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def url(self, path: str) -> str:
        return f"git://127.0.0.1:{self.port}/{path}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            sockets, self._open = self._open, []
            if self._listener is not None:
                sockets.append(self._listener)
                self._listener = None
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                if self._listener is not listener:  # cut meanwhile
                    client.close()
                    upstream.close()
                    return
                self._open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass
