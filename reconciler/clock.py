"""Wall-clock times as Winslow records them: ISO 8601 in UTC, to the millisecond.

Recorded times are for people and for records only; decisions that depend on
how long something took use each process's own monotonic clock.
"""
from __future__ import annotations

import datetime as _dt


def utcnow() -> str:
    return format_time(_dt.datetime.now(_dt.timezone.utc))


def format_time(stamp: _dt.datetime) -> str:
    return stamp.astimezone(_dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_time(text: str | None) -> _dt.datetime | None:
    """A recorded time as an aware datetime (UTC when it names no zone); None when absent or unreadable."""
    if not text:
        return None
    try:
        parsed = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=_dt.timezone.utc)


def seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds from one recorded time to another; None when either is missing or unreadable."""
    began, ended = parse_time(start), parse_time(end)
    return (ended - began).total_seconds() if began and ended else None


def add_seconds(text: str, seconds: float) -> str | None:
    """A recorded time plus some seconds, recorded the same way; None when the time is unreadable."""
    parsed = parse_time(text)
    return format_time(parsed + _dt.timedelta(seconds=seconds)) if parsed else None
