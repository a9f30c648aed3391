"""`winslow validate [DIR]`: every schema and meaning error of a state repo, as file:line:col."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from reconciler import layout
from reconciler.errors import ConfigError, InvalidFile, Problem
from reconciler.snapshot import Snapshot
from reconciler.state import DirectoryTree, StateReader
from reconciler.validation import lowered_request
from reconciler.yamlsafe import parse_yaml


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("validate", help="check a state repo's files: schema and meaning",
                            description="Check every file of a state repo against its schema and for meaning "
                                        "(pipelines exist, stage names unique, from/until in order, sizes parse, "
                                        "no path leaves its root, no run.request below the one the nodes acted on). "
                                        "Prints path:line:col: message for each error; exit 1 when there is any, "
                                        "or when DIR holds no winslow.yaml, pipelines/ or projects/.")
    parser.add_argument("dir", nargs="?", default=".", help="the state repo folder (default: .)")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    parser.set_defaults(func=run)


def check_dir(root: Path) -> Snapshot:
    """The state repo in `root` as validate sees it: what a node reads, plus the checks only a person needs."""
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder")
    if not _is_state_repo(root):
        # Checking nothing and saying ok would turn a CI job pointed at the wrong folder green.
        raise ConfigError(f"{root}: not a Winslow state repo: no {layout.CONFIG}, {layout.PIPELINES}/ or "
                          f"{layout.PROJECTS}/ (create one with winslow init)")
    tree = DirectoryTree(root)
    snapshot = StateReader(include_results=True).read(tree)
    lowered = _lowered_requests(tree, snapshot)
    if not lowered:
        return snapshot
    return dataclasses.replace(snapshot, problems=tuple(sorted(snapshot.problems + tuple(lowered))))


def _is_state_repo(root: Path) -> bool:
    """Any one of them will do: `winslow init` makes all three, a repo without projects yet is fine."""
    return (root / layout.CONFIG).is_file() or any((root / top).is_dir() for top in (layout.PIPELINES, layout.PROJECTS))


def _lowered_requests(tree: DirectoryTree, snapshot: Snapshot) -> list[Problem]:
    """Projects whose run.request is below the request their status says the nodes observed (they ignore it).

    Not a node's concern, so not `StateReader`'s: a node goes on with the request it observed.
    """
    problems = []
    for project_id, entry in snapshot.projects.items():
        observed = entry.status.observed_request
        if not entry.exists or observed == 0:
            continue
        if entry.project is not None and entry.project.run.request >= observed:
            continue  # the usual case, known without reading the file again
        path = layout.project_file(project_id)
        try:
            doc = parse_yaml(tree.read(path), path)
        except (OSError, InvalidFile):
            continue  # already reported as that file's problem
        problem = lowered_request(doc, observed, layout.status_file(project_id))
        if problem is not None:
            problems.append(problem)
    return problems


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def run(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    snapshot = check_dir(root)
    prefix = "" if args.dir in (".", "./") else args.dir.rstrip("/") + "/"
    summary = {"files": snapshot.files, "pipelines": len(snapshot.pipelines), "projects": len(snapshot.projects),
               "errors": len(snapshot.problems)}
    if args.format == "json":
        problems = [dict(p.to_json(), path=prefix + p.path) for p in snapshot.problems]
        json.dump({"ok": not problems, "summary": summary, "problems": problems}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for problem in snapshot.problems:
            print(f"{prefix}{problem}")
        verdict = _count(len(snapshot.problems), "error") if snapshot.problems else "ok"
        checked = f"{_count(snapshot.files, 'file')}, {_count(len(snapshot.pipelines), 'pipeline')}, " \
                  f"{_count(len(snapshot.projects), 'project')}"
        print(f"{verdict}: {checked} checked in {args.dir}", file=sys.stderr if snapshot.problems else sys.stdout)
    return 1 if snapshot.problems else 0
