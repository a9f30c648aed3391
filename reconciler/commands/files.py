"""`winslow upload`, `download`, `ls` and `rm`: files into and out of the storage root, locally or over SSH.

Where the storage is: `--storage` (a folder, or `ssh://[user@]host[:port]/path` through
a node's SSH server), else `storage.root` of winslow.yaml on origin/main of the current
clone. Paths are relative to the storage root:

    resources/videos/a.mp4           the resource pool
    ulm-0812/3-detect-1/tracks.csv   a run's workspace (workspaces/ulm-0812/3-detect-1/...)
    ulm-0812/detect/tracks.csv       the same, in the latest SUCCEEDED run of stage detect
    logs/ulm-0812/3-detect-1.log     a run's full log

`upload` and `rm` act on the pool only, so their paths may leave out `resources/`.
Every copy is streamed, hashed as it passes, atomic and resumable (`transfer.py`); a
file of a finished run is checked against the run's result manifest on origin/main.
"""
from __future__ import annotations

import argparse
import json
import posixpath
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import wraps
from pathlib import Path

from reconciler import layout
from reconciler.commands.clone import Clone, add_verb, check_name, fetch, no_project, open_clone
from reconciler.errors import ConfigError, StorageError
from reconciler.layout import MAIN_REFSPEC, ORIGIN_MAIN, escapes
from reconciler.model import ClusterConfig, Run, RunState
from reconciler.repoview import RepoView
from reconciler.snapshot import Snapshot
from reconciler.storage import Entry, Storage, Writer, file_writer
from reconciler.transfer import Bar, Interrupted, Source, copy, expecting, local_file, storage_at, stored_file
from reconciler.units import format_size

WIDTH = 78
RUN_ID = re.compile(r"\d+-.+-\d+\Z")
NO_PROJECT = "-"   # a project id no project has: reading it reads only winslow.yaml and the pipelines
NO_STORAGE = ("no storage: pass --storage DIR (or --storage ssh://[user@]host[:port]/path to reach it through a "
              "node), or set storage.root in winslow.yaml")
PATHS = ("Paths are relative to the storage root: resources/... (the pool), PROJECT/RUN/... (a run's workspace; RUN "
         "is a run id like 3-detect-1, or a stage name for its latest SUCCEEDED run), logs/PROJECT/RUN.log.")
WHERE = ("The storage is --storage, else storage.root of winslow.yaml on origin/main of this clone. Over ssh:// it runs "
         "your ssh (keys, agent and ~/.ssh/config as usual; never prompts; WINSLOW_SSH_COMMAND replaces `ssh`).")


def add_parser(sub: argparse._SubParsersAction) -> None:
    upload = _verb(sub, "upload", "copy a file into the resource pool (resources/)",
                   "Copy LOCAL to DEST in the resource pool: streamed, hashed (the sha256 is kept beside it), written "
                   "under a temporary name and renamed only when whole. An interrupted upload (Ctrl-C, a lost "
                   "connection, a full disk) keeps what it copied; the same command continues it. " + WHERE,
                   ["winslow upload DJI_0001.MP4 videos/                 # resources/videos/DJI_0001.MP4",
                    "winslow upload big.mp4 --storage ssh://gpu-1/srv/winslow"], run_upload)
    upload.add_argument("local", metavar="LOCAL", help="the file to copy")
    upload.add_argument("dest", metavar="DEST", nargs="?",
                        help="where in resources/ (default: LOCAL's name; a folder or a path ending in / takes it in)")
    _copy_options(upload)

    download = _verb(sub, "download", "copy a file out of storage: a resource, a run's result or log",
                     "Copy PATH to LOCAL (default: its name, in the current folder). " + PATHS + " A file of a finished "
                     "run must match the run's result manifest on origin/main, and a file with a recorded sha256 must "
                     "match it; otherwise nothing is saved. Interrupted downloads continue like uploads. " + WHERE,
                     ["winslow download ulm-0812/detect/tracks.csv results/",
                      "winslow download resources/videos/DJI_0001.MP4 --storage ssh://gpu-1/srv/winslow"],
                     run_download)
    download.add_argument("path", metavar="PATH", help="what to copy, relative to the storage root (see above)")
    download.add_argument("local", metavar="LOCAL", nargs="?", help="where to put it (a folder takes it in)")
    _copy_options(download)

    listing = _verb(sub, "ls", "list storage: sizes, times and sha256 where known",
                    "List a folder of the storage (default: its top), or show one file. " + PATHS + " Links are shown "
                    "as links, never followed. " + WHERE,
                    ["winslow ls resources/videos", "winslow ls ulm-0812/detect --json"], run_ls)
    listing.add_argument("path", metavar="PATH", nargs="?", default=".", help="a folder or file (default: the top)")
    listing.add_argument("--json", action="store_true", help="print the entries as JSON")
    _storage_option(listing)

    remove = _verb(sub, "rm", "remove a file from the resource pool",
                   "Remove PATH from the resource pool (resources/ may be left out), with its recorded sha256 and any "
                   "partial upload of it. Refused while a RUNNING run reads it: a stage's inputs, or an env value of the "
                   "run naming it (read from origin/main after a fetch). " + WHERE,
                   ["winslow rm videos/DJI_0001.MP4", "winslow rm -r videos/old/"], run_rm)
    remove.add_argument("path", metavar="PATH", help="the file (or, with -r, folder) in resources/")
    remove.add_argument("-r", "--recursive", action="store_true", help="remove a folder and everything in it")
    remove.add_argument("--quiet", "-q", action="store_true", help="print nothing but errors")
    _storage_option(remove)


def _verb(sub: argparse._SubParsersAction, name: str, help: str, description: str, examples: Sequence[str],
          func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    parser = add_verb(sub, name, help, textwrap.fill(description, WIDTH), func)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("example:\n" if len(examples) == 1 else "examples:\n") + "\n".join(f"  {e}" for e in examples)
    return parser


def _storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", metavar="ROOT",
                        help="the storage root: a folder, or ssh://[user@]host[:port]/path (default: storage.root of "
                             "winslow.yaml on origin/main)")


def _copy_options(parser: argparse.ArgumentParser) -> None:
    _storage_option(parser)
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue a partial copy even if it does not record the same source (its last MiB must "
                            "match); a partial of the same source is continued without it")
    again.add_argument("--restart", action="store_true", help="throw away a partial copy and start again")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bar or notes; errors only")


# -- the verbs -----------------------------------------------------------------------------------
def _interruptible(verb: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Ctrl-C during a copy: one line saying how to resume, and exit code 130 as a shell gives."""
    @wraps(verb)
    def run(args: argparse.Namespace) -> int:
        try:
            return verb(args)
        except Interrupted as exc:
            print(f"winslow: {exc}", file=sys.stderr)
            return 130
    return run


@_interruptible
def run_upload(args: argparse.Namespace) -> int:
    local = Path(args.local)
    source = local_file(local)
    with _Session(args) as session:
        dest = _in_pool(args.dest, local.name, session.storage)
        writer = session.storage.writer(dest, source.stamp, resume=args.resume)
        if args.restart and writer.offset:
            writer.restart()
        entry = _copy(args, source, writer, "uploading")
    if not args.quiet:
        print(f"{entry.path}  {format_size(entry.size)}  sha256 {entry.sha256}")
    return 0


@_interruptible
def run_download(args: argparse.Namespace) -> int:
    with _Session(args) as session:
        target = session.resolve(args.path)
        source = session.checked(target, stored_file(session.storage, target.path), args.quiet)
        local = _destination(args.local, posixpath.basename(source.name))
        writer = file_writer(local, source.stamp, resume=args.resume)
        if args.restart and writer.offset:
            writer.restart()
        entry = _copy(args, source, writer, "downloading")
    if not args.quiet:
        print(f"{entry.path}  {format_size(entry.size)}  sha256 {entry.sha256}")
    return 0


def run_ls(args: argparse.Namespace) -> int:
    with _Session(args) as session:
        target = session.resolve(args.path)
        entry = session.storage.stat(target.path)
        entries = session.storage.list(target.path) if entry.kind == "dir" else [entry]
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
        return 0
    for e in entries:
        size = format_size(e.size) if e.kind == "file" else "-"
        when = datetime.fromtimestamp(e.mtime).strftime("%Y-%m-%d %H:%M")
        name = posixpath.basename(e.path) if entry.kind == "dir" else e.path
        shown = f"{name}/" if e.kind == "dir" else f"{name} -> {e.target}" if e.kind == "link" else name
        print(f"{size:>10}  {when}  {e.sha256 or '-':<64}  {shown}")
    return 0


def run_rm(args: argparse.Namespace) -> int:
    with _Session(args, need_clone="rm checks that no running stage reads the file") as session:
        path = _in_pool(args.path.rstrip("/") or args.path, None, None)
        if not fetch(session.require_clone(), MAIN_REFSPEC, warn=False):
            raise ConfigError("cannot fetch origin to check that no running stage reads the file; try again when "
                              "the state repo's remote answers")
        users = in_use(path.removeprefix(f"{layout.RESOURCES}/"), session.view().snapshot())
        if users:
            raise ConfigError(f"{path} is read by running {', '.join(users)}; remove it once they have finished")
        session.storage.remove(path, recursive=args.recursive)
    if not args.quiet:
        print(f"removed {path}")
    return 0


def in_use(path: str, snapshot: Snapshot) -> list[str]:
    """The RUNNING runs that read `path` (relative to resources/), a folder holding it, or something in it.

    What a run reads: its stage's `inputs` (with ${VAR} from the run's env), and any env value of the run that
    names a path in the pool (`videos/a.mp4`, `/resources/videos/a.mp4`), for stages that read the pool without
    declaring it. Returns `project/run` for each.
    """
    target = posixpath.normpath(path)
    users = []
    for project, run in snapshot.active_runs:
        entry = snapshot.projects.get(project)
        stage = entry.lock.stage(run.stage) if entry is not None and entry.lock is not None else None
        named = list(stage.inputs_for(run.env)) if stage is not None else []
        named += [_pool_path(value) for value in run.env.values()]
        if any(_overlap(name, target) for name in named if name):
            users.append(f"{project}/{run.id}")
    return users


def _pool_path(value: str) -> str:
    for prefix in (f"/{layout.RESOURCES}/", f"{layout.RESOURCES}/"):
        if value.startswith(prefix):
            value = value[len(prefix):]
            break
    return "" if escapes(value) else posixpath.normpath(value)


def _overlap(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


# -- the pieces ------------------------------------------------------------------------------------
def _copy(args: argparse.Namespace, source: Source, writer: Writer, verb: str) -> Entry:
    with Bar(not args.quiet and sys.stderr.isatty(), notes=not args.quiet) as bar:
        return copy(source, writer, bar, verb)


def _in_pool(dest: str | None, name: str | None, storage: Storage | None) -> str:
    """A path in the resource pool, written with or without `resources/`; into a folder when it names one."""
    if not dest:
        if name is None:
            raise ConfigError("name a file in resources/")
        return f"{layout.RESOURCES}/{name}"
    below = "" if dest.rstrip("/") == layout.RESOURCES else dest.removeprefix(f"{layout.RESOURCES}/")
    if below and escapes(below):
        raise StorageError(f"path '{dest}' leaves the resource pool ({layout.RESOURCES}/)")
    below = posixpath.normpath(below) if below else "."
    path = layout.RESOURCES if below == "." else f"{layout.RESOURCES}/{below}"
    into = dest.endswith("/") or path == layout.RESOURCES
    if name is not None and not into and storage is not None:
        try:
            into = storage.stat(path).kind == "dir"
        except StorageError:
            into = False
    if into:
        if name is None:
            raise ConfigError(f"'{dest}' is a folder: name a file in it")
        return f"{path}/{name}"
    return path


def _destination(local: str | None, name: str) -> Path:
    if local is None:
        return Path.cwd() / name
    path = Path(local).expanduser()
    if local.endswith("/") or path.is_dir():
        if not path.is_dir():
            raise StorageError(f"{local}: no such folder")
        return path / name
    return path


@dataclass(frozen=True)
class _Target:
    """A storage path, and the run whose workspace holds it (when it is in one)."""

    path: str
    project: str | None = None
    run: Run | None = None
    within: str = ""   # the path inside the run's workspace


class _Session:
    """The clone (when there is one), its view of origin/main, and the storage, closed together."""

    def __init__(self, args: argparse.Namespace, need_clone: str | None = None) -> None:
        self.args = args
        self.clone = self._open_clone(args.repo_dir, need_clone)
        self._view: RepoView | None = None
        self.storage = self._open_storage(args.storage)

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.storage.close()
        if self._view is not None:
            self._view.close()

    def _open_clone(self, repo_dir: str | None, need: str | None) -> Clone | None:
        try:
            return open_clone(repo_dir)
        except ConfigError as exc:
            if repo_dir is not None or need is not None:
                raise ConfigError(f"{need}, which needs a clone of the state repo: {exc}" if need else str(exc)) \
                    from None
            return None

    def require_clone(self) -> Clone:
        assert self.clone is not None
        return self.clone

    def view(self) -> RepoView:
        if self._view is None:
            clone = self.require_clone()
            self._view = clone.view() if clone.has_ref(ORIGIN_MAIN) else clone.folder_view()
        return self._view

    def _config(self) -> ClusterConfig:
        return self.view().project(NO_PROJECT)[1].config

    def _open_storage(self, spec: str | None) -> Storage:
        if spec:
            return storage_at(spec)
        if self.clone is None:
            raise ConfigError(NO_STORAGE)
        root = self._config().storage_root
        if not root:
            raise ConfigError(NO_STORAGE)
        if not Path(root).is_dir():
            raise ConfigError(f"storage root {root} (storage.root in winslow.yaml) is not a folder on this machine; "
                              f"reach it through a node with --storage ssh://NODE{root}")
        return storage_at(root)

    # -- storage paths ---------------------------------------------------------------------------------
    def resolve(self, spec: str) -> _Target:
        """A path of `download` or `ls` as the storage path it means (see the module's doc)."""
        if spec in ("", ".", "/", "./"):
            return _Target(".")
        if escapes(spec):
            raise StorageError(f"path '{spec}' leaves the storage root")
        normal = posixpath.normpath(spec)
        top, _, rest = normal.partition("/")
        if top in (layout.RESOURCES, layout.STORAGE_LOGS, ".") or (top == layout.WORKSPACES and not rest):
            return _Target(normal)
        project, _, rest = rest.partition("/") if top == layout.WORKSPACES else (top, "", rest)
        check_name(project)
        name, _, within = rest.partition("/")
        if not name:
            return _Target(f"{layout.WORKSPACES}/{project}", project)
        run = self._run(project, name, normal)
        folder = layout.workspace(project, run.id if run is not None else name)
        return _Target(f"{folder}/{within}" if within else folder, project, run, within)

    def _run(self, project: str, name: str, spec: str) -> Run | None:
        """Run `name` of the project, or the latest SUCCEEDED run of stage `name`; None without a clone."""
        pool = f"a file in the pool is resources/{spec}"
        if self.clone is None:
            if RUN_ID.match(name):
                return None
            raise ConfigError(f"{spec}: finding the latest run of stage {name} needs a clone of the state repo (run "
                              f"this inside one, or name the run: {project}/3-{name}-1; {pool})")
        fetch(self.clone, MAIN_REFSPEC)
        view = self.view()
        entry, snapshot = view.project(project)
        if entry is None or not entry.exists:
            raise no_project(project, view.project_ids() if view.git is not None else list(snapshot.projects),
                             f" ({pool})")
        runs = entry.status.runs
        exact = entry.status.run(name)
        if exact is not None:
            return exact
        succeeded = [r for r in runs if r.stage == name and r.state is RunState.SUCCEEDED]
        if succeeded:
            return succeeded[-1]
        stages = entry.lock.stage_names if entry.lock else sorted({r.stage for r in runs})
        if name in stages or any(r.stage == name for r in runs):
            tried = ", ".join(f"{r.id} {r.state.value}" for r in runs if r.stage == name) or "none yet"
            raise ConfigError(f"{project} has no SUCCEEDED run of stage {name} (its runs: {tried})")
        raise ConfigError(f"{project} has no run or stage '{name}' (runs: {', '.join(r.id for r in runs[-5:]) or 'none'}; "
                          f"stages: {', '.join(stages) or 'none'})")

    def checked(self, target: _Target, source: Source, quiet: bool) -> Source:
        """A file of a run's workspace must match the run's result manifest; a note says when it cannot be checked."""
        run, project = target.run, target.project
        if project is None or not target.within:
            return source
        if run is None:
            if not quiet:
                self._note(f"{target.path}: not checked against a result manifest (no clone of the state repo here)")
            return source
        where = f"{project}/{run.id}"
        if run.state is RunState.RUNNING:
            if not quiet:
                self._note(f"{where} is still RUNNING: the file may change, and there is no result manifest yet")
            return source
        view = self.view()
        manifest = view.result((view.tip() or "") if view.git is not None else "", project, run.id)
        if manifest is None:
            if not quiet:
                self._note(f"{where} has no result manifest on origin/main yet: the file is not checked against one")
            return source
        listed = next((f for f in manifest.files if f.path == posixpath.normpath(target.within)), None)
        if listed is None:
            if not quiet:
                why = "the manifest was cut short" if manifest.truncated else "was it written after the run ended?"
                self._note(f"{target.within} is not in the result manifest of {where} ({why}); not checked against it")
            return source
        if source.stamp.size != listed.size:
            raise StorageError(f"{target.path} does not match the result manifest of {where}: it holds "
                               f"{source.stamp.size} bytes, the manifest says {listed.size}; not copied")
        return expecting(source, listed.sha256, f"the result manifest of {where}")

    @staticmethod
    def _note(line: str) -> None:
        print(f"winslow: {line}", file=sys.stderr)
