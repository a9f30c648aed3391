"""The demo pipeline's vehicle tracker, run on a synthetic video whose ground truth is known."""
from __future__ import annotations

import ast
import csv
import json
import math
import os
import re
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import pytest

from reconciler.demo import SCRIPTS, plot, vehicles

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


def png_picture(data: bytes) -> tuple[int, int, bytes]:
    """Width, height and RGB pixels of a PNG as encode_png writes it: truecolour, rows unfiltered."""
    chunks = png_chunks(data)
    width, height = struct.unpack(">II", chunks[0][1][:8])
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    stride = 1 + 3 * width
    return width, height, b"".join(raw[y * stride + 1 : (y + 1) * stride] for y in range(height))


def png_text(data: bytes) -> dict[str, str]:
    return dict(body.decode("latin-1").split("\x00", 1) for tag, body in png_chunks(data) if tag == b"tEXt")


def shows_text(width: int, pixels: bytes, text: str, colour: bytes) -> bool:
    """Whether the picture shows ``text`` in the demo's font and text size, in ``colour`` on the plain background."""
    size = plot.TEXT_SIZE
    stamp = plot.Canvas(plot.text_width(text, size), plot.GLYPH_HEIGHT * size)
    stamp.text(0, 0, text, colour, size)
    span = 3 * stamp.width
    stamp_rows = [bytes(stamp.pixels[r * span : (r + 1) * span]) for r in range(stamp.height)]
    key = max(range(stamp.height), key=lambda r: sum(stamp_rows[r][i : i + 3] != plot.BACKGROUND for i in range(0, span, 3)))
    line = 3 * width
    for y in range(key, len(pixels) // line - stamp.height + key + 1):
        row = pixels[y * line : (y + 1) * line]
        at = row.find(stamp_rows[key])
        while at != -1:
            top = (y - key) * line + at
            if at % 3 == 0 and all(pixels[top + r * line : top + r * line + span] == stamp_rows[r] for r in range(stamp.height)):
                return True
            at = row.find(stamp_rows[key], at + 1)
    return False


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
    assert (width, depth, colour, interlace) == (2 * WIDTH, 8, 2, 0)
    assert height > 2 * HEIGHT  # the map, with the title above it and the legend below
    raw = zlib.decompress(b"".join(body for tag, body in chunks if tag == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == height * stride
    assert all(raw[y * stride] == 0 for y in range(height))
    pixels = b"".join(raw[y * stride + 1 : (y + 1) * stride] for y in range(height))
    coloured = sum(1 for i in range(0, len(pixels), 3) if len(set(pixels[i : i + 3])) > 1)
    assert coloured > 1000  # the road is grey; only the tracks are in colour


def test_trajectories_title_names_the_video_vehicle_count_and_mean_speed(stages: dict[str, Path]) -> None:
    data = (stages["analyse"] / "trajectories.png").read_bytes()
    summary = json.loads((stages["analyse"] / "summary.json").read_text())
    title = png_text(data)["Title"]
    assert title.startswith("traffic.y4m: ")
    assert f" {summary['vehicles']} vehicles," in title
    mean = re.search(r"mean speed ([0-9.]+) km/h", title)
    assert mean and float(mean[1]) == pytest.approx(summary["mean_speed_kmh"], abs=0.06)
    width, _, pixels = png_picture(data)
    assert shows_text(width, pixels, title, plot.INK)


def test_trajectories_legend_lists_each_vehicle_with_its_id_and_mean_speed(stages: dict[str, Path]) -> None:
    data = (stages["analyse"] / "trajectories.png").read_bytes()
    expected = [f"#{row['vehicle']} {row['direction']} {row['speed_kmh']} km/h ({row['speed_px_s']} px/s)"
                for row in rows(stages["analyse"] / "vehicles.csv")]
    assert len(expected) >= 7
    assert png_text(data)["Description"].splitlines() == expected
    width, _, pixels = png_picture(data)
    assert [entry for entry in expected if not shows_text(width, pixels, entry, plot.INK)] == []


def test_each_track_is_tagged_with_its_vehicle_number_in_its_colour(stages: dict[str, Path]) -> None:
    width, _, pixels = png_picture((stages["analyse"] / "trajectories.png").read_bytes())
    numbers = [row["vehicle"] for row in rows(stages["analyse"] / "vehicles.csv")]
    assert [n for i, n in enumerate(numbers) if not shows_text(width, pixels, n, plot.track_colour(i))] == []


def test_tracks_sharing_a_lane_are_drawn_side_by_side_one_solid_one_dashed() -> None:
    P = vehicles.Point
    ahead = [P(f, 40.0 + 4 * f, 50.0) for f in range(30)]
    behind = [P(f, 10.0 + 4 * f, 50.5) for f in range(30)]  # the same lane, half a pixel over
    tracks = [ahead, behind]
    stats = [vehicles.measure(i, points, 10.0, 200, 100) for i, points in enumerate(tracks, start=1)]
    canvas = plot.draw_map(tracks, stats, 200, 100, None, 2)

    def line_of(colour: bytes) -> tuple[int, int]:
        """The row the track's line lies on (the row with most of its colour) and the runs of colour in it."""
        lit = [(i // 3 % canvas.width, i // 3 // canvas.width) for i in range(0, len(canvas.pixels), 3)
               if canvas.pixels[i : i + 3] == colour]
        row = Counter(y for _, y in lit).most_common(1)[0][0]
        xs = sorted(x for x, y in lit if y == row)
        assert xs[-1] - xs[0] > 150  # along most of the track, not just a marker
        return row, 1 + sum(1 for a, b in zip(xs, xs[1:]) if b > a + 1)

    (row_a, runs_a), (row_b, runs_b) = line_of(plot.track_colour(0)), line_of(plot.track_colour(1))
    assert abs(row_a - row_b) >= 4  # apart, with a gap between lines two pixels thick
    assert min(runs_a, runs_b) <= 3  # solid, broken only where the number tags sit
    assert max(runs_a, runs_b) >= 10  # dashed


@pytest.mark.parametrize(("lines", "slots"), [
    ([("eastbound", 50.0)], [(0, 1)]),
    ([("eastbound", 50.0), ("eastbound", 52.0), ("eastbound", 51.0)], [(0, 3), (1, 3), (2, 3)]),
    ([("eastbound", 50.0), ("eastbound", 70.0)], [(0, 1), (0, 1)]),
    ([("eastbound", 50.0), ("westbound", 50.0)], [(0, 1), (0, 1)]),
    ([("southbound", 80.0), ("southbound", 83.0), ("eastbound", 80.0)], [(0, 2), (1, 2), (0, 1)]),
    ([("stationary", 50.0), ("stationary", 50.0)], [(0, 1), (0, 1)]),
])
def test_lane_slots_give_tracks_on_one_line_the_same_way_their_own_places(lines: list[tuple[str, float]],
                                                                           slots: list[tuple[int, int]]) -> None:
    P = vehicles.Point
    tracks = [[P(f, float(f), across) if way in ("eastbound", "westbound") else P(f, across, float(f)) for f in range(5)]
              for way, across in lines]
    stats = [vehicles.VehicleStats(i, 0, 4, 5, 0.0, 0.0, 0.0, way) for i, (way, _) in enumerate(lines, start=1)]
    assert plot.lane_slots(tracks, stats) == slots


def test_png_encoder_round_trips_pixels() -> None:
    rgb = bytes(range(18))  # 3x2 pixels
    chunks = png_chunks(plot.encode_png(3, 2, rgb))
    raw = zlib.decompress(chunks[1][1])
    assert raw == b"\x00" + rgb[:9] + b"\x00" + rgb[9:]


def test_bresenham_line_is_connected_from_end_to_end() -> None:
    canvas = plot.Canvas(12, 6, bytes(12 * 6 * 3))
    canvas.line(0, 0, 9, 4, b"\xff\x00\x00")
    lit = {(i // 3 % 12, i // 3 // 12) for i in range(0, len(canvas.pixels), 3) if canvas.pixels[i]}
    assert (0, 0) in lit and (9, 4) in lit
    assert len(lit) == 10  # one pixel per step along the longer axis
    assert all(any(abs(x - a) <= 1 and abs(y - b) <= 1 for a, b in lit - {(x, y)}) for x, y in lit)


def test_text_is_drawn_in_the_5x7_font_magnified() -> None:
    canvas = plot.Canvas(20, 20, bytes(20 * 20 * 3))
    end = canvas.text(1, 2, "1", b"\xff\xff\xff", 2)
    lit = {(i // 3 % 20, i // 3 // 20) for i in range(0, len(canvas.pixels), 3) if canvas.pixels[i]}
    one = {(2, row) for row in range(7)} | {(1, 1), (1, 6), (3, 6)}  # the font's "1", column by row
    assert lit == {(1 + 2 * x + dx, 2 + 2 * y + dy) for x, y in one for dx in (0, 1) for dy in (0, 1)}
    assert end == 1 + 6 * 2


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
                     "METRES_PER_PIXEL": "0.5", "WINSLOW_PROJECT": "ulm"}),
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
    title = png_text((workspaces / "analyse" / "trajectories.png").read_bytes())["Title"]
    assert title.startswith(f"ulm / short.y4m: {summary['vehicles']} vehicles, mean speed ")


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


def test_scripts_need_only_the_standard_library_and_each_other() -> None:
    siblings = {Path(name).stem for name in SCRIPTS}
    assert SCRIPT.name in SCRIPTS
    for name in SCRIPTS:
        tree = ast.parse(SCRIPT.with_name(name).read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        assert imported <= set(sys.stdlib_module_names) | {"__future__"} | siblings, name


def test_the_scripts_winslow_demo_copies_run_on_their_own(tmp_path: Path) -> None:
    for name in SCRIPTS:  # as `winslow demo` lays them out in resources/demo/, away from this checkout
        (tmp_path / name).write_bytes(SCRIPT.with_name(name).read_bytes())
    done = subprocess.run([sys.executable, "-I", str(tmp_path / SCRIPT.name), "generate", str(tmp_path / "v.y4m"),
                           "--frames", "2", "--vehicles", "0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*SCRIPTS, "v.y4m", "v.y4m.truth.json"])  # no __pycache__
