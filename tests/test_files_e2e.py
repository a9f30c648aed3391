"""The whole path a researcher at a laptop takes: upload a video over SSH, run a pipeline that names it as an
input, and download the result — against a real OpenSSH server, a real node and a real remote."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from tests.cluster import GIT_ENV, NodeProcess, StateRemote, wait_for
from tests.sshd import SshServer, sshd_fixture  # noqa: F401 - the fixture, by its name `sshd`

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINE = """\
name: count
stages:
  - name: detect
    image: none
    inputs: ['videos/${VIDEO}']
    command: [sh, -c, 'wc -c < "$WINSLOW_RESOURCES/videos/$VIDEO" > "$WINSLOW_WORKSPACE/size.txt"']
"""


def winslow(sshd: SshServer, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**GIT_ENV, **sshd.env(), "PYTHONPATH": str(REPO_ROOT)})


def test_upload_over_ssh_run_with_it_as_input_and_download_the_result(tmp_path: Path, sshd: SshServer) -> None:
    remote = StateRemote(tmp_path)
    storage = tmp_path / "storage"
    url = sshd.url(storage)
    video = tmp_path / "DJI_0001.MP4"
    video.write_bytes(bytes(range(256)) * 4096 + b"tail")
    remote.write({"pipelines/count.yaml": PIPELINE,
                  "projects/ulm/project.yaml": "pipeline: count\nenv: {VIDEO: DJI_0001.MP4}\nrun: {request: 1}\n"},
                 "a project whose video is not uploaded yet")
    node = NodeProcess("ws-1", remote.remote, storage, tmp_path / "work")
    try:
        wait_for(lambda: "waits for input videos/DJI_0001.MP4" in (remote.status("ulm").get("message") or ""), 30,
                 "the project to say it waits for its video")
        assert remote.status("ulm")["state"] == "PENDING"
        up = winslow(sshd, remote.clone, "upload", str(video), "videos/", "--storage", url, "--quiet")
        assert up.returncode == 0, up.stderr
        wait_for(lambda: remote.status("ulm").get("state") == "SUCCEEDED", 60, "the run once the video is there")
    finally:
        node.stop()
    (run,) = remote.status("ulm")["runs"]
    digest = hashlib.sha256(video.read_bytes()).hexdigest()
    assert run["inputs"] == [{"path": "videos/DJI_0001.MP4", "size": video.stat().st_size, "sha256": digest}]
    git_pull = subprocess.run(["git", "pull", "-q", "origin", "main"], cwd=remote.clone, env=GIT_ENV, capture_output=True)
    assert git_pull.returncode == 0
    down = winslow(sshd, remote.clone, "download", "ulm/detect/size.txt", str(tmp_path / "size.txt"),
                   "--storage", url, "--quiet")
    assert down.returncode == 0, down.stderr
    assert (tmp_path / "size.txt").read_text().strip() == str(video.stat().st_size)
