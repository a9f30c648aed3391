"""Comment-preserving edits of a YAML mapping: change only the characters a person would.

The `winslow` verbs are shortcuts for edits users make by hand in their
project.yaml, so the file must come back as they wrote it: comments, blank lines,
key order and quoting intact. PyYAML's composed nodes give the exact span of every
key and value; an edit splices new text into those spans instead of dumping the
whole document again. Every result is re-read and compared with the intended data,
so a splice that went wrong is an error, never a silently broken file.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from reconciler.errors import ConfigError

INDENT = 2  # for blocks this module creates; existing blocks keep their own indentation
_WIDE = 1 << 30
_Edit = tuple[int, int, str]


class EditError(ConfigError):
    """The file cannot be edited that way (not a mapping there, or the edit would not read back)."""


def render(value: Any, flow: bool = False) -> str:
    """A value as YAML text on one line, quoted only when YAML needs it (as `yaml.safe_dump` decides)."""
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{render(k, True)}: {render(v, True)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(render(v, True) for v in value) + "]"
    if flow:
        text = yaml.safe_dump([value], default_flow_style=True, width=_WIDE, allow_unicode=True).strip()[1:-1]
    else:
        text = yaml.safe_dump({"k": value}, default_flow_style=False, width=_WIDE, allow_unicode=True)
        text = text[len("k: "):].rstrip("\n")
    if "\n" in text:  # a multi-line string: keep it on one line with escapes
        text = yaml.safe_dump([value], default_style='"', default_flow_style=True, width=_WIDE).strip()[1:-1]
    return text


def set_fields(text: str, path: Sequence[str], values: Mapping[str, Any]) -> str:
    """Set `values` in the mapping at `path` (created when missing); other text stays as it was."""
    if not values:
        return text
    result = _splice(text, _set_edits(text, tuple(path), dict(values)))
    _verify(text, result, tuple(path), set_values=values)
    return result


def remove_fields(text: str, path: Sequence[str], keys: Iterable[str]) -> str:
    """Remove `keys` (with their trailing comments) from the mapping at `path`; absent keys are fine."""
    keys = list(keys)
    result = _splice(text, _remove_edits(text, tuple(path), keys))
    _verify(text, result, tuple(path), remove_keys=keys)
    return result


def set_env(text: str, values: Mapping[str, Any]) -> str:
    """Set variables under the top-level `env:` mapping."""
    return set_fields(text, ("env",), values)


def add_items(text: str, path: Sequence[str], items: Iterable[Any]) -> str:
    """Append `items` not already there to the list at `path` (created when missing); the rest stays as written."""
    current = _list_at(text, tuple(path))
    old = [] if current is None else [node.value for node in current[1].value]
    new = [item for item in dict.fromkeys(items) if item not in old]
    if not new:
        return text
    if current is None or current[1].flow_style:
        return _set_list(text, tuple(path), old + new, current)
    _, node = current
    last = node.value[-1]
    dash = _dash(text, last)
    at = _skip_comments(text, _line_end(text, _last_char(text, last)), len(dash) - len(dash.lstrip(" ")) + 1)
    nl = _newline(text)
    result = _splice(text, [(at, at, "".join(f"{nl}{dash}{render(item)}" for item in new))])
    _verify(text, result, tuple(path[:-1]), set_values={path[-1]: old + new})
    return result


def remove_items(text: str, path: Sequence[str], items: Iterable[Any]) -> str:
    """Remove `items` (with their trailing comments) from the list at `path`; absent items are fine."""
    current = _list_at(text, tuple(path))
    if current is None:
        return text
    doomed = set(items)
    key, node = current
    kept = [item.value for item in node.value if item.value not in doomed]
    if len(kept) == len(node.value):
        return text
    if node.flow_style:
        return _set_list(text, tuple(path), kept, current)
    edits: list[_Edit] = []
    for item in node.value:
        if item.value in doomed:
            dash = _dash(text, item)
            start = item.start_mark.index - len(dash)
            end = _skip_comments(text, _line_end(text, _last_char(text, item)), len(dash) - len(dash.lstrip(" ")) + 1)
            edits.append((start, _next_line(text, end), ""))
    if not kept:  # an empty block would read as null
        colon = text.index(":", key.end_mark.index)
        edits.append((colon + 1, colon + 1, " []"))
    result = _splice(text, edits)
    _verify(text, result, tuple(path[:-1]), set_values={path[-1]: kept})
    return result


def _list_at(text: str, path: tuple[str, ...]) -> tuple[yaml.Node, yaml.SequenceNode] | None:
    """The key and the list of scalars at `path`; None when it is missing or empty (`tags:` or `tags: ~`)."""
    node = _compose(text)
    found: tuple[yaml.Node, yaml.Node] | None = None
    for key in path:
        if not isinstance(node, yaml.MappingNode) or (found := _find(node, key)) is None:
            return None
        node = found[1]
    if found is None or _is_null(found[1]):
        return None
    value = found[1]
    if not isinstance(value, yaml.SequenceNode) or not all(isinstance(item, yaml.ScalarNode) for item in value.value):
        raise EditError(f"'{_where(path)}' is not a list of single values (line {value.start_mark.line + 1})")
    return found[0], value


def _set_list(text: str, path: tuple[str, ...], values: list[Any],
              current: tuple[yaml.Node, yaml.SequenceNode] | None) -> str:
    """A missing list written in flow style after its siblings, or a flow list rewritten keeping its comment."""
    if current is None:
        return set_fields(text, path[:-1], {path[-1]: values})
    node = current[1]
    kept = {item.value: text[item.start_mark.index:item.end_mark.index] for item in node.value}
    flow = "[" + ", ".join(kept.get(v, render(v, True)) for v in values) + "]"
    start, end = node.start_mark.index, node.end_mark.index
    edit = (start, end, flow) if "\n" in text[start:end] else _keep_comment_column(text, start, end, flow)
    result = _splice(text, [edit])
    _verify(text, result, path[:-1], set_values={path[-1]: values})
    return result


def _dash(text: str, item: yaml.Node) -> str:
    """The `  - ` before an item of a block list; refused when the item shares its line with anything else."""
    start = text.rfind("\n", 0, item.start_mark.index) + 1
    dash = text[start:item.start_mark.index]
    if dash.strip(" ") != "-":
        raise EditError(f"cannot edit the list item on line {item.start_mark.line + 1}: it shares its line")
    return dash


def _compose(text: str) -> yaml.Node | None:
    try:
        # The pure-Python loader: its marks index characters of `text`, which is what a splice needs.
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise EditError(f"cannot edit a file that is not valid YAML: {' '.join(str(exc).split())}") from None


def _newline(text: str) -> str:
    return "\r\n" if "\r\n" in text else "\n"


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _find(mapping: yaml.MappingNode, key: str) -> tuple[yaml.Node, yaml.Node] | None:
    for key_node, value_node in mapping.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
            return key_node, value_node
    return None


def _where(path: Sequence[str]) -> str:
    return ".".join(path) or "the document"


def _set_edits(text: str, path: tuple[str, ...], values: dict[str, Any]) -> list[_Edit]:
    nl = _newline(text)
    node = _compose(text)
    if node is None or _is_null(node):
        return [_append_at_end(text, _block_lines(path, values, 0), nl)]
    if not isinstance(node, yaml.MappingNode):
        raise EditError("the file is not a mapping of keys")
    parent_key: yaml.Node | None = None
    for depth, key in enumerate(path):
        found = _find(node, key)
        rest = path[depth:]
        if found is None:
            if node.flow_style:
                return [_rewrite_flow(text, node, {rest[0]: _nest(rest[1:], values)})]
            if parent_key is None:
                return [_append_at_end(text, _block_lines(rest, values, 0), nl)]
            indent = node.value[0][0].start_mark.column
            return [(_entries_end(text, node), _entries_end(text, node), nl + nl.join(_block_lines(rest, values, indent)))]
        parent_key, value = found
        if _is_null(value):
            lines = _block_lines(path[depth + 1:], values, parent_key.start_mark.column + INDENT)
            return _fill_null(text, parent_key, value, lines)
        if not isinstance(value, yaml.MappingNode):
            raise EditError(f"'{_where(path[:depth + 1])}' is not a mapping (line {value.start_mark.line + 1})")
        node = value
    if node.flow_style:
        return [_rewrite_flow(text, node, values)]
    return _set_in_block(text, node, values, nl)


def _nest(path: Sequence[str], values: dict[str, Any]) -> Any:
    for key in reversed(path):
        values = {key: values}
    return values


def _block_lines(path: Sequence[str], values: Mapping[str, Any], indent: int) -> list[str]:
    lines = [" " * (indent + i * INDENT) + f"{render(key)}:" for i, key in enumerate(path)]
    inner = " " * (indent + len(path) * INDENT)
    return lines + [f"{inner}{render(k)}: {render(v)}" for k, v in values.items()]


def _append_at_end(text: str, lines: list[str], nl: str) -> _Edit:
    lead = "" if not text or text.endswith("\n") else nl
    return (len(text), len(text), lead + nl.join(lines) + nl)


def _fill_null(text: str, key: yaml.Node, null: yaml.Node, lines: list[str]) -> list[_Edit]:
    """`run:` with nothing (or `~`) after it becomes a block holding the new keys."""
    colon = text.index(":", key.end_mark.index)
    end = _line_end(text, colon)
    nl = _newline(text)
    edits: list[_Edit] = [(end, end, nl + nl.join(lines))]
    if null.end_mark.index > null.start_mark.index:  # an explicit `~` or `null`: drop it
        edits.append((colon + 1, null.end_mark.index, ""))
    return edits


def _set_in_block(text: str, node: yaml.MappingNode, values: Mapping[str, Any], nl: str) -> list[_Edit]:
    edits: list[_Edit] = []
    missing: dict[str, Any] = {}
    for key, new in values.items():
        found = _find(node, key)
        if found is None:
            missing[key] = new
            continue
        key_node, value = found
        if not isinstance(value, yaml.ScalarNode):
            raise EditError(f"'{key}' holds a {'list' if isinstance(value, yaml.SequenceNode) else 'mapping'} "
                            f"(line {value.start_mark.line + 1}), not a single value")
        start, end = value.start_mark.index, value.end_mark.index
        if start == end:  # `key:` with nothing after it
            colon = text.index(":", key_node.end_mark.index)
            edits.append((colon + 1, colon + 1, " " + render(new)))
        elif value.style in ("|", ">"):  # a block scalar's span ends after its last line break
            edits.append((start, end, render(new) + nl))
        else:
            edits.append(_keep_comment_column(text, start, end, render(new)))
    if missing:
        indent = " " * node.value[0][0].start_mark.column
        at = _entries_end(text, node)
        edits.append((at, at, "".join(f"{nl}{indent}{render(k)}: {render(v)}" for k, v in missing.items())))
    return edits


def _keep_comment_column(text: str, start: int, end: int, new: str) -> _Edit:
    """Replace a value so that a comment after it on the same line stays in its column."""
    gap_end = end
    while gap_end < len(text) and text[gap_end] in " \t":
        gap_end += 1
    if gap_end == end or not text.startswith("#", gap_end):
        return (start, end, new)
    gap = max(1, (gap_end - start) - len(new))
    return (start, gap_end, new + " " * gap)


def _remove_edits(text: str, path: tuple[str, ...], keys: list[str]) -> list[_Edit]:
    node = _compose(text)
    parent_key: yaml.Node | None = None
    for key in path:
        if not isinstance(node, yaml.MappingNode):
            return []
        found = _find(node, key)
        if found is None:
            return []
        parent_key, node = found
    if not isinstance(node, yaml.MappingNode):
        return []
    doomed = [key for key in keys if _find(node, key) is not None]
    if not doomed:
        return []
    if node.flow_style:
        return [_rewrite_flow(text, node, {}, remove=doomed)]
    edits: list[_Edit] = []
    indent = node.value[0][0].start_mark.column
    for key in doomed:
        key_node, value = _find(node, key)  # type: ignore[misc]
        start = text.rfind("\n", 0, key_node.start_mark.index) + 1
        if text[start:key_node.start_mark.index].strip(" "):
            raise EditError(f"cannot remove '{key}' (line {key_node.start_mark.line + 1}): it shares its line")
        end = _skip_comments(text, _line_end(text, _last_char(text, value)), indent + 1)
        edits.append((start, _next_line(text, end), ""))
    if len(doomed) == len(node.value) and parent_key is not None:
        colon = text.index(":", parent_key.end_mark.index)
        edits.append((colon + 1, colon + 1, " {}"))  # an empty block would read as null
    return edits


def _rewrite_flow(text: str, node: yaml.MappingNode, values: Mapping[str, Any], remove: Sequence[str] = ()) -> _Edit:
    """Rewrite one flow mapping (`{a: 1, b: 2}`), keeping untouched entries as they were written."""
    parts: list[str] = []
    done: set[str] = set()
    for key_node, value in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if key is not None and key in remove:
            continue
        if key is not None and key in values:
            parts.append(f"{text[key_node.start_mark.index:key_node.end_mark.index]}: {render(values[key], True)}")
            done.add(key)
        else:
            parts.append(text[key_node.start_mark.index:max(value.end_mark.index, key_node.end_mark.index)])
    parts += [f"{render(k, True)}: {render(v, True)}" for k, v in values.items() if k not in done]
    return (node.start_mark.index, node.end_mark.index, "{" + ", ".join(parts) + "}")


def _line_end(text: str, index: int) -> int:
    """Index of the line break (or end of text) of the line holding `index`; before a `\\r\\n`."""
    end = text.find("\n", index)
    if end == -1:
        return len(text)
    return end - 1 if end > 0 and text[end - 1] == "\r" else end


def _next_line(text: str, line_end: int) -> int:
    end = text.find("\n", line_end)
    return len(text) if end == -1 else end + 1


def _last_char(text: str, node: yaml.Node) -> int:
    """Index of the last character a node's own text occupies (block collections end at their last child)."""
    if isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) and not node.flow_style and node.value:
        last = node.value[-1]
        return _last_char(text, last[1] if isinstance(node, yaml.MappingNode) else last)
    index = max(node.start_mark.index, node.end_mark.index - 1)
    while index > node.start_mark.index and text[index] in "\r\n":
        index -= 1
    return index


def _skip_comments(text: str, line_end: int, min_indent: int) -> int:
    """Extend past comment lines indented at least `min_indent`: they continue the entry above."""
    while line_end < len(text):
        start = _next_line(text, line_end)
        end = _line_end(text, start)
        line = text[start:end]
        body = line.lstrip(" ")
        if start >= len(text) or not body.startswith("#") or len(line) - len(body) < min_indent:
            break
        line_end = end
    return line_end


def _entries_end(text: str, node: yaml.MappingNode) -> int:
    """Where a new last entry of a block mapping goes: after its last entry and that entry's comments."""
    indent = node.value[0][0].start_mark.column
    return _skip_comments(text, _line_end(text, _last_char(text, node.value[-1][1])), indent)


def _splice(text: str, edits: list[_Edit]) -> str:
    for start, end, new in sorted(edits, key=lambda e: (e[0], e[1]), reverse=True):
        text = text[:start] + new + text[end:]
    return text


def _verify(before: str, after: str, path: tuple[str, ...], set_values: Mapping[str, Any] | None = None,
            remove_keys: Sequence[str] = ()) -> None:
    """The edited text must read back as exactly the intended data; anything else is a bug to report."""
    try:
        expected = copy.deepcopy(yaml.safe_load(before)) or {}
        actual = yaml.safe_load(after)
    except yaml.YAMLError as exc:
        raise EditError(f"the edit would not read back as YAML: {' '.join(str(exc).split())}") from None
    target: dict[str, Any] | None = expected
    for key in path:
        assert target is not None
        child = target.get(key)
        if not isinstance(child, dict):
            if set_values is None:  # nothing to remove from a mapping that is not there
                target = None
                break
            child = target[key] = {}
        target = child
    if target is not None:
        target.update(set_values or {})
        for key in remove_keys:
            target.pop(key, None)
    if actual != expected:
        raise EditError(f"editing '{_where(path)}' would not give the intended data; edit the file by hand")
