"""`winslow viewer`: the read-only web viewer over its own mirror of the state repo and the storage root.

The viewer is its own package (`viewer/`): it imports the reconciler's model and read
path, and the reconciler never imports it (tests/test_architecture.py). This command
is where the two meet, so it finds the viewer by name when it runs, not at import.
"""
from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from reconciler.errors import ConfigError
from reconciler.units import parse_duration


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("viewer", help="serve the read-only web viewer",
                            description="Serve the read-only web viewer: what needs you (gates, failures, running "
                                        "stages), projects, runs with live logs and results, files, nodes with load "
                                        "charts, pipelines and validation problems, and the same as JSON under /api/. "
                                        "It keeps its own mirror of the state repo, fetched whenever the remote "
                                        "changes, and never writes to it.")
    parser.add_argument("--repo", required=True, help="URL or path of the state repo's remote")
    parser.add_argument("--storage", metavar="ROOT",
                        help="the storage root: a local folder or shared mount, or ssh://[user@]host[:port]/path "
                             "through a node's SSH server (your ssh, its keys and ~/.ssh/config; never prompts; "
                             "WINSLOW_SSH_COMMAND replaces `ssh`) (default: storage.root in winslow.yaml)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                            "only; give a LAN address with --token-file)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080)")
    parser.add_argument("--token-file", type=Path, metavar="FILE",
                        help="require the token in FILE (at least 16 characters): sent as 'Authorization: Bearer' "
                             "or set as a cookie by opening the viewer once with ?token=TOKEN")
    parser.add_argument("--work", type=Path, help="the viewer's own folder for its mirror (default: "
                                                  "$XDG_STATE_HOME/winslow/viewer-<hash of the URL>)")
    parser.add_argument("--poll", default="2s", help="poll interval for remotes that cannot be watched (default 2s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        args.poll = parse_duration(args.poll)
    except ValueError as exc:
        raise ConfigError(f"--poll: {exc}") from None
    serve = importlib.import_module("viewer.serve")
    return int(serve.run(args))
