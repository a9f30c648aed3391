"""A real OpenSSH server on 127.0.0.1, for the storage-over-SSH tests.

`sshd` (the fixture) starts Debian's `/usr/sbin/sshd -D` with a generated host key and
user key in a fresh folder, public-key login only, and writes a client config
(`IdentityFile`, `UserKnownHostsFile` holding the host key, `Port`) that the tests pass
to `ssh` with `-F`: through `SshServer.command` in-process, or `WINSLOW_SSH_COMMAND` for
a `winslow` process (`SshServer.env()`). It is stopped by its PID, connections and all.
Under CI=true a server that cannot start fails the test instead of skipping it (`.ci/run`
installs `openssh-server`).
"""
from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import psutil
import pytest

SSHD = Path("/usr/sbin/sshd")
# `SetEnv SHLVL=2` in the server's config: bash reads ~/.bashrc when it is the first shell of an ssh session, and
# the test machine's (pyenv) costs 150 ms per remote command; a shell level above 1 says it is not the first.
START_S = 10.0

SERVER_CONFIG = """\
ListenAddress 127.0.0.1
HostKey {dir}/host_key
AuthorizedKeysFile {dir}/authorized_keys
PidFile none
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
SetEnv SHLVL=2
"""

CLIENT_CONFIG = """\
Host 127.0.0.1
  Port {port}
  User {user}
  IdentityFile {dir}/user_key
  IdentitiesOnly yes
  UserKnownHostsFile {dir}/known_hosts
  StrictHostKeyChecking yes
  GlobalKnownHostsFile /dev/null
"""


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the SSH tests must run; .ci/run installs openssh-server)", pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
            return connection.recv(4).startswith(b"SSH-")
    except OSError:
        return False


@dataclass
class SshServer:
    dir: Path
    port: int = 0
    user: str = field(default_factory=getpass.getuser)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def client_config(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def command(self) -> list[str]:
        """The ssh client command for this server: `ssh -F <its client config>`."""
        return ["ssh", "-F", str(self.client_config)]

    def url(self, root: Path | str) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{root}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "WINSLOW_SSH_COMMAND": " ".join(self.command)}

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for key in ("host_key", "user_key"):
            if not (self.dir / key).exists():
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", key, "-f", str(self.dir / key)],
                               check=True, capture_output=True, stdin=subprocess.DEVNULL)
        (self.dir / "authorized_keys").write_text((self.dir / "user_key.pub").read_text())
        (self.dir / "sshd_config").write_text(SERVER_CONFIG.format(dir=self.dir))
        self.port = self.port or _free_port()
        host_key = " ".join((self.dir / "host_key.pub").read_text().split()[:2])
        (self.dir / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_key}\n")
        self.client_config.write_text(CLIENT_CONFIG.format(port=self.port, user=self.user, dir=self.dir))

    def start(self) -> None:
        """Start (or start again, on the same port and keys) and wait until it answers."""
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation folder
        log = open(self.dir / "sshd.log", "ab")
        self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(self.dir / "sshd_config"), "-p", str(self.port)],
                                     stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self.proc.returncode}: {self.log()[-500:]}")
            if _answers(self.port):
                return
            time.sleep(0.05)
        raise RuntimeError(f"sshd did not answer on port {self.port} within {START_S} s: {self.log()[-500:]}")

    def log(self) -> str:
        path = self.dir / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def drop_connections(self) -> int:
        """Kill the server's connection processes (the listener stays): every client loses its connection."""
        if self.proc is None:
            return 0
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return 0
        for child in children:
            try:
                child.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(children, timeout=5)
        return len(children)

    def stop(self) -> None:
        """Stop the listener and every connection, by PID."""
        if self.proc is None:
            return
        self.drop_connections()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None


def start_server(folder: Path) -> SshServer:
    """A started server with its keys and configs in `folder`; skips (fails under CI=true) when it cannot start."""
    if not SSHD.exists():
        _unavailable(f"{SSHD} is missing (apt-get install openssh-server)")
    server = SshServer(folder)
    for _ in range(3):  # the free port may be taken between choosing it and sshd binding it
        try:
            server.prepare()
            server.start()
            return server
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:  # e.g. /run/sshd needs root
            problem = str(exc)
            server.stop()
            server.port = 0
    _unavailable(f"sshd does not start: {problem}")


@pytest.fixture(name="sshd")
def sshd_fixture(tmp_path: Path) -> Iterator[SshServer]:
    """An OpenSSH server on 127.0.0.1 that lets this user in with a key of its own; stopped afterwards."""
    server = start_server(tmp_path / "sshd")
    yield server
    server.stop()
