"""The picture the demo's analyse stage draws: vehicle tracks over the road, with a title and a legend.

A small RGB canvas (filled rectangles, Bresenham lines, solid or dashed, and text in a 5x7
dot-matrix font) and a PNG encoder, in the standard library only: ``winslow demo`` copies this
file into the storage pool beside vehicles.py, which imports it there. Picture coordinates are
pixels, x to the right and y down, as in the video.
"""
from __future__ import annotations

import colorsys
import math
import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # only for the annotations: at run time vehicles.py imports this module, not the reverse
    from .vehicles import Point, VehicleStats


# --- PNG and drawing ---------------------------------------------------------------------


def encode_png(width: int, height: int, rgb: bytes, text: dict[str, str] | None = None) -> bytes:
    """A truecolour 8-bit PNG, every row with filter type 0 (none); ``text`` becomes tEXt chunks
    (keywords such as Title and Description, Latin-1)."""
    stride = width * 3
    raw = b"".join(b"\x00" + rgb[y * stride : (y + 1) * stride] for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    notes = b"".join(chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace"))
                     for key, value in (text or {}).items())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + notes + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


BACKGROUND = b"\x1e\x1e\x22"
INK = b"\xe8\xe8\xe8"
FAINT = b"\xa0\xa0\xa8"
TEXT_SIZE = 2  # font pixels are drawn as TEXT_SIZE x TEXT_SIZE squares
GLYPH_WIDTH, GLYPH_HEIGHT = 5, 7
# The classic 5x7 dot-matrix font for ASCII 32-126: five column bytes per character, bit 0 the top row.
_FONT = bytes.fromhex(
    "000000000000005f00000007000700147f147f14242a7f2a12231308646236495522500005030000001c2241000041221c001408"
    "3e081408083e080800503000000808080808006060000020100804023e5149453e00427f400042615149462141454b311814127f"
    "1027454545393c4a49493001710905033649494936064949291e0036360000005636000008142241001414141414004122140802"
    "01510906324979413e7e1111117e7f494949363e414141227f4141221c7f494949417f090909013e4149497a7f0808087f00417f"
    "41002040413f017f081422417f404040407f020c027f7f0408107f3e4141413e7f090909063e4151215e7f091929464649494931"
    "01017f01013f4040403f1f2040201f3f4038403f631408146307087008076151494543007f41410002040810200041417f000402"
    "0102044040404040000102040020545454787f484444383844444420384444487f3854545418087e0901020c5252523e7f080404"
    "7800447d40002040443d007f1028440000417f40007c041804787c0804047838444444387c14141408081414187c7c0804040848"
    "54545420043f4440203c4040207c1c2040201c3c4030403c44281028440c5050503c4464544c44083641410000007f0000004141"
    "36080804081008"
)


def text_width(text: str, size: int) -> int:
    return max(0, len(text) * (GLYPH_WIDTH + 1) - 1) * size


def _bresenham(x0: int, y0: int, x1: int, y1: int) -> Iterator[tuple[int, int]]:
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
    err = dx + dy
    while True:
        yield x0, y0
        if x0 == x1 and y0 == y1:
            return
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            x0 += sx
        if e2 <= dx:
            err += dx
            y0 += sy


def _dash_on(step: int, dash: Sequence[int]) -> bool:
    """Whether ``step`` pixels along a line falls on a drawn part of ``dash`` (lengths on, off, on, ...)."""
    if not dash:
        return True
    at = step % sum(dash)
    for index, length in enumerate(dash):
        if at < length:
            return index % 2 == 0
        at -= length
    return True


class Canvas:
    """An RGB image to draw lines, dots and text on."""

    def __init__(self, width: int, height: int, rgb: bytes | None = None) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(rgb) if rgb is not None else bytearray(BACKGROUND * (width * height))

    def fill(self, x0: int, y0: int, x1: int, y1: int, colour: bytes) -> None:
        """The rectangle from (x0, y0) to (x1, y1), end-exclusive, clipped to the canvas."""
        x0, x1 = max(0, x0), min(self.width, x1)
        if x0 >= x1:
            return
        for y in range(max(0, y0), min(self.height, y1)):
            i = (y * self.width + x0) * 3
            self.pixels[i : i + 3 * (x1 - x0)] = colour * (x1 - x0)

    def dot(self, x: int, y: int, colour: bytes, size: int = 1) -> None:
        self.fill(x - size // 2, y - size // 2, x - size // 2 + size, y - size // 2 + size, colour)

    def line(self, x0: int, y0: int, x1: int, y1: int, colour: bytes, size: int = 1) -> None:
        """Bresenham's line, drawn with square dots of ``size`` pixels."""
        for x, y in _bresenham(x0, y0, x1, y1):
            self.dot(x, y, colour, size)

    def polyline(self, points: Sequence[tuple[int, int]], colour: bytes, size: int = 1, dash: Sequence[int] = ()) -> None:
        """Lines through ``points``, solid or dashed: ``dash`` gives the lengths drawn and skipped, in turn."""
        step = 0
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            for index, (x, y) in enumerate(_bresenham(x0, y0, x1, y1)):
                if index == 0 and step:
                    continue  # the corner, already drawn as the end of the previous line
                if _dash_on(step, dash):
                    self.dot(x, y, colour, size)
                step += 1

    def text(self, x: int, y: int, text: str, colour: bytes, size: int = 1) -> int:
        """``text`` in the 5x7 font, each font pixel ``size`` pixels square, top left at (x, y);
        returns the x after it. Characters the font lacks are drawn as ``?``."""
        for char in text:
            code = ord(char) - 32 if " " <= char <= "~" else ord("?") - 32
            for column, bits in enumerate(_FONT[code * GLYPH_WIDTH : (code + 1) * GLYPH_WIDTH]):
                for row in range(GLYPH_HEIGHT):
                    if bits >> row & 1:
                        left, top = x + column * size, y + row * size
                        self.fill(left, top, left + size, top + size, colour)
            x += (GLYPH_WIDTH + 1) * size
        return x

    def paste(self, x: int, y: int, other: Canvas) -> None:
        """Copies ``other`` in with its top left at (x, y); it must fit."""
        stride = other.width * 3
        for row in range(other.height):
            i = ((y + row) * self.width + x) * 3
            self.pixels[i : i + stride] = other.pixels[row * stride : (row + 1) * stride]

    def png(self, text: dict[str, str] | None = None) -> bytes:
        return encode_png(self.width, self.height, bytes(self.pixels), text)


# --- the trajectory map ------------------------------------------------------------------


def track_colour(index: int) -> bytes:
    """The colour of the index-th track (from 0): hues a golden angle apart, so neighbours differ."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.8, 1.0)
    return bytes((round(r * 255), round(g * 255), round(b * 255)))


DASHES: tuple[tuple[int, ...], ...] = ((), (6, 3), (2, 2), (7, 2, 2, 2))  # solid, dashed, dotted, dash-dot


class Caption(NamedTuple):
    title: str
    note: str  # fainter, under the title, wrapped to the picture's width
    entries: tuple[str, ...]  # the legend: one line per track


def lane_slots(tracks: Sequence[Sequence[Point]], stats: Sequence[VehicleStats], lane_gap: float = 6.0) -> list[tuple[int, int]]:
    """(place, tracks in the lane) for each track. Tracks going the same way along lines less than
    ``lane_gap`` pixels apart share a lane: drawn as they are, they would cover each other."""
    def across(index: int) -> float:
        points, horizontal = tracks[index], stats[index].direction in ("eastbound", "westbound")
        return sum(p.y if horizontal else p.x for p in points) / len(points)

    slots = [(0, 1)] * len(stats)
    ways: dict[str, list[int]] = {}
    for index, stat in enumerate(stats):
        if stat.direction != "stationary":
            ways.setdefault(stat.direction, []).append(index)
    for members in ways.values():
        members.sort(key=across)
        lanes = [[members[0]]]
        for index in members[1:]:
            if across(index) - across(lanes[-1][-1]) > lane_gap:
                lanes.append([])
            lanes[-1].append(index)
        for lane in lanes:
            for place, index in enumerate(sorted(lane)):
                slots[index] = (place, len(lane))
    return slots


def _track_path(points: Sequence[Point], stat: VehicleStats, slot: tuple[int, int], scale: int) -> list[tuple[int, int]]:
    """The track in picture pixels, moved sideways to its place in a shared lane."""
    place, count = slot
    spacing = min(3.0 * scale, 9.0 * scale / max(1, count - 1))
    shift = (place - (count - 1) / 2) * spacing
    heading = math.atan2(stat.vy, stat.vx)
    dx, dy = -math.sin(heading) * shift, math.cos(heading) * shift
    return [(round((p.x + 0.5) * scale + dx), round((p.y + 0.5) * scale + dy)) for p in points]


def _place_label(path: Sequence[tuple[int, int]], width: int, height: int, bounds: tuple[int, int],
                 taken: Sequence[tuple[int, int, int, int]], clear: float) -> tuple[int, int, int, int] | None:
    """A box centred on a point of ``path`` within ``bounds`` and clear of ``taken``: the first such
    point at least ``clear`` pixels from both ends, so as not to hide the markers there, else any."""
    def away(point: tuple[int, int]) -> bool:
        return math.dist(point, path[0]) >= clear and math.dist(point, path[-1]) >= clear

    for x, y in [p for p in path if away(p)] + [p for p in path if not away(p)]:
        x0, y0 = x - width // 2, y - height // 2
        box = (x0, y0, x0 + width, y0 + height)
        inside = x0 >= 0 and y0 >= 0 and box[2] <= bounds[0] and box[3] <= bounds[1]
        if inside and not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
            return box
    return None


def draw_map(tracks: Sequence[Sequence[Point]], stats: Sequence[VehicleStats], width: int, height: int,
             road: bytes | None, scale: int) -> Canvas:
    """Each track as a polyline in its colour from a square dot (first seen) to an arrowhead (last
    seen), tagged with its vehicle number; tracks sharing a lane side by side, each dashed its own way."""
    canvas = Canvas(width * scale, height * scale, road)
    slots = lane_slots(tracks, stats)
    paths = [_track_path(points, stat, slot, scale) for points, stat, slot in zip(tracks, stats, slots)]
    for index, (path, stat, (place, _)) in enumerate(zip(paths, stats, slots)):
        colour = track_colour(index)
        canvas.polyline(path, colour, scale, [n * scale for n in DASHES[place % len(DASHES)]])
        canvas.dot(*path[0], colour, 3 * scale)
        heading = math.atan2(stat.vy, stat.vx)
        tip_x, tip_y = path[-1]
        for side in (-1, 1):
            back = heading + math.pi + side * math.radians(30)
            canvas.line(tip_x, tip_y, round(tip_x + 6 * scale * math.cos(back)), round(tip_y + 6 * scale * math.sin(back)),
                        colour, scale)
    taken: list[tuple[int, int, int, int]] = []
    for index, (path, stat) in enumerate(zip(paths, stats)):
        label = str(stat.vehicle)
        label_width, label_height = text_width(label, TEXT_SIZE) + 4, GLYPH_HEIGHT * TEXT_SIZE + 4
        box = _place_label(path, label_width, label_height, (canvas.width, canvas.height), taken, label_width / 2 + 6 * scale)
        if box is not None:
            taken.append(box)
            canvas.fill(*box, BACKGROUND)
            canvas.text(box[0] + 2, box[1] + 2, label, track_colour(index), TEXT_SIZE)
    return canvas


def _fit(text: str, width: int, size: int) -> str:
    """``text``, cut short with "..." if wider than ``width`` pixels."""
    if text_width(text, size) <= width:
        return text
    keep = max(0, (width // size + 1) // (GLYPH_WIDTH + 1) - 3)
    return text[:keep] + "..."


def _wrap(text: str, width: int, size: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels, broken between words where it can be."""
    lines: list[str] = []
    for word in text.split():
        if lines and text_width(f"{lines[-1]} {word}", size) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(_fit(word, width, size))
    return lines


def draw_trajectories(tracks: Sequence[Sequence[Point]], stats: Sequence[VehicleStats], width: int, height: int,
                      road: bytes | None, scale: int, caption: Caption) -> Canvas:
    """The map of :func:`draw_map` under the title and note, wrapped to fit, over a legend: for each
    track a sample of its line and its entry in ``caption.entries``, listed down the columns."""
    pad, size, thick = 6, TEXT_SIZE, max(2, scale)
    line_height = GLYPH_HEIGHT * size + 6
    picture = draw_map(tracks, stats, width, height, road, scale)
    swatch = 20 * thick
    column_width = swatch + 8 + max((text_width(e, size) for e in caption.entries), default=0) + 3 * pad
    full_width = max(picture.width, pad + column_width)  # a small video's map is narrower than one legend line
    columns = max(1, (full_width - pad) // column_width)
    rows = -(-len(caption.entries) // columns)
    lines = [(line, INK) for line in _wrap(caption.title, full_width - 2 * pad, size)]
    lines += [(line, FAINT) for line in _wrap(caption.note, full_width - 2 * pad, size)]
    header = 2 * pad + len(lines) * line_height
    canvas = Canvas(full_width, header + picture.height + 2 * pad + rows * line_height)
    for row, (line, colour) in enumerate(lines):
        canvas.text(pad, pad + row * line_height, line, colour, size)
    canvas.paste(0, header, picture)
    slots = lane_slots(tracks, stats)
    for index, entry in enumerate(caption.entries):
        x = pad + index // rows * column_width
        y = header + picture.height + pad + index % rows * line_height
        dash = [n * thick for n in DASHES[slots[index][0] % len(DASHES)]] if index < len(slots) else []
        middle = y + GLYPH_HEIGHT * size // 2
        canvas.polyline([(x, middle), (x + swatch, middle)], track_colour(index), thick, dash)
        canvas.text(x + swatch + 8, y, entry, INK, size)
    return canvas
