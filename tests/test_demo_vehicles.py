"""The demo pipeline's vehicle tracker, run on a synthetic video whose ground truth is known."""
from __future__ import annotations

import ast
import csv
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import pytest

from reconciler.demo import vehicles

SCRIPT = Path(vehicles.__file__).resolve()
WIDTH, HEIGHT, FPS, FRAMES = 320, 180, 10, 90


def quiet(line: str) -> None:
    pass


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_script(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The script as a stage runs it: by path, isolated (-I), so only the standard library is there."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WINSLOW_") and k not in ("VIDEO", "METRES_PER_PIXEL")}
    return subprocess.run([sys.executable, "-I", str(SCRIPT), *args], env={**clean, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        tag, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, f"bad CRC in {tag!r}"
        chunks.append((tag, body))
        at += 12 + length
    return chunks


def truth_centre(vehicle: dict, frame: int, fps: float) -> tuple[float, float]:
    (x0, y0), (vx, vy) = vehicle["centre_at_frame_0"], vehicle["velocity_px_s"]
    return x0 + vx * frame / fps, y0 + vy * frame / fps


def nearest_vehicle(points: list[dict[str, str]], truth: dict) -> tuple[float, dict]:
    """The ground-truth vehicle whose path a track follows, and the mean distance to it."""
    def mean_distance(vehicle: dict) -> float:
        return sum(math.dist((float(p["x"]), float(p["y"])), truth_centre(vehicle, int(p["frame"]), truth["fps"]))
                   for p in points) / len(points)
    return min(((mean_distance(v), v) for v in truth["vehicles"]), key=lambda pair: pair[0])


@pytest.fixture(scope="module")
def traffic_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resources") / "traffic.y4m"
    vehicles.generate(path, log=quiet)
    return path


@pytest.fixture(scope="module")
def truth(traffic_video: Path) -> dict:
    return json.loads(Path(f"{traffic_video}.truth.json").read_text())


@pytest.fixture(scope="module")
def stages(traffic_video: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Workspaces of detect, track and analyse, each stage reading the one before."""
    root = tmp_path_factory.mktemp("workspaces")
    folders = {name: root / name for name in ("detect", "track", "analyse")}
    vehicles.detect(traffic_video, folders["detect"], log=quiet)
    vehicles.track(folders["detect"], folders["track"], log=quiet)
    vehicles.analyse(folders["track"], folders["analyse"], log=quiet)
    return folders


@pytest.fixture(scope="module")
def tracks(stages: dict[str, Path]) -> dict[int, list[dict[str, str]]]:
    by_id: dict[int, list[dict[str, str]]] = {}
    for row in rows(stages["track"] / "tracks.csv"):
        by_id.setdefault(int(row["track_id"]), []).append(row)
    return by_id


def test_video_is_yuv4mpeg2_with_every_frame(traffic_video: Path) -> None:
    data = traffic_video.read_bytes()
    header = b"YUV4MPEG2 W320 H180 F10:1 Ip A1:1 C420jpeg\n"
    frame = WIDTH * HEIGHT * 3 // 2  # 4:2:0: a full luma plane and two quarter chroma planes
    assert data.startswith(header)
    assert len(data) == len(header) + FRAMES * (len(b"FRAME\n") + frame)
    assert all(data[len(header) + i * (6 + frame) :][:6] == b"FRAME\n" for i in range(FRAMES))
    with vehicles.Y4MReader(traffic_video) as video:
        assert video.info == vehicles.VideoInfo(WIDTH, HEIGHT, 10.0, "420jpeg")
        assert [len(luma) for luma in video.frames()] == [WIDTH * HEIGHT] * FRAMES


def test_truth_describes_every_vehicle(truth: dict) -> None:
    assert truth["vehicle_count"] == len(truth["vehicles"]) == len(truth["speeds_px_s"]) == 8
    assert {v["kind"] for v in truth["vehicles"]} == {"car", "truck"}
    assert all(v["visible_frames"] and v["speed_px_s"] > 0 for v in truth["vehicles"])


def test_detection_sees_each_vehicle_in_view_as_one_blob(stages: dict[str, Path], truth: dict) -> None:
    per_frame = Counter(int(row["frame"]) for row in rows(stages["detect"] / "detections.csv"))

    def in_view(frame: int, key: str) -> int:
        return sum(1 for v in truth["vehicles"] if v[key] and v[key][0] <= frame <= v[key][1])

    # The generator keeps vehicles apart, so each one wholly in view is exactly one blob;
    # one only partly in view may be below the smallest blob size.
    busy = [f for f in range(FRAMES) if in_view(f, "whole_frames")]
    right = [f for f in busy if in_view(f, "whole_frames") <= per_frame[f] <= in_view(f, "visible_frames")]
    assert len(busy) >= 0.9 * FRAMES
    assert len(right) >= 0.95 * len(busy)


def test_detect_summary_records_the_video(stages: dict[str, Path]) -> None:
    summary = json.loads((stages["detect"] / "detect.json").read_text())
    assert (summary["frames"], summary["width"], summary["height"], summary["fps"]) == (FRAMES, WIDTH, HEIGHT, FPS)
    assert summary["detections"] == len(rows(stages["detect"] / "detections.csv"))
    width, height, background = vehicles.read_pgm(stages["detect"] / "background.pgm")
    assert (width, height, len(background)) == (WIDTH, HEIGHT, WIDTH * HEIGHT)


def test_one_track_per_vehicle(stages: dict[str, Path], truth: dict, tracks: dict[int, list[dict[str, str]]]) -> None:
    # Each vehicle is in view for at least 2 s (20 frames, four times the shortest kept
    # track) and never touches another, so the tracker should find each exactly once. The
    # tolerance of one allows a single split or loss without hiding a systematic error.
    assert abs(len(tracks) - truth["vehicle_count"]) <= 1
    followed = [nearest_vehicle(points, truth) for points in tracks.values()]
    assert all(distance < 3.0 for distance, _ in followed)
    assert len({vehicle["id"] for _, vehicle in followed}) >= truth["vehicle_count"] - 1
    meta = json.loads((stages["track"] / "track.json").read_text())
    assert (meta["tracks"], meta["fps"], meta["width"], meta["height"]) == (len(tracks), FPS, WIDTH, HEIGHT)


def test_measured_speeds_and_directions_match_truth(stages: dict[str, Path], truth: dict,
                                                    tracks: dict[int, list[dict[str, str]]]) -> None:
    measured = {int(row["vehicle"]): row for row in rows(stages["analyse"] / "vehicles.csv")}
    assert sorted(measured) == sorted(tracks)
    for track_id, points in tracks.items():
        _, vehicle = nearest_vehicle(points, truth)
        row = measured[track_id]
        assert float(row["speed_px_s"]) == pytest.approx(vehicle["speed_px_s"], rel=0.15), row
        assert float(row["speed_kmh"]) == pytest.approx(float(row["speed_px_s"]) * 0.1 * 3.6, abs=0.06)
        assert row["direction"] == vehicle["direction"]


def test_summary_counts_vehicles_per_direction(stages: dict[str, Path], truth: dict) -> None:
    summary = json.loads((stages["analyse"] / "summary.json").read_text())
    expected = Counter(v["direction"] for v in truth["vehicles"])
    assert sum(abs(summary["directions"].get(d, 0) - expected[d]) for d in vehicles.DIRECTIONS) <= 1
    assert summary["vehicles"] == sum(summary["directions"].values())
    mean_truth = sum(truth["speeds_px_s"]) / len(truth["speeds_px_s"])
    assert summary["mean_speed_px_s"] == pytest.approx(mean_truth, rel=0.15)


def test_trajectories_png_is_a_valid_picture_with_tracks(stages: dict[str, Path]) -> None:
    data = (stages["analyse"] / "trajectories.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks = png_chunks(data)
    assert [tag for tag, _ in chunks][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (width, height, depth, colour, interlace) == (2 * WIDTH, 2 * HEIGHT, 8, 2, 0)
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == height * stride
    assert all(raw[y * stride] == 0 for y in range(height))
    pixels = b"".join(raw[y * stride + 1 : (y + 1) * stride] for y in range(height))
    coloured = sum(1 for i in range(0, len(pixels), 3) if len(set(pixels[i : i + 3])) > 1)
    assert coloured > 1000  # the road is grey; only the tracks are in colour


def test_png_encoder_round_trips_pixels() -> None:
    rgb = bytes(range(18))  # 3x2 pixels
    chunks = png_chunks(vehicles.encode_png(3, 2, rgb))
    raw = zlib.decompress(chunks[1][1])
    assert raw == b"\x00" + rgb[:9] + b"\x00" + rgb[9:]


def test_bresenham_line_is_connected_from_end_to_end() -> None:
    canvas = vehicles.Canvas(12, 6, bytes(12 * 6 * 3))
    canvas.line(0, 0, 9, 4, b"\xff\x00\x00")
    lit = {(i // 3 % 12, i // 3 // 12) for i in range(0, len(canvas.pixels), 3) if canvas.pixels[i]}
    assert (0, 0) in lit and (9, 4) in lit
    assert len(lit) == 10  # one pixel per step along the longer axis
    assert all(any(abs(x - a) <= 1 and abs(y - b) <= 1 for a, b in lit - {(x, y)}) for x, y in lit)


def test_tracks_coast_through_a_missed_detection_at_a_crossing() -> None:
    P = vehicles.Point
    east = {f: P(f, 20.0 + 5 * f, 50.0) for f in range(20)}
    south = {f: P(f, 70.0, 2.0 + 5 * f) for f in range(20)}
    by_frame = {f: [east[f]] + ([south[f]] if f not in (9, 10) else []) for f in range(20)}  # hidden at the crossing
    tracks = vehicles.link_tracks(by_frame, 20, 200, 200)
    assert sorted(tracks) == sorted([[east[f] for f in range(20)], [south[f] for f in range(20) if f not in (9, 10)]])


def test_track_that_leaves_the_frame_does_not_take_over_an_entering_vehicle() -> None:
    P = vehicles.Point
    leaving = [P(f, 20.0 - 6 * f, 40.0) for f in range(4)]  # last seen at x = 2, predicted at -4 next
    entering = [P(f, 1.0 + 6 * (f - 4), 46.0) for f in range(4, 12)]  # 7.8 px from that prediction
    by_frame = {p.frame: [p] for p in leaving + entering}
    assert vehicles.link_tracks(by_frame, 12, 100, 100, min_length=3) == [leaving, entering]


def test_stages_run_as_scripts_from_the_environment(tmp_path: Path) -> None:
    resources, workspaces = tmp_path / "resources", tmp_path / "workspaces"
    generated = run_script("generate", str(resources / "clips" / "short.y4m"), "--frames", "40", "--vehicles", "4")
    assert generated.returncode == 0, generated.stderr
    steps = [
        ("detect", {"WINSLOW_RESOURCES": str(resources), "WINSLOW_WORKSPACE": str(workspaces / "detect")}),
        ("track", {"WINSLOW_INPUT": str(workspaces / "detect"), "WINSLOW_WORKSPACE": str(workspaces / "track")}),
        ("analyse", {"WINSLOW_INPUT": str(workspaces / "track"), "WINSLOW_WORKSPACE": str(workspaces / "analyse"),
                     "METRES_PER_PIXEL": "0.5"}),
    ]
    for command, env in steps:
        done = run_script(command, env={**env, "WINSLOW_RESOURCES": str(resources)}, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        assert done.stdout.count(f"{command}: ") >= 2
    summary = json.loads((workspaces / "analyse" / "summary.json").read_text())
    truth = json.loads((resources / "clips" / "short.y4m.truth.json").read_text())
    assert abs(summary["vehicles"] - truth["vehicle_count"]) <= 1
    assert summary["metres_per_pixel"] == 0.5
    assert summary["mean_speed_kmh"] == pytest.approx(summary["mean_speed_px_s"] * 0.5 * 3.6, abs=0.02)
    assert {p.name for p in (workspaces / "analyse").iterdir()} == {"vehicles.csv", "summary.json", "trajectories.png"}


def test_missing_video_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    done = run_script("detect", "--video", "nowhere.y4m", env={"WINSLOW_WORKSPACE": "out"}, cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == "vehicles.py detect: error: video not found: nowhere.y4m\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "env", "message"), [
    (["detect", "--video", "junk.y4m"], {"WINSLOW_WORKSPACE": "out"}, "junk.y4m: not a YUV4MPEG2 (.y4m) video"),
    (["detect"], {"WINSLOW_RESOURCES": "empty", "WINSLOW_WORKSPACE": "out"}, "no .y4m video under empty"),
    (["detect"], {"WINSLOW_RESOURCES": "empty", "VIDEO": "a.y4m", "WINSLOW_WORKSPACE": "out"}, "video not found: empty/a.y4m"),
    (["detect", "--video", "junk.y4m"], {}, "set WINSLOW_WORKSPACE or pass --workspace"),
    (["track"], {"WINSLOW_INPUT": "empty", "WINSLOW_WORKSPACE": "out"}, "detect.json not found"),
    (["analyse"], {"WINSLOW_INPUT": "empty", "WINSLOW_WORKSPACE": "out", "METRES_PER_PIXEL": "far"}, "not a number: 'far'"),
    (["launch"], {}, "invalid choice: 'launch'"),
])
def test_bad_input_fails_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                       args: list[str], env: dict[str, str], message: str) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.y4m").write_bytes(b"MP4 pretending\n" + bytes(100))
    monkeypatch.chdir(tmp_path)
    for name in ("WINSLOW_RESOURCES", "WINSLOW_INPUT", "WINSLOW_WORKSPACE", "VIDEO", "METRES_PER_PIXEL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        code = vehicles.main(args)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    stderr = capsys.readouterr().err
    assert code != 0
    assert len(stderr.splitlines()) == 1
    assert message in stderr


def test_script_needs_only_the_standard_library() -> None:
    tree = ast.parse(SCRIPT.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}
