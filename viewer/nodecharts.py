"""A node's load charts from its heartbeat history: CPU, memory, network IO, and per GPU utilisation and memory."""
from __future__ import annotations

from typing import Any

from markupsafe import Markup

from viewer.charts import Series, line_chart, percent, rate, size


def charts(node: dict[str, Any]) -> list[tuple[str, Markup]]:
    """(title, SVG) for each chart of a node as `pages.node_data` describes it."""
    history = node.get("history") or []
    times = [s.get("time") for s in history]
    found = [
        ("CPU", line_chart("CPU busy", times, [Series("CPU", [s.get("cpu_percent") for s in history])], 100.0,
                           percent)),
        ("Memory", line_chart("Memory used", times, [Series("used", [s.get("memory_used") for s in history])],
                              float(node.get("memory") or 0) or None, size)),
        ("Network", line_chart("Network IO", times, [Series("received", [s.get("net_rx") for s in history]),
                                                     Series("sent", [s.get("net_tx") for s in history])], None, rate)),
    ]
    for gpu in node.get("gpus") or []:
        index = gpu.get("index")

        def of(sample: dict[str, Any], key: str, index: Any = index) -> Any:
            return next((g.get(key) for g in sample.get("gpus") or [] if g.get("index") == index), None)

        label = f"GPU {index}" + (f" ({gpu['model']})" if gpu.get("model") else "")
        found.append((f"{label} utilisation", line_chart(f"{label} utilisation", times,
                                                         [Series("busy", [of(s, "utilization") for s in history])],
                                                         100.0, percent)))
        found.append((f"{label} memory", line_chart(f"{label} memory", times,
                                                   [Series("used", [of(s, "memory_used") for s in history])],
                                                   float(gpu.get("memory") or 0) or None, size)))
    return found
