"""The storage root: nothing leaves it, manifests hash what a run left, logs are capped."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from reconciler.errors import StorageError
from reconciler.manifests import build_manifest
from reconciler.storage import LocalStorage, capped_log, read_tail


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    store = LocalStorage(tmp_path / "root")
    store.prepare()
    return store


@pytest.mark.parametrize("path", ["../etc", "workspaces/../../x", "/etc/passwd", "", "a\\..\\b", "..", "a/\x00"])
def test_paths_that_leave_the_root_are_refused(storage: LocalStorage, path: str) -> None:
    with pytest.raises(StorageError):
        storage.inside(path)


def test_a_symlink_out_of_the_root_is_refused(storage: LocalStorage, tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", storage.root / "resources" / "escape")
    with pytest.raises(StorageError, match="symlink"):
        storage.inside("resources/escape/file")
    assert storage.inside("resources/inside.txt") == storage.root / "resources" / "inside.txt"


def test_manifest_lists_every_file_with_size_and_sha256_and_skips_links_out(storage: LocalStorage, tmp_path: Path) -> None:
    workspace = storage.workspace("p", "1-a-1")
    (workspace / "sub").mkdir(parents=True)
    (workspace / "tracks.csv").write_bytes(b"1,2,3\n")
    (workspace / "sub" / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024 + 3))
    (tmp_path / "secret").write_text("not yours")
    os.symlink(tmp_path / "secret", workspace / "leak")
    os.symlink(workspace / "tracks.csv", workspace / "alias.csv")
    manifest = build_manifest(workspace, "workspaces/p/1-a-1")
    files = {f["path"]: f for f in manifest["files"]}
    assert set(files) == {"tracks.csv", "sub/big.bin", "alias.csv"}
    big = (workspace / "sub" / "big.bin").read_bytes()
    assert files["sub/big.bin"] == {"path": "sub/big.bin", "size": len(big), "sha256": hashlib.sha256(big).hexdigest()}
    assert manifest["total_size"] == len(big) + 6 + 6 and manifest["workspace"] == "workspaces/p/1-a-1"


def test_remove_project_deletes_its_workspaces_and_logs_and_nothing_else(storage: LocalStorage) -> None:
    for project in ("gone", "kept"):
        storage.workspace(project, "1-a-1").mkdir(parents=True)
        storage.log_path(project, "1-a-1").parent.mkdir(parents=True)
        storage.log_path(project, "1-a-1").write_text("log")
    (storage.resources / "video.mp4").write_text("pool")
    storage.remove_project("gone")
    assert storage.projects_on_disk() == {"kept"}
    assert (storage.resources / "video.mp4").exists()


def test_capped_log_keeps_head_and_tail_and_marks_the_cut(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    log.write_bytes(b"H" * 100 + b"M" * 1000 + b"T" * 50)
    capped = capped_log(log, head=100, tail=50)
    assert capped.startswith(b"H" * 100) and capped.endswith(b"T" * 50)
    assert b"1000 bytes cut here" in capped and b"M" not in capped
    log.write_bytes(b"short\n")
    assert capped_log(log, head=100, tail=50) == b"short\n"
    assert capped_log(tmp_path / "missing.log", 10, 10) == b""


def test_read_tail_starts_at_a_line_boundary(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    log.write_text("".join(f"line {i}\n" for i in range(1000)))
    tail = read_tail(log, 30)
    assert tail.endswith("line 999\n") and tail.startswith("line ")
    assert len(tail.encode()) <= 30
