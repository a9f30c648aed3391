"""The viewer end to end in headless Chromium, over a real state repo with real nodes running real stages.

`winslow viewer` runs as its own process against a bare remote that two `winslow node`
processes (process executor) work on: one stays up, one is killed mid-run so that its
node is lost and its run LOST. The repo holds a project of each kind: one waiting at a
gate, one failed, one printing for a few seconds (its live log is followed in the
browser until the run ends), the demo pipeline (whose analyse run shows
trajectories.png and vehicles.csv), and an invalid one. Each page is opened in Debian's
Chromium through Playwright, with screenshots under the test's folder.

Under CI=true a missing browser fails the tests instead of skipping them.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.commands.demo import make_video
from tests.cluster import GIT_ENV, NodeProcess, StateRemote, wait_for

CHROMIUM = Path("/usr/bin/chromium")
REPO_ROOT = Path(__file__).resolve().parent.parent
STEADY = ("--tag", "steady")
LINES = 40  # the chatty stage prints one line every 0.2 s

PIPELINES = {
    "gated": {"name": "gated", "stages": [
        {"name": "look", "image": "none", "command": ["sh", "-c", "echo looked > \"$WINSLOW_WORKSPACE/look.txt\""],
         "resources": {"cpus": 0.1}, "node_tags": ["steady"], "pause_after": True},
        {"name": "after", "image": "none", "command": ["true"], "resources": {"cpus": 0.1}, "node_tags": ["steady"]}]},
    "bad": {"name": "bad", "stages": [
        {"name": "detect", "image": "none", "command": ["sh", "-c", "echo detecting; echo broken >&2; exit 1"],
         "resources": {"cpus": 0.1}, "node_tags": ["steady"]}]},
    "chatty": {"name": "chatty", "stages": [
        {"name": "talk", "image": "none",
         "command": ["sh", "-c", f"for i in $(seq 1 {LINES}); do echo \"tick $i\"; sleep 0.2; done"],
         "resources": {"cpus": 0.1}, "node_tags": ["steady"]}]},
    "doomed": {"name": "doomed", "stages": [
        {"name": "hold", "image": "none", "command": ["sleep", "8"], "resources": {"cpus": 0.1},
         "node_tags": ["doomed"], "lost_retries": 0}]},
}


def _project(pipeline: str, name: str) -> str:
    return yaml.safe_dump({"name": name, "pipeline": pipeline, "tags": ["browser"],
                           "env": {"VIDEO": "demo/traffic.y4m", "METRES_PER_PIXEL": "0.375"},
                           "run": {"request": 1, "state": "running"}})


def _demo_pipeline() -> str:
    demo = yaml.safe_load((REPO_ROOT / "state-repo-template/pipelines/demo.yaml").read_text())
    for stage in demo["stages"]:
        stage["node_tags"] = ["steady"]
        stage["resources"]["cpus"] = 0.1
    return yaml.safe_dump(demo)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Cluster:
    remote: StateRemote
    storage: Path
    url: str
    shots: Path

    def state(self, project: str) -> str | None:
        return self.remote.status(project).get("state")

    def run(self, project: str, stage: str) -> dict[str, Any] | None:
        runs = [r for r in self.remote.status(project).get("runs", []) if r["stage"] == stage]
        return runs[-1] if runs else None


def _approve(remote: StateRemote, project: str) -> None:
    subprocess.run([sys.executable, "-m", "reconciler", "approve", project, "--repo-dir", str(remote.clone)],
                   check=True, capture_output=True, env=GIT_ENV, timeout=60)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = "playwright is not installed (pip install -e '.[test]')"
    if problem is None and not CHROMIUM.exists():
        problem = f"no {CHROMIUM} (apt-get install chromium)"
    if problem is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{problem} (CI=true: the browser tests must run)", pytrace=False)
        pytest.skip(problem)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, browser: Any) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("viewer-browser")
    remote = StateRemote(root / "state")
    storage = root / "storage"
    make_video(storage)  # the demo's video and vehicles.py under resources/demo/
    files: dict[str, str | None] = {f"pipelines/{name}.yaml": yaml.safe_dump(p) for name, p in PIPELINES.items()}
    files["pipelines/demo.yaml"] = _demo_pipeline()
    files["winslow.yaml"] = yaml.safe_dump({"version": 1, "timeouts": {"heartbeat": "1s", "node": "6s", "lease": "4s"}})
    files |= {f"projects/{pid}/project.yaml": _project(pipeline, name) for pid, pipeline, name in (
        ("gate", "gated", "Waiting at a gate"), ("bad", "bad", "Fails at once"), ("chatty", "chatty", "Talks"),
        ("doomed", "doomed", "On a node that dies"), ("demo", "demo", "Demo crossing"))}
    files["projects/broken/project.yaml"] = "name: broken\npipeline: nowhere\nrun: {request: 1, state: running}\n"
    remote.write(files, "projects of every kind")
    nodes = [NodeProcess("steady", remote.remote, storage, root / "work-steady", extra=STEADY),
             NodeProcess("doomed", remote.remote, storage, root / "work-doomed", extra=("--tag", "doomed"))]
    port = _free_port()
    viewer_log = open(root / "viewer.log", "wb")
    viewer = subprocess.Popen([sys.executable, "-m", "reconciler", "viewer", "--repo", str(remote.remote),
                               "--storage", str(storage), "--port", str(port), "--work", str(root / "viewer-work"),
                               "--poll", "1s"], stdout=viewer_log, stderr=subprocess.STDOUT, env=GIT_ENV)
    cluster = Cluster(remote, storage, f"http://127.0.0.1:{port}", root / "screenshots")
    cluster.shots.mkdir()
    try:
        def answers() -> bool:
            try:
                with urllib.request.urlopen(cluster.url + "/api/problems", timeout=2) as reply:
                    return bool(reply.status == 200)
            except OSError:
                return False

        wait_for(answers, 30, "the viewer to answer")
        wait_for(lambda: (cluster.run("doomed", "hold") or {}).get("state") == "RUNNING", 30,
                 "the doomed run to start")
        nodes[1].signal(signal.SIGKILL)  # the node dies mid-run; its stage (sleep 8) ends on its own
        yield cluster
    finally:
        viewer.send_signal(signal.SIGTERM)
        try:
            viewer.wait(timeout=15)
        except subprocess.TimeoutExpired:
            viewer.kill()
            viewer.wait(timeout=5)
        viewer_log.close()
        for node in nodes:
            node.stop()


def _page(browser: Any, cluster: Cluster) -> Any:
    page = browser.new_page(viewport={"width": 1366, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.errors = errors
    return page


def test_live_log_follows_a_running_stage_until_it_ends_without_a_reload(browser: Any, cluster: Cluster) -> None:
    wait_for(lambda: (cluster.run("chatty", "talk") or {}).get("state") == "RUNNING", 30, "the chatty stage to run")
    url = f"{cluster.url}/projects/chatty/runs/1-talk-1"

    def shown() -> bool:  # the viewer follows the remote a moment behind: wait until it knows the run
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return bool(reply.status == 200)
        except OSError:
            return False

    wait_for(shown, 15, "the viewer to show the run")
    page = _page(browser, cluster)
    page.goto(url)
    page.evaluate("window.sameDocument = true")
    log = page.locator("pre#log")
    assert log.get_attribute("data-stream") == "/projects/chatty/runs/1-talk-1/log/stream"
    # A locator's wait, not wait_for_function: the page's CSP (script-src 'self') refuses the eval behind that.
    page.locator("pre#log", has_text="tick").wait_for(timeout=15_000)
    seen_live = page.locator("pre#log").inner_text()
    page.wait_for_selector("pre#log[data-ended]", timeout=30_000)
    final = log.inner_text()
    assert page.evaluate("window.sameDocument") is True  # followed in place: no reload
    assert f"tick {LINES}" in final and "tick 1\n" in final + "\n"
    assert f"tick {LINES}" not in seen_live  # it was seen while the stage still ran
    assert page.locator("#run-state").inner_text() == "SUCCEEDED"
    assert page.locator("#log-source").inner_text() == "final log on main"
    page.screenshot(path=str(cluster.shots / "live-log.png"), full_page=True)
    assert not page.errors, page.errors
    page.close()


def test_analyse_run_page_shows_the_demo_plot_and_its_table(browser: Any, cluster: Cluster) -> None:
    wait_for(lambda: cluster.state("demo") == "WAITING", 60, "the demo to reach its gate")
    _approve(cluster.remote, "demo")
    wait_for(lambda: cluster.state("demo") == "SUCCEEDED", 90, "the demo to succeed")
    analyse = cluster.run("demo", "analyse")
    assert analyse is not None
    wait_for(lambda: cluster.remote.read(f"projects/demo/results/{analyse['id']}.yaml"), 30, "the result manifest")
    page = _page(browser, cluster)
    url = f"{cluster.url}/projects/demo/runs/{analyse['id']}"
    wait_for(lambda: page.goto(url) and page.locator('img[alt="trajectories.png"]').count() == 1, 15,
             "the viewer to show the manifest")
    image = page.locator('img[alt="trajectories.png"]')
    image.scroll_into_view_if_needed()
    # Polled from here: wait_for_function's eval is refused by the page's CSP (script-src 'self').
    wait_for(lambda: page.evaluate("document.querySelector('img[alt=\"trajectories.png\"]').complete"), 10,
             "the plot to load", interval=0.1)
    assert page.evaluate("document.querySelector('img[alt=\"trajectories.png\"]').naturalWidth") > 0
    table = page.locator("figure.preview.table", has_text="vehicles.csv").locator("table")
    headers = table.locator("thead th").all_inner_texts()
    assert [h.lower() for h in headers][:1] == ["vehicle"], headers
    first_before = table.locator("tbody tr").first.inner_text()
    table.locator("thead th").first.click()
    table.locator("thead th").first.click()  # descending: the last id comes first
    assert table.locator("thead th").first.get_attribute("aria-sort") == "descending"
    assert table.locator("tbody tr").first.inner_text() != first_before
    assert page.locator("text=summary.json").count() >= 1
    page.screenshot(path=str(cluster.shots / "analyse-run.png"), full_page=True)
    assert not page.errors, page.errors
    page.close()


def test_a_download_resumes_with_a_range_request_in_the_browser(browser: Any, cluster: Cluster) -> None:
    video = cluster.storage / "resources/demo/traffic.y4m"
    size = video.stat().st_size
    page = _page(browser, cluster)
    page.goto(f"{cluster.url}/files/resources/demo")
    assert page.locator("a", has_text="traffic.y4m").count() >= 1
    got = page.evaluate("""async () => {
        const reply = await fetch('/download/resources/demo/traffic.y4m', {headers: {Range: 'bytes=1000-'}});
        const body = new Uint8Array(await reply.arrayBuffer());
        return [reply.status, reply.headers.get('content-range'), body.length, Array.from(body.slice(0, 16))];
    }""")
    assert got[0] == 206 and got[1] == f"bytes 1000-{size - 1}/{size}" and got[2] == size - 1000
    assert bytes(got[3]) == video.read_bytes()[1000:1016]
    with page.expect_download() as started:
        page.locator('a[href="/download/resources/demo/vehicles.py"]').click()
    saved = Path(started.value.path())
    assert saved.read_bytes() == (cluster.storage / "resources/demo/vehicles.py").read_bytes()
    page.close()


def test_first_screen_nodes_and_problems_show_every_kind_of_state(browser: Any, cluster: Cluster) -> None:
    wait_for(lambda: cluster.state("gate") == "WAITING" and cluster.state("bad") == "FAILED", 60,
             "the gate to wait and the bad project to fail")
    wait_for(lambda: (cluster.run("doomed", "hold") or {}).get("state") == "LOST", 60, "the doomed run to be LOST")
    page = _page(browser, cluster)
    page.goto(cluster.url + "/")
    wait_for(lambda: page.reload() and page.locator("section.needs.waiting").count() == 1, 15, "the first screen")
    waiting = page.locator("section.needs.waiting")
    assert "winslow approve gate" in waiting.inner_text()
    page.locator("section.needs.waiting summary").first.click()
    assert "+  request: 2" in waiting.locator("pre.diff").inner_text()
    failed = page.locator("section.needs.failed").inner_text()
    assert "bad" in failed and "doomed" in failed
    assert "broken" in page.locator("section.needs.invalid").inner_text()
    states = page.locator("table.projects td .state").all_inner_texts()
    assert {"WAITING", "FAILED", "SUCCEEDED", "INVALID"} <= set(states), states
    page.screenshot(path=str(cluster.shots / "first-screen.png"), full_page=True)

    page.goto(cluster.url + "/projects/doomed")
    assert "LOST" in page.locator("table.sortable").inner_text()
    assert page.locator("svg.timeline rect.bar.lost").count() == 1

    page.goto(cluster.url + "/nodes")
    rows = {r.locator("td").first.inner_text(): r.locator("td").nth(1).inner_text()
            for r in page.locator("tbody tr").all()}
    assert rows == {"doomed": "LOST", "steady": "READY"}, rows
    page.goto(cluster.url + "/nodes/steady")
    assert page.locator("svg.chart").count() >= 3
    page.screenshot(path=str(cluster.shots / "node.png"), full_page=True)

    page.goto(cluster.url + "/problems")
    assert "projects/broken/project.yaml" in page.locator("table").inner_text()
    page.goto(cluster.url + "/pipelines/demo")
    assert page.locator("ol.stages li").count() == 3
    assert not page.errors, page.errors
    page.close()


def test_screenshots_were_taken(cluster: Cluster) -> None:
    shots = sorted(p.name for p in cluster.shots.glob("*.png"))
    assert {"first-screen.png", "analyse-run.png", "node.png", "live-log.png"} <= set(shots), shots
    assert all((cluster.shots / name).stat().st_size > 10_000 for name in shots)
    if os.environ.get("WINSLOW_SHOTS"):  # keep them somewhere to look at
        for name in shots:
            shutil.copy2(cluster.shots / name, Path(os.environ["WINSLOW_SHOTS"]) / name)
