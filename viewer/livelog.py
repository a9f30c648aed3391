"""A run's log as the viewer shows it: live from its node's branch while it runs, then the final log.

While a run is RUNNING its node carries the tail of its log on `winslow/nodes/<node>`
(`NodeInfo.runs[].log_tail`, pushed within about a second of the stage writing it).
The run page follows it through server-sent events from `stream()`:

    event: reset    data: {"text": ...}    the whole tail, at the start (and after a reconnect)
    event: append   data: {"text": ...}    what the tail gained since (`logs.new_text`)
    event: end      data: {"state": ..., "exit_code": ..., "reason": ..., "text": <the final log>}

Each event is sent when the viewer's mirror has read something new (the source wakes
the stream), never on a timer; a comment line every 15 s keeps proxies from closing
an idle stream. After `end` the stream closes and the page shows the final log from
main in place of the tail, without a reload.
"""
from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping

from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from reconciler.commands.logs import new_text
from reconciler.model import Run, RunState
from reconciler.repoview import NodeView
from reconciler.validation import is_safe_id
from viewer.source import Current, Source

KEEP_ALIVE_S = 15.0


def live_tail(nodes: Mapping[str, NodeView], project: str, run: Run) -> str | None:
    """The tail the run's node carries for it; None when the node's branch has none (yet)."""
    if not run.node or not is_safe_id(run.node):
        return None
    view = nodes.get(run.node)
    entry = view.info.run(project, run.id) if view is not None and view.info is not None else None
    return entry.log_tail if entry is not None else None


def final_log(source: Source, current: Current, project: str, run: Run) -> str | None:
    return source.read(lambda view: view.final_log(current.main, project, run.id))


def current_log(source: Source, current: Current, nodes: Mapping[str, NodeView], project: str,
                run: Run) -> tuple[str | None, bool]:
    """The log to show now and whether it is the live tail."""
    if run.state is RunState.RUNNING:
        return live_tail(nodes, project, run) or "", True
    return final_log(source, current, project, run), False


def _event(name: str, data: Mapping[str, object]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def stream(source: Source, project: str, run_id: str) -> StreamingResponse:
    return StreamingResponse(_events(source, project, run_id), media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})


async def _events(source: Source, project: str, run_id: str) -> AsyncIterator[str]:
    shown: str | None = None
    version = -1
    while True:
        current = source.current
        if current.version != version:
            version = current.version
            entry = current.snapshot.projects.get(project)
            run = entry.status.run(run_id) if entry is not None else None
            if run is None:
                yield _event("end", {"state": None, "text": f"run {run_id} is gone from {project}'s status"})
                return
            if run.done:
                text = await run_in_threadpool(final_log, source, current, project, run)
                yield _event("end", {"state": run.state.value, "exit_code": run.exit_code, "reason": run.reason,
                                     "finished": run.finished,
                                     "text": text if text is not None else "(no final log on main)"})
                return
            nodes = await run_in_threadpool(source.nodes, current)
            tail = live_tail(nodes, project, run)
            if tail is not None:
                if shown is None:
                    yield _event("reset", {"text": tail})
                else:
                    added = new_text(shown, tail)
                    if added:
                        yield _event("append", {"text": added})
                shown = tail
        if not await source.changed(version, KEEP_ALIVE_S):
            yield ": still here\n\n"
