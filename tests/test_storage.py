"""The storage root: nothing leaves it, links are never followed, hashes are kept beside files, writes are
atomic; manifests hash what a run left, logs are capped."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from reconciler.errors import StorageError
from reconciler.manifests import build_manifest
from reconciler.storage import LocalStorage, NotFound, StageFolders, Stamp, capped_log, read_tail


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
    assert set(files) == {"tracks.csv", "sub/big.bin"}  # links are listed as links, never hashed
    assert {link["path"] for link in manifest["links"]} == {"leak", "alias.csv"}
    big = (workspace / "sub" / "big.bin").read_bytes()
    assert files["sub/big.bin"] == {"path": "sub/big.bin", "size": len(big), "sha256": hashlib.sha256(big).hexdigest()}
    assert manifest["total_size"] == len(big) + 6 and manifest["workspace"] == "workspaces/p/1-a-1"


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


# -- the Storage interface: stat, list, open, writer, remove, and the shadow tree of hashes ----------------------

def _past(path: Path, seconds: float = 60) -> None:
    """An mtime old enough that a hash of the file is recorded (a file changed just now may change again unseen)."""
    stamp = os.stat(path).st_mtime - seconds
    os.utime(path, (stamp, stamp))


def test_stat_with_hash_computes_records_and_reuses_the_sha256(storage: LocalStorage) -> None:
    video = storage.resources / "videos" / "a.mp4"
    video.parent.mkdir()
    video.write_bytes(b"frames" * 1000)
    _past(video)
    assert storage.stat("resources/videos/a.mp4").sha256 is None  # not hashed until asked

    entry = storage.stat("resources/videos/a.mp4", hash=True)

    assert (entry.path, entry.kind, entry.size) == ("resources/videos/a.mp4", "file", 6000)
    assert entry.sha256 == hashlib.sha256(b"frames" * 1000).hexdigest()
    record = json.loads((storage.root / ".winslow/sha256/resources/videos/a.mp4.json").read_text())
    assert record == {"sha256": entry.sha256, "size": 6000, "mtime_ns": os.stat(video).st_mtime_ns}
    assert storage.stat("resources/videos/a.mp4").sha256 == entry.sha256  # read back, not hashed again
    assert storage.list("resources/videos")[0].sha256 == entry.sha256


def test_a_recorded_sha256_is_dropped_once_the_file_changes(storage: LocalStorage) -> None:
    video = storage.resources / "a.mp4"
    video.write_bytes(b"one")
    _past(video)
    assert storage.stat("resources/a.mp4", hash=True).sha256 == hashlib.sha256(b"one").hexdigest()
    video.write_bytes(b"two")  # same size, new mtime
    assert storage.stat("resources/a.mp4").sha256 is None
    assert storage.stat("resources/a.mp4", hash=True).sha256 == hashlib.sha256(b"two").hexdigest()


def test_a_file_changed_just_now_is_hashed_but_not_recorded(storage: LocalStorage) -> None:
    (storage.resources / "fresh.bin").write_bytes(b"still being written?")
    assert storage.stat("resources/fresh.bin", hash=True).sha256 is not None
    assert not (storage.root / ".winslow/sha256/resources/fresh.bin.json").exists()


def test_list_shows_links_as_links_and_hides_partials_and_winslow_records(storage: LocalStorage, tmp_path: Path) -> None:
    workspace = storage.workspace("p", "1-a-1")
    workspace.mkdir(parents=True)
    (workspace / "tracks.csv").write_text("1,2\n")
    (workspace / "sub").mkdir()
    os.symlink("/etc/passwd", workspace / "leak")
    (workspace / ".big.bin.winslow-partial").write_bytes(b"half")
    (workspace / ".big.bin.winslow-partial.json").write_text("{}")
    storage.remember("workspaces/p/1-a-1/tracks.csv", 4, 1, "0" * 64)

    entries = {e.path: e for e in storage.list("workspaces/p/1-a-1")}

    assert set(entries) == {"workspaces/p/1-a-1/tracks.csv", "workspaces/p/1-a-1/sub", "workspaces/p/1-a-1/leak"}
    assert entries["workspaces/p/1-a-1/leak"].kind == "link" and entries["workspaces/p/1-a-1/leak"].target == "/etc/passwd"
    assert entries["workspaces/p/1-a-1/sub"].kind == "dir"
    assert entries["workspaces/p/1-a-1/tracks.csv"].sha256 is None  # the record's size and mtime are not the file's
    assert [e.path for e in storage.list(".")] == ["logs", "resources", "workspaces"]  # .winslow/ is not listed
    assert storage.stat("workspaces/p/1-a-1/leak", hash=True).sha256 is None  # a link is never hashed


@pytest.mark.parametrize("call", ["stat", "list", "open", "writer", "remove"])
@pytest.mark.parametrize("path", ["workspaces/p/1-a-1/out/passwd", "workspaces/p/1-a-1/in/tracks.csv", "../x",
                                  "/etc/passwd", "resources/../../x", ".winslow/sha256/x.json"])
def test_the_interface_never_follows_a_link_nor_leaves_the_root(storage: LocalStorage, call: str, path: str) -> None:
    workspace = storage.workspace("p", "1-a-1")
    workspace.mkdir(parents=True)
    (workspace / "tracks.csv").write_text("1,2\n")
    os.symlink("/etc", workspace / "out")            # a folder link out of the root
    os.symlink(workspace, workspace / "in")          # a folder link that stays inside: still never followed
    calls = {"stat": lambda: storage.stat(path), "list": lambda: storage.list(path), "open": lambda: storage.open(path),
             "writer": lambda: storage.writer(path, Stamp("file:///x", 1, 1)), "remove": lambda: storage.remove(path)}
    with pytest.raises(StorageError) as refused:
        calls[call]()
    assert "\n" not in str(refused.value)
    assert (storage.root / "workspaces/p/1-a-1/tracks.csv").exists()


def test_open_serves_regular_files_only(storage: LocalStorage) -> None:
    (storage.resources / "a.bin").write_bytes(b"0123456789")
    os.symlink(storage.resources / "a.bin", storage.resources / "alias.bin")
    with storage.open("resources/a.bin", 4) as stream:
        assert stream.read() == b"456789"
    with pytest.raises(StorageError, match="symbolic link"):
        storage.open("resources/alias.bin")
    with pytest.raises(StorageError, match="folder"):
        storage.open("resources")
    with pytest.raises(NotFound):
        storage.open("resources/missing.bin")


def test_a_write_becomes_the_file_only_when_committed_whole(storage: LocalStorage) -> None:
    stamp = Stamp("file:///home/me/v.bin", 10, 123)
    writer = storage.writer("resources/new/v.bin", stamp)
    assert writer.offset == 0
    writer.write(b"01234")
    writer.abort()
    final = storage.root / "resources/new/v.bin"
    assert not final.exists() and (final.parent / ".v.bin.winslow-partial").read_bytes() == b"01234"
    assert storage.list("resources/new") == []

    again = storage.writer("resources/new/v.bin", stamp)  # the same source: it goes on where it stopped
    assert again.offset == 5 and again.read_back(0, 5) == b"01234"
    again.write(b"567")
    with pytest.raises(StorageError, match="holds 8 bytes, not 10"):
        again.commit(10, "0" * 64)
    assert not final.exists()
    again.abort()

    forced = storage.writer("resources/new/v.bin", Stamp("file:///home/me/moved.bin", 10, 123), resume=True)
    assert forced.offset == 8   # --resume: any partial no longer than the source (the copy checks its last MiB)
    forced.abort()
    other = storage.writer("resources/new/v.bin", Stamp("file:///home/me/other.bin", 10, 123))
    assert other.offset == 0  # another source starts again
    other.write(b"abcdefghij")
    entry = other.commit(10, hashlib.sha256(b"abcdefghij").hexdigest())
    assert final.read_bytes() == b"abcdefghij" and entry.sha256 == hashlib.sha256(b"abcdefghij").hexdigest()
    assert sorted(p.name for p in final.parent.iterdir()) == ["v.bin"]  # no partial or sidecar left
    assert storage.stat("resources/new/v.bin").sha256 == entry.sha256


def test_remove_takes_the_file_its_record_and_partials_and_a_folder_only_when_asked(storage: LocalStorage) -> None:
    (storage.resources / "videos").mkdir()
    (storage.resources / "videos" / "a.mp4").write_bytes(b"a")
    storage.remember("resources/videos/a.mp4", 1, 1, "0" * 64)
    (storage.resources / "videos" / ".a.mp4.winslow-partial").write_bytes(b"")
    storage.remove("resources/videos/a.mp4")
    assert list((storage.resources / "videos").iterdir()) == []
    assert not (storage.root / ".winslow/sha256/resources/videos/a.mp4.json").exists()
    with pytest.raises(StorageError, match="folder"):
        storage.remove("resources/videos")
    storage.remove("resources/videos", recursive=True)
    assert not (storage.resources / "videos").exists()
    with pytest.raises(NotFound):
        storage.remove("resources/videos")


def test_stage_folders_are_named_by_the_layout(storage: LocalStorage) -> None:
    folders = storage.folders("ulm", "3-detect-1")
    assert folders == StageFolders("resources", "workspaces/ulm/3-detect-1", "logs/ulm/3-detect-1.log")
    assert storage.inside(folders.workspace) == storage.workspace("ulm", "3-detect-1")


SECRET = b"Sup3rS3cretValue-42xyz"


def _mask(data: bytes) -> bytes:
    return data.replace(SECRET, b"***")


def test_a_secret_across_the_cut_of_a_capped_log_is_masked_whole(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    for at in range(1000 - len(SECRET) + 1, 1000):  # every place where the secret straddles the head's end
        body = b"a" * at + SECRET + b"b" * 5000 + SECRET[:3] + b"c" * 10 + SECRET + b"d" * 7
        log.write_bytes(body)
        capped = capped_log(log, head=1000, tail=30, mask=_mask, overlap=len(SECRET))
        for half in (SECRET[:8], SECRET[-8:]):
            assert half not in capped, (at, capped)


def test_the_live_tail_never_starts_inside_a_secret(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    log.write_bytes(b"x" * 100 + SECRET + b"0123456789")
    tail = read_tail(log, 20, mask=_mask, overlap=len(SECRET))
    assert "retValue" not in tail and "42xyz" not in tail


def test_a_log_that_is_a_symbolic_link_is_said_not_followed_and_never_raises(tmp_path: Path) -> None:
    elsewhere = tmp_path / "secret-elsewhere.txt"
    elsewhere.write_text("not yours\n")
    link = tmp_path / "run.log"
    link.symlink_to(elsewhere)
    capped = capped_log(link, 100, 100)
    assert b"not yours" not in capped and b"could not be read" in capped
    assert read_tail(link, 100) == ""
