"""A snapshot of the state repo as the typed model: what `state.StateReader` builds and decide reads.

Plain, immutable data; building it (reading files, parsing YAML) is `state.py`'s job.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from reconciler.errors import Problem
from reconciler.model import ClusterConfig, Pipeline, Project, Run, Status


@dataclass(frozen=True)
class ProjectEntry:
    """Everything the state repo says about one project folder."""

    id: str
    project: Project | None
    status: Status
    lock: Pipeline | None = None
    lock_request: int = 0
    problems: tuple[Problem, ...] = ()
    exists: bool = True

    @property
    def invalid(self) -> bool:
        return bool(self.problems)


@dataclass(frozen=True)
class Snapshot:
    """The state repo at one commit. Built once, never changed: what is derived from it is computed once."""

    commit: str | None
    config: ClusterConfig
    pipelines: Mapping[str, Pipeline | None]
    projects: Mapping[str, ProjectEntry]
    problems: tuple[Problem, ...] = ()
    files: int = 0
    pipeline_problems: Mapping[str, tuple[Problem, ...]] = field(default_factory=dict)
    # Read as the difference from the snapshot of commit `base`: the projects read again (the rest are the
    # same objects). None when it was read whole.
    base: str | None = field(default=None, compare=False)
    changed: frozenset[str] | None = field(default=None, compare=False)

    @cached_property
    def active_runs(self) -> tuple[tuple[str, Run], ...]:
        """(project, run) of every RUNNING run: what holds nodes' resources."""
        return tuple((project_id, run) for project_id, entry in self.projects.items() for run in entry.status.active)
