"""A snapshot of the state repo as the typed model: what `state.StateReader` builds and decide reads.

Plain, immutable data; building it (reading files, parsing YAML) is `state.py`'s job.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property

from reconciler import layout
from reconciler.errors import Problem
from reconciler.model import Build, ClusterConfig, Pipeline, Project, Run, Status


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
class HeldConfig:
    """winslow.yaml is invalid at this commit, so the settings of an earlier valid version stay in force.

    An invalid file never loosens anything: a drained node stays drained, reserved GPUs stay reserved.
    """

    problems: tuple[Problem, ...]
    source: str | None  # the commit whose winslow.yaml is in force; None: defaults (no valid version was found)
    absent: bool = False  # at `source` there was no winslow.yaml: its defaults are in force

    def describe(self) -> str:
        first = str(self.problems[0]) if self.problems else f"{layout.CONFIG} is invalid"
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        if self.source is None:
            kept = "no valid version was found in its history, so the defaults are in force"
        elif self.absent:
            kept = f"the defaults in force before it was added ({self.source[:10]}) stay in force"
        else:
            kept = f"the settings of its last valid version ({self.source[:10]}) stay in force"
        return f"{first}{more}; {kept}"


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
    held_config: HeldConfig | None = None  # winslow.yaml is invalid: `config` is an earlier valid version's
    image_sources: Mapping[str, str] = field(default_factory=dict)  # images/NAME/ (with a Dockerfile) -> content id
    builds: Mapping[str, tuple[Build, ...]] = field(default_factory=dict)  # builds/NAME.yaml
    # Read as the difference from the snapshot of commit `base`: the projects read again (the rest are the
    # same objects). None when it was read whole.
    base: str | None = field(default=None, compare=False)
    changed: frozenset[str] | None = field(default=None, compare=False)

    @cached_property
    def active_runs(self) -> tuple[tuple[str, Run], ...]:
        """(project, run) of every RUNNING run: what holds nodes' resources."""
        return tuple((project_id, run) for project_id, entry in self.projects.items() for run in entry.status.active)
