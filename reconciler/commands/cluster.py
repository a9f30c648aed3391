"""Drain and reserve as verbs: `winslow drain|undrain NODE`, `winslow reserve|unreserve NODE --gpus 1,2`.

Each edits `nodes.<NODE>` in winslow.yaml (keeping the file's comments), checks the
result as `winslow validate` would, and commits and pushes it the way every verb does
(change.py). A draining node finishes what it runs and claims nothing new; reserved
GPUs are never assigned to a stage. The reason for a drain goes into the commit message,
where `git log winslow.yaml` shows who drained which node and why.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reconciler import layout
from reconciler.commands.change import Edit, commit_edit
from reconciler.commands.clone import add_verb, check_name, open_clone
from reconciler.edit import remove_fields, set_fields
from reconciler.errors import ConfigError, InvalidFile
from reconciler.validation import read_config
from reconciler.yamlsafe import parse_yaml


def add_parser(sub: argparse._SubParsersAction) -> None:
    drain = add_verb(sub, "drain", "let a node finish what it runs and claim nothing new",
                     "Set nodes.NODE.drain: true in winslow.yaml, commit and push. `winslow nodes` shows the node "
                     "draining, then drained once idle.\n\nexample: winslow drain ws-1 --reason 'new PSU on Friday'",
                     run_drain)
    drain.add_argument("node")
    drain.add_argument("--reason", help="why, for the commit message")
    undrain = add_verb(sub, "undrain", "let a drained node claim work again",
                       "Remove nodes.NODE.drain from winslow.yaml, commit and push.\n\nexample: winslow undrain ws-1",
                       run_undrain)
    undrain.add_argument("node")
    reserve = add_verb(sub, "reserve", "keep some of a node's GPUs out of Winslow's hands",
                       "Add GPU indexes to nodes.NODE.reserved_gpus in winslow.yaml, commit and push: no stage is "
                       "given them (runs already on them finish).\n\nexample: winslow reserve ws-1 --gpus 1,2",
                       run_reserve)
    reserve.add_argument("node")
    reserve.add_argument("--gpus", required=True, help="comma-separated GPU indexes, as `winslow nodes NODE` lists them")
    unreserve = add_verb(sub, "unreserve", "give reserved GPUs back to Winslow",
                         "Remove GPU indexes (default: all) from nodes.NODE.reserved_gpus in winslow.yaml, commit and "
                         "push.\n\nexample: winslow unreserve ws-1 --gpus 2", run_unreserve)
    unreserve.add_argument("node")
    unreserve.add_argument("--gpus", help="comma-separated GPU indexes (default: every reserved one)")


def _gpus(text: str) -> list[int]:
    try:
        gpus = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise ConfigError(f"--gpus {text}: expected GPU indexes like 1,2") from None
    if not gpus or any(g < 0 for g in gpus):
        raise ConfigError(f"--gpus {text}: expected GPU indexes like 1,2")
    return gpus


def _edit_node(args: argparse.Namespace, change: Callable[[str, dict[str, Any]], tuple[str, str] | str]) -> None:
    """Apply `change(text, settings) -> (new text, commit subject) | message when nothing changes` to winslow.yaml."""
    node = args.node
    check_name(node)

    def edit(root: Path) -> Edit | str:
        path = root / layout.CONFIG
        if not path.is_file():
            raise ConfigError(f"{layout.CONFIG} is missing from this clone")
        text = path.read_text(encoding="utf-8")
        data = parse_yaml(text.encode("utf-8"), layout.CONFIG).data
        nodes = data.get("nodes") if isinstance(data, dict) else None
        settings = nodes.get(node) if isinstance(nodes, dict) else None
        result = change(text, dict(settings) if isinstance(settings, dict) else {})
        if isinstance(result, str):
            return result
        edited, subject = result
        now = parse_yaml(edited.encode("utf-8"), layout.CONFIG).data
        left = (now.get("nodes") or {}).get(node) if isinstance(now, dict) else None
        if isinstance(left, dict) and not left:  # nothing left for the node: no empty entry either
            edited = remove_fields(edited, ("nodes",), [node])
        _, problems = read_config(parse_yaml(edited.encode("utf-8"), layout.CONFIG))
        if problems:
            raise InvalidFile(problems)
        return Edit(subject, {layout.CONFIG: edited})

    commit_edit(open_clone(args.repo_dir), [layout.CONFIG], edit)


def run_drain(args: argparse.Namespace) -> int:
    def change(text: str, settings: dict[str, Any]) -> tuple[str, str] | str:
        if settings.get("drain") is True:
            return f"{args.node} is already draining; nothing to change"
        why = f": {' '.join(args.reason.split())}" if args.reason else ""
        return set_fields(text, ("nodes", args.node), {"drain": True}), f"Drain {args.node}{why}"
    _edit_node(args, change)
    return 0


def run_undrain(args: argparse.Namespace) -> int:
    def change(text: str, settings: dict[str, Any]) -> tuple[str, str] | str:
        if not settings.get("drain"):
            return f"{args.node} is not drained; nothing to change"
        return remove_fields(text, ("nodes", args.node), ["drain"]), f"Undrain {args.node}: it claims work again"
    _edit_node(args, change)
    return 0


def run_reserve(args: argparse.Namespace) -> int:
    wanted = _gpus(args.gpus)

    def change(text: str, settings: dict[str, Any]) -> tuple[str, str] | str:
        have = [g for g in settings.get("reserved_gpus") or [] if isinstance(g, int)]
        if set(wanted) <= set(have):
            return f"GPU {', '.join(map(str, wanted))} of {args.node} already reserved; nothing to change"
        merged = sorted(set(have) | set(wanted))
        return (set_fields(text, ("nodes", args.node), {"reserved_gpus": merged}),
                f"Reserve GPU {', '.join(map(str, wanted))} of {args.node}")
    _edit_node(args, change)
    return 0


def run_unreserve(args: argparse.Namespace) -> int:
    given = _gpus(args.gpus) if args.gpus else None

    def change(text: str, settings: dict[str, Any]) -> tuple[str, str] | str:
        have = [g for g in settings.get("reserved_gpus") or [] if isinstance(g, int)]
        freed = [g for g in have if given is None or g in given]
        if not freed:
            return f"no reserved GPU of {args.node} to give back; nothing to change"
        rest = [g for g in have if g not in freed]
        edited = (set_fields(text, ("nodes", args.node), {"reserved_gpus": rest}) if rest
                  else remove_fields(text, ("nodes", args.node), ["reserved_gpus"]))
        return edited, f"Unreserve GPU {', '.join(map(str, freed))} of {args.node}"
    _edit_node(args, change)
    return 0
