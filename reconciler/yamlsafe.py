"""Safe YAML loading that remembers where every value came from.

Everything a user writes passes through here once. The loader refuses what
PyYAML would silently accept or choke on: duplicate keys (an error, not
last-one-wins), alias bombs, deep nesting, huge files, non-UTF-8 bytes and
multiple documents. Each value's position is kept so that schema and meaning
errors can be reported as `file:line:col`.

The data is built in one pass straight from libyaml's parser events, without
PyYAML's composer: nesting is counted on the events themselves, so a deep file
is refused at the bracket that goes too deep and nothing ever recurses. An
alias replays the events recorded for its anchor, so it costs (and counts
against MAX_VALUES) what it expands into, exactly as if it were written out.
"""
from __future__ import annotations

import datetime as _dt
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.events import (
    AliasEvent,
    DocumentStartEvent,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)

from reconciler.errors import InvalidFile, Problem

MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_VALUES = 100_000
MAX_DEPTH = 64

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
JsonPath = tuple[object, ...]

_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("null", "bool", "int", "float", "timestamp")}
_WILDCARD = tuple(_Loader.yaml_implicit_resolvers.get(None, []))
# YAML 1.1 implicit tags of plain scalars, as PyYAML's resolver finds them: by first character, then regex.
_IMPLICIT: dict[str, tuple[tuple[str, re.Pattern[str]], ...]] = {
    first: tuple(resolvers) + _WILDCARD for first, resolvers in _Loader.yaml_implicit_resolvers.items() if first is not None}

# What a frame of the builder is filling in; the two kinds of mapping first (`kind <= _MERGE_MAP`).
_MAP, _MERGE_MAP, _SEQ, _MERGE_LIST, _MUTED = range(5)
# A mapping frame's `key` when it waits for a key, or when the coming value is skipped or merged.
_NO_KEY, _SKIP, _MERGE = object(), object(), object()


def shorten(value: object, limit: int = 60) -> str:
    """A user's value as an error message quotes it: on one line, and cut with '...' when long."""
    text = str(value)
    if not text.isprintable():
        text = repr(text)[1:-1]  # a newline or control character would break the one-line report
    return text if len(text) <= limit else text[:limit - 3] + "..."


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


class _Fatal(Exception):
    """Stops building; the first of these in a document is its one problem (after syntax and depth errors)."""

    def __init__(self, mark: Any, message: str, rank: int) -> None:
        super().__init__(message)
        self.mark, self.message, self.rank = mark, message, rank


_COMPOSE, _SECOND_DOCUMENT, _TOO_BIG = 0, 1, 2  # ranks: lower wins, as PyYAML's composer met them first


class _Frame:
    """A mapping or sequence being built: its value so far, its path, and (for a mapping) the key in hand."""

    __slots__ = ("kind", "value", "path", "key", "key_path", "seen", "anchor", "defines", "into")

    def __init__(self, kind: int, value: Any, path: JsonPath, anchor: str | None, into: Any = None) -> None:
        self.kind, self.value, self.path, self.anchor, self.into = kind, value, path, anchor, into
        self.key: object = _NO_KEY
        self.key_path: JsonPath = path
        self.seen: dict[str, int] = {}  # key -> line, for the duplicate key message
        self.defines = False  # its anchor is defined here (not replayed): its events are being recorded


def _resolve(value: str) -> str:
    for tag, regexp in _IMPLICIT.get(value[:1], _WILDCARD):
        if regexp.match(value):
            return tag
    return _STR


@functools.lru_cache(maxsize=8192)
def _plain(value: str) -> tuple[Any, str | None]:
    """A plain (unquoted, untagged) scalar's value, or the problem it has; the same few recur in every file."""
    tag = _resolve(value)
    if tag == _STR:
        return value, None
    if tag == _INT and value.isdigit() and (value[0] != "0" or value == "0"):
        try:
            return int(value), None
        except ValueError:
            pass  # over Python's digit limit: the constructor says so below
    return _construct(tag, value, None)


def _construct(tag: str, value: str, mark: Any) -> tuple[Any, str | None]:
    constructor = yaml.constructor.SafeConstructor()
    node = yaml.ScalarNode(tag, value, mark, mark)
    try:
        if tag in _PLAIN_TAGS:
            built = constructor.yaml_constructors[tag](constructor, node)
        else:  # an explicit tag: `!!binary`, `!!python/...`, `!foo`; never more than plain data
            built = constructor.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        return None, f"cannot read value: {getattr(exc, 'problem', exc)}"
    except Exception as exc:  # noqa: BLE001 - a date that is none, an int too long, a tag whose value does not fit it
        return None, f"cannot read value {value[:40]!r}: {exc}"
    if isinstance(built, (_dt.datetime, _dt.date)):
        return built.isoformat(), None
    if isinstance(built, bytes):
        return None, "binary values are not allowed"
    if isinstance(built, float) and built != built:
        return None, "NaN is not allowed"
    return built, None


def _is_merge_key(event: ScalarEvent) -> bool:
    tag = event.tag
    if tag is None or tag == "!":
        return bool(event.implicit[0]) and event.value == "<<"
    return tag == _MERGE_TAG


def _mark(mark: Any) -> tuple[int, int]:
    return (mark.line + 1, mark.column + 1)


class _Builder:
    """Plain data and positions from one document's events, with budgets against bombs."""

    def __init__(self, path: str, next_event: Callable[[], Any]) -> None:
        self.path = path
        self.next_event = next_event
        self.positions: dict[JsonPath, tuple[int, int]] = {}
        self.problems: list[Problem] = []
        self.values = 0
        self.depth = 0
        self.root_mark: Any = None
        self.anchors: dict[str, tuple[int, int, Any]] = {}  # name -> (first, end) in self.log, its first event
        self.open: dict[str, int] = {}  # anchors of the collections being built: an alias to one recurses
        self.log: list[Any] = []  # raw events while an anchor is being defined
        self.recording = 0
        self.replays: list[Iterator[Any]] = []

    # --- the event loop ----------------------------------------------------------------------

    def _problem(self, mark: Any, message: str) -> None:
        self.problems.append(Problem(self.path, mark.line + 1, mark.column + 1, message))

    def _too_deep(self, mark: Any) -> InvalidFile:
        return InvalidFile([Problem(self.path, mark.line + 1, mark.column + 1, f"nested deeper than {MAX_DEPTH} levels")])

    def document(self) -> Any:
        """The value of the document whose DocumentStartEvent was just read."""
        stack: list[_Frame] = []
        positions, replays, log, next_event = self.positions, self.replays, self.log, self.next_event
        while True:
            if replays:
                event = next(replays[-1], None)
                if event is None:
                    replays.pop()
                    continue
                raw = False
            else:
                event = next_event()
                raw = True
                if self.recording:
                    log.append(event)
            kind = event.__class__
            if kind is ScalarEvent:
                if raw and event.anchor is not None:
                    self._define(event, None)
                if not stack:
                    return self._scalar(event, ())
                top = stack[-1]
                if top.kind <= _MERGE_MAP:
                    key = top.key
                    if key is _NO_KEY:
                        key = event.value
                        if event.tag is None and key != "<<" and key not in top.seen:  # the common case of _key
                            mark = event.start_mark
                            top.seen[key] = mark.line + 1
                            top.key = key
                            top.key_path = path = top.path + (key,)
                            positions[path] = (mark.line + 1, mark.column + 1)
                        else:
                            self._key(top, event, event.start_mark)
                        continue
                    if key is _SKIP or key is _MERGE:
                        if key is _MERGE:
                            self._problem(event.start_mark, "'<<' merges only mappings")
                        top.key = _NO_KEY
                        continue
                    path = top.key_path
                    top.key = _NO_KEY
                elif top.kind is _SEQ:
                    path = top.path + (len(top.value),)
                    mark = event.start_mark
                    positions.setdefault(path, (mark.line + 1, mark.column + 1))
                else:
                    if top.kind is _MERGE_LIST:
                        self._problem(event.start_mark, "'<<' merges only mappings")
                    continue
                self.values += 1
                if self.values > MAX_VALUES or not raw:
                    self._count(path, counted=True)
                value = event.value
                if event.tag is not None or (event.implicit[0] and (value[:1] in _IMPLICIT or _WILDCARD)):
                    value = self._value(event)
                if top.kind is _SEQ:
                    top.value.append(value)
                else:
                    top.value[key] = value
            elif kind is MappingStartEvent or kind is SequenceStartEvent:
                if raw:
                    self.depth += 1
                    if self.depth > MAX_DEPTH:
                        raise self._too_deep(event.start_mark)
                parent = stack[-1] if stack else None
                if parent is not None and event.anchor is None and (
                        parent.kind is _SEQ or (parent.kind <= _MERGE_MAP and parent.key.__class__ is str)):
                    # the common case of _open: a plain value in a mapping or list
                    path = parent.key_path if parent.kind <= _MERGE_MAP else parent.path + (len(parent.value),)
                    self.values += 1
                    if self.values > MAX_VALUES or not raw:
                        self._count(path, counted=True)
                    mark = event.start_mark
                    positions.setdefault(path, (mark.line + 1, mark.column + 1))
                    stack.append(_Frame(_MAP, {}, path, None) if kind is MappingStartEvent else _Frame(_SEQ, [], path, None))
                    continue
                frame = self._open(stack, event, kind is MappingStartEvent)
                if raw and event.anchor is not None:
                    self._define(event, frame)
                if frame.anchor is not None:
                    self.open[frame.anchor] = self.open.get(frame.anchor, 0) + 1
                stack.append(frame)
            elif kind is MappingEndEvent or kind is SequenceEndEvent:
                if raw:
                    self.depth -= 1
                frame = stack.pop()
                if frame.anchor is not None:
                    self.open[frame.anchor] -= 1
                    if frame.defines:
                        first, _, start = self.anchors[frame.anchor]
                        self.anchors[frame.anchor] = (first, len(log), start)
                        self.recording -= 1
                if frame.kind is _MERGE_MAP:
                    for key, value in frame.value.items():
                        frame.into.setdefault(key, value)
                value = frame.value if frame.kind is _MAP or frame.kind is _SEQ else _SKIP
                if not stack:
                    return value
                top = stack[-1]
                if top.kind is _SEQ:
                    top.value.append(value)
                elif top.kind is _MAP and top.key.__class__ is str and value is not _SKIP:
                    top.value[top.key] = value
                    top.key = _NO_KEY
                else:
                    self._give(top, value)
            elif kind is AliasEvent:
                if not stack:
                    found = self._alias(None, event, raw)
                    if found is not _SKIP:
                        return found
                else:
                    self._alias(stack[-1], event, raw)
            else:
                raise _Fatal(event.start_mark, f"unexpected {kind.__name__}", _COMPOSE)

    def _give(self, parent: _Frame, value: Any) -> None:
        """A finished collection (or _SKIP, for one that gives no value) to the frame below it."""
        if parent.kind is _SEQ:
            parent.value.append(value)
        elif parent.kind is _MAP or parent.kind is _MERGE_MAP:
            if parent.key is _NO_KEY:  # it was a key: a list or mapping; its value is skipped
                parent.key = _SKIP
                return
            if value is not _SKIP and parent.key is not _SKIP and parent.key is not _MERGE:
                parent.value[parent.key] = value
            parent.key = _NO_KEY

    def _slot(self, parent: _Frame | None) -> tuple[object, JsonPath]:
        """What the next value is for: a value at a path, a key, one to skip, or a merge source."""
        if parent is None:
            return "value", ()
        if parent.kind is _SEQ:
            return "value", parent.path + (len(parent.value),)
        if parent.kind is _MAP or parent.kind is _MERGE_MAP:
            key = parent.key
            if key is _NO_KEY:
                return "key", parent.path
            if key is _SKIP:
                return "skip", parent.path
            if key is _MERGE:
                return "merge", parent.path
            return "value", parent.key_path
        if parent.kind is _MERGE_LIST:
            return "merge-item", parent.path
        return "skip", parent.path

    def _open(self, stack: list[_Frame], event: Any, mapping: bool) -> _Frame:
        parent = stack[-1] if stack else None
        slot, path = self._slot(parent)
        anchor = event.anchor
        if slot == "value":
            self._count(path)
            if self.root_mark is None:
                self.root_mark = event.start_mark
            self.positions.setdefault(path, _mark(event.start_mark))
            return _Frame(_MAP, {}, path, anchor) if mapping else _Frame(_SEQ, [], path, anchor)
        if slot == "key":
            self._problem(event.start_mark, "a key must be a plain value, not a list or mapping")
        elif slot == "merge" or slot == "merge-item":
            into = parent.value if slot == "merge" else parent.into  # type: ignore[union-attr]
            if mapping:
                return _Frame(_MERGE_MAP, {}, path, anchor, into)
            if slot == "merge":
                return _Frame(_MERGE_LIST, None, path, anchor, into)
            self._problem(event.start_mark, "'<<' merges only mappings")
        return _Frame(_MUTED, None, path, anchor)

    def _count(self, path: JsonPath, counted: bool = False) -> None:
        if not counted:
            self.values += 1
        if self.values > MAX_VALUES:
            raise _Fatal(self.root_mark, f"more than {MAX_VALUES} values (an alias bomb?)", _TOO_BIG)
        if len(path) > MAX_DEPTH:  # only an alias can go deeper than the events do
            raise _Fatal(self.root_mark, f"nested deeper than {MAX_DEPTH} levels", _TOO_BIG)

    def _define(self, event: Any, frame: _Frame | None) -> None:
        name = event.anchor
        if name in self.anchors:
            raise _Fatal(event.start_mark, "found duplicate anchor; first occurrence second occurrence", _COMPOSE)
        if not self.recording:
            self.log.append(event)
        first = len(self.log) - 1
        self.anchors[name] = (first, first + 1, event)
        if frame is not None:
            frame.defines = True
            self.recording += 1

    def _key(self, frame: _Frame, event: ScalarEvent, mark: Any) -> None:
        if (event.value == "<<" or event.tag is not None) and _is_merge_key(event):
            frame.key = _MERGE
            return
        key = event.value  # as written: `on:` and `NO:` are names here, not YAML 1.1 booleans
        seen = frame.seen
        if key in seen:
            self._problem(mark, f"duplicate key '{shorten(key)}' (first defined on line {seen[key]})")
            frame.key = _SKIP
            return
        seen[key] = mark.line + 1
        frame.key = key
        frame.key_path = frame.path + (key,)
        self.positions[frame.key_path] = (mark.line + 1, mark.column + 1)

    def _alias(self, parent: _Frame | None, event: Any, raw: bool) -> Any:
        """An alias where a value is due: replayed from its anchor, or a problem; _SKIP when it gives no value now."""
        anchor = self.anchors.get(event.anchor)
        if anchor is None:
            raise _Fatal(event.start_mark, "found undefined alias", _COMPOSE)
        first, end, start = anchor
        recursive = self.open.get(event.anchor, 0) > 0
        slot, path = self._slot(parent)
        if slot == "skip":
            if parent is not None and parent.kind is not _MUTED:
                parent.key = _NO_KEY
            return _SKIP
        if slot == "key":
            if recursive or start.__class__ is not ScalarEvent:
                self._problem(start.start_mark, "a key must be a plain value, not a list or mapping")
                parent.key = _SKIP  # type: ignore[union-attr]
            else:
                self._key(parent, start, start.start_mark)  # type: ignore[arg-type]
            return _SKIP
        if recursive:
            if slot == "value":
                self._count(path)
                self._problem(start.start_mark, "an alias refers to itself (recursive structure)")
                if parent is None:
                    return None
                self._give(parent, None)
            else:
                self._problem(start.start_mark, "a mapping merges itself (recursive structure)")
                if slot == "merge":
                    parent.key = _NO_KEY  # type: ignore[union-attr]
            return _SKIP
        self.replays.append(iter(self.log[first:end]))
        return _SKIP

    # --- scalars -----------------------------------------------------------------------------

    def _scalar(self, event: ScalarEvent, path: JsonPath) -> Any:
        self._count(path)
        if self.root_mark is None:
            self.root_mark = event.start_mark
            self.positions[path] = _mark(event.start_mark)
        return self._value(event)

    def _value(self, event: ScalarEvent) -> Any:
        value, tag = event.value, event.tag
        if tag is None or tag == "!":
            if not event.implicit[0] or (value[:1] not in _IMPLICIT and not _WILDCARD):
                return value
            built, problem = _plain(value) if len(value) <= 64 else _plain.__wrapped__(value)
        elif tag == _STR:
            return value
        else:
            built, problem = _construct(tag, value, event.start_mark)
        if problem is not None:
            self._problem(event.start_mark, problem)
        return built

    # --- after a fatal problem: read on for the errors that come first ------------------------

    def drain_document(self, fatal: _Fatal) -> _Fatal:
        """Read to the end of the document: a syntax error or deep nesting anywhere wins, then the first composer error."""
        while True:
            event = self.next_event()
            kind = event.__class__
            if kind is MappingStartEvent or kind is SequenceStartEvent:
                self.depth += 1
                if self.depth > MAX_DEPTH:
                    raise self._too_deep(event.start_mark)
            elif kind is MappingEndEvent or kind is SequenceEndEvent:
                self.depth -= 1
            elif kind is ScalarEvent or kind is AliasEvent:
                pass
            else:
                return fatal
            if fatal.rank == _COMPOSE:
                continue
            try:
                if kind is AliasEvent and event.anchor not in self.anchors:
                    raise _Fatal(event.start_mark, "found undefined alias", _COMPOSE)
                if getattr(event, "anchor", None) is not None and kind is not AliasEvent:
                    if event.anchor in self.anchors:
                        raise _Fatal(event.start_mark, "found duplicate anchor; first occurrence second occurrence", _COMPOSE)
                    self.anchors[event.anchor] = (0, 0, event)
            except _Fatal as found:
                fatal = found.with_traceback(None)  # kept past the except: no cycle through its frames

    def drain_stream(self) -> None:
        """Read the rest of the stream after a second document: only syntax errors and depth count there."""
        while True:
            event = self.next_event()
            kind = event.__class__
            if kind is MappingStartEvent or kind is SequenceStartEvent:
                self.depth += 1
                if self.depth > MAX_DEPTH:
                    raise self._too_deep(event.start_mark)
            elif kind is MappingEndEvent or kind is SequenceEndEvent:
                self.depth -= 1
            elif kind is StreamEndEvent:
                return


def _build(text: str, path: str) -> Document:
    parser = _Loader(text)
    try:
        builder = _Builder(path, parser.get_event)
        parser.get_event()  # StreamStartEvent
        if parser.get_event().__class__ is StreamEndEvent:
            return Document(path, None, {(): (1, 1)})
        fatal: _Fatal | None = None
        data: Any = None
        try:
            data = builder.document()
        except _Fatal as exc:
            fatal = builder.drain_document(exc.with_traceback(None))  # kept: no cycle through its frames
        else:
            parser.get_event()  # DocumentEndEvent
        event = parser.get_event()
        if event.__class__ is DocumentStartEvent:
            if fatal is None or fatal.rank > _SECOND_DOCUMENT:
                fatal = _Fatal(event.start_mark, "expected a single document in the stream but found another document",
                               _SECOND_DOCUMENT)
            builder.drain_stream()
    finally:
        parser.dispose()
    if fatal is not None:
        prefix = "invalid YAML: " if fatal.rank < _TOO_BIG else ""
        raise InvalidFile([Problem(path, *_mark(fatal.mark), prefix + fatal.message)])
    if builder.problems:
        raise InvalidFile(builder.problems)
    return Document(path, data, builder.positions)


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
        return _build(text, path)
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


class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """Never writes anchors and aliases: files written by Winslow are read by people too."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(data: Any) -> str:
    """YAML as Winslow writes it: block style, keys in the order given, UTF-8."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=120)
