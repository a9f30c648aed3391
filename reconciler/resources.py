"""Where the files that ship with Winslow live: the JSON Schemas and the state-repo template.

In an installed wheel they sit in `reconciler/_data/`; in a checkout they are the
top-level `schema/` and `state-repo-template/` folders.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent


def data_dir(name: str) -> Path:
    for candidate in (_PACKAGE / "_data" / name, _CHECKOUT / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"Winslow's {name}/ folder is missing from this installation")


def schema_dir() -> Path:
    return data_dir("schema")


def template_dir() -> Path:
    return data_dir("state-repo-template")
