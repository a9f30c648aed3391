"""Results shown, not only listed: images inline, CSV as a table of its first rows, text as text.

A run's result manifest says which files it left; this module decides how each is
shown on the run page and reads the little of it that the page needs (never more
than `TEXT_MAX` bytes of a file, `CSV_ROWS` rows of a table).
"""
from __future__ import annotations

import csv
import io
import posixpath
from dataclasses import dataclass
from typing import Any

from reconciler.errors import StorageError
from reconciler.model import ResultManifest
from viewer.files import Files

IMAGES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml",
          ".gif": "image/gif", ".webp": "image/webp"}
TEXTS = {".txt", ".log", ".json", ".yaml", ".yml", ".md", ".out", ".err", ".cfg", ".ini", ".toml"}
TABLES = {".csv", ".tsv"}
CSV_ROWS = 50
TEXT_MAX = 64 * 1024
SHOWN_MAX = 12  # previews per run page; every file stays in the list with its download


def media_type(path: str) -> str:
    ext = posixpath.splitext(path)[1].lower()
    if ext in IMAGES:
        return IMAGES[ext]
    if ext in TABLES:
        return "text/csv; charset=utf-8"
    if ext in TEXTS:
        return "text/plain; charset=utf-8"
    return "application/octet-stream"


def kind_of(path: str) -> str | None:
    ext = posixpath.splitext(path)[1].lower()
    if ext in IMAGES:
        return "image"
    if ext in TABLES:
        return "table"
    return "text" if ext in TEXTS else None


@dataclass(frozen=True)
class Preview:
    path: str             # relative to the storage root
    name: str             # relative to the workspace
    kind: str             # image | table | text | error
    header: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    more_rows: bool = False
    text: str = ""
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"path": self.path, "name": self.name, "kind": self.kind}
        if self.kind == "table":
            data.update(header=list(self.header), rows=[list(r) for r in self.rows], more_rows=self.more_rows)
        elif self.kind in ("text", "error"):
            data.update(text=self.text, truncated=self.truncated)
        return data


def previews(files: Files | None, manifest: ResultManifest | None) -> list[Preview]:
    if files is None or manifest is None:
        return []
    shown = []
    for item in manifest.files:
        kind = kind_of(item.path)
        if kind is None:
            continue
        path = posixpath.join(manifest.workspace, item.path)
        shown.append(preview(files, path, item.path, kind))
        if len(shown) >= SHOWN_MAX:
            break
    order = {"image": 0, "table": 1, "text": 2, "error": 3}
    return sorted(shown, key=lambda p: order.get(p.kind, 9))


def preview(files: Files, path: str, name: str, kind: str) -> Preview:
    if kind == "image":
        return Preview(path, name, kind)
    try:
        data = files.head(path, TEXT_MAX + 1)
    except StorageError as exc:
        return Preview(path, name, "error", text=str(exc))
    truncated = len(data) > TEXT_MAX
    text = data[:TEXT_MAX].decode("utf-8", "replace")
    if kind == "text":
        return Preview(path, name, kind, text=text, truncated=truncated)
    return _table(path, name, text, truncated)


def _table(path: str, name: str, text: str, truncated: bool) -> Preview:
    if truncated and "\n" in text:
        text = text[:text.rindex("\n") + 1]  # whole lines only
    dialect: type[csv.Dialect] = csv.excel_tab if path.lower().endswith(".tsv") else csv.excel
    reader = csv.reader(io.StringIO(text), dialect)
    try:
        header = tuple(next(reader, ()))
        rows: list[tuple[str, ...]] = []
        for row in reader:
            if len(rows) >= CSV_ROWS:
                return Preview(path, name, "table", header, tuple(rows), more_rows=True)
            rows.append(tuple(row))
    except csv.Error as exc:
        return Preview(path, name, "error", text=f"not readable as CSV: {exc}")
    return Preview(path, name, "table", header, tuple(rows), more_rows=truncated)
