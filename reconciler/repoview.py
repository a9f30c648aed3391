"""The one read path into the state repo: what the node, the CLI and the viewer all read through.

`RepoView` turns a ref of a git repository (a node's mirror, a user's clone, the
viewer's clone) or a folder on disk into the typed model: a `Snapshot` of main,
every node's heartbeat document (`NodeInfo`) with how long ago it was heard
from, result manifests, final logs, and each project's history of requests.

It only reads. It imports nothing that writes to git, nothing of the node's loop,
and nothing of the executors (a test checks which modules importing it loads).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler import layout
from reconciler.errors import GitError, InvalidFile
from reconciler.gitread import Change, GitReader
from reconciler.model import NodeInfo, ResultManifest
from reconciler.snapshot import ProjectEntry, Snapshot
from reconciler.state import DirectoryTree, StateReader
from reconciler.yamlsafe import parse_yaml

log = logging.getLogger("winslow.repoview")


@dataclass(frozen=True)
class NodeView:
    """A node as a reader sees it: its document, and how long ago it was last heard from."""

    name: str
    info: NodeInfo | None      # None: the branch has no readable node document
    tip: str
    heard_ago: float | None    # seconds since the heartbeat, on the reader's clock; None: unknown
    lost: bool                 # silent for longer than the node timeout

    @property
    def state(self) -> str:
        if self.lost:
            return "lost"
        return "draining" if self.info is not None and self.info.drain else "ready"


@dataclass(frozen=True)
class RequestChange:
    """One commit on main that changed a project's project.yaml, with the request it asked for."""

    commit: str
    author: str
    email: str
    time: str
    subject: str
    request: int | None
    state: str | None
    from_stage: str | None


class RepoView:
    """Reads the state repo from a git repository (`git`) or from a folder on disk (`folder`)."""

    def __init__(self, git: GitReader | None = None, folder: Path | None = None, results: bool = False) -> None:
        if (git is None) == (folder is None):
            raise ValueError("RepoView reads either a git repository or a folder")
        self.git = git
        self.folder = Path(folder) if folder is not None else None
        self.results = results
        self._reader = StateReader(include_results=results, earlier_configs=self._earlier_configs)
        self._seen: dict[str, tuple[str, float]] = {}  # node -> (branch tip, monotonic time it was first seen)
        self._docs: dict[str, tuple[str, bytes | None, NodeInfo | None]] = {}  # node -> (branch tip, file, document)

    @classmethod
    def of_repository(cls, path: Path, results: bool = False) -> RepoView:
        return cls(git=GitReader(path), results=results)

    @property
    def projects_read(self) -> int:
        """Project entries built so far (unchanged projects are carried over, not built again)."""
        return self._reader.projects_read

    @property
    def last(self) -> Snapshot | None:
        """The snapshot read last."""
        return self._reader.last

    # -- main ---------------------------------------------------------------------------------
    def tip(self, rev: str = layout.ORIGIN_MAIN) -> str | None:
        return self.git.resolve(rev) if self.git is not None else None

    def snapshot(self, commit: str | None = None) -> Snapshot:
        """Main (or `commit`) as the typed model; only files changed since the last call are parsed again."""
        if self.git is None:
            assert self.folder is not None
            return self._reader.read(DirectoryTree(self.folder))
        commit = commit or self.tip()
        if commit is None:
            raise GitError(f"{self.git.path} has no {layout.ORIGIN_MAIN.removeprefix('refs/remotes/')} yet")
        return self._reader.read(self.git.tree(commit, self.results), commit)

    def project(self, project: str, commit: str | None = None) -> tuple[ProjectEntry | None, Snapshot]:
        """One project read on its own (its files, the pipelines and winslow.yaml), however many others there are.

        Returns the entry (None when the repo has no such project folder) and the small snapshot it came from.
        """
        if self.git is None:
            snapshot = self.snapshot()
        else:
            commit = commit or self.tip()
            if commit is None:
                raise GitError(f"{self.git.path} has no {layout.ORIGIN_MAIN.removeprefix('refs/remotes/')} yet")
            paths = (layout.CONFIG, layout.PIPELINES, layout.project_dir(project))
            snapshot = StateReader(self.results, self._earlier_configs).read(self.git.subtree(commit, paths, self.results),
                                                                       commit)
        return snapshot.projects.get(project), snapshot

    def _earlier_configs(self, commit: str) -> list[tuple[str, bytes | None]]:
        return self.git.versions(commit, layout.CONFIG) if self.git is not None else []

    def project_ids(self, commit: str | None = None) -> list[str]:
        """The project folders on main, without reading any of them."""
        if self.git is None:
            return sorted(self.snapshot().projects)
        commit = commit or self.tip()
        if commit is None:
            return []
        try:
            return sorted(self.git.git("ls-tree", "--name-only", f"{commit}:{layout.PROJECTS}").split())
        except GitError:  # no projects/ folder at all
            return []

    def file(self, commit: str, path: str) -> bytes | None:
        if self.git is not None:
            return self.git.read(commit, path)
        assert self.folder is not None
        try:
            return DirectoryTree(self.folder).read(path)
        except OSError:
            return None

    def final_log(self, commit: str, project: str, run_id: str) -> str | None:
        raw = self.file(commit, layout.log_file(project, run_id))
        return raw.decode("utf-8", "replace") if raw is not None else None

    def result(self, commit: str, project: str, run_id: str) -> ResultManifest | None:
        data = self._yaml(commit, layout.result_file(project, run_id))
        return ResultManifest.from_dict(data) if isinstance(data, dict) else None

    def history(self, project: str, rev: str = layout.ORIGIN_MAIN, limit: int = 50) -> list[RequestChange]:
        """Who asked for what and when: the commits that changed the project's project.yaml, newest first."""
        if self.git is None:
            return []
        changes = []
        for change in self.git.history(rev, layout.project_file(project), limit):
            run = self._run_section(change, project)
            changes.append(RequestChange(change.commit, change.author, change.email, change.time, change.subject,
                                         _int(run.get("request")), _str(run.get("state")), _str(run.get("from"))))
        return changes

    def _run_section(self, change: Change, project: str) -> dict[str, Any]:
        data = self._yaml(change.commit, layout.project_file(project), quiet=True)
        run = data.get("run") if isinstance(data, dict) else None
        return run if isinstance(run, dict) else {}

    # -- node branches ------------------------------------------------------------------------
    def node_tips(self) -> dict[str, str]:
        if self.git is None:
            return {}
        return {ref[len(layout.ORIGIN_NODES):]: sha for ref, sha in self.git.refs(layout.ORIGIN_NODES).items()}

    def resume_branches(self) -> frozenset[str]:
        if self.git is None:
            return frozenset()
        return frozenset(ref[len(layout.ORIGIN):] for ref in self.git.refs(layout.ORIGIN_RESUMES))

    def node(self, name: str, tip: str) -> NodeInfo | None:
        """The node document on a commit of the node's branch; None when missing or unreadable."""
        return self._node_document(name, tip, self.file(tip, layout.node_file(name)))

    def _node_document(self, name: str, tip: str, raw: bytes | None) -> NodeInfo | None:
        if raw is None:
            return None
        try:
            data = parse_yaml(raw, layout.node_file(name)).data
        except InvalidFile as exc:
            log.debug("%s at %s is unreadable: %s", layout.node_file(name), tip[:10], exc)
            return None
        if not isinstance(data, dict) or "name" not in data:
            return None
        try:
            return NodeInfo.from_dict(data)
        except Exception as exc:  # noqa: BLE001 - another node's broken file is that node's problem, never the reader's
            log.warning("node %s: unreadable heartbeat: %s", name, exc)
            return None

    def nodes(self, timeout: float, tips: Mapping[str, str] | None = None,
              trust_commit_time: bool = True, clock: Callable[[], float] = time.monotonic) -> dict[str, NodeView]:
        """Every node with a branch, and whether it is alive, judged on this reader's own clocks.

        A reader that has watched a branch judges by when it last saw the tip move, on its
        monotonic clock: no clock synchronisation is assumed. A tip seen for the first time
        counts as just moved, unless `trust_commit_time` (a one-shot reader such as
        `winslow status`, which has nothing else to go by): then the heartbeat commit's
        time is compared with this machine's clock. `clock` measures the silence: a node
        passes one that runs only while its own fetches succeed (liveness.ConnectedClock).
        """
        now_mono, now_wall = clock(), time.time()
        views = {}
        for name, tip in sorted((self.node_tips() if tips is None else tips).items()):
            seen = self._seen.get(name)
            if seen is None or seen[0] != tip:
                moved = now_mono
                if seen is None and trust_commit_time and self.git is not None:
                    committed = self.git.committed(tip)
                    if committed is not None:
                        moved -= max(0.0, now_wall - committed)
                seen = self._seen[name] = (tip, moved)
            ago = now_mono - seen[1]
            views[name] = NodeView(name, self._node_info(name, tip), tip, ago, ago >= timeout)
        return views

    def _node_info(self, name: str, tip: str) -> NodeInfo | None:
        """The node's document, read once per heartbeat tip and parsed only when it changed (most beats move
        only the tick); the last good one when the new one is unreadable."""
        known = self._docs.get(name)
        if known is not None and known[0] == tip:
            return known[2]
        raw = self.file(tip, layout.node_file(name))
        if known is not None and raw is not None and raw == known[1]:
            info = known[2]
        else:
            info = self._node_document(name, tip, raw)
            if info is None and known is not None:
                info = known[2]
        self._docs[name] = (tip, raw, info)
        return info

    # -- helpers ------------------------------------------------------------------------------
    def _yaml(self, commit: str, path: str, quiet: bool = False) -> Any:
        raw = self.file(commit, path)
        if raw is None:
            return None
        try:
            return parse_yaml(raw, path).data
        except InvalidFile as exc:
            if not quiet:
                log.debug("%s at %s is unreadable: %s", path, commit[:10], exc)
            return None

    def close(self) -> None:
        if self.git is not None:
            self.git.close()


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
