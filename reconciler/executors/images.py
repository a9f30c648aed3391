"""Stage images from a registry: which registry a reference names, pulls that show their progress, digests.

A stage names its image by tag (`registry.lab:5000/tracker:v3`) or by digest
(`registry.lab:5000/tracker@sha256:...`). A tag is resolved when the run starts: the node
pulls it, and the container is created from the digest it pulled, which the run records;
a retry of the stage runs that same digest (decide pins it), whatever the tag says by then.
Names without a registry host (`busybox:1`, `winslow-test/busybox:1`) are images of this
engine and used as they are, pulled only when missing.

A pull writes its progress into the run's log, about every two seconds, so that
`winslow logs --follow` and the viewer show a big image arriving; a pull that fails says
whether the registry could not be reached or does not have the image.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from reconciler.errors import ExecutorError
from reconciler.model import image_repository
from reconciler.units import format_size

PROGRESS_EVERY_S = 2.0

_UNREACHABLE = ("connection refused", "no such host", "i/o timeout", "dial tcp", "tls handshake", "network is unreachable",
                "server gave http response to https client", "connection reset", "no route to host")
_MISSING = ("manifest unknown", "not found", "name unknown", "does not exist", "repository name not known")


def registry_of(ref: str) -> str | None:
    """The registry host a reference names: `registry.lab:5000/tracker:v3` -> `registry.lab:5000`; None for names
    without one (images of this engine, or Docker Hub's short names)."""
    first, slash, _ = ref.partition("/")
    if not slash:
        return None
    return first if ("." in first or ":" in first or first == "localhost") else None


def by_digest(ref: str) -> bool:
    return "@sha256:" in ref


def digest_ref(image: Any, ref: str) -> str | None:
    """`repository@sha256:...` of a pulled image, from the engine's RepoDigests for the reference's repository."""
    wanted = image_repository(ref)
    for entry in image.attrs.get("RepoDigests") or []:
        if entry.split("@", 1)[0] == wanted:
            return str(entry)
    return None


def explain_pull(ref: str, registry: str, node: str, detail: str) -> str:
    """Why a pull failed, in words that say which: the registry is unreachable, or it lacks the image."""
    lowered = detail.lower()
    if any(word in lowered for word in _UNREACHABLE):
        return f"the registry {registry} cannot be reached from {node} to pull '{ref}': {detail}"
    if any(word in lowered for word in _MISSING):
        return f"image '{ref}' is not in the registry {registry}: {detail}"
    return f"image '{ref}' could not be pulled from {registry} on {node}: {detail}"


class Progress:
    """Adds up a pull's per-layer progress and says it now and then."""

    def __init__(self, ref: str, say: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.ref, self.say, self.clock = ref, say, clock
        self.layers: dict[str, tuple[int, int]] = {}  # layer -> (bytes so far, total)
        self.began = clock()
        self._said = self.began

    def update(self, event: dict[str, Any]) -> None:
        layer, status = event.get("id"), str(event.get("status") or "")
        detail = event.get("progressDetail") or {}
        if layer and status == "Downloading" and detail.get("total"):
            self.layers[layer] = (int(detail.get("current") or 0), int(detail["total"]))
        elif layer and status in ("Download complete", "Pull complete", "Already exists") and layer in self.layers:
            total = self.layers[layer][1]
            self.layers[layer] = (total, total)
        now = self.clock()
        if now - self._said >= PROGRESS_EVERY_S:
            self._said = now
            self.say(f"winslow: pulling {self.ref}: {self.line()}")

    def line(self) -> str:
        done = sum(current for current, _ in self.layers.values())
        total = sum(size for _, size in self.layers.values())
        return f"{format_size(done)} of {format_size(total)} in {len(self.layers)} layers" if total else "starting"

    def summary(self) -> str:
        seconds = self.clock() - self.began
        total = sum(size for _, size in self.layers.values())
        return f"{format_size(total)} in {seconds:.1f} s" if total else f"{seconds:.1f} s, nothing to download"


def follow_pull(events: Iterable[dict[str, Any]], ref: str, registry: str, node: str, progress: Progress) -> None:
    """Read the engine's pull events to the end; raise ExecutorError with the reason when it reports an error."""
    for event in events:
        error = event.get("error") or (event.get("errorDetail") or {}).get("message")
        if error:
            raise ExecutorError(explain_pull(ref, registry, node, " ".join(str(error).split())))
        progress.update(event)
