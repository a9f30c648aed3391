"""One exception hierarchy, with messages written for the person who reads them."""
from __future__ import annotations

from dataclasses import dataclass


class WinslowError(Exception):
    """Anything Winslow reports to a user; the CLI prints it on one line."""


class ConfigError(WinslowError):
    """A file in the state repo or a command-line argument is wrong."""


class GitError(WinslowError):
    """A git operation failed (unreachable remote, rejected push, ...)."""


class PushRejected(GitError):
    """The remote moved on: the compare-and-swap on a branch lost."""


class StorageError(WinslowError):
    """A storage path is invalid or a file operation failed."""


class ExecutorError(WinslowError):
    """A stage could not be started or controlled."""


@dataclass(frozen=True, order=True)
class Problem:
    """One validation error, located in a file of the state repo."""

    path: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.message}"

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "line": self.line, "column": self.column, "message": self.message}


class InvalidFile(ConfigError):
    """A file that cannot be turned into the model; carries every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems)
        super().__init__("; ".join(str(p) for p in self.problems))
