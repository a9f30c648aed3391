"""Which live node fits a stage best. Every node computes the same answer.

A node's free resources are its capacity (from its heartbeat) minus what the
RUNNING runs in status hold there, minus GPUs people reserved in
winslow.yaml. Among the nodes that meet a stage's needs, the one that wastes
least wins: a CPU stage goes to a node without GPUs while one is free.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from reconciler.model import ClusterConfig, NodeInfo, Run, RunState, Stage


@dataclass(frozen=True)
class Slot:
    """A live node's free resources, as every node computes them from the same commit."""

    name: str
    cpus: float
    memory: int | None  # None: the node did not say
    gpus: tuple[int, ...]
    gpu_total: int
    tags: frozenset[str]
    drain: bool = False

    def fits(self, stage: Stage) -> bool:
        need = stage.resources
        return (not self.drain and len(self.gpus) >= need.gpus and self.cpus >= need.cpus - 1e-9
                and (self.memory is None or self.memory >= need.memory) and set(stage.node_tags) <= self.tags)

    def waste(self, stage: Stage) -> tuple[float, ...]:
        need = stage.resources
        return (self.gpu_total - need.gpus, len(self.gpus) - need.gpus, self.cpus - need.cpus,
                (self.memory or 0) - need.memory)

    def take(self, stage: Stage) -> tuple[Slot, tuple[int, ...]]:
        need = stage.resources
        gpus = self.gpus[: need.gpus]
        rest = replace(self, cpus=self.cpus - need.cpus,
                       memory=None if self.memory is None else self.memory - need.memory,
                       gpus=self.gpus[need.gpus:])
        return rest, gpus


def slots(nodes: Mapping[str, NodeInfo], running: Iterable[Run], config: ClusterConfig) -> dict[str, Slot]:
    """Free resources of each live node after the runs it holds."""
    held: dict[str, list[Run]] = {}
    for run in running:
        if run.state is RunState.RUNNING and run.node:
            held.setdefault(run.node, []).append(run)
    result = {}
    for name, info in sorted(nodes.items()):
        settings = config.nodes.get(name)
        reserved = set(settings.reserved_gpus) if settings else set()
        runs = held.get(name, [])
        used = {g for run in runs for g in run.gpus}
        free = tuple(sorted(g.index for g in info.gpus if g.index not in used and g.index not in reserved))
        result[name] = Slot(
            name=name,
            cpus=info.cpus - sum(run.cpus for run in runs),
            memory=info.memory - sum(run.memory for run in runs) if info.memory else None,
            gpus=free,
            gpu_total=len(info.gpus),
            tags=frozenset(info.tags) | frozenset(settings.tags if settings else ()),
            drain=bool(settings and settings.drain),
        )
    return result


def rank(stage: Stage, free: Mapping[str, Slot]) -> list[str]:
    """Live nodes that can run `stage`, best fit first (ties broken by name)."""
    fitting = [slot for slot in free.values() if slot.fits(stage)]
    return [slot.name for slot in sorted(fitting, key=lambda s: (s.waste(stage), s.name))]
