"""Sizes (`32GiB`) and durations (`48h`, `1h30m`) as users write them."""
from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B?|B)?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4, "p": 1000**5, "pb": 1000**5,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4, "pi": 1024**5, "pib": 1024**5,
}
MAX_SIZE = 2**63 - 1
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_FACTORS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(text: str | int) -> int:
    """Bytes in a size such as `32GiB`, `512M` or `1000`; ValueError when it is not one."""
    if isinstance(text, bool):
        raise ValueError(f"'{text}' is not a size (examples: 512MiB, 32GiB, 2G)")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"'{text}' is not a size: it is negative")
        if text > MAX_SIZE:
            raise ValueError(f"'{str(text)[:24]}...' is too large a size (at most 8 EiB)")
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ValueError(f"'{text}' is not a size (examples: 512MiB, 32GiB, 2G)")
    number, unit = match.groups()
    try:
        value = int(float(number) * _SIZE_FACTORS[(unit or "").lower()])
    except OverflowError:
        value = MAX_SIZE + 1
    if value > MAX_SIZE:
        raise ValueError(f"'{str(text)[:24]}...' is too large a size (at most 8 EiB)")
    return value


def parse_duration(text: str | int | float) -> float:
    """Seconds in a duration such as `48h`, `1h30m`, `90s` or a bare number of seconds."""
    if isinstance(text, bool):
        raise ValueError(f"'{text}' is not a duration (examples: 90s, 30m, 48h, 7d)")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"'{text}' is not a duration: it is negative")
        if float(text) == float("inf"):
            raise ValueError(f"'{text}' is too long a duration")
        return float(text)
    compact = str(text).replace(" ", "")
    if re.fullmatch(r"\d+(?:\.\d+)?", compact):  # bare seconds, as on the command line
        return float(compact)
    parts = _DURATION_PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"'{text}' is not a duration (examples: 90s, 30m, 48h, 7d)")
    seconds = sum(float(n) * _DURATION_FACTORS[u] for n, u in parts)
    if seconds == float("inf"):
        raise ValueError(f"'{text}' is too long a duration")
    return seconds


def format_duration(seconds: float) -> str:
    """`1h02m`, `3m05s`, `12s`: short and readable, for tables."""
    seconds = int(max(0, seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"
