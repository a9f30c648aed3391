"""Moving big files: byte-identical round trips locally and over a real SSH server, resuming after Ctrl-C, a kill
or a lost connection, and nothing truncated under a final name when the disk fills up or the bytes are wrong."""
from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler import cli
from reconciler.errors import StorageError
from reconciler.sshstore import SshStorage
from reconciler.storage import LocalStorage, Stamp, Storage, file_writer
from reconciler.transfer import copy, local_file, stored_file
from tests.sshd import SshServer, sshd_fixture, start_server  # noqa: F401 - the fixture `sshd`

REPO_ROOT = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
GiB = 1024 * MiB
BIG = 2 * GiB + 5   # a sparse file: gigabytes to copy, almost nothing on disk until it is copied


def winslow(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "reconciler", *args], cwd=REPO_ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def sparse(path: Path, size: int) -> None:
    """`size` bytes, zeros but for a random MiB at the start, in the middle and at the end (so an offset off by
    one chunk shows)."""
    with open(path, "wb") as handle:
        handle.truncate(size)
        for at in (0, size // 2, size - MiB):
            handle.seek(at)
            handle.write(os.urandom(MiB))


def wait_until_bigger(path: Path, size: int, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.stat().st_size >= size:
            return
        if proc.poll() is not None:
            pytest.fail(f"the copy ended ({proc.returncode}) before {path.name} reached {size} bytes: "
                        f"{proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"{path} did not reach {size} bytes within {timeout} s")


def identical(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(params=["local", "ssh"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Storage, Path]]:
    """A storage root at tmp_path/root, as a folder or through a real SSH server on 127.0.0.1."""
    root = tmp_path / "root"
    (root / "resources").mkdir(parents=True)
    if request.param == "local":
        yield LocalStorage(root), root
        return
    server = start_server(tmp_path / "sshd")
    storage = SshStorage(server.url(root), server.command)
    try:
        yield storage, root
    finally:
        storage.close()
        server.stop()


def upload(storage: Storage, local: Path, path: str) -> str:
    source = local_file(local)
    entry = copy(source, storage.writer(path, source.stamp))
    assert entry.sha256 is not None
    return entry.sha256


def test_a_round_trip_is_byte_identical_and_keeps_the_sha256_beside_the_file(store, tmp_path: Path) -> None:
    storage, root = store
    data = os.urandom(9 * MiB + 3)   # more than two chunks, and not a multiple of one
    (tmp_path / "a.bin").write_bytes(data)
    (tmp_path / "empty.bin").write_bytes(b"")

    sha = upload(storage, tmp_path / "a.bin", "resources/videos/a.bin")
    upload(storage, tmp_path / "empty.bin", "resources/videos/empty.bin")

    assert sha == hashlib.sha256(data).hexdigest()
    assert (root / "resources/videos/a.bin").read_bytes() == data
    assert storage.stat("resources/videos/a.bin").sha256 == sha
    listed = {e.path: e for e in storage.list("resources/videos")}
    assert listed["resources/videos/a.bin"].size == len(data) and listed["resources/videos/a.bin"].sha256 == sha
    assert listed["resources/videos/empty.bin"].sha256 == hashlib.sha256(b"").hexdigest()
    assert (root / ".winslow/sha256/resources/videos/a.bin.json").exists()
    assert sorted(p.name for p in (root / "resources/videos").iterdir()) == ["a.bin", "empty.bin"]

    (root / "resources/videos/raw.bin").write_bytes(data[:1000])   # put there by hand: no record yet
    os.utime(root / "resources/videos/raw.bin", (1e9, 1e9))
    assert storage.stat("resources/videos/raw.bin").sha256 is None
    assert storage.stat("resources/videos/raw.bin", hash=True).sha256 == hashlib.sha256(data[:1000]).hexdigest()
    assert storage.stat("resources/videos/raw.bin").sha256 == hashlib.sha256(data[:1000]).hexdigest()
    storage.remove("resources/videos/raw.bin")

    source = stored_file(storage, "resources/videos/a.bin")
    assert source.expected == sha   # a download is checked against the recorded sha256
    entry = copy(source, file_writer(tmp_path / "out.bin", source.stamp))
    assert (tmp_path / "out.bin").read_bytes() == data and entry.sha256 == sha

    storage.remove("resources/videos/a.bin")
    assert [e.path for e in storage.list("resources/videos")] == ["resources/videos/empty.bin"]
    assert not (root / ".winslow/sha256/resources/videos/a.bin.json").exists()


def test_a_partial_of_the_same_source_is_continued_and_a_wrong_one_started_again(store, tmp_path: Path) -> None:
    storage, root = store
    data = os.urandom(6 * MiB)
    (tmp_path / "a.bin").write_bytes(data)
    stamp = local_file(tmp_path / "a.bin").stamp
    partial = root / "resources/.a.bin.winslow-partial"
    (root / "resources/.a.bin.winslow-partial.json").write_bytes(stamp.to_json())

    partial.write_bytes(data[:5 * MiB])
    writer = storage.writer("resources/a.bin", stamp)
    assert writer.offset == 5 * MiB
    assert copy(local_file(tmp_path / "a.bin"), writer).sha256 == hashlib.sha256(data).hexdigest()
    assert (root / "resources/a.bin").read_bytes() == data

    (root / "resources/a.bin").unlink()
    (root / "resources/.a.bin.winslow-partial.json").write_bytes(stamp.to_json())
    partial.write_bytes(data[:3 * MiB] + b"x" * MiB)  # the same length, other bytes at its end
    assert copy(local_file(tmp_path / "a.bin"), storage.writer("resources/a.bin", stamp)).sha256 == \
        hashlib.sha256(data).hexdigest()
    assert (root / "resources/a.bin").read_bytes() == data and not partial.exists()


def test_bytes_that_do_not_match_the_recorded_sha256_are_not_saved(store, tmp_path: Path) -> None:
    storage, root = store
    (tmp_path / "a.bin").write_bytes(b"the original bytes")
    upload(storage, tmp_path / "a.bin", "resources/a.bin")
    stored = root / "resources/a.bin"
    before = stored.stat()
    stored.write_bytes(b"the rotten bytes!!")  # same size; the mtime put back, so the record still looks valid
    os.utime(stored, ns=(before.st_atime_ns, before.st_mtime_ns))

    source = stored_file(storage, "resources/a.bin")
    with pytest.raises(StorageError, match="do not match the sha256 recorded in storage") as refused:
        copy(source, file_writer(tmp_path / "out.bin", source.stamp))
    assert "\n" not in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir() if "out" in p.name) == []  # neither the file nor a partial


def test_a_multi_gb_copy_cut_short_resumes_to_identical_bytes_both_ways(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "resources").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    sparse(tmp_path / "big.bin", BIG)
    upload = ("upload", str(tmp_path / "big.bin"), "videos/", "--storage", str(root))
    download = ("download", "resources/videos/big.bin", str(tmp_path / "out"), "--storage", str(root))
    uploading = root / "resources/videos/.big.bin.winslow-partial"
    downloading = tmp_path / "out/.big.bin.winslow-partial"

    proc = winslow(*upload)
    wait_until_bigger(uploading, 256 * MiB, proc)
    proc.send_signal(signal.SIGINT)   # Ctrl-C
    code, _, err = finish(proc)

    assert code == 130, err
    done = re.fullmatch(rf"winslow: interrupted; run the same command again to resume \((\d+) of {BIG} bytes done\)",
                        one_line(err))
    assert done is not None, err
    assert uploading.stat().st_size == int(done.group(1)) and not (root / "resources/videos/big.bin").exists()

    code, out, err = finish(winslow(*upload))

    assert code == 0, err
    assert "resuming resources/videos/big.bin after" in err
    assert sorted(p.name for p in (root / "resources/videos").iterdir()) == ["big.bin"]
    recorded = LocalStorage(root).stat("resources/videos/big.bin").sha256
    assert recorded is not None and out == f"resources/videos/big.bin  2.0GiB  sha256 {recorded}\n"

    proc = winslow(*download)
    wait_until_bigger(downloading, 256 * MiB, proc)
    proc.kill()   # no chance to clean up
    proc.wait(timeout=10)
    assert not (tmp_path / "out/big.bin").exists()

    code, out, err = finish(winslow(*download))   # checked against the sha256 recorded by the upload

    assert code == 0, err
    assert "resuming" in err and out.rstrip().endswith(recorded)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["big.bin"]
    assert identical(tmp_path / "big.bin", tmp_path / "out/big.bin")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, unmounted afterwards. Mounting needs root: without it the test is skipped (not under CI)."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("a full filesystem is tested on a tmpfs, which only root can mount (CI runs as root)")
        pytest.skip("mounting a tmpfs to fill up needs root")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_and_leaves_no_file_under_the_final_name(small_disk: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "big.bin").write_bytes(os.urandom(24 * MiB))
    (small_disk / "root/resources").mkdir(parents=True)

    code = cli.main(["upload", str(tmp_path / "big.bin"), "--storage", str(small_disk / "root")])

    line = one_line(capsys.readouterr().err)
    assert code == 1
    assert line.startswith("winslow: no space left on the device writing resources/big.bin (") and "resume" in line
    assert not (small_disk / "root/resources/big.bin").exists()
    (small_disk / "root/resources/.big.bin.winslow-partial").unlink()

    other = tmp_path / "root"
    (other / "resources").mkdir(parents=True)
    os.replace(tmp_path / "big.bin", other / "resources/big.bin")
    code = cli.main(["download", "resources/big.bin", str(small_disk), "--storage", str(other)])

    line = one_line(capsys.readouterr().err)
    assert code == 1 and line.startswith(f"winslow: no space left on the device writing {small_disk}/big.bin (")
    assert not (small_disk / "big.bin").exists()


def test_a_lost_connection_is_one_line_and_the_same_command_resumes(sshd: SshServer, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "resources").mkdir(parents=True)
    (tmp_path / "big.bin").write_bytes(os.urandom(64 * MiB))
    command = ("upload", str(tmp_path / "big.bin"), "--storage", sshd.url(root))
    partial = root / "resources/.big.bin.winslow-partial"

    proc = winslow(*command, env=sshd.env())
    wait_until_bigger(partial, 8 * MiB, proc)
    sshd.stop()   # the server and every connection, gone mid-transfer
    code, _, err = finish(proc)

    assert code == 1
    line = one_line(err)
    assert "lost the connection to 127.0.0.1" in line and "the partial is kept" in line, line
    assert partial.exists() and not (root / "resources/big.bin").exists()

    sshd.start()
    code, _, err = finish(winslow(*command, env=sshd.env()))

    assert code == 0, err
    assert "resuming" in err
    assert identical(tmp_path / "big.bin", root / "resources/big.bin")


def test_an_unreachable_server_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], sshd: SshServer,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.bin").write_bytes(b"a")
    monkeypatch.setenv("WINSLOW_SSH_COMMAND", " ".join(sshd.command))
    sshd.stop()
    code = cli.main(["upload", str(tmp_path / "a.bin"), "--storage", sshd.url(tmp_path / "root")])
    assert code == 1
    assert one_line(capsys.readouterr().err).startswith("winslow: cannot reach 127.0.0.1 over ssh: ")


def test_a_stamp_names_what_a_partial_copies() -> None:
    stamp = Stamp("file:///home/me/a.bin", 10, 123)
    assert stamp.same(stamp.to_json())
    assert not stamp.same(Stamp("file:///home/me/a.bin", 10, 124).to_json())
    assert not stamp.same(None) and not stamp.same(b"{broken")
