"""`winslow validate [DIR]`: every schema and meaning error of a state repo, as file:line:col."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from reconciler.errors import ConfigError
from reconciler.snapshot import Snapshot
from reconciler.state import DirectoryTree, StateReader


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("validate", help="check a state repo's files: schema and meaning",
                            description="Check every file of a state repo against its schema and for meaning "
                                        "(pipelines exist, stage names unique, from/until in order, sizes parse, "
                                        "no path leaves its root). Prints path:line:col: message for each error; "
                                        "exit 1 when there is any.")
    parser.add_argument("dir", nargs="?", default=".", help="the state repo folder (default: .)")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: text)")
    parser.set_defaults(func=run)


def check_dir(root: Path) -> Snapshot:
    if not root.is_dir():
        raise ConfigError(f"{root}: no such folder")
    return StateReader(include_results=True).read(DirectoryTree(root))


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
        word = "error" if len(snapshot.problems) == 1 else "errors"
        verdict = f"{len(snapshot.problems)} {word}" if snapshot.problems else "ok"
        print(f"{verdict}: {summary['files']} files, {summary['pipelines']} pipelines, "
              f"{summary['projects']} projects checked in {args.dir}", file=sys.stderr if snapshot.problems else sys.stdout)
    return 1 if snapshot.problems else 0
