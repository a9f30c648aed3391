"""Facts a node observed about its own runs: plain data, kept in the journal until they are on main."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

QUEUED = "queued"     # the stage waits in its executor's queue (a Slurm job PENDING); `reason` says where and why
STARTED = "started"   # the stage began running
EXITED = "exited"     # the stage ended (exit code, or why it did not run)
LISTED = "listed"     # its workspace was listed and hashed: the result manifest


@dataclass(frozen=True)
class Fact:
    """`kind` is QUEUED, STARTED, EXITED or LISTED; the rest says what and when."""

    kind: str
    project: str
    run_id: str
    time: str
    exit_code: int | None = None
    reason: str | None = None
    image_digest: str | None = None
    pulled: str | None = None  # STARTED: the image pulled for it (`pulled REF@sha256:... (45 MB in 3.1 s)`)
    lost: bool = False  # ended by the node's own failure (fencing), not by the program
    manifest: dict[str, Any] | None = field(default=None, compare=False)
    # QUEUED or STARTED (whichever came first): what it reads
    inputs: tuple[dict[str, Any], ...] | list[dict[str, Any]] = field(default=(), compare=False)

    @property
    def key(self) -> tuple[str, str, str]:
        """One fact of each kind per run; QUEUED one per reason, so that a new reason recorded while
        the last one is being published is not settled (dropped) with it."""
        if self.kind == QUEUED:
            return (f"{QUEUED}:{self.reason or ''}", self.project, self.run_id)
        return (self.kind, self.project, self.run_id)
