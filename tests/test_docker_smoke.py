"""The Docker engine, the busybox image and bind mounts work on this machine."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.docker


def test_busybox_container_writes_to_a_bind_mount_and_stdout(docker_client, busybox_image, tmp_path):
    container = docker_client.containers.run(
        busybox_image,
        ["sh", "-c", "echo hello from busybox; echo written > /out/file.txt; exit 0"],
        volumes={str(tmp_path): {"bind": "/out", "mode": "rw"}},
        labels={"winslow.test": "smoke"},
        detach=True,
    )
    try:
        result = container.wait(timeout=30)
        output = container.logs()
    finally:
        container.remove(force=True)

    assert result["StatusCode"] == 0
    assert output == b"hello from busybox\n"
    assert (tmp_path / "file.txt").read_text() == "written\n"
