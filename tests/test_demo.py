"""`winslow demo`: the README's main command, run as a user runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster import GIT_ENV


def run_demo(tmp_path: Path, executor: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reconciler", "demo", "--dir", str(tmp_path / "demo"),
                           "--executor", executor, "--timeout", "300"], capture_output=True, text=True,
                          timeout=400, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})


def check_outcome(root: Path, result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo-traffic SUCCEEDED" in result.stdout
    assert "approving it by merging its resume branch" in result.stdout
    truth = json.loads((root / "storage/resources/demo/traffic.y4m.truth.json").read_text())
    analyse = root / "storage/workspaces/demo-traffic/2-analyse-1"
    summary = json.loads((analyse / "summary.json").read_text())
    assert abs(summary["vehicles"] - truth["vehicle_count"]) <= 1
    assert (analyse / "trajectories.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((analyse / "vehicles.csv").read_text().splitlines()) == summary["vehicles"] + 1
    log = subprocess.run(["git", "--git-dir", str(root / "remote.git"), "log", "--format=%s", "main"],
                         capture_output=True, text=True, env=GIT_ENV, check=True).stdout
    assert "Approve demo-traffic: merge resume/demo-traffic/1" in log
    assert "demo-traffic: analyse -> SUCCEEDED" in log
    status = subprocess.run(["git", "--git-dir", str(root / "remote.git"), "show",
                             "main:projects/demo-traffic/status.yaml"], capture_output=True, text=True).stdout
    assert "state: SUCCEEDED" in status
    assert "resume/demo-traffic" not in subprocess.run(["git", "--git-dir", str(root / "remote.git"), "branch"],
                                                       capture_output=True, text=True).stdout


def test_demo_runs_the_vehicle_pipeline_end_to_end_with_processes(tmp_path: Path) -> None:
    result = run_demo(tmp_path, "process")
    check_outcome(tmp_path / "demo", result)
    assert "stages run as host processes" in result.stdout


@pytest.mark.docker
def test_demo_runs_in_docker_when_an_engine_and_python_image_are_there(tmp_path: Path, docker_client) -> None:
    try:
        docker_client.images.get("winslow-demo/python:3")
    except Exception:  # noqa: BLE001 - any failure to find the image means it is not there
        if os.environ.get("CI") == "true":
            pytest.fail("CI builds winslow-demo/python:3 in .ci/run; it is missing")
        pytest.skip("no winslow-demo/python:3 image here (.ci/run builds it)")
    result = run_demo(tmp_path, "auto")
    check_outcome(tmp_path / "demo", result)
    assert "stages run as Docker containers" in result.stdout


def test_demo_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "precious.txt").write_text("keep me")
    result = run_demo(tmp_path, "process")
    assert result.returncode == 1 and "not an earlier demo" in result.stderr
    assert (tmp_path / "demo" / "precious.txt").read_text() == "keep me"
    assert "Traceback" not in result.stderr


def test_the_commands_the_demo_prints_work_from_an_unactivated_virtualenv(tmp_path: Path, monkeypatch) -> None:
    from reconciler.commands.demo import winslow_command

    script = tmp_path / "venv" / "bin" / "winslow"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script), "demo"])
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # the virtualenv is not activated
    assert winslow_command() == str(script)
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")  # it is
    assert winslow_command() == "winslow"
