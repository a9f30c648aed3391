"""Reading a state repo into a snapshot of the model.

The same code reads a folder on disk (`winslow validate`) and a commit of a
git repo (the reconciler, the viewer). Parsed files are cached by their
content id (a blob sha, or mtime and size on disk), so a reconcile cycle
after a commit rereads only the files that commit changed.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from reconciler import layout
from reconciler.errors import InvalidFile, Problem
from reconciler.model import Build, ClusterConfig, Pipeline, Project, Status
from reconciler.snapshot import HeldConfig, ProjectEntry, Snapshot
from reconciler.validation import (
    read_builds,
    read_config,
    read_lock,
    read_pipeline,
    read_project,
    read_result,
    read_status,
)
from reconciler.yamlsafe import MAX_FILE_BYTES, Document, parse_yaml

# Earlier versions of winslow.yaml before a commit, newest first: (commit, its bytes, or None where it was absent).
EarlierConfigs = Callable[[str], Iterable[tuple[str, bytes | None]]]


class Tree(Protocol):
    def entries(self) -> Mapping[str, str]:
        """Every file path (POSIX, relative to the repo root) with an id that changes with its content."""

    def read(self, path: str) -> bytes: ...


class DirectoryTree:
    """A state repo checked out in a folder (or any folder being validated)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._base = os.fspath(self.root)

    def entries(self) -> dict[str, str]:
        found: dict[str, str] = {}
        config = self.root / layout.CONFIG
        if config.is_file():
            found[layout.CONFIG] = _stamp(os.lstat(config))
        for top in (layout.PIPELINES, layout.PROJECTS, layout.IMAGES, layout.BUILDS):
            folders = [(top, 1)]
            while folders:  # top-down, like os.walk, without following links into folders
                folder, depth = folders.pop()
                try:
                    listing = list(os.scandir(os.path.join(self._base, folder)))
                except OSError:
                    continue
                below = []
                for entry in listing:
                    name = entry.name
                    try:
                        is_dir = entry.is_dir()
                    except OSError:
                        is_dir = False
                    if is_dir:
                        # Logs are plain text: projects/<id>/logs is never YAML to check.
                        if not entry.is_symlink() and not name.startswith(".") and not (depth == 2 and name == layout.LOGS):
                            below.append((f"{folder}/{name}", depth + 1))
                    elif layout.is_state_file(f"{folder}/{name}", results=True):
                        found[f"{folder}/{name}"] = _stamp(entry.stat(follow_symlinks=False))
                folders.extend(reversed(below))
        return found

    def read(self, path: str) -> bytes:
        """A regular file's bytes; never follows a link out, never blocks on a FIFO, never reads a huge file whole."""
        full = os.path.join(self._base, path)
        info = os.lstat(full)
        if stat.S_ISLNK(info.st_mode):
            raise OSError(f"{path} is a symbolic link; state repo files must be regular files")
        if not stat.S_ISREG(info.st_mode):
            raise OSError(f"{path} is not a regular file")
        # Swapped for a link or a FIFO since the lstat, it still cannot lead out (O_NOFOLLOW) or hang (O_NONBLOCK).
        fd = os.open(full, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise OSError(f"{path} is not a regular file")
            return _read_at_most(fd, MAX_FILE_BYTES + 1, info.st_size)
        finally:
            os.close(fd)


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def _read_at_most(fd: int, limit: int, size: int) -> bytes:
    """Up to `limit` bytes, asking for the size the file has (a buffer of `limit` for every file is slow)."""
    chunks = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(left, max(size + 1, 64 * 1024)))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _stamp(info: os.stat_result) -> str:
    return f"{info.st_mtime_ns}:{info.st_size}:{info.st_mode}"


class _Parsed:
    __slots__ = ("value", "problems")

    def __init__(self, value: Any, problems: list[Problem]) -> None:
        self.value = value
        self.problems = problems


class StateReader:
    """Builds snapshots, reparsing only files whose content id changed.

    Given a tree that says which files changed since the commit read last (a
    `gitread.GitTree` listed as a difference), only the projects those files belong
    to are read again; every other project keeps its `ProjectEntry` object, so a
    reader can tell an unchanged project by identity. A change to winslow.yaml or a
    pipeline reads everything (their meaning reaches every project).
    """

    def __init__(self, include_results: bool = False, earlier_configs: EarlierConfigs | None = None) -> None:
        self.include_results = include_results
        self.earlier_configs = earlier_configs
        self._held: tuple[str, HeldConfig, ClusterConfig] | None = None  # (commit:content id, held, in force)
        self._cache: dict[tuple[str, str], tuple[str, _Parsed]] = {}  # (path, kind) -> (content id, parsed)
        # project.yaml -> (key: content id, pipeline id, lock id), its meaning, the pipeline it names
        self._meaning: dict[str, tuple[tuple[object, ...], tuple[Project | None, list[Problem]], str | None]] = {}
        self._pipelines_by_content: dict[str, Pipeline] = {}  # locks of one pipeline share one Pipeline
        self._general: list[Problem] = []                      # winslow.yaml's and the pipelines' problems
        self._misplaced: dict[str, Problem] = {}
        self._project_problems: dict[str, list[Problem]] = {}  # only projects that have problems
        self.last: Snapshot | None = None
        self.projects_read = 0  # project entries built so far: a reader can tell a large read from a small one

    def _load(self, tree: Tree, path: str, reader: Callable[[Document], tuple[Any, list[Problem]]]) -> _Parsed:
        try:
            value, problems = reader(parse_yaml(tree.read(path), path))
        except InvalidFile as exc:
            value, problems = None, list(exc.problems)
        except OSError as exc:
            value, problems = None, [Problem(path, 1, 1, f"cannot read: {exc.strerror or exc}")]
        except Exception as exc:  # noqa: BLE001 - a model that cannot be built is that file's problem, never a crash
            value, problems = None, [Problem(path, 1, 1, f"cannot use this file: {exc}")]
        return _Parsed(value, problems)

    def _parse(self, tree: Tree, path: str, key: str, kind: str,
               reader: Callable[[Document], tuple[Any, list[Problem]]]) -> _Parsed:
        hit = self._cache.get((path, kind))
        if hit is not None and hit[0] == key:
            return hit[1]
        parsed = self._load(tree, path, reader)
        self._cache[(path, kind)] = (key, parsed)
        return parsed

    def read(self, tree: Tree, commit: str | None = None) -> Snapshot:
        with _collector_paused():
            changed = getattr(tree, "changed", None)
            last = self.last
            if changed is not None and not changed and last is not None and last.commit == commit is not None:
                return last
            if (changed is not None and last is not None and last.commit is not None
                    and last.commit == getattr(tree, "base", None) and not self.include_results
                    and not any(p == layout.CONFIG or p.startswith((layout.PIPELINES + "/", layout.IMAGES + "/",
                                                                    layout.BUILDS + "/")) for p in changed)):
                self.last = self._read_changes(tree, commit, last, changed)
            else:
                self.last = self._read(tree, commit)
            return self.last

    def _read(self, tree: Tree, commit: str | None) -> Snapshot:
        entries = tree.entries()
        self._general = []
        config = ClusterConfig()
        held = None
        if layout.CONFIG in entries:
            parsed = self._parse(tree, layout.CONFIG, entries[layout.CONFIG], "winslow", read_config)
            self._general += parsed.problems
            if parsed.value is not None and not parsed.problems:
                config = parsed.value
            else:
                held, config = self._held_config(entries[layout.CONFIG], parsed.problems, commit)
        self._misplaced = {problem.path: problem for problem in _misplaced(entries)}
        pipelines, pipeline_problems = self._pipelines(tree, entries)
        for pipeline_found in pipeline_problems.values():
            self._general += pipeline_found
        projects: dict[str, ProjectEntry] = {}
        self._project_problems = {}
        for project_id, files in _group_projects(entries).items():
            entry, found = self._project(tree, entries, project_id, files, pipelines)
            self.projects_read += 1
            projects[project_id] = entry
            if found:
                self._project_problems[project_id] = found
        for stale in [key for key in self._cache if key[0] not in entries]:
            del self._cache[stale]
        for stale_path in [path for path in self._meaning if path not in entries]:
            del self._meaning[stale_path]
        sources = image_sources(entries)
        self._general += _unknown_images(tree, pipelines, sources)
        builds: dict[str, tuple[Build, ...]] = {}
        for path in sorted(p for p in entries if p.startswith(layout.BUILDS + "/") and p.endswith(".yaml")
                           and p.count("/") == 1):
            parsed = self._parse(tree, path, entries[path], "build", read_builds)
            self._general += parsed.problems
            if parsed.value is not None:
                builds[path[len(layout.BUILDS) + 1:-len(".yaml")]] = parsed.value
        return Snapshot(commit, config, pipelines, projects, self._problems(), len(entries), pipeline_problems,
                        held_config=held, image_sources=sources, builds=builds)

    def _held_config(self, key: str, problems: list[Problem], commit: str | None) -> tuple[HeldConfig, ClusterConfig]:
        """The settings in force while winslow.yaml is invalid: those of its last valid version, never looser
        defaults. Every node finds the same one in the history of main, however long it has been running."""
        if self._held is not None and self._held[0] == f"{commit}:{key}":
            return self._held[1], self._held[2]
        source, absent, config = None, False, ClusterConfig()
        for earlier, data in (self.earlier_configs(commit) if self.earlier_configs and commit else ()):
            if data is None:  # no winslow.yaml at that commit: the defaults were in force
                source, absent = earlier, True
                break
            try:
                value, found = read_config(parse_yaml(data, layout.CONFIG))
            except InvalidFile:
                continue
            if value is not None and not found:
                source, config = earlier, value
                break
        held = HeldConfig(tuple(sorted(problems)), source, absent)
        self._held = (f"{commit}:{key}", held, config)
        return held, config

    def _read_changes(self, tree: Tree, commit: str | None, last: Snapshot, changed: frozenset[str]) -> Snapshot:
        """`last` with the projects that `changed` touches read again; nothing else is looked at."""
        entries = tree.entries()
        projects = dict(last.projects)
        affected: set[str] = set()
        for path in changed:
            self._misplaced.pop(path, None)
            if path in entries:
                self._misplaced.update((problem.path, problem) for problem in _misplaced((path,)))
            else:
                for kind in _KINDS:
                    self._cache.pop((path, kind), None)
                self._meaning.pop(path, None)
            project_id = layout.project_of(path)
            if project_id is not None:
                affected.add(project_id)
        added = False
        for project_id in affected:
            self._project_problems.pop(project_id, None)
            if not _has_files(entries, project_id):
                projects.pop(project_id, None)
                continue
            added = added or project_id not in projects
            entry, found = self._project(tree, entries, project_id, [], last.pipelines)
            self.projects_read += 1
            projects[project_id] = entry
            if found:
                self._project_problems[project_id] = found
        if added:  # every node must see projects in the same order: placement goes by it
            projects = dict(sorted(projects.items()))
        return Snapshot(commit, last.config, last.pipelines, projects, self._problems(), len(entries),
                        last.pipeline_problems, last.held_config, last.image_sources, last.builds, base=last.commit,
                        changed=frozenset(affected))

    def _problems(self) -> tuple[Problem, ...]:
        found = list(self._general) + list(self._misplaced.values())
        for problems in self._project_problems.values():
            found += problems
        return tuple(sorted(found))

    def _pipelines(self, tree: Tree, entries: Mapping[str, str]
                   ) -> tuple[dict[str, Pipeline | None], dict[str, tuple[Problem, ...]]]:
        pipelines: dict[str, Pipeline | None] = {}
        problems: dict[str, tuple[Problem, ...]] = {}
        for path in sorted(p for p in entries if p.startswith(layout.PIPELINES + "/") and p.count("/") == 1):
            stem = path[len(layout.PIPELINES) + 1:].rsplit(".", 1)[0]
            if path.endswith(".yml"):
                problems[stem] = (Problem(path, 1, 1, "pipelines must be named .yaml, not .yml"),)
                continue
            parsed = self._parse(tree, path, entries[path], "pipeline", functools.partial(read_pipeline, stem=stem))
            pipelines[stem] = parsed.value
            if parsed.problems:
                problems[stem] = tuple(parsed.problems)
        return pipelines, problems

    def _read_lock(self, doc: Document) -> tuple[tuple[int, Pipeline] | None, list[Problem]]:
        """A lock, its pipeline shared with every other lock of the same pipeline content."""
        value, problems = read_lock(doc)
        if value is None:
            return value, problems
        request, pipeline = value
        content = json.dumps(pipeline.source, sort_keys=True, default=str)
        return (request, self._pipelines_by_content.setdefault(content, pipeline)), problems

    def _project(self, tree: Tree, entries: Mapping[str, str], project_id: str, files: list[str],
                 pipelines: Mapping[str, Pipeline | None]) -> tuple[ProjectEntry, list[Problem]]:
        base = layout.project_dir(project_id) + "/"
        problems: list[Problem] = []
        status = Status()
        status_path = layout.status_file(project_id)
        if status_path in entries:
            parsed = self._parse(tree, status_path, entries[status_path], "status", lambda doc: read_status(doc, project_id))
            problems += parsed.problems
            status = parsed.value or status
        lock, lock_request = None, 0
        lock_path = layout.lock_file(project_id)
        if lock_path in entries:
            parsed = self._parse(tree, lock_path, entries[lock_path], "pipeline-lock", self._read_lock)
            problems += parsed.problems
            if parsed.value:
                lock_request, lock = parsed.value
        if self.include_results:
            for path in files:
                if path.startswith(base + layout.RESULTS + "/"):
                    problems += self._parse(tree, path, entries[path], "result",
                                            lambda doc: (None, read_result(doc, project_id))).problems
        if base + "project.yml" in entries:
            problems.append(Problem(base + "project.yml", 1, 1, "a project file must be named project.yaml, not .yml"))
        project_path = layout.project_file(project_id)
        if project_path not in entries:
            return ProjectEntry(project_id, None, status, lock, lock_request, (), exists=False), problems
        project, own = self._project_file(tree, entries, project_path, project_id, pipelines, lock, lock_request)
        return ProjectEntry(project_id, project, status, lock, lock_request, tuple(own)), problems + own

    def _project_file(self, tree: Tree, entries: Mapping[str, str], path: str, project_id: str,
                      pipelines: Mapping[str, Pipeline | None], lock: Pipeline | None,
                      lock_request: int) -> tuple[Project | None, list[Problem]]:
        """project.yaml's meaning depends on its pipeline and lock too: both are part of the cache key.

        The parsed document is not kept (its positions are most of its size); a change of
        pipeline or lock parses the file again.
        """
        content = entries[path]
        lock_key = entries.get(layout.lock_file(project_id))
        known = self._meaning.get(path)
        if known is not None and known[0][0] == content:
            if known[0] == (content, _pipeline_key(known[2], entries, pipelines), lock_key):
                return known[1]
        parsed = self._load(tree, path, lambda doc: (doc, []))
        if parsed.value is None:
            return None, parsed.problems
        doc: Document = parsed.value
        name = doc.data.get("pipeline") if isinstance(doc.data, dict) else None
        name = name if isinstance(name, str) else None
        meaning = read_project(doc, project_id, pipelines, lock, lock_request)
        self._meaning[path] = ((content, _pipeline_key(name, entries, pipelines), lock_key), meaning, name)
        return meaning


_KINDS = ("winslow", "pipeline", "status", "pipeline-lock", "result", "build")


def _pipeline_key(name: str | None, entries: Mapping[str, str], pipelines: Mapping[str, Pipeline | None]) -> object:
    """What a project's meaning depends on of the pipelines: its own pipeline's file, or which ones exist."""
    found = entries.get(layout.pipeline_file(name)) if name is not None else None
    return found if found is not None else tuple(sorted(pipelines))


def _has_files(entries: Mapping[str, str], project_id: str) -> bool:
    if any(path in entries for path in (layout.project_file(project_id), layout.status_file(project_id),
                                        layout.lock_file(project_id))):
        return True
    prefix = layout.project_dir(project_id) + "/"
    return any(path.startswith(prefix) for path in entries)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Reading builds a great many small acyclic objects; the cyclic collector would rescan them again and
    again (a sixth of `winslow validate` on 10,000 projects). Reference counting still frees them as usual."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _misplaced(entries: Iterable[str]) -> list[Problem]:
    """YAML files where Winslow never looks: without a word they would seem to be read and fine."""
    problems = []
    for path in entries:
        if not path.endswith((".yaml", ".yml")):
            continue
        name = path.rsplit("/", 1)[-1]
        stem = name.rsplit(".", 1)[0]
        if path.startswith(layout.PIPELINES + "/") and path.count("/") > 1:
            problems.append(Problem(path, 1, 1, f"not read: pipelines are read only from files directly in "
                                                f"pipelines/ (move it to pipelines/{name})"))
        elif path.startswith(layout.PROJECTS + "/") and path.count("/") == 1:
            problems.append(Problem(path, 1, 1, f"not read: a project is a folder with a project.yaml "
                                                f"(move it to projects/{stem}/project.yaml)"))
    return problems


def image_sources(entries: Mapping[str, str]) -> dict[str, str]:
    """images/NAME/ -> its content id: a hash of its files' paths and blob ids, the same on every node that reads
    the same commit. Only a folder with a Dockerfile is an image."""
    grouped: dict[str, list[str]] = {}
    for path in entries:
        name = layout.image_of(path)
        if name is not None and layout.is_image_name(name):
            grouped.setdefault(name, []).append(path)
    return {name: hashlib.sha256("".join(f"{path}\0{entries[path]}\n" for path in sorted(paths)).encode()).hexdigest()[:24]
            for name, paths in sorted(grouped.items()) if f"{layout.image_dir(name)}/Dockerfile" in entries}


def _unknown_images(tree: Tree, pipelines: Mapping[str, Pipeline | None], sources: Mapping[str, str]) -> list[Problem]:
    """A stage that builds from an image folder main does not have, said at its line of the pipeline file."""
    problems = []
    for stem, pipeline in pipelines.items():
        missing = [name for name in pipeline.builds if name not in sources] if pipeline else []
        if not missing:
            continue
        path = f"{layout.PIPELINES}/{stem}.yaml"
        try:
            lines = tree.read(path).decode(errors="replace").splitlines()
        except OSError:
            lines = []
        for name in missing:
            line = next((n for n, text in enumerate(lines, 1) if "build" in text and name in text), 1)
            column = lines[line - 1].find(name) + 1 if line <= len(lines) else 1
            problems.append(Problem(path, line, max(1, column), f"image '{name}' is built from {layout.image_dir(name)}/, "
                                                   f"which has no Dockerfile on this branch"))
    return problems


def _group_projects(entries: Iterable[str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for path in entries:
        parts = path.split("/")
        if len(parts) >= 3 and parts[0] == layout.PROJECTS:
            grouped.setdefault(parts[1], []).append(path)
    return dict(sorted(grouped.items()))
