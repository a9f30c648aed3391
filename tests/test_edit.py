"""Comment-preserving edits: only the values change, everything a person wrote stays."""
from __future__ import annotations

import pytest
import yaml

from reconciler.edit import EditError, remove_fields, render, set_env, set_fields

PROJECT = """\
# A project file with the kinds of things people write.
name: Ulm intersection   # display name
pipeline: tracking

env:                     # for every stage
  VIDEO: ulm/DJI_0001.MP4  # under resources/

# What you want to happen.
run:
  request: 3       # bump it
  from: detect     # redo a stage by naming it
  # until: analyse # the last stage to run
  state: running   # running | paused
                   #   | aborted (stops now)

tags: [ulm, drone]   # after run, on purpose
"""


def test_set_fields_replaces_values_in_place_and_keeps_everything_else() -> None:
    edited = set_fields(PROJECT, ("run",), {"request": 4, "from": "track", "state": "paused"})

    assert edited == PROJECT.replace("request: 3       # bump it", "request: 4       # bump it") \
        .replace("from: detect     # redo", "from: track      # redo") \
        .replace("state: running   # running", "state: paused    # running")
    assert yaml.safe_load(edited)["run"] == {"request": 4, "from": "track", "state": "paused"}


def test_missing_key_goes_after_the_last_key_and_its_comments() -> None:
    edited = set_fields(PROJECT, ("run",), {"until": "analyse", "step": True})

    assert "                   #   | aborted (stops now)\n  until: analyse\n  step: true\n\ntags:" in edited
    assert yaml.safe_load(edited)["run"]["until"] == "analyse"
    assert edited.replace("  until: analyse\n  step: true\n", "") == PROJECT


def test_missing_run_block_is_created_at_the_end_of_the_file() -> None:
    text = "pipeline: tracking  # the pipeline\n# trailing comment\n"

    edited = set_fields(text, ("run",), {"request": 1, "from": "detect", "state": "running"})

    assert edited == text + "run:\n  request: 1\n  from: detect\n  state: running\n"


def test_file_without_final_newline_gets_one_before_the_new_block() -> None:
    assert set_fields("pipeline: t", ("run",), {"request": 1}) == "pipeline: t\nrun:\n  request: 1\n"


def test_empty_run_key_is_filled_as_a_block() -> None:
    text = "pipeline: t\nrun:   # nothing yet\nname: x\n"

    edited = set_fields(text, ("run",), {"request": 1})

    assert edited == "pipeline: t\nrun:   # nothing yet\n  request: 1\nname: x\n"


def test_key_with_empty_value_gets_one() -> None:
    edited = set_fields("run:\n  from:\n  request: 2\n", ("run",), {"from": "b"})

    assert edited == "run:\n  from: b\n  request: 2\n"


def test_flow_mapping_is_rewritten_alone() -> None:
    text = "pipeline: t  # keep\nrun: {request: 3, from: detect}   # flow style\nname: x\n"

    edited = set_fields(text, ("run",), {"request": 4, "state": "running"})

    assert edited == "pipeline: t  # keep\nrun: {request: 4, from: detect, state: running}   # flow style\nname: x\n"


def test_set_env_adds_and_replaces_variables_with_quotes_only_where_needed() -> None:
    edited = set_env(PROJECT, {"VIDEO": "ulm/other clip.mp4", "COUNT": "3", "MODE": "fast"})

    assert "  VIDEO: ulm/other clip.mp4 # under resources/\n  COUNT: '3'\n  MODE: fast\n\n# What you want" in edited
    assert yaml.safe_load(edited)["env"] == {"VIDEO": "ulm/other clip.mp4", "COUNT": "3", "MODE": "fast"}


def test_set_env_in_a_flow_mapping() -> None:
    edited = set_env("pipeline: t\nenv: {VIDEO: a.mp4}  # input\n", {"MODE": "x,y"})

    assert edited == "pipeline: t\nenv: {VIDEO: a.mp4, MODE: 'x,y'}  # input\n"


def test_remove_fields_drops_the_line_and_its_continuation_comments() -> None:
    edited = remove_fields(PROJECT, ("run",), ["state", "absent"])

    assert edited == PROJECT.replace("  state: running   # running | paused\n                   #   | aborted (stops now)\n", "")
    assert yaml.safe_load(edited)["run"] == {"request": 3, "from": "detect"}


def test_removing_every_key_leaves_an_empty_mapping_not_null() -> None:
    edited = remove_fields("run:\n  request: 1\n  from: a\nname: x\n", ("run",), ["request", "from"])

    assert yaml.safe_load(edited) == {"run": {}, "name": "x"}


def test_remove_from_a_flow_mapping_and_from_a_missing_one() -> None:
    assert remove_fields("run: {request: 1, until: c}\n", ("run",), ["until"]) == "run: {request: 1}\n"
    assert remove_fields("pipeline: t\n", ("run",), ["until"]) == "pipeline: t\n"


def test_windows_line_endings_are_kept() -> None:
    edited = set_fields("pipeline: t\r\nrun:\r\n  request: 2\r\n", ("run",), {"request": 3, "from": "a"})

    assert edited == "pipeline: t\r\nrun:\r\n  request: 3\r\n  from: a\r\n"


def test_a_run_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(EditError, match="'run' is not a mapping"):
        set_fields("run: [1, 2]\n", ("run",), {"request": 1})


def test_invalid_yaml_is_refused() -> None:
    with pytest.raises(EditError, match="not valid YAML"):
        set_fields("run: {request: 1\n", ("run",), {"request": 2})


@pytest.mark.parametrize("value, block, flow", [
    ("running", "running", "running"),
    ("yes", "'yes'", "'yes'"),
    ("3", "'3'", "'3'"),
    ("2019-08-12", "'2019-08-12'", "'2019-08-12'"),
    ("a, b", "a, b", "'a, b'"),
    ("", "''", "''"),
    ("two\nlines", '"two\\nlines"', '"two\\nlines"'),
    (4, "4", "4"),
    (True, "true", "true"),
])
def test_render_quotes_only_when_yaml_needs_it(value: object, block: str, flow: str) -> None:
    assert render(value) == block
    assert render(value, flow=True) == flow
    assert yaml.safe_load(f"k: {block}")["k"] == value
    assert yaml.safe_load(f"{{k: {flow}}}")["k"] == value
