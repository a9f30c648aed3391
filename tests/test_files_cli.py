"""`winslow upload`, `download`, `ls` and `rm` as a user runs them: locally and over a real SSH server, with the
storage named by winslow.yaml, runs found by id or stage, result manifests checked, and every path that would leave
the storage root refused in one line."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler import cli
from reconciler.commands.files import in_use
from reconciler.sshstore import _STAT, SshStorage
from reconciler.storage import Stamp
from reconciler.yamlsafe import dump_yaml
from tests.cluster import StateRemote
from tests.sshd import SshServer, start_server
from tests.statebuild import CPU, base, project, run, snapshot, stage, status

INPUTS: dict[str, Any] = {"name": "cpu", "stages": [stage("a", inputs=["videos/${VIDEO}"]), stage("b")]}


@pytest.fixture(autouse=True)
def outside_any_clone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run from a folder that is no git clone: the verbs find a clone only where a test names one."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    started = start_server(tmp_path_factory.mktemp("sshd"))
    yield started
    started.stop()


def winslow(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def manifest(project_id: str, run_id: str, files: dict[str, bytes]) -> dict[str, str]:
    data = {"project": project_id, "run": run_id, "stage": run_id.split("-")[1],
            "workspace": f"workspaces/{project_id}/{run_id}", "total_size": sum(len(b) for b in files.values()),
            "truncated": False,
            "files": [{"path": p, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()} for p, b in files.items()]}
    return {f"projects/{project_id}/results/{run_id}.yaml": dump_yaml(data)}


def workspace(root: Path, project_id: str, run_id: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        path = root / "workspaces" / project_id / run_id / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


@pytest.mark.parametrize("where", ["local", "ssh"])
def test_upload_ls_download_rm_round_trip(where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    (root / "resources").mkdir(parents=True)
    storage = str(root)
    if where == "ssh":
        sshd: SshServer = request.getfixturevalue("server")
        monkeypatch.setenv("WINSLOW_SSH_COMMAND", " ".join(sshd.command))
        storage = sshd.url(root)
    data = os.urandom(5 * 1024 * 1024 + 1)
    sha = hashlib.sha256(data).hexdigest()
    (tmp_path / "DJI_0001.MP4").write_bytes(data)
    remote = StateRemote(tmp_path / "state")

    code, out, err = winslow(capsys, "upload", tmp_path / "DJI_0001.MP4", "videos/", "--storage", storage)
    assert (code, err) == (0, "")
    assert out == f"resources/videos/DJI_0001.MP4  5.0MiB  sha256 {sha}\n"

    code, out, _ = winslow(capsys, "ls", "resources/videos", "--storage", storage)
    assert code == 0 and out.split()[0] == "5.0MiB" and out.rstrip().endswith(f"{sha}  DJI_0001.MP4")
    code, out, _ = winslow(capsys, "ls", "--json", "--storage", storage)
    assert [e["path"] for e in json.loads(out)] == ["resources"]
    code, out, _ = winslow(capsys, "ls", "resources/videos/DJI_0001.MP4", "--json", "--storage", storage)
    assert json.loads(out)[0] | {"mtime": None} == {"path": "resources/videos/DJI_0001.MP4", "kind": "file",
                                                    "size": len(data), "mtime": None, "sha256": sha}

    code, out, err = winslow(capsys, "download", "resources/videos/DJI_0001.MP4", tmp_path / "back.mp4",
                             "--storage", storage, "-q")
    assert (code, out, err) == (0, "", "")
    assert (tmp_path / "back.mp4").read_bytes() == data

    code, out, err = winslow(capsys, "rm", "videos/DJI_0001.MP4", "--storage", storage, "--repo-dir", remote.clone)
    assert (code, out, err) == (0, "removed resources/videos/DJI_0001.MP4\n", "")
    assert list((root / "resources/videos").iterdir()) == []
    code, _, err = winslow(capsys, "ls", "resources/videos/DJI_0001.MP4", "--storage", storage)
    assert code == 1 and err == "winslow: no such file or folder in storage: resources/videos/DJI_0001.MP4\n"


def test_restart_throws_a_partial_away_and_resume_continues_one_of_another_name(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    (root / "resources").mkdir(parents=True)
    data = os.urandom(3 * 1024 * 1024)
    (tmp_path / "a.bin").write_bytes(data)
    partial = root / "resources/.a.bin.winslow-partial"
    partial.write_bytes(data[:1024 * 1024])   # left by another tool: no sidecar names its source

    code, _, err = winslow(capsys, "upload", tmp_path / "a.bin", "--storage", root, "--resume")
    assert (code, err) == (0, "winslow: resuming resources/a.bin after 1048576 of 3145728 bytes\n")
    assert (root / "resources/a.bin").read_bytes() == data

    partial.write_bytes(b"x" * 1024 * 1024)
    (root / "resources/.a.bin.winslow-partial.json").write_bytes(Stamp((tmp_path / "a.bin").as_uri(), len(data),
                                                                     (tmp_path / "a.bin").stat().st_mtime_ns).to_json())
    code, _, err = winslow(capsys, "upload", tmp_path / "a.bin", "--storage", root, "--restart")
    assert (code, err) == (0, "")   # no resuming, no mismatch found: it started from nothing
    assert (root / "resources/a.bin").read_bytes() == data and not partial.exists()


def test_the_storage_is_storage_root_of_winslow_yaml_else_a_one_line_error(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.bin").write_bytes(b"a")
    remote = StateRemote(tmp_path / "state")

    code, _, err = winslow(capsys, "upload", tmp_path / "a.bin", "--repo-dir", remote.clone)
    assert code == 1 and err == ("winslow: no storage: pass --storage DIR (or --storage ssh://[user@]host[:port]/path "
                                 "to reach it through a node), or set storage.root in winslow.yaml\n")
    code, _, err = winslow(capsys, "upload", tmp_path / "a.bin")   # not in a clone either
    assert code == 1 and "no storage: pass --storage" in err

    remote.write(base(storage={"root": "/srv/not-here"}))
    code, _, err = winslow(capsys, "upload", tmp_path / "a.bin", "--repo-dir", remote.clone)
    assert code == 1 and err == ("winslow: storage root /srv/not-here (storage.root in winslow.yaml) is not a folder on "
                                 "this machine; reach it through a node with --storage ssh://NODE/srv/not-here\n")

    (tmp_path / "root").mkdir()
    remote.write(base(storage={"root": str(tmp_path / "root")}))
    code, out, err = winslow(capsys, "upload", tmp_path / "a.bin", "--repo-dir", remote.clone)
    assert (code, err) == (0, "") and (tmp_path / "root/resources/a.bin").read_bytes() == b"a"


@pytest.fixture
def results(tmp_path: Path) -> tuple[StateRemote, Path]:
    """Project ulm with runs 1-a-1 and 2-a-1 SUCCEEDED (each with a manifest) and 2-b-1 FAILED, files in storage."""
    root = tmp_path / "root"
    (root / "resources").mkdir(parents=True)
    remote = StateRemote(tmp_path / "state")
    first, second = {"tracks.csv": b"id,x\n1,10\n"}, {"tracks.csv": b"id,x\n1,10\n2,20\n", "plots/speed.png": b"png"}
    workspace(root, "ulm", "1-a-1", first)
    workspace(root, "ulm", "2-a-1", second)
    runs = [run("1-a-1", "SUCCEEDED", project="ulm"), run("2-a-1", "SUCCEEDED", project="ulm"),
            run("2-b-1", "FAILED", project="ulm")]
    remote.write(base(storage={"root": str(root)}) | project("ulm", "cpu", request=2)
                 | status("ulm", state="FAILED", request=2, runs=runs)
                 | manifest("ulm", "1-a-1", first) | manifest("ulm", "2-a-1", second))
    return remote, root


def test_download_finds_a_run_by_id_or_the_latest_success_of_a_stage(results, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    remote, root = results
    clone = ("--repo-dir", remote.clone)

    code, out, err = winslow(capsys, "download", "ulm/a/tracks.csv", tmp_path / "latest.csv", *clone)
    assert (code, err) == (0, "") and (tmp_path / "latest.csv").read_bytes() == b"id,x\n1,10\n2,20\n"
    code, out, err = winslow(capsys, "download", "ulm/1-a-1/tracks.csv", tmp_path / "first.csv", *clone)
    assert (code, err) == (0, "") and (tmp_path / "first.csv").read_bytes() == b"id,x\n1,10\n"
    code, out, _ = winslow(capsys, "ls", "ulm/a", *clone)
    assert code == 0 and [line.split()[-1] for line in out.splitlines()] == ["plots/", "tracks.csv"]
    code, out, _ = winslow(capsys, "ls", "ulm", *clone)
    assert [line.split()[-1] for line in out.splitlines()] == ["1-a-1/", "2-a-1/"]

    code, _, err = winslow(capsys, "download", "ulm/b/out.csv", *clone)
    assert code == 1 and err == "winslow: ulm has no SUCCEEDED run of stage b (its runs: 2-b-1 FAILED)\n"
    code, _, err = winslow(capsys, "download", "videos/a.mp4", *clone)
    assert code == 1 and "no project 'videos'" in err and "a file in the pool is resources/videos/a.mp4" in err


def test_a_result_file_that_does_not_match_its_manifest_is_refused(results, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    remote, root = results
    (root / "workspaces/ulm/1-a-1/tracks.csv").write_bytes(b"id,x\n9,99\n")   # same size, other bytes

    code, _, err = winslow(capsys, "download", "ulm/1-a-1/tracks.csv", tmp_path / "t.csv", "--repo-dir", remote.clone)

    assert code == 1
    assert err.startswith("winslow: workspaces/ulm/1-a-1/tracks.csv: its bytes do not match the result manifest of "
                          "ulm/1-a-1 (they hash to sha256 ") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(("t.csv", ".winslow-partial"))) == []

    (root / "workspaces/ulm/2-a-1/tracks.csv").write_bytes(b"shorter")
    code, _, err = winslow(capsys, "download", "ulm/a/tracks.csv", tmp_path / "t.csv", "--repo-dir", remote.clone)
    assert code == 1 and err == ("winslow: workspaces/ulm/2-a-1/tracks.csv does not match the result manifest of "
                                 "ulm/2-a-1: it holds 7 bytes, the manifest says 15; not copied\n")


def test_rm_is_refused_while_a_running_stage_reads_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    for name in ("videos/a.mp4", "videos/b.mp4", "clips/c.mp4"):
        (root / "resources" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "resources" / name).write_bytes(b"v")
    remote = StateRemote(tmp_path / "state")
    reading = [run("3-a-1", "RUNNING", project="ulm", env={"VIDEO": "a.mp4"})]
    by_env = [run("1-b-1", "RUNNING", project="old", env={"CLIP": "/resources/clips/c.mp4"})]
    remote.write(base(storage={"root": str(root)}) | project("ulm", "cpu", request=3) | project("old", "cpu", request=1)
                 | status("ulm", request=3, runs=reading, lock=INPUTS) | status("old", request=1, runs=by_env, lock=CPU))
    clone = ("--repo-dir", remote.clone)

    code, _, err = winslow(capsys, "rm", "videos/a.mp4", *clone)
    assert code == 1 and err == ("winslow: resources/videos/a.mp4 is read by running ulm/3-a-1; remove it once they "
                                 "have finished\n")
    code, _, err = winslow(capsys, "rm", "-r", "resources/videos/", *clone)
    assert code == 1 and "read by running ulm/3-a-1" in err
    code, _, err = winslow(capsys, "rm", "clips/c.mp4", *clone)
    assert code == 1 and "read by running old/1-b-1" in err
    code, out, err = winslow(capsys, "rm", "videos/b.mp4", *clone)
    assert (code, out, err) == (0, "removed resources/videos/b.mp4\n", "")
    assert (root / "resources/videos/a.mp4").exists() and not (root / "resources/videos/b.mp4").exists()

    code, _, err = winslow(capsys, "rm", "videos/a.mp4", "--storage", root)   # no clone: no way to check
    assert code == 1 and err.startswith("winslow: rm checks that no running stage reads the file, which needs a clone")


@pytest.mark.parametrize("path, users", [
    ("videos/a.mp4", ["ulm/3-a-1"]),          # its stage's inputs name it (${VIDEO} from the run's env)
    ("videos", ["ulm/3-a-1"]),                # the folder holding it
    ("videos/b.mp4", []),
    ("clips/c.mp4", ["old/1-b-1"]),           # no inputs declared, but an env value names it
    ("clips/c.mp4.bak", []),
])
def test_in_use_names_the_running_runs_that_read_a_path(path: str, users: list[str]) -> None:
    repo = (base() | project("ulm", "cpu", request=3) | project("old", "cpu", request=1)
            | status("ulm", request=3, runs=[run("3-a-1", "RUNNING", project="ulm", env={"VIDEO": "a.mp4"}),
                                              run("2-a-1", "SUCCEEDED", project="ulm", env={"VIDEO": "b.mp4"})],
                     lock=INPUTS)
            | status("old", request=1, runs=[run("1-b-1", "RUNNING", project="old", env={"CLIP": "clips/c.mp4"})],
                     lock=CPU))
    assert in_use(path, snapshot(repo)) == users


@pytest.fixture
def escapes(tmp_path: Path) -> dict[str, Path]:
    """A storage root with a link out of it in the pool and in a workspace, and a secret outside."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not yours")
    root = tmp_path / "root"
    (root / "resources").mkdir(parents=True)
    workspace(root, "p", "1-a-1", {"tracks.csv": b"1,2\n"})
    os.symlink(outside, root / "resources/escape")
    os.symlink(outside / "secret", root / "workspaces/p/1-a-1/leak")
    os.symlink(outside, root / "workspaces/p/1-a-1/out")
    (tmp_path / "a.bin").write_bytes(b"a")
    return {"root": root, "outside": outside, "file": tmp_path / "a.bin"}


ESCAPES = [
    ("upload", "{file}", "../x"),
    ("upload", "{file}", "/etc/passwd"),
    ("upload", "{file}", "resources/../../x"),
    ("upload", "{file}", "../workspaces/p/1-a-1/x"),     # inside the root, but out of the pool
    ("upload", "{file}", "escape/x"),                    # through a link out of the root
    ("download", "../etc/passwd"),
    ("download", "/etc/passwd"),
    ("download", "resources/../../etc/passwd"),
    ("download", "resources/escape/secret"),
    ("download", "p/1-a-1/leak"),                        # a link a stage left: listed, never served
    ("download", "p/1-a-1/out/secret"),
    ("download", ".winslow/sha256/resources/x.json"),
    ("ls", "../"),
    ("ls", "/etc"),
    ("ls", "resources/escape/secret"),
    ("ls", "p/1-a-1/out/"),
    ("rm", "../x"),
    ("rm", "/etc/passwd"),
    ("rm", "escape/secret"),
    ("rm", "../workspaces/p/1-a-1/tracks.csv"),
]


@pytest.mark.parametrize("where", ["local", "ssh"])
@pytest.mark.parametrize("row", ESCAPES, ids=[" ".join(r) for r in ESCAPES])
def test_every_entry_point_refuses_paths_that_leave_the_root(where: str, row: tuple[str, ...], escapes,
                                                             capsys: pytest.CaptureFixture[str],
                                                             request: pytest.FixtureRequest,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    storage = str(escapes["root"])
    if where == "ssh":
        sshd: SshServer = request.getfixturevalue("server")
        monkeypatch.setenv("WINSLOW_SSH_COMMAND", " ".join(sshd.command))
        storage = sshd.url(escapes["root"])
    verb, *args = (part.format(file=escapes["file"]) for part in row)
    if verb == "ls" and args == ["p/1-a-1/out/"]:
        code, out, err = winslow(capsys, verb, *args, "--storage", storage)   # the link itself is listed, as a link
        assert code == 0 and out.rstrip().endswith(f"workspaces/p/1-a-1/out -> {escapes['outside']}")
        args = ["p/1-a-1/out/secret"]
    extra = ("--repo-dir", str(StateRemote(escapes["root"].parent / "state").clone)) if verb == "rm" else ()
    if verb == "download":
        args.append(str(escapes["root"].parent / "got"))

    code, out, err = winslow(capsys, verb, *args, "--storage", storage, *extra)

    assert code == 1 and out == ""
    assert err.startswith("winslow: ") and err.count("\n") == 1, err
    assert (escapes["outside"] / "secret").read_text() == "not yours"
    assert sorted(p.name for p in escapes["outside"].iterdir()) == ["secret"]
    assert not (escapes["root"].parent / "got").exists()


def test_the_server_checks_every_path_again(server: SshServer, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "resources").mkdir(parents=True)
    os.symlink("/etc", root / "resources/etc")
    with SshStorage(server.url(root), server.command) as storage:
        for bad in ("../etc", "/etc", "resources//x", "resources/./x", "resources/../../etc"):
            with pytest.raises(Exception, match="leaves the storage root"):
                storage._run(_STAT, bad)   # what a client that skipped its own check would send
        with pytest.raises(Exception, match="'resources/etc' is a symbolic link"):
            storage._run(_STAT, "resources/etc/passwd")


def test_every_verb_has_help_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for verb in ("upload", "download", "ls", "rm"):
        with pytest.raises(SystemExit):
            cli.main([verb, "--help"])
        text = capsys.readouterr().out
        assert "example" in text and f"winslow {verb} " in text and "--storage" in text
