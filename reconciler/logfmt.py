"""Log lines for people (the default) or for log shippers (`winslow node --log-format json`).

A JSON line carries the time, level, logger and message, and the fields a node puts
beside a run's events: project, run, node and event (claimed, started, exited, ...).
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = ("project", "run", "node", "event")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def use(kind: str) -> None:
    """Format every line of this process as `kind` ("text" or "json")."""
    formatter = JsonFormatter() if kind == "json" else logging.Formatter(TEXT)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(formatter)
