#!/usr/bin/env python3
"""Winslow's demo pipeline: find, track and measure vehicles in a top-down traffic video.

A script using only the standard library, so it runs with a bare ``python3`` on a node
or in a minimal container; it draws its picture with plot.py, which lies beside it.
``winslow demo`` copies both into the storage pool and runs one subcommand per stage:

    generate OUT.y4m  a synthetic traffic video (YUV4MPEG2) and OUT.y4m.truth.json
    detect            video -> detections.csv, detect.json, background.pgm
    track             detections -> tracks.csv, track.json (+ background.pgm)
    analyse           tracks -> vehicles.csv, summary.json, trajectories.png

Each stage finds its folders in WINSLOW_RESOURCES (the read-only pool), WINSLOW_INPUT
(the previous stage's workspace) and WINSLOW_WORKSPACE (its own output); flags override
them. Image coordinates: x grows to the right (east), y grows down (south); a position
(x, y) is a blob's centroid in pixels. Bad input ends with one line on stderr, exit 1.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import operator
import os
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from statistics import NormalDist
from typing import TYPE_CHECKING, NamedTuple

if __package__ or TYPE_CHECKING:  # imported as reconciler.demo.vehicles; mypy reads only this branch
    from .plot import Caption, draw_trajectories
    from .plot import encode_png as encode_png  # re-exported: tests/test_viewer.py imports it from here
else:  # run as a script from the storage pool, with plot.py beside it
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # python3 -I leaves the script's folder out
    sys.dont_write_bytecode = True  # no __pycache__ among the resources
    from plot import Caption, draw_trajectories

Log = Callable[[str], None]
DIRECTIONS = ("eastbound", "westbound", "southbound", "northbound")


class DemoError(Exception):
    """Bad input, reported in one line; anything else is a bug and keeps its traceback."""


def say(line: str) -> None:
    """A progress line for the stage log: flushed at once so live log tails show it."""
    print(line, flush=True)


# --- YUV4MPEG2 video -------------------------------------------------------------------

_LINE_LIMIT = 4096


class VideoInfo(NamedTuple):
    width: int
    height: int
    fps: float
    colorspace: str


def _frame_bytes(info: VideoInfo, path: Path) -> int:
    luma = info.width * info.height
    chroma_w, chroma_h = (info.width + 1) // 2, (info.height + 1) // 2
    if info.colorspace == "mono":
        return luma
    if info.colorspace in ("420", "420jpeg", "420paldv", "420mpeg2"):
        return luma + 2 * chroma_w * chroma_h
    if info.colorspace == "422":
        return luma + 2 * chroma_w * info.height
    if info.colorspace == "444":
        return 3 * luma
    raise DemoError(f"{path}: unsupported colour space C{info.colorspace} (8-bit mono, 420, 422 or 444 only)")


def _parse_header(line: bytes, path: Path) -> VideoInfo:
    words = line.rstrip(b"\n").decode("ascii", "replace").split(" ")
    if not line.endswith(b"\n") or words[0] != "YUV4MPEG2":
        raise DemoError(f"{path}: not a YUV4MPEG2 (.y4m) video")
    fields = {word[0]: word[1:] for word in words[1:] if word}
    try:
        width, height = int(fields["W"]), int(fields["H"])
        num, den = (int(part) for part in fields.get("F", "25:1").split(":"))
        fps = num / den
    except (KeyError, ValueError, ZeroDivisionError):
        raise DemoError(f"{path}: YUV4MPEG2 header lacks a valid size or frame rate") from None
    if width <= 0 or height <= 0 or fps <= 0:
        raise DemoError(f"{path}: YUV4MPEG2 header has a non-positive size or frame rate")
    return VideoInfo(width, height, fps, fields.get("C", "420jpeg"))


class Y4MReader:
    """Streams the luma plane of each frame of a .y4m file; one frame in memory at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = open(path, "rb")
        except FileNotFoundError:
            raise DemoError(f"video not found: {path}") from None
        except IsADirectoryError:
            raise DemoError(f"video is a folder, not a file: {path}") from None
        try:
            header = self._file.readline(_LINE_LIMIT)
            self.info = _parse_header(header, path)
            self.frame_bytes = _frame_bytes(self.info, path)
        except DemoError:
            self._file.close()
            raise
        self._header_bytes = len(header)

    def __enter__(self) -> Y4MReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def estimated_frames(self) -> int:
        """Frame count if every frame header is a plain ``FRAME\\n``; exact for most files."""
        size = os.fstat(self._file.fileno()).st_size
        return (size - self._header_bytes) // (len(b"FRAME\n") + self.frame_bytes)

    def frames(self) -> Iterator[bytes]:
        luma_bytes = self.info.width * self.info.height
        index = 0
        while True:
            line = self._file.readline(_LINE_LIMIT)
            if not line:
                return
            if not line.startswith(b"FRAME") or not line.endswith(b"\n"):
                raise DemoError(f"{self.path}: frame {index}: bad frame header")
            data = self._file.read(self.frame_bytes)
            if len(data) < self.frame_bytes:
                raise DemoError(f"{self.path}: frame {index} is truncated ({len(data)} of {self.frame_bytes} bytes)")
            yield data[:luma_bytes]
            index += 1


# --- generate: a synthetic top-down traffic video ----------------------------------------

NOISE_MAX = 10  # sensor noise stays within +-NOISE_MAX grey levels
_GROUND, _ROAD, _MARKING = 70, 112, 205


class Layout(NamedTuple):
    """An east-west road with two lanes, crossed by a north-south road with two lanes."""

    width: int
    height: int
    road_y: int  # centre line of the east-west road
    road_x: int  # centre line of the north-south road
    half_ew: int  # half the breadth of the east-west road
    half_ns: int  # half the breadth of the north-south road

    def lane(self, direction: str) -> int:
        """The lane's centre line; traffic keeps right."""
        return {
            "eastbound": self.road_y + self.half_ew // 2,
            "westbound": self.road_y - self.half_ew // 2,
            "southbound": self.road_x - self.half_ns // 2,
            "northbound": self.road_x + self.half_ns // 2,
        }[direction]

    def axis_length(self, direction: str) -> int:
        return self.width if direction in ("eastbound", "westbound") else self.height


def road_layout(width: int, height: int) -> Layout:
    return Layout(width, height, height // 2, round(width * 0.62), max(8, round(height * 0.11)), max(8, round(width * 0.05)))


class Vehicle(NamedTuple):
    id: int
    kind: str  # car | truck
    direction: str
    length: int  # pixels along the direction of travel
    breadth: int
    luma: int
    speed: float  # pixels per second
    enter: float  # seconds: when its front edge reaches the edge of the frame

    def centre(self, layout: Layout, t: float) -> tuple[float, float]:
        along = -self.length / 2 + self.speed * (t - self.enter)
        lane = layout.lane(self.direction)
        if self.direction == "eastbound":
            return along, lane
        if self.direction == "westbound":
            return layout.width - along, lane
        if self.direction == "southbound":
            return lane, along
        return lane, layout.height - along

    def rect(self, layout: Layout, t: float) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), end-exclusive and not clipped to the frame."""
        cx, cy = self.centre(layout, t)
        w, h = (self.length, self.breadth) if self.direction in ("eastbound", "westbound") else (self.breadth, self.length)
        x0, y0 = round(cx - w / 2), round(cy - h / 2)
        return x0, y0, x0 + w, y0 + h


def _clip(rect: tuple[int, int, int, int], layout: Layout) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = rect
    return max(0, x0), max(0, y0), min(layout.width, x1), min(layout.height, y1)


def paint_background(layout: Layout, rng: random.Random) -> bytearray:
    w, h = layout.width, layout.height
    texture = bytes((byte % 9) - 4 + 128 for byte in range(256))  # static grain of +-4
    grain = rng.randbytes(w * h).translate(texture)
    image = bytearray(_GROUND for _ in range(w * h))
    top, bottom = layout.road_y - layout.half_ew, layout.road_y + layout.half_ew
    left, right = layout.road_x - layout.half_ns, layout.road_x + layout.half_ns
    for y in range(h):
        row = y * w
        if top <= y < bottom:
            image[row : row + w] = bytes([_ROAD]) * w
        else:
            image[row + left : row + right] = bytes([_ROAD]) * (right - left)
    for x in range(w):  # east-west markings: edge lines and a dashed centre line
        if left <= x < right:
            continue
        for y in (top, bottom - 1):
            image[y * w + x] = _MARKING
        if x % 16 < 9:
            for y in (layout.road_y - 1, layout.road_y):
                image[y * w + x] = _MARKING
    for y in range(h):  # north-south markings
        if top <= y < bottom:
            continue
        for x in (left, right - 1):
            image[y * w + x] = _MARKING
        if y % 16 < 9:
            for x in (layout.road_x - 1, layout.road_x):
                image[y * w + x] = _MARKING
    return bytearray(min(255, max(0, v + g - 128)) for v, g in zip(image, grain))


def _noise_table(sigma: float = 3.5) -> bytes:
    """Maps a uniform random byte to Gaussian noise in 0..2*NOISE_MAX (offset by NOISE_MAX)."""
    normal = NormalDist(0.0, sigma)
    return bytes(NOISE_MAX + max(-NOISE_MAX, min(NOISE_MAX, round(normal.inv_cdf((u + 0.5) / 256)))) for u in range(256))


def _visible(rect: tuple[int, int, int, int], layout: Layout) -> bool:
    x0, y0, x1, y1 = _clip(rect, layout)
    return x0 < x1 and y0 < y1


def _collide(a: Vehicle, b: Vehicle, layout: Layout, frames: int, fps: float, gap: int = 4) -> bool:
    """Whether the two come within ``gap`` pixels of each other anywhere in view."""
    for f in range(frames):
        ra, rb = a.rect(layout, f / fps), b.rect(layout, f / fps)
        near = ra[0] < rb[2] + gap and rb[0] < ra[2] + gap and ra[1] < rb[3] + gap and rb[1] < ra[3] + gap
        if near and _visible(ra, layout) and _visible(rb, layout):
            return True
    return False


def plan_vehicles(layout: Layout, count: int, frames: int, fps: float, rng: random.Random, log: Log = say) -> list[Vehicle]:
    """Random vehicles, each in view for at least two seconds, none touching another in view:
    traffic keeps its distance and gives way at the crossing, so every vehicle is one blob."""
    duration = frames / fps
    min_visible = min(2.0, duration / 3)
    planned: list[Vehicle] = []
    for index in range(count):
        truck = index % 5 == 0
        length, breadth = (24, 8) if truck else (12, 6)
        luma = rng.choice((rng.randint(215, 240), rng.randint(25, 45)))
        for _attempt in range(200):
            direction = rng.choices(DIRECTIONS, weights=(3, 3, 2, 2))[0]
            fast = rng.uniform(30, 55) if truck else rng.uniform(40, 90)
            speed = round(fast if direction in ("eastbound", "westbound") else fast * 0.7, 1)
            crossing = (layout.axis_length(direction) + length) / speed
            enter = rng.uniform(min_visible - crossing, duration - min_visible)
            vehicle = Vehicle(len(planned) + 1, "truck" if truck else "car", direction, length, breadth, luma, speed, enter)
            if not any(_collide(vehicle, other, layout, frames, fps) for other in planned):
                planned.append(vehicle)
                break
        else:
            log(f"generate: vehicle {index + 1}: no free slot in the lanes, left out")
    return planned


def _visibility(vehicle: Vehicle, layout: Layout, frames: int, fps: float) -> dict[str, list[int] | None]:
    seen: list[int] = []
    whole: list[int] = []
    for f in range(frames):
        rect = vehicle.rect(layout, f / fps)
        if _visible(rect, layout):
            seen.append(f)
            if _clip(rect, layout) == rect:
                whole.append(f)
    return {
        "visible_frames": [seen[0], seen[-1]] if seen else None,
        "whole_frames": [whole[0], whole[-1]] if whole else None,
    }


def _truth(vehicles: Sequence[Vehicle], layout: Layout, frames: int, fps: float, seed: int) -> dict:
    rows = []
    for v in vehicles:
        x, y = v.centre(layout, 0.0)
        x1, y1 = v.centre(layout, 1.0)
        rows.append({
            "id": v.id, "kind": v.kind, "direction": v.direction, "length": v.length, "breadth": v.breadth,
            "luma": v.luma, "speed_px_s": v.speed, "velocity_px_s": [round(x1 - x, 3), round(y1 - y, 3)],
            "centre_at_frame_0": [round(x, 3), round(y, 3)], **_visibility(v, layout, frames, fps),
        })
    return {
        "width": layout.width, "height": layout.height, "fps": fps, "frames": frames, "seed": seed,
        "vehicle_count": len(rows), "speeds_px_s": [row["speed_px_s"] for row in rows], "vehicles": rows,
    }


def generate(out_path: Path, frames: int = 90, width: int = 320, height: int = 180, fps: int = 10,
             seed: int = 7, vehicles: int = 8, log: Log = say) -> dict:
    """Writes the video and ``<out_path>.truth.json``; returns the ground truth."""
    if frames < 1 or width < 64 or height < 48 or fps < 1 or vehicles < 0:
        raise DemoError("need frames >= 1, width >= 64, height >= 48, fps >= 1, vehicles >= 0")
    rng = random.Random(seed)
    layout = road_layout(width, height)
    plan = plan_vehicles(layout, vehicles, frames, fps, rng, log)
    log(f"generate: {frames} frames {width}x{height} at {fps} fps, {len(plan)} vehicles -> {out_path}")
    # Noise is added as bytes(map(add, ...)) over a scene lowered by NOISE_MAX, which keeps
    # every sum within 0..255 and runs in C: a per-pixel Python loop would take seconds.
    scene = bytearray(max(0, v - NOISE_MAX) for v in paint_background(layout, rng))
    noise = _noise_table()
    chroma = bytes([128]) * (2 * ((width + 1) // 2) * ((height + 1) // 2))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "wb") as out:
        out.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode("ascii"))
        for f in range(frames):
            canvas = bytearray(scene)
            for v in plan:
                x0, y0, x1, y1 = _clip(v.rect(layout, f / fps), layout)
                fill = bytes([min(v.luma, 255 - NOISE_MAX) - NOISE_MAX]) * max(0, x1 - x0)
                for y in range(y0, y1):
                    canvas[y * width + x0 : y * width + x1] = fill
            out.write(b"FRAME\n")
            out.write(bytes(map(operator.add, canvas, rng.randbytes(width * height).translate(noise))))
            out.write(chroma)
            if (f + 1) % 30 == 0 or f + 1 == frames:
                log(f"generate: frame {f + 1}/{frames}")
    truth = _truth(plan, layout, frames, fps, seed)
    Path(f"{out_path}.truth.json").write_text(json.dumps(truth, indent=2) + "\n")
    log(f"generate: wrote {out_path} ({out_path.stat().st_size} bytes) and {out_path.name}.truth.json")
    return truth


# --- detect: background subtraction and connected components -----------------------------


class Blob(NamedTuple):
    x: float  # centroid
    y: float
    w: int  # bounding box
    h: int
    area: int  # pixels


def estimate_background(path: Path, samples: int = 15, log: Log = say) -> bytes:
    """Per-pixel median over frames spread through the video: vehicles move, the road stays."""
    with Y4MReader(path) as video:
        stride = max(1, video.estimated_frames() // samples)
        picked = []
        for index, luma in enumerate(video.frames()):
            if index % stride == 0:
                picked.append(luma)
                if len(picked) == samples:
                    break
    if not picked:
        raise DemoError(f"{path}: the video has no frames")
    middle = len(picked) // 2
    log(f"detect: background = per-pixel median of {len(picked)} frames")
    return bytes(sorted(column)[middle] for column in zip(*picked))


def find_blobs(luma: bytes, low: bytes, high: bytes, width: int, min_area: int) -> list[Blob]:
    """Connected regions (4-neighbours) of pixels outside [low, high], by iterative flood fill."""
    foreground = {i for i, v, lo, hi in zip(range(len(luma)), luma, low, high) if v < lo or v > hi}
    blobs = []
    while foreground:
        stack = [foreground.pop()]
        area = sum_x = sum_y = 0
        x_min = y_min = 1 << 30
        x_max = y_max = -1
        while stack:
            i = stack.pop()
            y, x = divmod(i, width)
            area += 1
            sum_x += x
            sum_y += y
            x_min, x_max, y_min, y_max = min(x_min, x), max(x_max, x), min(y_min, y), max(y_max, y)
            for j in (i - width, i + width, i - 1 if x > 0 else -1, i + 1 if x < width - 1 else -1):
                if j in foreground:
                    foreground.remove(j)
                    stack.append(j)
        if area >= min_area:
            blobs.append(Blob(sum_x / area, sum_y / area, x_max - x_min + 1, y_max - y_min + 1, area))
    blobs.sort(key=lambda b: (b.y, b.x))
    return blobs


def write_pgm(path: Path, width: int, height: int, luma: bytes) -> None:
    path.write_bytes(b"P5\n%d %d\n255\n" % (width, height) + luma)


def read_pgm(path: Path) -> tuple[int, int, bytes]:
    data = path.read_bytes()
    parts = data.split(maxsplit=4)
    if len(parts) < 5 or parts[0] != b"P5" or parts[3] != b"255":
        raise DemoError(f"{path}: not an 8-bit binary PGM image")
    width, height = int(parts[1]), int(parts[2])
    header_end = len(data) - width * height
    if header_end < len(b"P5 1 1 255 "):
        raise DemoError(f"{path}: truncated PGM image")
    return width, height, data[header_end:]


def detect(video: Path, workspace: Path, threshold: int = 30, min_area: int = 20,
           samples: int = 15, progress_every: int = 10, log: Log = say) -> dict:
    """Writes detections.csv (frame, x, y, w, h, area), detect.json and background.pgm."""
    if not (1 <= threshold <= 255 and min_area >= 1 and samples >= 1 and progress_every >= 1):
        raise DemoError("need 1 <= threshold <= 255, min area >= 1, samples >= 1, progress every >= 1")
    background = estimate_background(video, samples, log)
    low = bytes(max(0, b - threshold) for b in background)
    high = bytes(min(255, b + threshold) for b in background)
    workspace.mkdir(parents=True, exist_ok=True)
    frames = detections = busy_frames = 0
    with Y4MReader(video) as reader, open(workspace / "detections.csv", "w", newline="") as out:
        info, total = reader.info, reader.estimated_frames()
        log(f"detect: {video.name}: {info.width}x{info.height} at {info.fps:g} fps, about {total} frames")
        rows = csv.writer(out)
        rows.writerow(["frame", "x", "y", "w", "h", "area"])
        for frame, luma in enumerate(reader.frames()):
            blobs = find_blobs(luma, low, high, info.width, min_area)
            rows.writerows([frame, f"{b.x:.2f}", f"{b.y:.2f}", b.w, b.h, b.area] for b in blobs)
            frames, detections, busy_frames = frame + 1, detections + len(blobs), busy_frames + bool(blobs)
            if frames % progress_every == 0:
                log(f"detect: frame {frames}/{total}: {len(blobs)} vehicles, {detections} detections so far")
    write_pgm(workspace / "background.pgm", info.width, info.height, background)
    summary = {
        "video": video.name, "frames": frames, "width": info.width, "height": info.height, "fps": info.fps,
        "detections": detections, "frames_with_detections": busy_frames,
        "threshold": threshold, "min_area": min_area, "background_samples": samples,
    }
    _write_json(workspace / "detect.json", summary)
    log(f"detect: {detections} detections in {frames} frames ({busy_frames} with vehicles)")
    return summary


# --- track: link detections into tracks --------------------------------------------------


class Point(NamedTuple):
    frame: int
    x: float
    y: float


class _Track:
    """A track being built: its points and a smoothed constant-velocity model (px/frame)."""

    __slots__ = ("points", "vx", "vy", "missed")

    def __init__(self, first: Point) -> None:
        self.points = [first]
        self.vx: float | None = None
        self.vy: float | None = None
        self.missed = 0

    def predict(self, frame: int) -> tuple[float, float]:
        last = self.points[-1]
        if self.vx is None or self.vy is None:
            return last.x, last.y
        gap = frame - last.frame
        return last.x + self.vx * gap, last.y + self.vy * gap

    def add(self, point: Point) -> None:
        last = self.points[-1]
        gap = point.frame - last.frame
        vx, vy = (point.x - last.x) / gap, (point.y - last.y) / gap
        if self.vx is None or self.vy is None:
            self.vx, self.vy = vx, vy
        else:
            self.vx, self.vy = (self.vx + vx) / 2, (self.vy + vy) / 2
        self.points.append(point)
        self.missed = 0


def link_tracks(by_frame: dict[int, list[Point]], frames: int, width: float, height: float,
                max_distance: float = 15.0, max_missed: int = 5, min_length: int = 5) -> list[list[Point]]:
    """Greedy nearest-neighbour linking against each track's predicted position.

    The gate is ``max_distance`` around the prediction, twice that for a track of one
    detection. A track without a detection coasts on its velocity (a vehicle hidden for a
    moment) and ends after ``max_missed`` such frames, or at once when it is predicted
    outside the frame, so that it cannot take over a vehicle entering there. Tracks with
    fewer than ``min_length`` detections are dropped as noise; the rest come back ordered
    by their start.
    """
    active: list[_Track] = []
    finished: list[_Track] = []
    for frame in range(frames):
        points = by_frame.get(frame, [])
        predicted = []
        for track in active:
            x, y = track.predict(frame)
            if 0 <= x < width and 0 <= y < height:
                predicted.append((track, x, y))
            else:
                finished.append(track)
        pairs = []
        for t, (track, px, py) in enumerate(predicted):
            # Until a track has a velocity its prediction lags by a whole frame's motion.
            gate = max_distance if track.vx is not None else 2 * max_distance
            for d, point in enumerate(points):
                distance = math.hypot(point.x - px, point.y - py)
                if distance <= gate:
                    pairs.append((distance, t, d))
        taken_tracks, taken_points = set(), set()
        for _distance, t, d in sorted(pairs):
            if t not in taken_tracks and d not in taken_points:
                predicted[t][0].add(points[d])
                taken_tracks.add(t)
                taken_points.add(d)
        active = []
        for t, (track, _, _) in enumerate(predicted):
            if t not in taken_tracks:
                track.missed += 1
            (finished if track.missed > max_missed else active).append(track)
        active += [_Track(p) for d, p in enumerate(points) if d not in taken_points]
    kept = [t.points for t in finished + active if len(t.points) >= min_length]
    return sorted(kept, key=lambda points: (points[0].frame, points[0].x, points[0].y))


def _read_json(path: Path, needed: Sequence[str]) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DemoError(f"{path} not found: is the input folder the previous stage's workspace?") from None
    except ValueError as err:
        raise DemoError(f"{path}: not valid JSON ({err})") from None
    missing = [key for key in needed if not isinstance(data, dict) or key not in data]
    if missing:
        raise DemoError(f"{path}: missing {', '.join(missing)}")
    return data


def _read_points(path: Path, id_column: str | None) -> list[tuple[int, Point]]:
    """Rows of a CSV with frame, x, y (and an id column): [(id, point)], validated."""
    columns = ["frame", "x", "y"] + ([id_column] if id_column else [])
    try:
        with open(path, newline="") as f:
            rows = csv.DictReader(f)
            missing = [c for c in columns if c not in (rows.fieldnames or [])]
            if missing:
                raise DemoError(f"{path}: missing column {', '.join(missing)}")
            out = []
            for row in rows:
                try:
                    point = Point(int(row["frame"]), float(row["x"]), float(row["y"]))
                    out.append((int(row[id_column]) if id_column else 0, point))
                except (TypeError, ValueError):
                    raise DemoError(f"{path}:{rows.line_num}: not a number in {row}") from None
            return out
    except FileNotFoundError:
        raise DemoError(f"{path} not found: is the input folder the previous stage's workspace?") from None


def track(input_dir: Path, workspace: Path, max_distance: float = 15.0, max_missed: int = 5,
          min_length: int = 5, log: Log = say) -> dict:
    """Reads detections.csv and detect.json, writes tracks.csv (track_id, frame, x, y) and track.json."""
    if not (max_distance > 0 and max_missed >= 0 and min_length >= 1):
        raise DemoError("need max distance > 0, max missed >= 0, min length >= 1")
    meta = _read_json(input_dir / "detect.json", ("frames", "fps", "width", "height"))
    rows = _read_points(input_dir / "detections.csv", None)
    by_frame: dict[int, list[Point]] = {}
    for _, point in rows:
        by_frame.setdefault(point.frame, []).append(point)
    frames = max([int(meta["frames"])] + [f + 1 for f in by_frame])
    log(f"track: {len(rows)} detections in {frames} frames; gate {max_distance:g} px, "
        f"coast {max_missed} frames, keep tracks of {min_length}+ detections")
    tracks = link_tracks(by_frame, frames, float(meta["width"]), float(meta["height"]), max_distance, max_missed, min_length)
    workspace.mkdir(parents=True, exist_ok=True)
    with open(workspace / "tracks.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["track_id", "frame", "x", "y"])
        for track_id, points in enumerate(tracks, start=1):
            writer.writerows([track_id, p.frame, f"{p.x:.2f}", f"{p.y:.2f}"] for p in points)
            log(f"track: {track_id}: frames {points[0].frame}-{points[-1].frame}, {len(points)} detections")
    background = input_dir / "background.pgm"
    if background.is_file():  # carried forward so the analysis can draw the road under the tracks
        (workspace / "background.pgm").write_bytes(background.read_bytes())
    linked = sum(len(points) for points in tracks)
    summary = {
        "video": meta.get("video"), "frames": frames, "fps": meta["fps"], "width": meta["width"],
        "height": meta["height"], "tracks": len(tracks), "detections": len(rows), "linked_detections": linked,
        "max_distance": max_distance, "max_missed": max_missed, "min_length": min_length,
    }
    _write_json(workspace / "track.json", summary)
    log(f"track: {len(tracks)} tracks from {linked} of {len(rows)} detections")
    return summary


# --- analyse: speeds, directions and a picture -------------------------------------------


class VehicleStats(NamedTuple):
    vehicle: int
    first_frame: int
    last_frame: int
    frames: int
    vx: float  # px/s
    vy: float
    speed_px_s: float
    direction: str


def _slope(ts: Sequence[float], vs: Sequence[float]) -> float:
    """Least-squares slope of vs over ts."""
    mt, mv = sum(ts) / len(ts), sum(vs) / len(vs)
    var = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (v - mv) for t, v in zip(ts, vs)) / var if var else 0.0


def direction_of(vx: float, vy: float, still_below: float = 2.0) -> str:
    if math.hypot(vx, vy) < still_below:
        return "stationary"
    if abs(vx) >= abs(vy):
        return "eastbound" if vx > 0 else "westbound"
    return "southbound" if vy > 0 else "northbound"


def measure(vehicle: int, points: Sequence[Point], fps: float, width: int, height: int, edge_margin: float = 16) -> VehicleStats:
    """Velocity from a line fit over the points away from the frame's edges, where a
    vehicle only partly in view has its centroid pulled inwards."""
    inner = [p for p in points
             if edge_margin <= p.x <= width - 1 - edge_margin and edge_margin <= p.y <= height - 1 - edge_margin]
    fit = inner if len(inner) >= 3 else list(points)
    ts = [p.frame / fps for p in fit]
    vx, vy = _slope(ts, [p.x for p in fit]), _slope(ts, [p.y for p in fit])
    return VehicleStats(vehicle, points[0].frame, points[-1].frame, len(points), vx, vy, math.hypot(vx, vy), direction_of(vx, vy))


def _road_picture(background: Path, width: int, height: int, scale: int, log: Log) -> bytes | None:
    """The background estimate, dimmed and enlarged ``scale`` times, as RGB; None if unusable."""
    if not background.is_file():
        return None
    try:
        w, h, luma = read_pgm(background)
    except (DemoError, ValueError) as err:
        log(f"analyse: ignoring {background.name}: {err}")
        return None
    if (w, h) != (width, height) or len(luma) != w * h:
        log(f"analyse: ignoring {background.name}: {w}x{h}, not {width}x{height}")
        return None
    dim = bytes(24 + v * 40 // 100 for v in range(256))
    rows = []
    for y in range(h):
        wide = bytearray(w * scale)
        for k in range(scale):
            wide[k::scale] = luma[y * w : (y + 1) * w].translate(dim)
        rgb = bytearray(len(wide) * 3)
        rgb[0::3] = rgb[1::3] = rgb[2::3] = wide
        rows.extend([bytes(rgb)] * scale)
    return b"".join(rows)


def legend_entry(stat: VehicleStats, kmh_per_px_s: float) -> str:
    kmh = stat.speed_px_s * kmh_per_px_s
    return f"#{stat.vehicle} {stat.direction} {kmh:.1f} km/h ({stat.speed_px_s:.1f} px/s)"


def analyse(input_dir: Path, workspace: Path, metres_per_pixel: float = 0.1, edge_margin: float = 16,
            project: str | None = None, log: Log = say) -> dict:
    """Writes vehicles.csv, summary.json and trajectories.png from tracks.csv and track.json."""
    if not metres_per_pixel > 0:
        raise DemoError(f"metres per pixel must be positive, not {metres_per_pixel}")
    meta = _read_json(input_dir / "track.json", ("fps", "width", "height"))
    fps, width, height = float(meta["fps"]), int(meta["width"]), int(meta["height"])
    by_id: dict[int, list[Point]] = {}
    for track_id, point in _read_points(input_dir / "tracks.csv", "track_id"):
        by_id.setdefault(track_id, []).append(point)
    tracks = [sorted(points) for _, points in sorted(by_id.items())]
    stats = [measure(i, points, fps, width, height, edge_margin) for i, points in enumerate(tracks, start=1)]
    kmh = metres_per_pixel * 3.6
    workspace.mkdir(parents=True, exist_ok=True)
    with open(workspace / "vehicles.csv", "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["vehicle", "first_frame", "last_frame", "frames", "duration_s", "speed_px_s", "speed_kmh", "direction"])
        for s in stats:
            duration = (s.last_frame - s.first_frame) / fps
            writer.writerow([s.vehicle, s.first_frame, s.last_frame, s.frames, f"{duration:.2f}",
                             f"{s.speed_px_s:.1f}", f"{s.speed_px_s * kmh:.1f}", s.direction])
            log(f"analyse: vehicle {s.vehicle}: {s.direction}, {s.speed_px_s:.1f} px/s = "
                f"{s.speed_px_s * kmh:.1f} km/h, frames {s.first_frame}-{s.last_frame}")
    directions = {d: 0 for d in DIRECTIONS}
    for s in stats:
        directions[s.direction] = directions.get(s.direction, 0) + 1
    mean_speed = sum(s.speed_px_s for s in stats) / len(stats) if stats else 0.0
    summary = {
        "vehicles": len(stats), "directions": directions, "mean_speed_px_s": round(mean_speed, 2),
        "mean_speed_kmh": round(mean_speed * kmh, 2), "metres_per_pixel": metres_per_pixel, "fps": fps,
    }
    _write_json(workspace / "summary.json", summary)
    scale = 2 if width < 640 else 1
    road = _road_picture(input_dir / "background.pgm", width, height, scale, log)
    source = " / ".join(str(part) for part in (project, meta.get("video")) if part) or "trajectories"
    caption = Caption(
        f"{source}: {len(stats)} vehicle{'' if len(stats) == 1 else 's'}, mean speed {mean_speed * kmh:.1f} km/h",
        f"square: first seen, arrow: last seen; speeds are track means at {metres_per_pixel:g} m/px",
        tuple(legend_entry(s, kmh) for s in stats),
    )
    picture = draw_trajectories(tracks, stats, width, height, road, scale, caption)
    (workspace / "trajectories.png").write_bytes(picture.png({"Title": caption.title, "Description": "\n".join(caption.entries)}))
    log(f"analyse: {len(stats)} vehicles, mean {mean_speed:.1f} px/s = {mean_speed * kmh:.1f} km/h; "
        f"trajectories.png {picture.width}x{picture.height}")
    return summary


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# --- command line ------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _folder(value: str | None, env: str, flag: str) -> Path:
    value = value or os.environ.get(env)
    if not value:
        raise DemoError(f"no folder given: set {env} or pass {flag}")
    return Path(value)


def find_video(resources: Path, name: str | None) -> Path:
    """``resources/name`` when a name is given, else the first .y4m under resources."""
    if name:
        return resources / name
    if not resources.is_dir():
        raise DemoError(f"resources folder not found: {resources}")
    videos = sorted(resources.rglob("*.y4m"))
    if not videos:
        raise DemoError(f"no .y4m video under {resources} (set VIDEO or pass --video)")
    return videos[0]


def _run_generate(args: argparse.Namespace) -> None:
    generate(Path(args.out_path), args.frames, args.width, args.height, args.fps, args.seed, args.vehicles)


def _run_detect(args: argparse.Namespace) -> None:
    if args.video:
        video = Path(args.video)
    else:
        video = find_video(_folder(args.resources, "WINSLOW_RESOURCES", "--resources"), os.environ.get("VIDEO"))
    detect(video, _folder(args.workspace, "WINSLOW_WORKSPACE", "--workspace"), args.threshold, args.min_area,
           args.samples, args.progress_every)


def _run_track(args: argparse.Namespace) -> None:
    track(_folder(args.input, "WINSLOW_INPUT", "--input"), _folder(args.workspace, "WINSLOW_WORKSPACE", "--workspace"),
          args.max_distance, args.max_missed, args.min_length)


def _run_analyse(args: argparse.Namespace) -> None:
    scale = args.metres_per_pixel or os.environ.get("METRES_PER_PIXEL") or "0.1"
    try:
        metres_per_pixel = float(scale)
    except ValueError:
        raise DemoError(f"metres per pixel is not a number: {scale!r}") from None
    analyse(_folder(args.input, "WINSLOW_INPUT", "--input"), _folder(args.workspace, "WINSLOW_WORKSPACE", "--workspace"),
            metres_per_pixel, args.edge_margin, args.project or os.environ.get("WINSLOW_PROJECT"))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="vehicles.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="write a synthetic traffic video (.y4m) and its ground truth")
    gen.add_argument("out_path", metavar="OUT_PATH", help="the .y4m file to write; truth goes to OUT_PATH.truth.json")
    gen.add_argument("--frames", type=int, default=90)
    gen.add_argument("--width", type=int, default=320)
    gen.add_argument("--height", type=int, default=180)
    gen.add_argument("--fps", type=int, default=10)
    gen.add_argument("--seed", type=int, default=7)
    gen.add_argument("--vehicles", type=int, default=8)
    gen.set_defaults(run=_run_generate)

    det = commands.add_parser("detect", help="find moving vehicles in each frame -> detections.csv")
    det.add_argument("--video", help="default: $WINSLOW_RESOURCES/$VIDEO, else the first .y4m under $WINSLOW_RESOURCES")
    det.add_argument("--resources", help="default: $WINSLOW_RESOURCES")
    det.add_argument("--workspace", help="default: $WINSLOW_WORKSPACE")
    det.add_argument("--threshold", type=int, default=30, help="grey levels from the background that count as a vehicle")
    det.add_argument("--min-area", type=int, default=20, help="smallest blob kept, in pixels")
    det.add_argument("--samples", type=int, default=15, help="frames in the background median")
    det.add_argument("--progress-every", type=int, default=10, help="frames between progress lines")
    det.set_defaults(run=_run_detect)

    trk = commands.add_parser("track", help="link detections into tracks -> tracks.csv")
    trk.add_argument("--input", help="default: $WINSLOW_INPUT (the detect stage's workspace)")
    trk.add_argument("--workspace", help="default: $WINSLOW_WORKSPACE")
    trk.add_argument("--max-distance", type=float, default=15.0, help="gate around the predicted position, px")
    trk.add_argument("--max-missed", type=int, default=5, help="frames a track coasts without a detection")
    trk.add_argument("--min-length", type=int, default=5, help="fewest detections in a kept track")
    trk.set_defaults(run=_run_track)

    ana = commands.add_parser("analyse", help="speeds and directions -> vehicles.csv, summary.json, trajectories.png")
    ana.add_argument("--input", help="default: $WINSLOW_INPUT (the track stage's workspace)")
    ana.add_argument("--workspace", help="default: $WINSLOW_WORKSPACE")
    ana.add_argument("--metres-per-pixel", help="default: $METRES_PER_PIXEL, else 0.1")
    ana.add_argument("--edge-margin", type=float, default=16, help="px from the frame edge left out of speed fits")
    ana.add_argument("--project", help="named in the picture's title; default: $WINSLOW_PROJECT")
    ana.set_defaults(run=_run_analyse)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (DemoError, OSError) as err:
        print(f"vehicles.py {args.command}: error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
