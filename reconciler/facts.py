"""Facts a node observed about its own runs: plain data, kept in the journal until they are on main."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STARTED = "started"   # the stage began running
EXITED = "exited"     # the stage ended (exit code, or why it did not run)
LISTED = "listed"     # its workspace was listed and hashed: the result manifest


@dataclass(frozen=True)
class Fact:
    """`kind` is STARTED, EXITED or LISTED; the rest says what and when."""

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
    inputs: tuple[dict[str, Any], ...] | list[dict[str, Any]] = field(default=(), compare=False)  # STARTED: what it read

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.project, self.run_id)
