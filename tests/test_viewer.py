"""The viewer's routes through Starlette's TestClient, over a real state repo, a real node branch and real storage.

The repo holds a project of each kind a person must tell apart (waiting at a gate with
its resume branch, failed, running on a node whose branch carries its log tail,
succeeded with results, invalid, and one whose name is an HTML tag); storage holds
results, a resource, and links that must never be followed. The same storage is also
served over SSH, by a real OpenSSH server (`tests/sshd.py`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from reconciler.demo.vehicles import encode_png
from reconciler.errors import ConfigError
from reconciler.gitsync import Mirror
from reconciler.sshstore import SshStorage
from reconciler.storage import Entry, LocalStorage, Storage
from reconciler.transfer import copy, local_file
from reconciler.yamlsafe import dump_yaml
from tests import statebuild as sb
from tests.cluster import GIT_ENV, StateRemote, wait_for
from tests.sshd import SshServer, sshd_fixture  # noqa: F401 - the fixture, by its name `sshd`
from viewer.app import create_app
from viewer.files import Files
from viewer.serve import open_storage
from viewer.source import Source

TOKEN = "a-long-enough-token-for-tests-0123"
MR = "https://git.example/lab/state/-/merge_requests/new?merge_request[source_branch]={branch}"
XSS = "<script>alert(1)</script>"
CSV = "id,kind,speed_kmh\n1,car,42.5\n2,truck,31.0\n3,car,55.25\n"


def _project(pid: str, name: str, pipeline: str = "cpu", tags: list[str] | None = None, request: int = 1) -> str:
    return dump_yaml({"name": name, "pipeline": pipeline, "tags": tags or ["lab"], "env": {"VIDEO": f"v/{pid}.mp4"},
                      "run": {"request": request, "state": "running"}})


def _node_document(project: str, run_id: str, tail: str) -> bytes:
    history = [{"time": f"2024-05-01T11:5{i}:00.000Z", "cpu_percent": 10.0 * i, "memory_used": (i + 1) * 2**30,
                "net_rx": 1000 * i, "net_tx": 500 * i,
                "gpus": [{"index": 0, "utilization": 20 * i, "memory_used": i * 2**30}]} for i in range(5)]
    document = {"name": "gpu1", "version": "0.1.0", "executor": "process", "started": sb.T0, "tags": [],
                "drain": False, "capacity": {"cpus": 16, "memory": 64 * 2**30,
                                             "gpus": [{"index": 0, "uuid": "GPU-0", "model": "A100", "memory": 40 * 2**30}]},
                "load": history[-1], "history": history,
                "runs": [{"project": project, "run": run_id, "stage": "a", "gpus": [0], "started": sb.T0,
                          "log_tail": tail}]}
    return dump_yaml(document).encode()


@dataclass
class World:
    remote: StateRemote
    storage: Path
    source: Source
    client: TestClient
    png: bytes
    big: bytes
    files: Files = field(init=False)

    def stop(self) -> None:
        self.source.stop()
        self.files.close()

    def push_branch(self, branch: str, files: dict[str, bytes], parent: str | None = None) -> None:
        mirror = Mirror(str(self.remote.remote), self.remote.root / "pusher.git")
        mirror.open()
        mirror.fetch()
        mirror.push_branch(branch, mirror.commit(parent, files, f"test: {branch}"))
        mirror.close()


def build_world(tmp_path: Path, token: str | None = None,
                storage_at: Callable[[Path], Storage] = LocalStorage) -> World:
    remote = StateRemote(tmp_path / "state")
    done_run = sb.run("1-a-1", "SUCCEEDED", project="done", inputs=[{"path": "big.bin", "size": 300_000,
                                                                     "sha256": "ab" * 32}])
    files: dict[str, str | None] = {
        "winslow.yaml": dump_yaml({"version": 1, "viewer": {"merge_request_url": MR}}),
        "pipelines/cpu.yaml": sb.pipeline(sb.CPU)["pipelines/cpu.yaml"],
        "projects/waiting/project.yaml": _project("waiting", "Gate project", tags=["ulm"]),
        "projects/failed/project.yaml": _project("failed", "Failing project"),
        "projects/running/project.yaml": _project("running", "Running project"),
        "projects/done/project.yaml": _project("done", "Finished project"),
        "projects/xss/project.yaml": _project("xss", XSS),
        "projects/broken/project.yaml": "name: broken\npipeline: nope\nrun: {request: 1}\n",
        "projects/done/logs/1-a-1.log": "the final log of done\nall good\n",
        "projects/done/results/1-a-1.yaml": dump_yaml({
            "project": "done", "run": "1-a-1", "stage": "a", "node": "gpu1", "created": sb.T0,
            "workspace": "workspaces/done/1-a-1", "total_size": 0, "truncated": False,
            "files": [{"path": "plot.png", "size": 0, "sha256": "00" * 32},
                      {"path": "table.csv", "size": len(CSV), "sha256": "11" * 32},
                      {"path": "notes.txt", "size": 6, "sha256": "22" * 32}]}),
    }
    files |= sb.status("waiting", "WAITING", runs=[sb.run("1-a-1", "SUCCEEDED", project="waiting")],
                       waiting_since=sb.T0, proposed=True, message="waiting at the gate after a")
    files |= sb.status("failed", "FAILED", runs=[sb.run("1-a-1", "FAILED", project="failed", exit_code=3,
                                                        reason="the program exited with code 3")],
                       message="a failed")
    files |= sb.status("running", "RUNNING", runs=[sb.run("1-a-1", "RUNNING", project="running", gpus=[0])])
    files |= sb.status("done", "SUCCEEDED", runs=[done_run], env={"VIDEO": "v/done.mp4", "DB_PASSWORD": "***"})
    remote.write(files, "a world for the viewer")
    main = remote.refs()["refs/heads/main"]
    world = World(remote, tmp_path / "storage", None, None, b"", b"")  # type: ignore[arg-type]
    gate_yaml = _project("waiting", "Gate project", tags=["ulm"]).replace("request: 1", "request: 2\n  from: b")
    world.push_branch("resume/waiting/1", {"projects/waiting/project.yaml": gate_yaml.encode()}, parent=main)
    world.push_branch("winslow/nodes/gpu1", {"nodes/gpu1.yaml": _node_document("running", "1-a-1",
                                                                                 "line 1\nline 2 <b>bold</b>\n")})

    storage = world.storage
    workspace = storage / "workspaces/done/1-a-1"
    workspace.mkdir(parents=True)
    (storage / "resources").mkdir()
    (storage / "logs/done").mkdir(parents=True)
    world.png = encode_png(4, 3, bytes(range(36)))
    (workspace / "plot.png").write_bytes(world.png)
    (workspace / "table.csv").write_text(CSV)
    (workspace / "notes.txt").write_text("notes\n")
    (workspace / "escape").symlink_to("/etc/passwd")
    (storage / "logs/done/1-a-1.log").write_text("the full log of done\n")
    world.big = os.urandom(300_000)
    (storage / "resources/big.bin").write_bytes(world.big)
    (storage / "resources/linkdir").symlink_to("../workspaces")
    (tmp_path / "outside.txt").write_text("secret outside the root\n")

    world.source = Source(str(remote.remote), tmp_path / "viewer-work")
    world.source.open()
    world.files = Files(storage_at(storage))
    world.client = TestClient(create_app(world.source, world.files, token))
    return world


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    built = build_world(tmp_path)
    yield built
    built.stop()


PAGES = ["/", "/?state=FAILED", "/?tag=ulm", "/?q=gate", "/projects/done", "/projects/xss", "/projects/broken",
         "/projects/running", "/projects/done/runs/1-a-1", "/projects/running/runs/1-a-1",
         "/projects/done/runs/1-a-1/log", "/files", "/files/resources", "/files/resources/big.bin",
         "/files/workspaces/done/1-a-1", "/nodes", "/nodes/gpu1", "/pipelines", "/pipelines/cpu", "/problems"]
APIS = ["/api/projects", "/api/projects/done", "/api/projects/done/runs", "/api/projects/done/runs/1-a-1",
        "/api/projects/done/runs/1-a-1/log", "/api/files", "/api/files/resources", "/api/nodes", "/api/nodes/gpu1",
        "/api/pipelines", "/api/pipelines/cpu", "/api/problems"]


def test_first_screen_shows_waiting_then_failed_then_invalid_then_running(world: World) -> None:
    page = world.client.get("/").text
    order = [page.index(f'class="state state-{s}">{s.upper()}</span>') for s in ("waiting", "failed", "invalid", "running")]
    assert order == sorted(order), order
    assert "winslow approve waiting" in page
    assert "resume/waiting/1" in page
    assert MR.replace("{branch}", "resume%2Fwaiting%2F1").replace("[", "[").replace("&", "&amp;") in page
    assert '<span class="add">+  request: 2</span>' in page  # what approving changes
    assert "the program exited with code 3" in page and ">3</td>" in page
    assert '<a href="/nodes/gpu1">gpu1</a>' in page  # the running project's node


def test_every_page_and_api_answers_get_and_head_and_nothing_else(world: World) -> None:
    for url in PAGES + APIS:
        got = world.client.get(url)
        assert got.status_code == 200, (url, got.status_code, got.text[:300])
        assert world.client.head(url).status_code == 200, url
    for url in ["/", "/projects/done", "/api/projects", "/download/resources/big.bin", "/static/viewer.css",
                "/no/such/page"]:
        for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            got = world.client.request(method, url)
            assert got.status_code == 405, (method, url, got.status_code)
            assert got.headers["allow"] == "GET, HEAD"


def test_every_name_is_escaped_and_no_page_has_inline_script(world: World) -> None:
    for url in ["/", "/projects/xss", "/?q=script"]:
        page = world.client.get(url).text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page, url
        assert XSS not in page
    for url in PAGES:
        page = world.client.get(url).text
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page), url
        assert " on" + "click=" not in page and "javascript:" not in page
    run = world.client.get("/projects/running/runs/1-a-1").text
    assert "line 2 &lt;b&gt;bold&lt;/b&gt;" in run  # a stage's output is text too


def test_security_headers_on_every_response(world: World) -> None:
    for url in ["/", "/api/projects", "/static/viewer.js", "/download/resources/big.bin", "/nope"]:
        headers = world.client.get(url).headers
        csp = headers["content-security-policy"]
        script = next(part for part in csp.split(";") if "script-src" in part or "default-src" in part)
        assert "'unsafe-inline'" not in script, csp
        assert "frame-ancestors 'none'" in csp or "sandbox" in csp, csp
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["x-frame-options"] == "DENY"


def test_secrets_are_shown_masked(world: World) -> None:
    data = world.client.get("/api/projects/done").json()
    assert data["env"]["DB_PASSWORD"] == "***"
    assert data["secrets"] == ["DB_PASSWORD"]
    assert "<code>DB_PASSWORD</code></th><td><code>***</code>" in world.client.get("/projects/done").text


def test_no_file_outside_the_storage_root_and_no_link_is_served(world: World) -> None:
    refused = ["/download/%2e%2e/outside.txt", "/download/resources/%2e%2e/%2e%2e/outside.txt",
               "/download/workspaces/done/1-a-1/escape", "/raw/workspaces/done/1-a-1/escape",
               "/download/resources/linkdir/done/1-a-1/plot.png", "/download/resources/linkdir",
               "/api/files/resources/linkdir/done", "/download/resources/..%2F..%2Foutside.txt",
               "/api/files/.winslow/sha256", "/download/.winslow/sha256/resources/big.bin.json"]
    for url in refused:
        got = world.client.get(url)
        assert got.status_code in (403, 404), (url, got.status_code)
        assert b"secret outside" not in got.content and b"root:" not in got.content
    listing = {e["path"]: e for e in world.client.get("/api/files/resources").json()["entries"]}
    assert listing["resources/linkdir"]["kind"] == "link"
    assert listing["resources/linkdir"]["target"] == "../workspaces"
    assert listing["resources/big.bin"]["size"] == 300_000
    assert listing["resources/big.bin"]["sha256"] == hashlib.sha256(world.big).hexdigest()
    ws = {e["path"]: e for e in world.client.get("/api/files/workspaces/done/1-a-1").json()["entries"]}
    assert ws["workspaces/done/1-a-1/escape"]["kind"] == "link"
    assert "link, not followed" in world.client.get("/files/workspaces/done/1-a-1").text
    link = world.client.get("/api/files/resources/linkdir").json()  # described, not entered
    assert link["entry"]["kind"] == "link" and link["entries"] is None


def test_downloads_answer_range_requests(world: World) -> None:
    url = "/download/resources/big.bin"
    whole = world.client.get(url)
    assert whole.status_code == 200 and whole.content == world.big
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["content-disposition"] == 'attachment; filename="big.bin"'
    etag = whole.headers["etag"]
    part = world.client.get(url, headers={"Range": "bytes=1000-"})
    assert part.status_code == 206 and part.content == world.big[1000:]
    assert part.headers["content-range"] == f"bytes 1000-299999/{len(world.big)}"
    assert world.client.get(url, headers={"Range": "bytes=10-19"}).content == world.big[10:20]
    assert world.client.get(url, headers={"Range": "bytes=-5"}).content == world.big[-5:]
    unsatisfiable = world.client.get(url, headers={"Range": "bytes=400000-"})
    assert unsatisfiable.status_code == 416 and unsatisfiable.headers["content-range"] == "bytes */300000"
    same = world.client.get(url, headers={"Range": "bytes=5-9", "If-Range": etag})
    assert same.status_code == 206
    changed = world.client.get(url, headers={"Range": "bytes=5-9", "If-Range": '"not-it"'})
    assert changed.status_code == 200 and changed.content == world.big
    head = world.client.head(url, headers={"Range": "bytes=100-"})
    assert head.status_code == 206 and head.headers["content-length"] == str(len(world.big) - 100)
    assert head.content == b""


def test_token_is_required_when_set_and_compared_as_a_whole(tmp_path: Path) -> None:
    world = build_world(tmp_path, token=TOKEN)
    try:
        client = world.client
        page = client.get("/")
        assert page.status_code == 401 and "This viewer needs a token" in page.text
        assert page.headers["www-authenticate"] == "Bearer"
        api = client.get("/api/projects")
        assert api.status_code == 401 and api.json()["error"] == "unauthorized"
        assert client.get("/api/projects", headers={"Authorization": "Bearer " + TOKEN[:-1]}).status_code == 401
        assert client.get("/download/resources/big.bin").status_code == 401
        assert client.get("/api/projects", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert client.get("/static/viewer.css").status_code == 200
        first = client.get(f"/projects/done?token={TOKEN}&x=1", follow_redirects=False)
        assert first.status_code == 303 and first.headers["location"] == "/projects/done?x=1"
        assert "HttpOnly" in first.headers["set-cookie"] and "SameSite=Strict" in first.headers["set-cookie"]
        assert client.get("/projects/done").status_code == 200  # the cookie from now on
        client.cookies.clear()
        assert client.get("/projects/done?token=wrong", follow_redirects=False).status_code == 401
    finally:
        world.stop()


def test_json_api_holds_what_the_pages_show(world: World) -> None:
    api = world.client.get
    projects = {p["project"]: p for p in api("/api/projects").json()["projects"]}
    assert {p: projects[p]["state"] for p in ("waiting", "failed", "running", "done", "broken")} == {
        "waiting": "WAITING", "failed": "FAILED", "running": "RUNNING", "done": "SUCCEEDED", "broken": "INVALID"}
    needs = api("/api/projects").json()["needs_me"]
    assert needs["WAITING"][0]["gate"]["approve"] == "winslow approve waiting"
    assert needs["WAITING"][0]["gate"]["merge_request"].endswith("source_branch]=resume%2Fwaiting%2F1")
    assert needs["RUNNING"][0]["node"] == "gpu1" and needs["RUNNING"][0]["gpus"] == [0]
    assert needs["FAILED"][0]["exit_code"] == 3
    done = api("/api/projects/done").json()
    assert [s["name"] for s in done["stages"]] == ["a", "b", "c"] and done["stages"][0]["state"] == "SUCCEEDED"
    assert done["runs"][0]["inputs"] == [{"path": "big.bin", "size": 300_000, "sha256": "ab" * 32}]
    assert done["history"] and done["history"][0]["request"] == 1
    run = api("/api/projects/done/runs/1-a-1").json()
    assert [f["path"] for f in run["manifest"]["files"]] == ["plot.png", "table.csv", "notes.txt"]
    assert {p["name"]: p["kind"] for p in run["previews"]} == {"plot.png": "image", "table.csv": "table",
                                                                "notes.txt": "text"}
    log = api("/api/projects/done/runs/1-a-1/log").json()
    assert log["text"] == "the final log of done\nall good\n" and log["live"] is False
    live = api("/api/projects/running/runs/1-a-1/log").json()
    assert live["live"] is True and live["text"].startswith("line 1\n")
    node = api("/api/nodes/gpu1").json()
    assert node["state"] == "ready" and len(node["history"]) == 5 and node["runs"][0]["project"] == "running"
    assert [n["name"] for n in api("/api/nodes").json()["nodes"]] == ["gpu1"]
    assert "cpu" in [p["name"] for p in api("/api/pipelines").json()["pipelines"]]
    problems = api("/api/problems").json()["problems"]
    broken = [p for p in problems if p["path"] == "projects/broken/project.yaml"]
    assert broken and all(p["line"] >= 1 and p["column"] >= 1 for p in broken)
    assert api("/api/projects/nope").status_code == 404
    assert api("/api/projects/done/runs/9-x-1").status_code == 404


def test_run_page_shows_results_inline(world: World) -> None:
    page = world.client.get("/projects/done/runs/1-a-1").text
    assert '<img src="/raw/workspaces/done/1-a-1/plot.png" alt="plot.png">' in page
    assert "<th>speed_kmh</th>" in page and "<td>55.25</td>" in page
    assert "<pre>notes\n</pre>" in page
    assert 'href="/download/workspaces/done/1-a-1/table.csv"' in page
    image = world.client.get("/raw/workspaces/done/1-a-1/plot.png")
    assert image.status_code == 200 and image.content == world.png
    assert image.headers["content-type"] == "image/png"
    assert image.headers["content-disposition"].startswith("inline")


def test_live_log_page_streams_and_a_finished_run_ends_with_its_final_log(world: World) -> None:
    page = world.client.get("/projects/running/runs/1-a-1").text
    assert 'data-stream="/projects/running/runs/1-a-1/log/stream"' in page
    head = world.client.head("/projects/running/runs/1-a-1/log/stream")  # answered at once, not after the run
    assert head.status_code == 200 and head.headers["content-type"].startswith("text/event-stream")
    with world.client.stream("GET", "/projects/done/runs/1-a-1/log/stream") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        body = "".join(stream.iter_text())
    event, data = body.strip().split("\n", 1)
    assert event == "event: end"
    end = json.loads(data.removeprefix("data: "))
    assert end["state"] == "SUCCEEDED" and end["text"] == "the final log of done\nall good\n"


def test_projects_page_pages_filters_and_searches(tmp_path: Path) -> None:
    world = build_world(tmp_path)
    try:
        world.remote.write({f"projects/many-{i:03d}/project.yaml": _project(f"many-{i:03d}", f"Many {i}",
                                                                             tags=["bulk"], request=0)
                            for i in range(230)}, "many idle projects")
        world.source.refresh()
        api = world.client.get
        first = api("/api/projects?tag=bulk").json()
        assert first["matching"] == 230 and first["pages"] == 3 and len(first["projects"]) == 100
        third = api("/api/projects?tag=bulk&page=3").json()
        assert [p["project"] for p in third["projects"]][0] == "many-200" and len(third["projects"]) == 30
        assert [p["project"] for p in api("/api/projects?state=failed").json()["projects"]] == ["failed"]
        assert [p["project"] for p in api("/api/projects?q=MANY 229").json()["projects"]] == ["many-229"]
        page = world.client.get("/?tag=bulk").text
        assert 'href="?tag=bulk&amp;page=2"' in page and "page 1 of 3" in page
    finally:
        world.stop()


def test_node_page_draws_load_charts_as_svg(world: World) -> None:
    page = world.client.get("/nodes/gpu1").text
    for title in ("CPU busy", "Memory used", "Network IO", "GPU 0 (A100) utilisation", "GPU 0 (A100) memory"):
        assert f'aria-label="{title}"' in page, title
    assert page.count("<polyline") >= 6  # rx and tx share one chart
    nodes = world.client.get("/nodes").text
    assert 'class="state state-ready">READY</span>' in nodes


def test_viewer_follows_the_remote_when_it_changes(world: World) -> None:
    world.source.start()
    before = world.source.current.version
    world.remote.write({"projects/newcomer/project.yaml": _project("newcomer", "Newcomer")}, "a new project")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "newcomer" not in world.source.current.snapshot.projects:
        time.sleep(0.05)
    assert world.source.current.version > before
    assert "newcomer" in world.client.get("/?q=newcomer").text


def test_a_curl_download_cut_short_resumes_with_curl_c(world: World, tmp_path: Path) -> None:
    import shutil

    import uvicorn

    if shutil.which("curl") is None:
        pytest.skip("no curl here")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(world.client.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        target = tmp_path / "big.bin"
        target.write_bytes(world.big[:123_456])  # what an interrupted download left
        subprocess.run(["curl", "-sS", "-f", "-C", "-", "-o", str(target),
                        f"http://127.0.0.1:{port}/download/resources/big.bin"], check=True, timeout=30)
        assert target.read_bytes() == world.big
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# -- storage over SSH, and recorded hashes --------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class CountingHashes:
    """A storage that counts the hashes it is asked to compute, and otherwise is the storage it wraps."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.hashed: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def stat(self, path: str, hash: bool = False) -> Entry:
        if hash:
            self.hashed.append(path)
        return self.inner.stat(path, hash)


@pytest.fixture
def ssh_world(tmp_path: Path, sshd: SshServer) -> Iterator[World]:
    built = build_world(tmp_path, storage_at=lambda root: SshStorage(sshd.url(root), command=sshd.command))
    yield built
    built.stop()


def test_files_page_and_range_downloads_over_ssh_storage(ssh_world: World, sshd: SshServer) -> None:
    world, client = ssh_world, ssh_world.client
    page = client.get("/files/resources")
    assert page.status_code == 200
    assert sshd.url(world.storage) in page.text  # the root the files come from
    assert 'href="/download/resources/big.bin"' in page.text and "link, not followed" in page.text
    listing = {e["path"]: e for e in client.get("/api/files/resources").json()["entries"]}
    assert listing["resources/big.bin"]["size"] == 300_000 and listing["resources/big.bin"]["kind"] == "file"
    assert "sha256" not in listing["resources/big.bin"]  # not recorded: over SSH it is computed when asked
    assert listing["resources/linkdir"] == {**listing["resources/linkdir"], "kind": "link", "target": "../workspaces"}
    assert [e["path"] for e in client.get("/api/files").json()["entries"]] == ["logs", "resources", "workspaces"]

    url = "/download/resources/big.bin"
    whole = client.get(url)
    assert whole.status_code == 200 and whole.content == world.big
    part = client.get(url, headers={"Range": "bytes=1000-"})
    assert part.status_code == 206 and part.content == world.big[1000:]
    assert part.headers["content-range"] == f"bytes 1000-299999/{len(world.big)}"
    assert client.get(url, headers={"Range": "bytes=10-19"}).content == world.big[10:20]
    assert client.get(url, headers={"Range": "bytes=-5"}).content == world.big[-5:]
    assert client.get(url, headers={"Range": "bytes=400000-"}).status_code == 416
    resumed = client.get(url, headers={"Range": "bytes=5-9", "If-Range": whole.headers["etag"]})
    assert resumed.status_code == 206 and resumed.content == world.big[5:10]
    assert client.get(url, headers={"Range": "bytes=5-9", "If-Range": '"not-it"'}).content == world.big
    head = client.head(url, headers={"Range": "bytes=100-"})
    assert head.status_code == 206 and head.headers["content-length"] == str(len(world.big) - 100)

    for refused in ["/download/workspaces/done/1-a-1/escape", "/raw/workspaces/done/1-a-1/escape",
                    "/download/resources/linkdir/done/1-a-1/plot.png", "/api/files/resources/linkdir/done",
                    "/download/resources/%2e%2e/%2e%2e/outside.txt", "/download/resources"]:
        got = client.get(refused)
        assert got.status_code in (403, 404), (refused, got.status_code)
        assert b"secret outside" not in got.content and b"root:" not in got.content
    assert client.get("/download/resources/nothing.bin").status_code == 404

    run = client.get("/projects/done/runs/1-a-1").text  # previews read over SSH too
    assert "<td>55.25</td>" in run and "<pre>notes\n</pre>" in run
    assert client.get("/raw/workspaces/done/1-a-1/plot.png").content == world.png


def test_hash_on_request_over_ssh_is_recorded_and_then_listed(ssh_world: World) -> None:
    big = ssh_world.storage / "resources/big.bin"
    os.utime(big, (time.time() - 60, time.time() - 60))  # settled: a hash of it may be recorded
    digest = hashlib.sha256(ssh_world.big).hexdigest()
    asked = ssh_world.client.get("/api/files/resources/big.bin?hash=1").json()
    assert asked["entry"]["sha256"] == digest
    listing = {e["path"]: e for e in ssh_world.client.get("/api/files/resources").json()["entries"]}
    assert listing["resources/big.bin"]["sha256"] == digest
    assert "compute it" not in ssh_world.client.get("/files/resources/big.bin").text


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_a_sha256_recorded_by_an_upload_is_listed_without_hashing_again(tmp_path: Path, where: str,
                                                                        request: pytest.FixtureRequest) -> None:
    root = tmp_path / "storage"
    (root / "resources").mkdir(parents=True)
    if where == "ssh":
        sshd: SshServer = request.getfixturevalue("sshd")
        storage: Storage = SshStorage(sshd.url(root), command=sshd.command)
    else:
        storage = LocalStorage(root)
    video = tmp_path / "DJI_0001.MP4"
    video.write_bytes(os.urandom(70_000))
    source = local_file(video)
    uploaded = copy(source, storage.writer("resources/videos/DJI_0001.MP4", source.stamp))  # what `winslow upload` does
    remote = StateRemote(tmp_path / "state")
    remote.write({"winslow.yaml": "version: 1\n"}, "an empty cluster")
    viewer_source = Source(str(remote.remote), tmp_path / "viewer-work")
    viewer_source.open()
    counting = CountingHashes(storage)
    try:
        client = TestClient(create_app(viewer_source, Files(counting)))  # type: ignore[arg-type]
        (entry,) = client.get("/api/files/resources/videos").json()["entries"]
        assert entry["sha256"] == uploaded.sha256 == hashlib.sha256(video.read_bytes()).hexdigest()
        page = client.get("/files/resources/videos/DJI_0001.MP4").text
        assert uploaded.sha256 is not None and uploaded.sha256 in page and "compute it" not in page
        assert counting.hashed == []
    finally:
        viewer_source.stop()
        storage.close()


def test_winslow_viewer_serves_storage_given_as_an_ssh_url(tmp_path: Path, sshd: SshServer) -> None:
    world = build_world(tmp_path)
    world.stop()
    port = _free_port()
    log = open(tmp_path / "viewer.log", "wb")
    viewer = subprocess.Popen([sys.executable, "-m", "reconciler", "viewer", "--repo", str(world.remote.remote),
                               "--storage", sshd.url(world.storage), "--port", str(port),
                               "--work", str(tmp_path / "cli-work")],
                              stdout=log, stderr=subprocess.STDOUT, env={**GIT_ENV, **sshd.env()},
                              cwd=Path(__file__).resolve().parents[1])
    base = f"http://127.0.0.1:{port}"
    try:
        import httpx

        def answers() -> bool:
            try:
                return httpx.get(base + "/api/problems", timeout=2).status_code == 200
            except httpx.HTTPError:
                return viewer.poll() is not None  # stop waiting: the assertions below say why
        wait_for(answers, 30, "the viewer to answer")
        assert viewer.poll() is None, (tmp_path / "viewer.log").read_text()
        listing = httpx.get(base + "/api/files/resources").json()
        assert listing["root"] == sshd.url(world.storage)
        assert {e["path"]: e["kind"] for e in listing["entries"]} == {"resources/big.bin": "file",
                                                                       "resources/linkdir": "link"}
        part = httpx.get(base + "/download/resources/big.bin", headers={"Range": "bytes=299990-"})
        assert part.status_code == 206 and part.content == world.big[299_990:]
    finally:
        viewer.terminate()
        try:
            viewer.wait(timeout=15)
        except subprocess.TimeoutExpired:
            viewer.kill()
            viewer.wait(timeout=5)
        log.close()


def test_the_storage_comes_from_the_flag_else_winslow_yaml(tmp_path: Path) -> None:
    assert open_storage(None, None) is None
    assert isinstance(open_storage(str(tmp_path), "/elsewhere"), LocalStorage)
    assert isinstance(open_storage(None, str(tmp_path)), LocalStorage)
    over_ssh = open_storage("ssh://gpu-1/srv/winslow", None)
    assert isinstance(over_ssh, SshStorage) and over_ssh.url == "ssh://gpu-1/srv/winslow"
    assert isinstance(open_storage(None, "ssh://gpu-1/srv/winslow"), SshStorage)
    with pytest.raises(ConfigError, match=r"not a folder on this machine; reach it through a node with "
                                          r"--storage ssh://NODE/no/such/root"):
        open_storage(None, "/no/such/root")
