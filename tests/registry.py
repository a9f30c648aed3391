"""A real image registry on 127.0.0.1, for the tests of images pulled by tag and by digest.

`registry` (the fixture) starts Debian's `docker-registry serve` (the CNCF distribution)
with filesystem storage in a fresh folder on a free port, and waits for `/v2/` to answer.
The Docker engine treats registries on 127.0.0.0/8 as allowed without TLS, so
`docker push 127.0.0.1:PORT/name:tag` works as it would against a lab's registry. The
server is stopped by its PID. Under CI=true a registry that cannot start fails the test
instead of skipping it (`.ci/run` installs `docker-registry`).
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

START_S = 15.0
CONFIG = """\
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{port}
"""


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the registry tests must run; .ci/run installs docker-registry)",
                    pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Registry:
    folder: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("docker-registry")
        if binary is None:
            _unavailable("no docker-registry here (apt-get install docker-registry)")
        config = self.folder / "config.yml"
        config.write_text(CONFIG.format(root=self.folder / "data", port=self.port))
        log = open(self.folder / "registry.log", "ab")
        self.proc = subprocess.Popen([binary, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        text = (self.folder / "registry.log").read_text(errors="replace")[-2000:]
        self.stop()
        _unavailable(f"docker-registry did not answer on {self.host} within {START_S:.0f}s: {text}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def push(self, local: str, name: str) -> str:
        """Tag a local image as HOST/name and push it; its digest reference (`HOST/repo@sha256:...`)."""
        ref = f"{self.host}/{name}"
        subprocess.run(["docker", "tag", local, ref], check=True, capture_output=True, timeout=60)
        out = subprocess.run(["docker", "push", ref], check=True, capture_output=True, text=True, timeout=120).stdout
        found = re.search(r"digest: (sha256:[0-9a-f]{64})", out)
        assert found, out
        return f"{ref.rsplit(':', 1)[0] if ':' in name else ref}@{found.group(1)}"


@pytest.fixture
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    server = Registry(tmp_path_factory.mktemp("registry"), free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
