"""Safe YAML loading that remembers where every value came from.

Everything a user writes passes through here once. The loader refuses what
PyYAML would silently accept or choke on: duplicate keys (an error, not
last-one-wins), alias bombs, deep nesting, huge files, non-UTF-8 bytes and
multiple documents. Each value's position is kept so that schema and meaning
errors can be reported as `file:line:col`.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

import yaml

from reconciler.errors import InvalidFile, Problem

MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_VALUES = 100_000
MAX_DEPTH = 64

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"
JsonPath = tuple[object, ...]


@dataclass
class Document:
    """A parsed YAML file: plain data plus the line and column of each value."""

    path: str
    data: Any
    positions: dict[JsonPath, tuple[int, int]] = field(default_factory=dict)

    def where(self, json_path: JsonPath) -> tuple[int, int]:
        """Position of a value, or of its nearest ancestor that has one."""
        json_path = tuple(json_path)
        while json_path not in self.positions and json_path:
            json_path = json_path[:-1]
        return self.positions.get(json_path, (1, 1))

    def problem(self, json_path: JsonPath, message: str) -> Problem:
        line, column = self.where(json_path)
        return Problem(self.path, line, column, message)


class _TooBig(Exception):
    pass


class _Builder:
    """Turns a composed node graph into plain data, with budgets against bombs."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.positions: dict[JsonPath, tuple[int, int]] = {}
        self.problems: list[Problem] = []
        self.values = 0
        self._scalars = yaml.constructor.SafeConstructor()

    def _problem(self, node: yaml.Node, message: str) -> None:
        self.problems.append(Problem(self.path, node.start_mark.line + 1, node.start_mark.column + 1, message))

    def build(self, node: yaml.Node, json_path: JsonPath, ancestors: frozenset[int]) -> Any:
        self.values += 1
        if self.values > MAX_VALUES:
            raise _TooBig(f"more than {MAX_VALUES} values (an alias bomb?)")
        if len(json_path) > MAX_DEPTH:
            raise _TooBig(f"nested deeper than {MAX_DEPTH} levels")
        if id(node) in ancestors:
            self._problem(node, "an alias refers to itself (recursive structure)")
            return None
        self.positions.setdefault(json_path, (node.start_mark.line + 1, node.start_mark.column + 1))
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node)
        inner = ancestors | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, json_path + (i,), inner) for i, item in enumerate(node.value)]
        return self._mapping(node, json_path, inner)

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        try:
            value = self._scalars.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self._problem(node, f"cannot read value: {getattr(exc, 'problem', exc)}")
            return None
        except Exception as exc:  # a date that is none, an int too long, a tag whose value does not fit it
            self._problem(node, f"cannot read value {node.value[:40]!r}: {exc}")
            return None
        if isinstance(value, (_dt.datetime, _dt.date)):
            return value.isoformat()
        if isinstance(value, bytes):
            self._problem(node, "binary values are not allowed")
            return None
        if isinstance(value, float) and value != value:
            self._problem(node, "NaN is not allowed")
            return None
        return value

    def _mapping(self, node: yaml.MappingNode, json_path: JsonPath, ancestors: frozenset[int]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                self._merge(value_node, result, json_path, ancestors)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self._problem(key_node, "a key must be a plain value, not a list or mapping")
                continue
            key = key_node.value  # as written: `on:` and `NO:` are names here, not YAML 1.1 booleans
            if key in seen:
                self._problem(key_node, f"duplicate key '{key}' (first defined on line {seen[key]})")
                continue
            seen[key] = key_node.start_mark.line + 1
            child = json_path + (key,)
            self.positions[child] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            result[key] = self.build(value_node, child, ancestors)
        return result

    def _merge(self, value_node: yaml.Node, into: dict[str, Any], json_path: JsonPath, ancestors: frozenset[int]) -> None:
        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for source in sources:
            if not isinstance(source, yaml.MappingNode):
                self._problem(source, "'<<' merges only mappings")
                continue
            if id(source) in ancestors:
                self._problem(source, "a mapping merges itself (recursive structure)")
                continue
            for key, value in self._mapping(source, json_path, ancestors | {id(source)}).items():
                into.setdefault(key, value)


def _decode(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start]
        line = before.count(b"\n") + 1
        column = len(before[before.rfind(b"\n") + 1:].decode("utf-8", "replace")) + 1  # in characters
        raise InvalidFile([Problem(path, line, column, f"not UTF-8 text (byte 0x{raw[exc.start]:02x})")]) from None


def _char_index(text: str, position: int) -> int:
    """libyaml reports positions in UTF-8 bytes of what it read; the text counts characters."""
    if text.isascii():
        return position
    return len(text.encode("utf-8", "surrogatepass")[:position].decode("utf-8", "ignore"))


def _char_at(text: str, line: int, column: int) -> str:
    lines = text.split("\n")
    if 0 < line <= len(lines) and 0 < column <= len(lines[line - 1]):
        return lines[line - 1][column - 1]
    return ""


def _check_depth(text: str) -> None:
    """Refuse deep nesting before composing: the C composer recurses and would crash."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                raise InvalidFile([Problem("", mark.line + 1, mark.column + 1, f"nested deeper than {MAX_DEPTH} levels")])
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            depth -= 1


def parse_yaml(raw: bytes | str, path: str) -> Document:
    """Parse one YAML document; InvalidFile with every problem when it cannot be used."""
    size = len(raw)
    if size > MAX_FILE_BYTES:
        raise InvalidFile([Problem(path, 1, 1, f"file is too large ({size} bytes; at most {MAX_FILE_BYTES})")])
    text = _decode(raw, path) if isinstance(raw, bytes) else raw
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        line = text.count("\n", 0, exc.start) + 1
        column = exc.start - (text.rfind("\n", 0, exc.start) + 1) + 1
        raise InvalidFile([Problem(path, line, column, "not valid Unicode text (a lone surrogate)")]) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    try:
        _check_depth(text)
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = " ".join(part for part in (exc.context, exc.problem) if part) or "invalid YAML"
        if _char_at(text, line, column) == "\t":
            message = "a tab character: YAML is indented with spaces, never tabs"
        elif "nesting depth" in message:  # newer libyaml stops deep nesting itself
            raise InvalidFile([Problem(path, line, column, f"nested deeper than {MAX_DEPTH} levels")]) from None
        raise InvalidFile([Problem(path, line, column, f"invalid YAML: {message}")]) from None
    except yaml.reader.ReaderError as exc:
        at = _char_index(text, exc.position)
        line = text.count("\n", 0, at) + 1
        column = at - (text.rfind("\n", 0, at) + 1) + 1
        what = f"character #x{exc.character:04x}" if isinstance(exc.character, int) else f"byte {exc.character!r}"
        raise InvalidFile([Problem(path, line, column, f"unacceptable {what}: {exc.reason}")]) from None
    except yaml.YAMLError as exc:
        raise InvalidFile([Problem(path, 1, 1, f"invalid YAML: {' '.join(str(exc).split())}")]) from None
    except InvalidFile as exc:
        raise InvalidFile([Problem(path, p.line, p.column, p.message) for p in exc.problems]) from None
    except RecursionError:
        raise InvalidFile([Problem(path, 1, 1, f"nested deeper than {MAX_DEPTH} levels")]) from None
    if node is None:
        return Document(path, None, {(): (1, 1)})
    builder = _Builder(path)
    try:
        data = builder.build(node, (), frozenset())
    except _TooBig as exc:
        raise InvalidFile([Problem(path, node.start_mark.line + 1, node.start_mark.column + 1, str(exc))]) from None
    except RecursionError:
        raise InvalidFile([Problem(path, 1, 1, f"nested deeper than {MAX_DEPTH} levels")]) from None
    if builder.problems:
        raise InvalidFile(builder.problems)
    return Document(path, data, builder.positions)


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """Never writes anchors and aliases: files written by Winslow are read by people too."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(data: Any) -> str:
    """YAML as Winslow writes it: block style, keys in the order given, UTF-8."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=120)
