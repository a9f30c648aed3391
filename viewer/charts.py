"""Charts drawn on the server as SVG: a node's load over the last minutes, a project's runs as a timeline.

No chart library and nothing from the internet: each chart is a small SVG string
with its colours in the stylesheet (classes, no inline style), every text in it
escaped. A chart says in words what it shows (`<title>`, axis labels), so it reads
without colour too.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from markupsafe import Markup, escape

from reconciler.clock import parse_time
from reconciler.units import format_duration, format_size

W, H = 640, 150
LEFT, RIGHT, TOP, BOTTOM = 64, 12, 14, 24


@dataclass(frozen=True)
class Series:
    name: str
    values: Sequence[float | None]


def percent(value: float) -> str:
    return f"{value:.0f}%"


def size(value: float) -> str:
    return format_size(int(value))


def rate(value: float) -> str:
    return format_size(int(value)) + "/s"


def line_chart(title: str, times: Sequence[str | None], series: Sequence[Series], top: float | None,
               label: Callable[[float], str]) -> Markup:
    """A line per series over the sample times; `top` fixes the y axis (a capacity), else the largest value."""
    stamps = [parse_time(t) for t in times]
    known = [s for s in stamps if s is not None]
    parts = [f'<svg class="chart" viewBox="0 0 {W} {H}" role="img" aria-label="{escape(title)}">',
             f"<title>{escape(title)}</title>"]
    values = [v for s in series for v in s.values if v is not None]
    if len(known) < 2 or not values:
        parts.append(f'<text class="empty" x="{W / 2}" y="{H / 2}" text-anchor="middle">'
                     f"{escape(title)}: not enough samples yet</text></svg>")
        return Markup("".join(parts))
    first, last = min(known), max(known)
    span = max(1.0, (last - first).total_seconds())
    ceiling = top if top and top > 0 else max(values) or 1.0
    ceiling = max(ceiling, max(values))
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM

    def x(stamp: datetime) -> float:
        return LEFT + plot_w * (stamp - first).total_seconds() / span

    def y(value: float) -> float:
        return TOP + plot_h * (1 - value / ceiling)

    for fraction in (0.0, 0.5, 1.0):
        at = y(ceiling * fraction)
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{at:.1f}" y2="{at:.1f}"/>')
        parts.append(f'<text class="axis" x="{LEFT - 6}" y="{at + 4:.1f}" text-anchor="end">'
                     f"{escape(label(ceiling * fraction))}</text>")
    parts.append(f'<text class="axis" x="{LEFT}" y="{H - 6}">-{escape(format_duration(span))}</text>')
    parts.append(f'<text class="axis" x="{W - RIGHT}" y="{H - 6}" text-anchor="end">'
                 f'{escape(last.strftime("%H:%M:%S"))} UTC</text>')
    for index, line in enumerate(series):
        points = [f"{x(s):.1f},{y(v):.1f}" for s, v in zip(stamps, line.values) if s is not None and v is not None]
        if points:
            parts.append(f'<polyline class="line s{index % 6}" points="{" ".join(points)}"/>')
            latest = next((v for v in reversed(line.values) if v is not None), None)
            legend = f"{line.name}: {label(latest)}" if latest is not None else line.name
            parts.append(f'<text class="legend s{index % 6}" x="{LEFT + 8 + 170 * index}" y="{TOP + 10}">'
                         f"{escape(legend)}</text>")
    parts.append("</svg>")
    return Markup("".join(parts))


@dataclass(frozen=True)
class Bar:
    """One run on the timeline."""

    id: str
    label: str
    state: str
    start: str | None
    end: str | None     # None: still going (drawn to now)
    detail: str
    href: str


def timeline(bars: Sequence[Bar], now: datetime) -> Markup:
    """A Gantt-like bar per run from its start to its end (or now), on one time axis."""
    spans = [(b, parse_time(b.start), parse_time(b.end) if b.end else now) for b in bars]
    dated = [(b, s, e) for b, s, e in spans if s is not None and e is not None]
    row, label_w, width = 24, 170, 900
    height = TOP + row * max(1, len(bars)) + BOTTOM
    parts = [f'<svg class="timeline" viewBox="0 0 {width} {height}" role="img" aria-label="runs over time">',
             "<title>Runs over time</title>"]
    if not dated:
        parts.append(f'<text class="empty" x="{width / 2}" y="{height / 2}" text-anchor="middle">no runs have '
                     "started yet</text></svg>")
        return Markup("".join(parts))
    first = min(s for _, s, _ in dated)
    last = max(e for _, _, e in dated if e is not None)
    span = max(1.0, (last - first).total_seconds())
    plot = width - label_w - RIGHT
    for index, (bar, start, end) in enumerate(spans):
        top = TOP + index * row
        parts.append(f'<a href="{escape(bar.href)}"><text class="axis run" x="0" y="{top + 15}">'
                     f"{escape(bar.label)}</text></a>")
        if start is None or end is None:
            continue
        left = label_w + plot * (start - first).total_seconds() / span
        wide = max(3.0, plot * (end - start).total_seconds() / span)
        parts.append(f'<a href="{escape(bar.href)}"><rect class="bar {escape(bar.state.lower())}" x="{left:.1f}" '
                     f'y="{top + 3}" width="{wide:.1f}" height="{row - 8}" rx="3"><title>{escape(bar.detail)}</title>'
                     f"</rect></a>")
        parts.append(f'<text class="axis" x="{min(left + wide + 4, width - 60):.1f}" y="{top + 15}">'
                     f"{escape(bar.state)}</text>")
    axis = TOP + row * len(bars) + 14
    parts.append(f'<text class="axis" x="{label_w}" y="{axis}">{escape(first.strftime("%Y-%m-%d %H:%M:%S"))} UTC</text>')
    parts.append(f'<text class="axis" x="{width - RIGHT}" y="{axis}" text-anchor="end">+'
                 f"{escape(format_duration(span))}</text>")
    parts.append("</svg>")
    return Markup("".join(parts))
