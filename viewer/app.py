"""The viewer as a Starlette app: every page as HTML and, under /api/, the same data as JSON.

`create_app(source, files, token)` puts it together: the routes below, the static
stylesheet and script, and `security.Guard` in front of everything (GET and HEAD
only, the optional token, the security headers). Each page is one function that
returns plain data (`pages.py`, `overview.py`); `_page` renders it with a template,
`_api` returns it as JSON. The live log is a stream of server-sent events
(`livelog.py`); downloads come from storage with HTTP Range (`files.py`); `/metrics`
is the cluster for Prometheus (`reconciler/metrics.py`).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp

from reconciler import layout
from reconciler.clock import parse_time
from reconciler.errors import StorageError
from reconciler.metrics import ClusterView, cluster_registry
from reconciler.storage import NotFound, clean
from reconciler.units import format_duration, format_size
from reconciler.validation import is_safe_id
from viewer import charts, livelog, nodecharts, pages
from viewer.files import FileDownload, Files, entry_dict
from viewer.overview import NEEDS_ME, PER_PAGE, STATES, Gate, Gates, Query, Row, Rows, needs_me, node_is_lost, select
from viewer.results import media_type, previews
from viewer.security import Guard
from viewer.source import Current, Source

HERE = Path(__file__).resolve().parent
RAW_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; sandbox; frame-ancestors 'none'"
Handler = Callable[[Request], Awaitable[Response]]


class Viewer:
    """What every request reads: the source, storage, and the caches kept between requests."""

    def __init__(self, source: Source, files: Files | None) -> None:
        self.source = source
        self.files = files
        self.rows = Rows()
        self.gates = Gates()
        source.listen(lambda current: self.rows.overview(current.snapshot))  # rows built on the fetch thread
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                                 trim_blocks=True, lstrip_blocks=True)
        env.filters.update(age=_age, size=_size, when=_when, state=_state_class, short=lambda s: (s or "")[:10])
        for name in env.list_templates():  # compiled now, not on the first person's first page
            env.get_template(name)
        self.templates = Jinja2Templates(env=env)

    # -- shared ---------------------------------------------------------------------------------
    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def entry(self, current: Current, project: str) -> Any:
        entry = current.snapshot.projects.get(project) if is_safe_id(project) else None
        if entry is None or not entry.exists:
            raise HTTPException(404, f"no project '{project}' on main")
        return entry

    def render(self, request: Request, template: str, data: dict[str, Any], status: int = 200,
               **extra: Any) -> Response:
        current = self.source.current
        context = {**extra, "data": data, "now": self.now(), "main": current.main, "fetched": current.fetched,
                   "fetch_error": current.fetch_error, "held": current.snapshot.held_config,
                   "problems_count": len(current.snapshot.problems), "path": request.url.path}
        return self.templates.TemplateResponse(request, template, context, status_code=status)

    # -- pages ----------------------------------------------------------------------------------
    def home(self, request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
        current = self.source.current
        query = Query.of(request.query_params)
        overview = self.rows.overview(current.snapshot)
        rows, matching, page_count = select(overview, query)
        nodes = self.source.nodes(current)
        now = self.now()
        sections = needs_me(overview) if not query.filtered and query.page == 1 else {}
        gates = {row.id: self._gate(current, row) for row in sections.get("WAITING", ())}

        def with_node(row: Any) -> dict[str, Any]:
            data = row.to_dict(now)
            if node_is_lost(row, nodes):
                data["node_lost"] = True
            if row.id in gates:
                data["gate"] = gates[row.id].to_dict()
            return data

        page = min(query.page, page_count)
        data = {"projects": [with_node(r) for r in rows], "matching": matching, "total": len(overview.rows),
                "page": page, "pages": page_count, "per_page": PER_PAGE,
                "query": {"state": query.state, "tag": query.tag, "q": query.q},
                "states": overview.states, "tags": overview.tags,
                "needs_me": {state: [with_node(r) for r in sections.get(state, ())] for state in NEEDS_ME}
                if sections else None}
        links = {"prev": query.link(page=page - 1) if page > 1 else None,
                 "next": query.link(page=page + 1) if page < page_count else None,
                 "all_states": STATES, "query": query}
        return data, links

    def _gate(self, current: Current, row: Row) -> Gate:
        return self.source.read(lambda view: self.gates.gate(view, current.snapshot, current.main,
                                                             current.resume_tips, row))

    def project(self, request: Request) -> dict[str, Any]:
        current = self.source.current
        entry = self.entry(current, request.path_params["project"])
        history = self.source.read(lambda view: view.history(entry.id))
        return pages.project_data(entry, current.snapshot, self.source.nodes(current), history, self.now())

    def run(self, request: Request) -> tuple[dict[str, Any], list[Any]]:
        current = self.source.current
        entry = self.entry(current, request.path_params["project"])
        run = entry.status.run(request.path_params["run"])
        if run is None:
            raise HTTPException(404, f"{entry.id} has no run '{request.path_params['run']}'")
        nodes = self.source.nodes(current)
        text, live = livelog.current_log(self.source, current, nodes, entry.id, run)
        manifest = self.source.read(lambda view: view.result(current.main, entry.id, run.id)) if run.done else None
        data = pages.run_data(entry, run, current.snapshot, nodes, self.now(), text, live, manifest)
        shown = previews(self.files, manifest)
        data["previews"] = [p.to_dict() for p in shown]
        return data, shown

    def nodes(self) -> dict[str, Any]:
        current = self.source.current
        views = self.source.nodes(current)
        return {"nodes": [pages.node_data(v, current.snapshot, history=False) for v in views.values()],
                "node_timeout": current.snapshot.config.node_timeout, "lease": current.snapshot.config.lease}

    def node(self, request: Request) -> dict[str, Any]:
        current = self.source.current
        view = self.source.nodes(current).get(request.path_params["node"])
        if view is None:
            raise HTTPException(404, f"no node '{request.path_params['node']}' (no branch "
                                     f"{layout.node_branch(request.path_params['node'])})")
        return pages.node_data(view, current.snapshot)

    def cluster(self) -> ClusterView:
        current = self.source.current
        return ClusterView(current.snapshot, self.source.nodes(current), current.fetched)

    def pipelines(self, only: str | None = None) -> dict[str, Any]:
        snapshot = self.source.current.snapshot
        used: dict[str, int] = {}
        for entry in snapshot.projects.values():
            if entry.project is not None:
                used[entry.project.pipeline] = used.get(entry.project.pipeline, 0) + 1
        names = sorted(set(snapshot.pipelines) | set(snapshot.pipeline_problems))
        if only is not None:
            if only not in names:
                raise HTTPException(404, f"no pipeline '{only}' in {layout.PIPELINES}/")
            names = [only]
        return {"pipelines": [pages.pipeline_data(n, snapshot.pipelines.get(n), snapshot.pipeline_problems.get(n, ()),
                                                  used.get(n, 0)) for n in names]}

    def listing(self, request: Request) -> dict[str, Any]:
        files = self._files()
        relative = _storage_path(request.path_params.get("path", ""))
        hash_big = request.query_params.get("hash") == "1"
        try:
            entry = files.stat(relative, hash=hash_big) if relative else None
            if entry is not None and entry.kind != "dir":
                return {"path": relative, "entry": entry_dict(entry), "entries": None, "root": files.root}
            entries = files.list(relative)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except StorageError as exc:
            raise HTTPException(403, str(exc)) from None
        if not relative:
            entries = [e for e in entries if e.path in layout.STORAGE_FOLDERS]
        return {"path": relative, "entry": None, "entries": [entry_dict(e) for e in entries], "root": files.root}

    def download(self, request: Request, attachment: bool) -> Response:
        files = self._files()
        relative = _storage_path(request.path_params["path"])
        if not relative:
            raise HTTPException(404, "name a file")
        try:
            entry = files.file(relative)
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except StorageError as exc:
            raise HTTPException(403, str(exc)) from None
        kind = media_type(relative) if not attachment else "application/octet-stream"
        if not attachment and not kind.startswith(("image/", "text/")):
            kind = "application/octet-stream"
        return FileDownload(files, entry, kind, request.method, request.headers.get("range"),
                            request.headers.get("if-range"), attachment=attachment, csp=RAW_CSP)

    def _files(self) -> Files:
        if self.files is None:
            raise HTTPException(404, "this viewer was started without storage (--storage ROOT)")
        return self.files


def _storage_path(raw: str) -> str:
    """A path of a URL as a path below the storage root ('' for the root); 403 when it would leave it."""
    try:
        relative = clean(raw.strip("/"))
    except StorageError as exc:
        raise HTTPException(403, str(exc)) from None
    return "" if relative == "." else relative


# -- template filters ------------------------------------------------------------------------------
def _age(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def _size(value: int | None) -> str:
    return "-" if value is None else format_size(int(value))


def _when(value: str | float | None) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    parsed = parse_time(value)
    return parsed.strftime("%Y-%m-%d %H:%M:%S UTC") if parsed else str(value)


def _state_class(state: str | None) -> str:
    return f"state state-{(state or 'none').lower()}"


# -- routes --------------------------------------------------------------------------------------
def create_app(source: Source, files: Files | None, token: str | None = None) -> ASGIApp:
    viewer = Viewer(source, files)
    registry = cluster_registry(viewer.cluster)

    async def home(request: Request) -> Response:
        data, links = await _thread(viewer.home, request)
        return viewer.render(request, "home.html", data, links=links)

    async def api_projects(request: Request) -> Response:
        data, _ = await _thread(viewer.home, request)
        return JSONResponse(data)

    async def project(request: Request) -> Response:
        data = await _thread(viewer.project, request)
        bars = [charts.Bar(r["id"], r["id"], r["state"], r.get("started") or r.get("claimed"), r.get("finished")
                           if r["state"] != "RUNNING" else None, _bar_detail(r),
                           f"/projects/{data['project']}/runs/{r['id']}") for r in data["runs"]]
        return viewer.render(request, "project.html", dict(data, timeline=charts.timeline(bars, viewer.now())))

    async def api_project(request: Request) -> Response:
        return JSONResponse(await _thread(viewer.project, request))

    async def api_runs(request: Request) -> Response:
        data = await _thread(viewer.project, request)
        return JSONResponse({"project": data["project"], "runs": data["runs"]})

    async def run(request: Request) -> Response:
        data, _ = await _thread(viewer.run, request)
        return viewer.render(request, "run.html", data)

    async def api_run(request: Request) -> Response:
        data, _ = await _thread(viewer.run, request)
        return JSONResponse(data)

    async def api_log(request: Request) -> Response:
        data, _ = await _thread(viewer.run, request)
        return JSONResponse({"project": data["project"], "run": data["run"]["id"], "state": data["run"]["state"],
                             "live": data["live"], "source": data["log_source"], "text": data["log"]})

    async def log_text(request: Request) -> Response:
        data, _ = await _thread(viewer.run, request)
        return PlainTextResponse(data["log"] or "")

    async def log_stream(request: Request) -> Response:
        current = source.current
        entry = viewer.entry(current, request.path_params["project"])
        if entry.status.run(request.path_params["run"]) is None:
            raise HTTPException(404, f"{entry.id} has no run '{request.path_params['run']}'")
        if request.method == "HEAD":  # the headers only: a stream would last as long as the run
            return Response(media_type="text/event-stream", headers={"cache-control": "no-store"})
        return livelog.stream(source, entry.id, request.path_params["run"])

    async def files_page(request: Request) -> Response:
        data = await _thread(viewer.listing, request)
        return viewer.render(request, "files.html", data)

    async def api_files(request: Request) -> Response:
        return JSONResponse(await _thread(viewer.listing, request))

    async def download(request: Request) -> Response:
        return await run_in_threadpool(viewer.download, request, True)

    async def raw(request: Request) -> Response:
        return await run_in_threadpool(viewer.download, request, False)

    async def nodes(request: Request) -> Response:
        data = await _thread(lambda _: viewer.nodes(), request)
        return viewer.render(request, "nodes.html", data)

    async def api_nodes(request: Request) -> Response:
        return JSONResponse(await _thread(lambda _: viewer.nodes(), request))

    async def node(request: Request) -> Response:
        data = await _thread(viewer.node, request)
        return viewer.render(request, "node.html", dict(data, charts=nodecharts.charts(data)))

    async def api_node(request: Request) -> Response:
        return JSONResponse(await _thread(viewer.node, request))

    async def pipelines(request: Request) -> Response:
        only = request.path_params.get("name")
        data = await _thread(lambda _: viewer.pipelines(only), request)
        return viewer.render(request, "pipelines.html", data)

    async def api_pipelines(request: Request) -> Response:
        only = request.path_params.get("name")
        return JSONResponse(await _thread(lambda _: viewer.pipelines(only), request))

    async def problems(request: Request) -> Response:
        return viewer.render(request, "problems.html", pages.problems_data(source.current.snapshot))

    async def api_problems(request: Request) -> Response:
        return JSONResponse(pages.problems_data(source.current.snapshot))

    async def metrics(request: Request) -> Response:
        return Response(await run_in_threadpool(generate_latest, registry), media_type=CONTENT_TYPE_PLAIN_0_0_4)

    async def error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if request.url.path.startswith("/api/") or request.url.path.startswith("/download/"):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return viewer.render(request, "error.html", {"status": exc.status_code, "detail": exc.detail},
                             status=exc.status_code)

    get = ["GET", "HEAD"]
    routes: list[BaseRoute] = [
        Route("/", home, methods=get),
        Route("/projects/{project}", project, methods=get),
        Route("/projects/{project}/runs/{run}", run, methods=get),
        Route("/projects/{project}/runs/{run}/log", log_text, methods=get),
        Route("/projects/{project}/runs/{run}/log/stream", log_stream, methods=get),
        Route("/files", files_page, methods=get),
        Route("/files/{path:path}", files_page, methods=get),
        Route("/download/{path:path}", download, methods=get),
        Route("/raw/{path:path}", raw, methods=get),
        Route("/nodes", nodes, methods=get),
        Route("/nodes/{node}", node, methods=get),
        Route("/pipelines", pipelines, methods=get),
        Route("/pipelines/{name}", pipelines, methods=get),
        Route("/problems", problems, methods=get),
        Route("/metrics", metrics, methods=get),
        Route("/api/projects", api_projects, methods=get),
        Route("/api/projects/{project}", api_project, methods=get),
        Route("/api/projects/{project}/runs", api_runs, methods=get),
        Route("/api/projects/{project}/runs/{run}", api_run, methods=get),
        Route("/api/projects/{project}/runs/{run}/log", api_log, methods=get),
        Route("/api/files", api_files, methods=get),
        Route("/api/files/{path:path}", api_files, methods=get),
        Route("/api/nodes", api_nodes, methods=get),
        Route("/api/nodes/{node}", api_node, methods=get),
        Route("/api/pipelines", api_pipelines, methods=get),
        Route("/api/pipelines/{name}", api_pipelines, methods=get),
        Route("/api/problems", api_problems, methods=get),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: error})
    return Guard(app, token)


async def _thread(work: Callable[[Request], Any], request: Request) -> Any:
    """Page data is built on a worker thread: reading git or storage must not hold up the event loop."""
    return await run_in_threadpool(work, request)


def _bar_detail(run: dict[str, Any]) -> str:
    parts = [f"{run['id']}: {run['state']}", f"node {run.get('node') or '-'}"]
    if run.get("gpus"):
        parts.append("GPUs " + ",".join(map(str, run["gpus"])))
    if run.get("duration_seconds") is not None:
        parts.append(format_duration(run["duration_seconds"]))
    if run.get("exit_code") is not None:
        parts.append(f"exit {run['exit_code']}")
    if run.get("reason"):
        parts.append(run["reason"])
    return ", ".join(parts)
