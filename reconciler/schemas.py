"""JSON Schema checks (draft 2020-12) with errors located in the YAML source."""
from __future__ import annotations

import functools
import json
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from reconciler.errors import Problem
from reconciler.resources import schema_dir
from reconciler.yamlsafe import Document

KINDS = ("winslow", "pipeline", "project", "status", "pipeline-lock", "result", "node")
SCHEMA_URL = "https://winslow.dev/schema/{kind}.schema.json"


@functools.cache
def _registry() -> Registry:
    resources = []
    for kind in KINDS:
        contents = json.loads((schema_dir() / f"{kind}.schema.json").read_text())
        resources.append((contents["$id"], Resource.from_contents(contents)))
    return Registry().with_resources(resources)


@functools.cache
def validator(kind: str) -> Draft202012Validator:
    contents = _registry().get_or_retrieve(SCHEMA_URL.format(kind=kind)).value.contents
    return Draft202012Validator(contents, registry=_registry())


def _message(error: Any) -> str:
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties":
        return error.message.replace("Additional properties are not allowed", "unknown key")
    if error.validator == "required":
        return error.message.replace("is a required property", "is missing")
    if error.validator == "type" and error.instance is None:
        return f"'{where or 'document'}' is empty"
    prefix = f"{where}: " if where else ""
    if error.validator == "pattern":
        return f"{prefix}{error.instance!r} is not allowed here (letters, digits, '_', '.', '-'; starting with a letter or digit)"
    return prefix + error.message


def check(document: Document, kind: str) -> list[Problem]:
    """Every schema error of a document, each at the line of the value it concerns."""
    if document.data is None:
        return [document.problem((), "the file is empty (expected a mapping of keys)")]
    problems = []
    for error in validator(kind).iter_errors(document.data):
        path = tuple(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            allowed = error.schema.get("properties", {})
            for key in error.instance:
                if key not in allowed:
                    known = ", ".join(allowed) if allowed else "none"
                    problems.append(document.problem(path + (key,), f"unknown key '{key}' (allowed: {known})"))
            continue
        problems.append(document.problem(path, _message(error)))
    return sorted(set(problems))
