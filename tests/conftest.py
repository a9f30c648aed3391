"""Fixtures shared by every test module; each says what it builds."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import docker
import pytest
import requests

BUSYBOX_TAG = "winslow-test/busybox:1"
# Debian's busybox-static; the image has no libc, so a dynamically linked busybox would not run.
BUSYBOX_BINARIES = (Path("/usr/bin/busybox"), Path("/bin/busybox"))

_BUSYBOX_DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
RUN ["/bin/busybox", "mkdir", "-p", "/tmp", "/root"]
CMD ["/bin/sh"]
"""


def _unavailable(reason: str) -> NoReturn:
    """Under CI=true a missing engine or tool is a broken machine, not a reason to skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: Docker tests must run)", pytrace=False)
    pytest.skip(reason)


def _static_busybox() -> Path | None:
    for path in BUSYBOX_BINARIES:
        if path.is_file():
            with path.open("rb") as binary:
                if b"ld-linux" not in binary.read(4096):  # no ELF interpreter: static
                    return path
    return None


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A docker-py client talking to the local engine."""
    try:
        client = docker.from_env(timeout=60)
        client.ping()
        problem = None
    except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
        problem = f"no Docker engine answers: {exc}"
    if problem is not None:
        _unavailable(problem)
    yield client
    client.close()


@pytest.fixture(scope="session")
def busybox_image(docker_client: docker.DockerClient) -> str:
    """A local image holding only a static busybox (sh, sleep, echo, cat, ...); returns its tag."""
    try:
        docker_client.images.get(BUSYBOX_TAG)
        return BUSYBOX_TAG
    except docker.errors.ImageNotFound:
        pass
    busybox = _static_busybox()
    if busybox is None:
        _unavailable("no static busybox at /usr/bin/busybox (apt-get install busybox-static)")
    with tempfile.TemporaryDirectory(prefix="winslow-busybox-") as context:
        shutil.copy2(busybox, Path(context) / "busybox")
        (Path(context) / "Dockerfile").write_text(_BUSYBOX_DOCKERFILE)
        docker_client.images.build(path=context, tag=BUSYBOX_TAG, rm=True, forcerm=True)
    return BUSYBOX_TAG


WINSLOW_IMAGE_TAG = "winslow/winslow:ci"


@pytest.fixture(scope="session")
def winslow_image(docker_client: docker.DockerClient) -> str:
    """Winslow's own image (the top-level Dockerfile), as `.ci/run` builds it; returns its tag."""
    try:
        docker_client.images.get(WINSLOW_IMAGE_TAG)
    except docker.errors.ImageNotFound:
        _unavailable(f"no image {WINSLOW_IMAGE_TAG}: build it with `bash .ci/run` (offline, on a local Debian base) "
                     f"or `docker build -t {WINSLOW_IMAGE_TAG} .` (pulls python:3.11-slim; README: Winslow's image)")
    return WINSLOW_IMAGE_TAG
