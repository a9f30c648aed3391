"""JSON Schema checks (draft 2020-12) with errors located in the YAML source.

A valid document is the common case: it is checked by jsonschema_rs (compiled,
in Rust) when that is installed. Only a document it refuses goes through
jsonschema, whose errors say where and what. The fast check may refuse more
than jsonschema (an infinite float, Python's `$` before a final newline), never
less, so the result is always jsonschema's.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

try:
    import jsonschema_rs
except ImportError:  # only slower without it
    jsonschema_rs = None  # type: ignore[assignment]

from reconciler.errors import Problem
from reconciler.resources import schema_dir
from reconciler.yamlsafe import Document, shorten

if TYPE_CHECKING:
    from jsonschema import Draft202012Validator
    from referencing import Registry

KINDS = ("winslow", "pipeline", "project", "status", "pipeline-lock", "result", "node", "build")
SCHEMA_URL = "https://winslow.dev/schema/{kind}.schema.json"


@functools.cache
def _schemas() -> dict[str, dict[str, Any]]:
    return {kind: json.loads((schema_dir() / f"{kind}.schema.json").read_text()) for kind in KINDS}


@functools.cache
def _registry() -> Registry:
    from referencing import Registry, Resource  # imported when first needed: 70 ms at every start otherwise
    return Registry().with_resources((c["$id"], Resource.from_contents(c)) for c in _schemas().values())


@functools.cache
def validator(kind: str) -> Draft202012Validator:
    """jsonschema's validator for a kind: slower than the compiled check, but its errors say where and what."""
    from jsonschema import Draft202012Validator
    contents = _registry().get_or_retrieve(SCHEMA_URL.format(kind=kind)).value.contents
    return Draft202012Validator(contents, registry=_registry())


@functools.cache
def _fast(kind: str) -> Callable[[Any], bool] | None:
    """A compiled is_valid for a kind, or None without jsonschema_rs."""
    if jsonschema_rs is None:
        return None
    try:
        registry = jsonschema_rs.Registry([(c["$id"], c) for c in _schemas().values()])
        return jsonschema_rs.Draft202012Validator(_schemas()[kind], registry=registry).is_valid
    except Exception:  # noqa: BLE001 - an incompatible version: jsonschema alone still gives the right answer
        return None


def _valid(kind: str, data: Any) -> bool:
    is_valid = _fast(kind)
    if is_valid is None:
        return False
    try:
        return bool(is_valid(data))
    except Exception:  # noqa: BLE001 - a value it cannot take (an int too large for it): let jsonschema decide
        return False


def _message(error: Any) -> str:
    where = shorten(".".join(str(p) for p in error.absolute_path))
    if error.validator == "additionalProperties":
        return error.message.replace("Additional properties are not allowed", "unknown key")
    if error.validator == "required":
        return error.message.replace("is a required property", "is missing")
    if error.validator == "type" and error.instance is None:
        return f"'{where or 'document'}' is empty"
    prefix = f"{where}: " if where else ""
    if error.validator == "pattern":
        return (f"{prefix}{_quoted(error.instance)} is not allowed here "
                f"(letters, digits, '_', '.', '-'; starting with a letter or digit)")
    return prefix + error.message.replace(repr(error.instance), _quoted(error.instance), 1)


def _quoted(value: Any) -> str:
    """A value as jsonschema quotes it (its repr), shortened when long."""
    text = repr(value)
    if len(text) <= 60:
        return text
    return f"'{shorten(value)}'" if isinstance(value, str) else shorten(text)


def check(document: Document, kind: str) -> list[Problem]:
    """Every schema error of a document, each at the line of the value it concerns."""
    if document.data is None:
        return [document.problem((), "the file is empty (expected a mapping of keys)")]
    if _valid(kind, document.data):
        return []
    problems = []
    for error in validator(kind).iter_errors(document.data):
        path = tuple(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = error.schema.get("properties", {})
            for key in error.instance:
                if key not in allowed:
                    known = ", ".join(allowed) if allowed else "none"
                    problems.append(document.problem(path + (key,), f"unknown key '{shorten(key)}' (allowed: {known})"))
            continue
        problems.append(document.problem(path, _message(error)))
    return sorted(set(problems))
