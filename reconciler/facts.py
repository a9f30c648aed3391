"""Facts a node observed about its own runs: plain data, kept in the journal until they are on main."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STARTED = "started"
EXITED = "exited"


@dataclass(frozen=True)
class Fact:
    """`kind` is 'started' or 'exited'; the rest says what and when."""

    kind: str
    project: str
    run_id: str
    time: str
    exit_code: int | None = None
    reason: str | None = None
    image_digest: str | None = None
    lost: bool = False  # ended by the node's own failure (fencing), not by the program
    manifest: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.project, self.run_id)
