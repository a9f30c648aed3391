"""The machine a benchmark ran on, in one line: figures are comparable only on the same one."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe(*extra: str) -> str:
    """`2 cores, <CPU>, Linux <release>, Python <version>` and whatever the benchmark adds."""
    parts = [f"{os.cpu_count()} cores", cpu_model(), f"Linux {platform.release()}",
             f"Python {platform.python_version()}", *extra]
    return ", ".join(parts)
