"""Result manifests: whatever a stage leaves in its workspace, the manifest is built and says what it could not list."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reconciler import manifests
from reconciler.manifests import (
    CHANGING,
    NOT_UTF8,
    UNLISTED_MAX,
    VANISHED,
    HashCache,
    build_manifest,
)

ROOT = os.geteuid() == 0
SCHEMA = Path(__file__).resolve().parent.parent / "schema" / "result.schema.json"
HOUR_AGO = time.time() - 3600


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build(workspace: Path, **kwargs: Any) -> dict[str, Any]:
    """build_manifest in a thread, bounded: a FIFO or anything else that blocks fails the test instead of hanging it."""
    result: dict[str, Any] = {}

    def run() -> None:
        result["manifest"] = build_manifest(workspace, "workspaces/p/1-a-1", **kwargs)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "build_manifest hung"
    manifest: dict[str, Any] = result["manifest"]
    return manifest


def listed(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["path"]: f for f in manifest["files"]}


def unlisted(manifest: dict[str, Any]) -> dict[str, str]:
    return {u["path"]: u["reason"] for u in manifest.get("unlisted", [])}


def links(manifest: dict[str, Any]) -> dict[str, str]:
    return {link["path"]: link["target"] for link in manifest.get("links", [])}


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    workspace = tmp_path / "storage" / "workspaces" / "p" / "1-a-1"
    workspace.mkdir(parents=True)
    return workspace


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the files build_manifest really reads and hashes."""
    calls: list[int] = []
    real = manifests.sha256_fd

    def counting(fd: int) -> tuple[int, str]:
        calls.append(fd)
        return real(fd)

    monkeypatch.setattr(manifests, "sha256_fd", counting)
    return calls


def test_files_in_nested_folders_are_listed_in_sorted_order_with_size_and_sha256(ws: Path) -> None:
    contents = {"tracks.csv": b"1,2,3\n", "a.txt": b"a", "a/x": b"x" * 10, "a-b/y": b"",
                "b/c/d/e.bin": os.urandom(5 * 1024 * 1024 + 3),
                "z": b"last"}
    for rel, data in contents.items():
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_bytes(data)
    (ws / "empty-folder").mkdir()
    manifest = build(ws)
    assert manifest == {"workspace": "workspaces/p/1-a-1", "total_size": sum(map(len, contents.values())),
                        "truncated": False,
                        "files": [{"path": rel, "size": len(contents[rel]), "sha256": sha(contents[rel])}
                                  for rel in sorted(contents)]}
    assert [f["path"] for f in manifest["files"]] == ["a-b/y", "a.txt", "a/x", "b/c/d/e.bin", "tracks.csv", "z"]


def test_a_missing_workspace_gives_an_empty_manifest(tmp_path: Path) -> None:
    assert build(tmp_path / "never-created") == {"workspace": "workspaces/p/1-a-1", "total_size": 0,
                                                 "truncated": False, "files": []}


def test_a_workspace_that_is_a_file_is_said_so(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    manifest = build(tmp_path / "file")
    assert manifest["files"] == [] and unlisted(manifest) == {".": manifests.NOT_A_FOLDER}


def test_a_symlink_loop_is_named_not_raised(ws: Path) -> None:
    (ws / "kept.txt").write_text("kept")
    os.symlink("b", ws / "a")
    os.symlink("a", ws / "b")
    os.symlink("self", ws / "self")
    os.makedirs(ws / "deep")
    os.symlink("../deep/loop", ws / "deep" / "loop")
    manifest = build(ws)
    assert list(listed(manifest)) == ["kept.txt"] and "unlisted" not in manifest
    assert links(manifest) == {"a": "b", "b": "a", "deep/loop": "../deep/loop", "self": "self"}


def test_a_dangling_link_is_listed_as_a_link_with_its_target(ws: Path, tmp_path: Path) -> None:
    os.symlink("no-such-file", ws / "dangling")
    os.symlink("kept.txt/below-a-file", ws / "not-a-folder")
    os.symlink(tmp_path / "nowhere", ws / "dangling-out")
    (ws / "kept.txt").write_text("kept")
    manifest = build(ws)
    assert list(listed(manifest)) == ["kept.txt"] and "unlisted" not in manifest
    assert links(manifest) == {"dangling": "no-such-file", "not-a-folder": "kept.txt/below-a-file",
                               "dangling-out": str(tmp_path / "nowhere")}


def test_links_out_of_the_workspace_are_never_followed(ws: Path, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("not yours")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "big").write_text("not yours either")
    os.symlink(tmp_path / "secret", ws / "leak")
    os.symlink("../../../../secret", ws / "relative-leak")
    os.symlink(tmp_path / "outside", ws / "folder-out")
    os.symlink("/etc/passwd", ws / "passwd")
    os.symlink("/", ws / "root")
    (ws / "sub").mkdir()
    os.symlink("../..", ws / "sub" / "up")
    manifest = build(ws)
    assert manifest["files"] == [] and "unlisted" not in manifest
    assert links(manifest)["passwd"] == "/etc/passwd" and len(links(manifest)) == 6  # named, never read


def test_links_inside_are_listed_as_links_never_hashed_and_linked_folders_are_not_entered(ws: Path) -> None:
    (ws / "data").mkdir()
    (ws / "data" / "frames.bin").write_bytes(b"frames")
    os.symlink("data/frames.bin", ws / "alias.bin")
    os.symlink(ws / "data" / "frames.bin", ws / "absolute-alias.bin")
    os.symlink("alias.bin", ws / "chain.bin")
    os.symlink("data", ws / "data-link")  # a folder: not entered, not listed
    os.symlink(".", ws / "here")
    manifest = build(ws)
    assert manifest["files"] == [{"path": "data/frames.bin", "size": 6, "sha256": sha(b"frames")}]
    assert manifest["total_size"] == 6 and "unlisted" not in manifest
    assert links(manifest) == {"absolute-alias.bin": str(ws / "data" / "frames.bin"), "alias.bin": "data/frames.bin",
                               "chain.bin": "alias.bin", "data-link": "data", "here": "."}


def test_a_workspace_below_a_linked_folder_is_listed_but_one_swapped_for_a_link_is_not(ws: Path, tmp_path: Path) -> None:
    (ws / "a.txt").write_text("a")
    os.symlink("x", ws / "inside-link")
    (ws / "x").write_text("x")
    os.symlink(ws.parent, tmp_path / "root-link")  # a storage root reached through a link: fine
    manifest = build(tmp_path / "root-link" / ws.name)
    assert [f["path"] for f in manifest["files"]] == ["a.txt", "x"] and links(manifest) == {"inside-link": "x"}
    os.symlink(ws, tmp_path / "swapped")  # the run put a link where its workspace was: nothing behind it is listed
    swapped = build(tmp_path / "swapped")
    assert swapped["files"] == [] and unlisted(swapped) == {".": manifests.WORKSPACE_LINK}


def test_fifos_and_sockets_are_skipped_without_blocking(ws: Path) -> None:
    os.mkfifo(ws / "pipe")
    os.symlink("pipe", ws / "pipe-link")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(ws / "sock"))
        os.symlink("sock", ws / "sock-link")
        (ws / "kept.txt").write_text("kept")
        manifest = build(ws)  # bounded: a FIFO opened for reading without O_NONBLOCK would block for ever
    assert list(listed(manifest)) == ["kept.txt"] and "unlisted" not in manifest


def test_names_that_are_not_utf8_are_named_with_escapes(ws: Path) -> None:
    base = os.fsencode(ws)
    try:
        with open(base + b"/bad-\xff.bin", "wb") as handle:
            handle.write(b"x")
        os.mkdir(base + b"/folder-\xfe")
    except OSError as exc:  # a file system that insists on UTF-8 names
        pytest.skip(f"cannot create a non-UTF-8 name here: {exc}")
    with open(base + b"/folder-\xfe/inside", "wb") as handle:
        handle.write(b"y")
    (ws / "kept.txt").write_text("kept")
    (ws / "unicode-é.txt").write_text("fine")
    manifest = build(ws)
    assert list(listed(manifest)) == ["kept.txt", "unicode-é.txt"]
    assert unlisted(manifest) == {"bad-\\xff.bin": NOT_UTF8, "folder-\\xfe": NOT_UTF8 + manifests.INSIDE_NOT_LISTED}
    json.dumps(manifest, ensure_ascii=False).encode("utf-8")  # it can be written as YAML/JSON in UTF-8


@pytest.mark.skipif(ROOT, reason="root reads every file whatever its mode")
def test_unreadable_files_and_folders_are_named(ws: Path) -> None:
    (ws / "locked.bin").write_bytes(b"secret")
    (ws / "locked.bin").chmod(0)
    (ws / "closed").mkdir()
    (ws / "closed" / "inside").write_text("x")
    (ws / "kept.txt").write_text("kept")
    (ws / "closed").chmod(0)
    try:
        manifest = build(ws)
    finally:
        (ws / "closed").chmod(0o755)
        (ws / "locked.bin").chmod(0o644)
    assert list(listed(manifest)) == ["kept.txt"]
    assert unlisted(manifest) == {"closed": "folder cannot be read: permission denied; nothing inside it is listed",
                                  "locked.bin": "cannot be read: permission denied"}


class _DenyingOs:
    """The os module as seen by manifests.py, refusing to open some paths (root cannot be refused for real)."""

    def __init__(self, denied: set[str]) -> None:
        self.denied = denied

    def open(self, path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fspath(path) in self.denied:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return os.open(path, flags, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def test_unreadable_files_and_folders_are_named_even_as_root(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (ws / "locked.bin").write_bytes(b"secret")
    (ws / "closed").mkdir()
    (ws / "closed" / "inside").write_text("x")
    (ws / "kept.txt").write_text("kept")
    monkeypatch.setattr(manifests, "os", _DenyingOs({str(ws / "locked.bin"), str(ws / "closed")}))
    manifest = build(ws)
    assert list(listed(manifest)) == ["kept.txt"]
    assert unlisted(manifest) == {"closed": "folder cannot be read: permission denied; nothing inside it is listed",
                                  "locked.bin": "cannot be read: permission denied"}


def test_a_file_that_vanishes_during_the_walk_is_named(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (ws / "kept.txt").write_text("kept")
    real = manifests._Builder._entries

    def with_ghost(self: Any, folder: str, rel: str) -> list[str] | None:
        names = real(self, folder, rel)
        return sorted([*(names or []), "ghost.bin", "ghost-folder"])  # listed a moment ago, gone now

    monkeypatch.setattr(manifests._Builder, "_entries", with_ghost)
    manifest = build(ws)
    assert list(listed(manifest)) == ["kept.txt"]
    assert unlisted(manifest) == {"ghost-folder": VANISHED, "ghost.bin": VANISHED}


def test_a_file_still_being_written_is_hashed_again_then_named(ws: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (ws / "settled.log").write_text("first")
    (ws / "growing.log").write_text("first")
    real = manifests.sha256_fd
    appends = {"settled.log": 1, "growing.log": 99}

    def writer_meanwhile(fd: int) -> tuple[int, str]:
        result = real(fd)
        name = next(n for n in appends if os.fstat(fd).st_ino == (ws / n).stat().st_ino)
        if appends[name]:
            appends[name] -= 1
            with open(ws / name, "a") as handle:
                handle.write(" more")
        return result

    monkeypatch.setattr(manifests, "sha256_fd", writer_meanwhile)
    manifest = build(ws)
    assert listed(manifest)["settled.log"]["sha256"] == sha(b"first more")  # changed once: hashed again
    assert unlisted(manifest) == {"growing.log": CHANGING}


def test_truncated_at_max_files_after_the_first_in_sorted_order(ws: Path, hashed: list[int]) -> None:
    for i in range(25):
        (ws / f"f{i:02}").write_text(str(i))
    manifest = build(ws, max_files=10)
    assert manifest["truncated"] is True
    assert [f["path"] for f in manifest["files"]] == [f"f{i:02}" for i in range(10)]
    assert manifest["total_size"] == 10 and len(hashed) == 10  # the walk stops there
    exact = build(ws, max_files=25)
    assert exact["truncated"] is False and len(exact["files"]) == 25


def test_a_deep_tree_does_not_hit_the_recursion_limit(ws: Path) -> None:
    depth = 1100  # more than Python's recursion limit; os.makedirs and shutil.rmtree recurse, so by hand
    folders = [os.path.join(ws, *["d"] * level) for level in range(1, depth + 1)]
    try:
        for folder in folders:
            os.mkdir(folder)
        with open(os.path.join(folders[-1], "bottom.txt"), "w") as handle:
            handle.write("bottom")
        manifest = build(ws)
        assert [f["path"] for f in manifest["files"]] == ["d/" * depth + "bottom.txt"]
    finally:  # pytest's own clean-up of old temp folders would recurse too deep on what is left
        if os.path.exists(os.path.join(folders[-1], "bottom.txt")):
            os.unlink(os.path.join(folders[-1], "bottom.txt"))
        for folder in reversed(folders):
            if os.path.isdir(folder):
                os.rmdir(folder)


def test_unlisted_is_bounded(ws: Path) -> None:
    for i in range(UNLISTED_MAX + 20):  # names that are not UTF-8 cannot be listed in YAML
        with open(os.path.join(os.fsencode(ws), b"bad\xff%03d" % i), "wb"):
            pass
    manifest = build(ws)
    assert len(manifest["unlisted"]) == UNLISTED_MAX
    assert manifest["unlisted"][-1]["reason"].endswith("; 20 more entries could not be listed either (not named here)")


def test_a_manifest_with_unlisted_entries_matches_the_result_schema(ws: Path) -> None:
    import jsonschema

    (ws / "a.txt").write_text("a")
    os.symlink("loop", ws / "loop")
    with open(os.path.join(os.fsencode(ws), b"bad\xff"), "wb"):
        pass
    manifest = build(ws)
    assert "unlisted" in manifest and "links" in manifest
    document = {"project": "p", "run": "1-a-1", "stage": "a", "node": "n1", "created": "2026-01-01T00:00:00.000Z",
                **manifest}
    validator = jsonschema.Draft202012Validator(json.loads(SCHEMA.read_text()))
    assert list(validator.iter_errors(document)) == []
    document["unlisted"].append({"path": "x", "reason": "y", "extra": 1})
    assert list(validator.iter_errors(document))


# -- the hash cache ----------------------------------------------------------------------------------

def big_file(path: Path, size: int = 50 * 1024 * 1024) -> bytes:
    data = os.urandom(1024 * 1024) * (size // (1024 * 1024))
    path.write_bytes(data)
    os.utime(path, (HOUR_AGO, HOUR_AGO))
    return data


def test_an_unchanged_file_is_not_hashed_twice(ws: Path, hashed: list[int]) -> None:
    data = big_file(ws / "video.bin")
    (ws / "small.txt").write_text("small")
    cache = HashCache(racy_s=0)
    first = build(ws, cache=cache)
    assert len(hashed) == 2
    began = time.monotonic()
    second = build(ws, cache=cache)
    assert time.monotonic() - began < 1.0
    assert len(hashed) == 2 and second == first and cache.hits == 2
    assert listed(second)["video.bin"] == {"path": "video.bin", "size": len(data), "sha256": sha(data)}


def test_a_link_to_a_file_is_never_hashed(ws: Path, hashed: list[int]) -> None:
    big_file(ws / "video.bin", 4 * 1024 * 1024)
    os.symlink("video.bin", ws / "alias.bin")
    manifest = build(ws, cache=HashCache(racy_s=0))
    assert len(hashed) == 1 and list(listed(manifest)) == ["video.bin"] and links(manifest) == {"alias.bin": "video.bin"}


def test_a_changed_file_is_hashed_again(ws: Path, hashed: list[int]) -> None:
    path = ws / "video.bin"
    data = big_file(path, 8 * 1024 * 1024)
    cache = HashCache(racy_s=0)
    build(ws, cache=cache)
    # new content, new size, new mtime
    path.write_bytes(data + b"tail")
    changed = build(ws, cache=cache)
    assert len(hashed) == 2 and listed(changed)["video.bin"]["sha256"] == sha(data + b"tail")
    # same size, mtime set back to what it was: the ctime still tells
    with open(path, "r+b") as handle:
        handle.write(b"X")
    os.utime(path, ns=(cache._entries[str(path)][0].mtime_ns,) * 2)
    rewritten = build(ws, cache=cache)
    assert len(hashed) == 3 and listed(rewritten)["video.bin"]["sha256"] == sha(b"X" + data[1:] + b"tail")
    # replaced by another file (another inode) of the same size and mtime
    path.unlink()
    path.write_bytes(data + b"TAIL")
    os.utime(path, (HOUR_AGO, HOUR_AGO))
    replaced = build(ws, cache=cache)
    assert len(hashed) == 4 and listed(replaced)["video.bin"]["sha256"] == sha(data + b"TAIL")


def test_a_file_changed_just_now_is_hashed_but_not_cached(ws: Path, hashed: list[int]) -> None:
    (ws / "fresh.txt").write_text("written a moment ago")
    cache = HashCache()  # racy_s=2: a write within the same timestamp tick would go unseen
    build(ws, cache=cache)
    build(ws, cache=cache)
    assert len(hashed) == 2 and len(cache) == 0
    st = (ws / "fresh.txt").stat()
    assert cache.put(str(ws / "fresh.txt"), st, "0" * 64) is False
    assert cache.put(str(ws / "fresh.txt"), st, "0" * 64, hashed_at_ns=time.time_ns() + 3 * 10**9) is True


def test_the_cache_file_spares_a_restarted_node_the_hashing(ws: Path, tmp_path: Path, hashed: list[int]) -> None:
    data = big_file(ws / "video.bin", 8 * 1024 * 1024)
    (ws / "frames").mkdir()
    for i in range(3):
        (ws / "frames" / f"{i}.png").write_bytes(bytes([i]) * 100)
        os.utime(ws / "frames" / f"{i}.png", (HOUR_AGO, HOUR_AGO))
    store = tmp_path / "work" / "hashes.jsonl"
    with HashCache(store, racy_s=0) as first:
        before = build(ws, cache=first)
    assert len(hashed) == 4 and len(store.read_text().splitlines()) == 4
    with open(store, "a") as handle:
        handle.write('["half a line cut by a cra')  # a crash in the middle of an append
    with HashCache(store) as second:
        assert len(second) == 4
        after = build(ws, cache=second)
        assert second.hits == 4
    assert len(hashed) == 4 and after == before and listed(after)["video.bin"]["sha256"] == sha(data)


def test_the_cache_is_bounded_in_memory_and_on_disk(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("x")
    os.utime(target, (HOUR_AGO, HOUR_AGO))
    st = target.stat()
    store = tmp_path / "hashes.jsonl"
    cache = HashCache(store, max_entries=10, racy_s=0)
    for i in range(3000):
        assert cache.put(f"/data/{i}", st, f"{i:064x}")
    assert len(cache) == 10
    lines = store.read_text().splitlines()
    assert len(lines) <= 2 * 10 + 1000 + 1
    cache.close()
    reloaded = HashCache(store, max_entries=10)
    assert len(reloaded) == 10
    assert reloaded.get("/data/2999", st) == f"{2999:064x}" and reloaded.get("/data/0", st) is None
    assert reloaded.forget("/data") == 10 and len(reloaded) == 0
    reloaded.close()
    assert HashCache(store).get("/data/2999", st) is None


def test_the_cache_is_safe_to_share_between_threads(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("x")
    os.utime(target, (HOUR_AGO, HOUR_AGO))
    st = target.stat()
    cache = HashCache(tmp_path / "hashes.jsonl", max_entries=500, racy_s=0)
    errors: list[BaseException] = []

    def work(n: int) -> Callable[[], None]:
        def run() -> None:
            try:
                for i in range(2000):
                    path = f"/t{n}/{i % 300}"
                    if cache.get(path, st) is None:
                        cache.put(path, st, f"{i:064x}")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        return run

    threads = [threading.Thread(target=work(n)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and len(cache) == 500
    cache.close()
    assert len(HashCache(tmp_path / "hashes.jsonl", max_entries=500)) == 500


def test_a_cache_file_that_cannot_be_written_leaves_a_working_cache(ws: Path, tmp_path: Path,
                                                                      hashed: list[int]) -> None:
    big_file(ws / "video.bin", 1024 * 1024)
    (tmp_path / "blocker").write_text("a file where the work folder should be")
    cache = HashCache(tmp_path / "blocker" / "hashes.jsonl", racy_s=0)
    first = build(ws, cache=cache)
    assert build(ws, cache=cache) == first and len(hashed) == 1 and cache.path is None
