"""The README's screenshots, taken from a real run: `python -m viewer.screenshots [--out docs/images]`.

It runs `winslow demo` (process executor), then adds three projects to the demo's state
repo so the first screen has something in every section (one waiting at its gate, one
failed, one running), starts a node and `winslow viewer` on it, and takes with Debian's
Chromium (Playwright, `/usr/bin/chromium`):

    first-screen.png   the first screen: what needs you, then every project
    run-page.png       the demo's analyse run: its log, trajectories.png and vehicles.csv
    node-charts.png    the node's page with its load charts from the heartbeat history

The running project is aborted and every process it started is stopped by its PID at
the end; the demo folder is removed unless --keep.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from reconciler.gitcmd import IDENTITY, git, git_env

CHROMIUM = "/usr/bin/chromium"
ENV = {**os.environ, **IDENTITY}
EXTRA_PIPELINE = {
    "name": "survey",
    "description": "Checks a flight's calibration, then watches the crossing for a while.",
    "stages": [
        {"name": "calibrate", "image": "winslow-demo/python:3",
         "command": ["python3", "-c", "import sys; print('calibrating camera 2 ...'); print('no checkerboard found in "
                                      "frames 0-120', file=sys.stderr); sys.exit(2)"],
         "resources": {"cpus": 0.2, "memory": "256MiB"}},
    ]}
WATCH_PIPELINE = {
    "name": "watch",
    "stages": [{"name": "observe", "image": "winslow-demo/python:3",
                "command": ["python3", "-u", "-c", "import time\nfor i in range(600):\n    sum(range(300000))\n"
                            "    print(f'frame {i}: 3 vehicles in view', flush=True)\n    time.sleep(0.2)"],
                "resources": {"cpus": 0.5, "memory": "256MiB"}}]}


def _project(name: str, pipeline: str, tags: list[str]) -> str:
    return yaml.safe_dump({"name": name, "pipeline": pipeline, "tags": tags,
                           "env": {"VIDEO": "demo/traffic.y4m", "METRES_PER_PIXEL": "0.375"},
                           "run": {"request": 1, "state": "running"}}, sort_keys=False)


def _wait(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise SystemExit(f"screenshots: timed out waiting for {what}")


def _state(remote: Path, project: str) -> str | None:
    out = subprocess.run(["git", "--git-dir", str(remote), "show", f"main:projects/{project}/status.yaml"],
                         capture_output=True, text=True)
    data = yaml.safe_load(out.stdout) if out.returncode == 0 else None
    return data.get("state") if isinstance(data, dict) else None


def _push(repo: Path, files: dict[str, str], message: str) -> None:
    env = git_env(IDENTITY)
    git(repo, "pull", "-q", "--rebase", "origin", "main", env=env)
    for path, text in files.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(text)
    git(repo, "add", "-A", env=env)
    git(repo, "commit", "-qm", message, env=env)
    git(repo, "push", "-q", "origin", "main", env=env)


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "reconciler", *args], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, env=ENV)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def take(root: Path, out: Path, samples_s: float) -> None:
    from playwright.sync_api import sync_playwright

    subprocess.run([sys.executable, "-m", "reconciler", "demo", "--dir", str(root / "demo"), "--executor", "process"],
                   check=True, env=ENV, stdout=subprocess.DEVNULL)
    demo = root / "demo"
    repo, remote, storage = demo / "repo", demo / "remote.git", demo / "storage"
    _push(repo, {"pipelines/survey.yaml": yaml.safe_dump(EXTRA_PIPELINE, sort_keys=False),
                 "pipelines/watch.yaml": yaml.safe_dump(WATCH_PIPELINE, sort_keys=False),
                 "projects/crossing-north/project.yaml": _project("Crossing north, 2026-11-28", "demo", ["demo", "north"]),
                 "projects/bridge-survey/project.yaml": _project("Bridge survey, camera 2", "survey", ["bridge"]),
                 "projects/crossing-live/project.yaml": _project("Crossing, live watch", "watch", ["demo", "live"])},
          "three more projects for the screenshots")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    node = _start(["node", "--repo", str(remote), "--storage", str(storage), "--name", "ws-1", "--executor", "process",
                   "--work", str(root / "ws-1"), "--heartbeat", "1s"], root / "node.log")
    viewer = _start(["viewer", "--repo", str(remote), "--storage", str(storage), "--port", str(port),
                     "--work", str(root / "viewer")], root / "viewer.log")
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _state(remote, "crossing-north") == "WAITING" and _state(remote, "bridge-survey") == "FAILED"
              and _state(remote, "crossing-live") == "RUNNING", 120, "the projects to reach their states")
        time.sleep(samples_s)  # the node's heartbeat history gathers load samples for the charts
        _wait(lambda: _answers(url), 30, "the viewer")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url + "/")
            page.locator("section.needs.waiting summary").first.click()
            page.screenshot(path=str(out / "first-screen.png"), full_page=False)
            page.goto(url + "/projects/demo-traffic")
            analyse = page.locator("a.run", has_text="analyse").first.get_attribute("href") \
                if page.locator("a.run", has_text="analyse").count() else None
            page.goto(url + (analyse or "/projects/demo-traffic/runs/2-analyse-1"))
            page.wait_for_function("document.querySelector('img[alt=\"trajectories.png\"]')?.naturalWidth > 0")
            _clip_to(page, "div.previews", out / "run-page.png")
            page.goto(url + "/nodes/ws-1")
            _clip_to(page, "div.charts", out / "node-charts.png")
            browser.close()
    finally:
        try:
            _push(repo, {"projects/crossing-live/project.yaml": _project("Crossing, live watch", "watch",
                                                                         ["demo", "live"]).replace("running", "aborted")},
                  "crossing-live: abort")
            _wait(lambda: _state(remote, "crossing-live") != "RUNNING", 60, "the live project to stop")
        finally:
            _stop(viewer)
            _stop(node)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/api/problems", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def _clip_to(page: Any, selector: str, path: Path) -> None:
    """The page from its top to the bottom of `selector`."""
    box = page.locator(selector).bounding_box()
    height = int(box["y"] + box["height"] + 16) if box else 900
    page.set_viewport_size({"width": 1280, "height": max(900, height)})
    page.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": 1280, "height": height})
    page.set_viewport_size({"width": 1280, "height": 900})


def main() -> int:
    parser = argparse.ArgumentParser(description="Take the README's screenshots of the viewer from a real demo run.")
    parser.add_argument("--out", type=Path, default=Path("docs/images"), help="where the PNGs go (default docs/images)")
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it (default: a temp folder, removed)")
    parser.add_argument("--samples", type=float, default=40.0,
                        help="seconds to let the node gather load samples before the charts (default 40)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    root = args.keep or Path(tempfile.mkdtemp(prefix="winslow-shots-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        take(root.resolve(), args.out.resolve(), args.samples)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    for name in ("first-screen.png", "run-page.png", "node-charts.png"):
        print(args.out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
