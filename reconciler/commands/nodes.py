"""`winslow nodes [NAME]`: the cluster's nodes as their heartbeat branches show them, like `kubectl get nodes`.

Liveness is judged here, from when each node's branch last moved (a one-shot look
compares the heartbeat commit's time with this machine's clock), against the
node timeout in winslow.yaml on origin/main.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from typing import Any

from reconciler import layout
from reconciler.commands.clone import add_verb, check_name, fetch, open_clone
from reconciler.commands.status import _age, _table
from reconciler.errors import ConfigError
from reconciler.layout import MAIN_REFSPEC, NODES_REFSPEC, ORIGIN_MAIN
from reconciler.model import ClusterConfig, LoadSample, NodeInfo
from reconciler.repoview import NodeView
from reconciler.units import format_size

HISTORY_ROWS = 12  # load samples `winslow nodes NAME` prints, newest last


def add_parser(sub: argparse._SubParsersAction) -> None:
    nodes = add_verb(sub, "nodes", "show the nodes: state, capacity, load and what they run",
                     "Fetch the node branches winslow/nodes/* and show each node: ready, draining, drained (draining "
                     "and idle) or lost (with how long ago it was last heard from), its CPUs, memory and GPUs, its "
                     "current load and running runs. With NAME, one node in detail with its recent load.\n\n"
                     "example: winslow nodes; winslow nodes ws-1 --json", run_nodes)
    nodes.add_argument("name", nargs="?", help="one node, in detail")
    nodes.add_argument("--json", action="store_true", help="print the same data as JSON")


def state(view: NodeView, config: ClusterConfig) -> str:
    """lost, fenced, drained, draining or ready: what an operator needs to know first."""
    if view.lost:
        return "lost"
    info = view.info
    if info is not None and info.fenced:
        return "fenced"
    settings = config.nodes.get(view.name)
    draining = (settings is not None and settings.drain) or (info is not None and info.drain)
    if draining:
        return "drained" if info is None or not info.runs else "draining"
    return "ready"


def _sample(sample: LoadSample | None) -> dict[str, Any] | None:
    if sample is None:
        return None
    return {"time": sample.time, "cpu_percent": sample.cpu_percent, "memory_used": sample.memory_used,
            "net_rx": sample.net_rx, "net_tx": sample.net_tx,
            "gpus": [{"index": g.index, "utilization": g.utilization, "memory_used": g.memory_used,
                      "temperature": g.temperature} for g in sample.gpus]}


def describe(view: NodeView, config: ClusterConfig, history: bool = False) -> dict[str, Any]:
    info = view.info or NodeInfo(view.name)
    data: dict[str, Any] = {
        "name": view.name, "state": state(view, config), "heard_seconds_ago": view.heard_ago,
        "readable": view.info is not None, "version": info.version or None, "executor": info.executor,
        "started": info.started, "tags": list(info.tags), "cpus": info.cpus, "memory": info.memory,
        "gpus": [{"index": g.index, "model": g.model or None, "memory": g.memory, "uuid": g.uuid or None}
                 for g in info.gpus],
        "reserved_gpus": list(config.nodes[view.name].reserved_gpus) if view.name in config.nodes else [],
        "load": _sample(info.load),
        "runs": [{"project": r.project, "run": r.run, "stage": r.stage, "gpus": list(r.gpus), "started": r.started}
                 for r in info.runs],
    }
    if history:
        data["history"] = [_sample(s) for s in info.history]
    return data


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _gpus(data: Mapping[str, Any]) -> str:
    if not data["gpus"]:
        return "0"
    models = sorted({g["model"] or "GPU" for g in data["gpus"]})
    load = {g["index"]: g["utilization"] for g in (data["load"] or {}).get("gpus", [])}
    busy = [load.get(g["index"]) for g in data["gpus"]]
    utilisation = "/".join(_percent(u) for u in busy) if any(u is not None for u in busy) else ""
    return f"{len(data['gpus'])}x {', '.join(models)}" + (f" ({utilisation})" if utilisation else "")


def _memory(data: Mapping[str, Any]) -> str:
    used = (data["load"] or {}).get("memory_used")
    total = format_size(data["memory"]) if data["memory"] else "-"
    return f"{format_size(used)}/{total}" if used is not None else total


def _net(load: Mapping[str, Any] | None) -> str:
    if not load or load.get("net_rx") is None:
        return "-"
    return f"{format_size(load['net_rx'])}/s in, {format_size(load['net_tx'] or 0)}/s out"


def _state_cell(data: Mapping[str, Any]) -> str:
    if data["state"] == "lost":
        return f"lost (last heard {_age(data['heard_seconds_ago'])} ago)"
    return data["state"]


def _print_one(data: Mapping[str, Any]) -> None:
    print(f"{data['name']}   {_state_cell(data)}   version {data['version'] or '-'}   executor {data['executor']}"
          f"   heard {_age(data['heard_seconds_ago'])} ago")
    print(f"capacity: {data['cpus']:g} CPUs, {format_size(data['memory']) if data['memory'] else '-'} memory"
          + (f", tags {', '.join(data['tags'])}" if data["tags"] else ""))
    for gpu in data["gpus"]:
        reserved = " (reserved)" if gpu["index"] in data["reserved_gpus"] else ""
        print(f"  GPU {gpu['index']}: {gpu['model'] or '?'}, {format_size(gpu['memory']) if gpu['memory'] else '?'}"
              f"{reserved}")
    load = data["load"]
    if load:
        print(f"load: CPU {_percent(load['cpu_percent'])}, memory {_memory(data)}, network {_net(load)}")
    print("runs: " + (", ".join(f"{r['project']}/{r['run']}" + (f" (GPU {','.join(map(str, r['gpus']))})"
                                                                  if r["gpus"] else "") for r in data["runs"])
                      or "none"))
    samples = [s for s in data.get("history", []) if s][-HISTORY_ROWS:]
    if samples:
        print()
        gpu_ids = sorted({g["index"] for s in samples for g in s["gpus"]})
        headers: Sequence[str] = ("TIME", "CPU", "MEMORY", "NET IN", "NET OUT", *(f"GPU {i}" for i in gpu_ids))
        rows = []
        for sample in samples:
            gpus = {g["index"]: g for g in sample["gpus"]}
            rows.append((sample["time"], _percent(sample["cpu_percent"]),
                         format_size(sample["memory_used"]) if sample["memory_used"] is not None else "-",
                         f"{format_size(sample['net_rx'])}/s" if sample["net_rx"] is not None else "-",
                         f"{format_size(sample['net_tx'])}/s" if sample["net_tx"] is not None else "-",
                         *(_percent(gpus[i]["utilization"]) if i in gpus else "-" for i in gpu_ids)))
        _table(headers, rows)


def run_nodes(args: argparse.Namespace) -> int:
    if args.name:
        check_name(args.name)
    clone = open_clone(args.repo_dir)
    fetch(clone, MAIN_REFSPEC, NODES_REFSPEC)
    view = clone.view()
    try:
        config = view.snapshot().config if clone.has_ref(ORIGIN_MAIN) else ClusterConfig()
        nodes = view.nodes(config.node_timeout, trust_commit_time=True)
        if args.name and args.name not in nodes:
            known = ", ".join(sorted(nodes)) or "none"
            raise ConfigError(f"no node '{args.name}' (no branch {layout.node_branch(args.name)} on origin; "
                              f"nodes: {known})")
        rows = [describe(nodes[name], config, history=bool(args.name)) for name in sorted(nodes)
                if not args.name or name == args.name]
    finally:
        view.close()
    if args.json:
        print(json.dumps(rows[0] if args.name else {"nodes": rows}, indent=2))
        return 0
    if args.name:
        _print_one(rows[0])
        return 0
    if not rows:
        print("no nodes: no branch winslow/nodes/* on origin (start one with winslow node)")
        return 0
    _table(("NODE", "STATE", "CPUS", "MEMORY", "GPUS", "NETWORK", "RUNS", "VERSION"),
           [(r["name"], _state_cell(r), f"{r['cpus']:g} ({_percent((r['load'] or {}).get('cpu_percent'))})",
             _memory(r), _gpus(r), _net(r["load"]), ", ".join(f"{x['project']}/{x['run']}" for x in r["runs"]) or "-",
             r["version"]) for r in rows])
    return 0
