"""The `winslow` command: one line per error, tracebacks only for bugs."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from reconciler import __version__
from reconciler.commands import (
    cluster,
    demo,
    files,
    init,
    localcluster,
    logs,
    node,
    nodes,
    projects,
    status,
    validate,
    verbs,
    viewer,
)
from reconciler.errors import WinslowError

COMMANDS = (validate, init, node, verbs, projects, status, nodes, cluster, logs, files, viewer, demo, localcluster)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="winslow", description="Winslow: a GitOps orchestrator for long GPU pipelines.")
    parser.add_argument("--version", action="version", version=f"winslow {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except WinslowError as exc:
        print(f"winslow: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
