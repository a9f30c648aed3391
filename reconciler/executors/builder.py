"""Builds a stage image from the state repo and pushes it to the registry: a node's part in image builds.

The files come from git, not from anyone's checkout: `images/NAME/` at the commit the build
record names, exported with `git archive` from the node's mirror into a scratch folder. The
Docker engine builds it (the classic builder; its output goes to the build's log, as a
stage's output goes to its log) and pushes it as REGISTRY/PREFIX/NAME:SOURCE. The registry
answers the push with the digest, which is what stages then run. See `buildplan` for who
builds what and when.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests

from reconciler import layout
from reconciler.executors.images import registry_of

log = logging.getLogger(__name__)

_ENGINE_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)


class BuildFailed(Exception):
    """Why a build failed, in a sentence for the build record."""


def build_and_push(git_dir: Path, commit: str, name: str, image: str, log_path: Path, scratch: Path, node: str,
                   client: Any = None) -> str:
    """Build images/NAME/ at `commit`, push it as `image`; its digest reference (REPOSITORY@sha256:...).

    Raises BuildFailed with the reason; everything the engine said is in the log at `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    context = scratch / f"{name}-{image.rsplit(':', 1)[-1]}"
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    try:
        with open(log_path, "ab") as out:
            def say(line: str) -> None:
                out.write(line.encode(errors="replace") + (b"" if line.endswith("\n") else b"\n"))
                out.flush()

            say(f"winslow: building {image} from {layout.image_dir(name)}/ at {commit[:12]} on {node}")
            _export(git_dir, commit, name, context)
            engine = client if client is not None else docker.from_env(timeout=600)
            _build(engine, context / layout.IMAGES / name, image, say)
            digest = _push(engine, image, say, node)
            say(f"winslow: pushed {digest}")
            return digest
    except OSError as exc:
        raise BuildFailed(f"could not prepare the build on {node}: {exc}") from exc
    finally:
        shutil.rmtree(context, ignore_errors=True)


def _export(git_dir: Path, commit: str, name: str, into: Path) -> None:
    archive = subprocess.run(["git", "--git-dir", str(git_dir), "archive", "--format=tar", commit,
                              f"{layout.image_dir(name)}/"], capture_output=True, timeout=300, check=False)
    if archive.returncode != 0:
        why = archive.stderr.decode(errors="replace").strip().splitlines()
        raise BuildFailed(f"{layout.image_dir(name)}/ could not be read at {commit[:12]}: "
                          f"{why[-1] if why else 'git archive failed'}")
    unpacked = subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, capture_output=True, timeout=300,
                              check=False)
    if unpacked.returncode != 0:
        raise BuildFailed(f"{layout.image_dir(name)}/ could not be unpacked: "
                          f"{unpacked.stderr.decode(errors='replace').strip()}")


def _build(engine: Any, context: Path, image: str, say: Callable[[str], None]) -> None:
    try:
        for event in engine.api.build(path=str(context), tag=image, rm=True, forcerm=True, decode=True):
            if event.get("stream"):
                say(str(event["stream"]))
            error = event.get("error") or (event.get("errorDetail") or {}).get("message")
            if error:
                say(f"winslow: the build failed: {error}")
                raise BuildFailed(f"docker build failed: {' '.join(str(error).split())}")
    except _ENGINE_ERRORS as exc:
        raise BuildFailed(f"docker build failed: {' '.join(str(exc).split())}") from exc


def _push(engine: Any, image: str, say: Callable[[str], None], node: str) -> str:
    repository, _, tag = image.rpartition(":")
    digest = None
    say(f"winslow: pushing {image}")
    try:
        for event in engine.api.push(repository, tag=tag, stream=True, decode=True):
            error = event.get("error") or (event.get("errorDetail") or {}).get("message")
            if error:
                raise BuildFailed(f"the push to {registry_of(image)} from {node} failed: {' '.join(str(error).split())}")
            found = (event.get("aux") or {}).get("Digest")
            if found:
                digest = str(found)
    except _ENGINE_ERRORS as exc:
        raise BuildFailed(f"the push to {registry_of(image)} from {node} failed: {' '.join(str(exc).split())}") from exc
    if digest is None:
        raise BuildFailed(f"the registry {registry_of(image)} did not say the digest of {image}")
    return f"{repository}@{digest}"
