"""No input crashes the YAML loader or the state reader: fuzzing plus the classic attacks.

Two contracts, checked on every input:

- `parse_yaml(raw, path)` returns a Document of plain data (dict with str keys, list,
  str, int, float, bool, None) or raises InvalidFile whose problems are all located
  (line >= 1, column >= 1). Nothing else may escape it.
- `StateReader().read(DirectoryTree(repo))` returns a Snapshot whatever bytes one file
  of the repo holds, and every problem in it is located in a file of the repo.

Hypothesis runs derandomized (a fixed seed per test, no example database), so a run
is reproducible and a failure here is a failure everywhere.
"""
from __future__ import annotations

import math
import re
import shutil
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.errors import InvalidFile, Problem
from reconciler.snapshot import Snapshot
from reconciler.state import DirectoryTree, StateReader
from reconciler.yamlsafe import MAX_DEPTH, MAX_FILE_BYTES, Document, parse_yaml

TEMPLATE = Path(__file__).resolve().parent.parent / "state-repo-template"
FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
FEWER = settings(FUZZ, max_examples=120)

HEX = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
# Files of the kinds the template lacks, written as a reconciler would: seeds for mutation.
SEEDS = {
    "projects/ulm-0812/status.yaml": """\
state: WAITING
message: waiting for approval after detect
observed_request: 1
request:
  number: 1
  from: detect
  until: analyse
  step: false
  next: cleanup
  since: '2024-05-01T10:00:00+00:00'
  env: {VIDEO: ulm/DJI_0001.MP4}
updated: '2024-05-01T12:00:00+00:00'
runs:
  - id: 1-detect-1
    request: 1
    stage: detect
    attempt: 1
    state: SUCCEEDED
    node: gpu-box-1
    gpus: [0]
    exit_code: 0
    workspace: workspaces/ulm-0812/1-detect-1
    log: projects/ulm-0812/logs/1-detect-1.log
    result: projects/ulm-0812/results/1-detect-1.yaml
    events:
      - {time: '2024-05-01T10:00:01+00:00', message: claimed by gpu-box-1}
""",
    "projects/ulm-0812/pipeline.lock.yaml": """\
request: 1
source: pipelines/tracking.yaml
pipeline:
  name: tracking
  stages:
    - name: detect
      image: tracker:1.4
      command: [java, -jar, /app/tracker.jar, detect, "/resources/${VIDEO}"]
      resources: {gpus: 1, cpus: 8, memory: 32GiB}
      timeout: 48h
    - name: analyse
      image: tracker:1.4
      command: [java, -jar, /app/tracker.jar, analyse]
""",
    "projects/ulm-0812/results/1-detect-1.yaml": f"""\
project: ulm-0812
run: 1-detect-1
workspace: workspaces/ulm-0812/1-detect-1
total_size: 2048
files:
  - {{path: detections.csv, size: 2048, sha256: {HEX}}}
""",
}
TARGETS = ("winslow.yaml", "pipelines/tracking.yaml", "projects/ulm-0812/project.yaml", *SEEDS)

FRAGMENTS = [
    "a", "b", "name", "pipeline", "stages", "run", "from", "until", "env", "memory", "timeout", "image",
    "command", "state", "runs", "id", "tracking", "detect",
    ":", ": ", "-", "- ", "[", "]", "{", "}", ", ", "?", "? ", "|", ">", "#", "'", '"', "\\", "=",
    "&a ", "*a", "&b ", "*b", "<<: ", "<<: *a", "\t", "\n", "\n", "  ", "    ", "---\n", "...\n", "%YAML 1.1\n",
    "!!python/object:os.system ", "!!python/object/apply:os.system ", "!!binary ", "!!str ", "!!map ",
    "!!seq ", "!foo ", "!<tag:x> ", "ü", "日本", "🚗", "\u2028", "\x85", "\ufeff", "\r\n", "\r",
    "1", "7", "0.5", "~", "null", "true", "yes", "on", "No", ".nan", ".inf", "-.inf", "0x1F", "0o17",
    "32GiB", "48h", "/resources/../etc", "${VIDEO}", "\x00", "\x07", "\x1b[2J",
]
# Left out on purpose, each tested below as a known bug: !!int/!!float/!!timestamp and
# date-like scalars that are no dates (ValueError), ints over 4300 digits, lone surrogates.


def plain(value: object) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def located(problem: Problem, path: str) -> bool:
    return problem.path == path and problem.line >= 1 and problem.column >= 1 and bool(problem.message)


def parse_or_refuse(raw: bytes | str, path: str = "projects/p/project.yaml") -> Document | None:
    """The loader's contract; returns the Document, or None when it refused the input."""
    try:
        doc = parse_yaml(raw, path)
    except InvalidFile as exc:
        assert exc.problems and all(located(p, path) for p in exc.problems), exc.problems
        return None
    assert isinstance(doc, Document)
    assert plain(doc.data), doc.data
    assert all(line >= 1 and column >= 1 for line, column in doc.positions.values())
    return doc


def make_repo(root: Path) -> Path:
    """The template plus a status, a pipeline lock and a result manifest, all valid."""
    shutil.copytree(TEMPLATE, root)
    for path, text in SEEDS.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


@pytest.fixture(scope="module")
def fuzz_repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("fuzz") / "repo")


def read_repo_with(root: Path, target: str, content: bytes) -> Snapshot:
    """Read the whole repo at `root` with `target` holding `content` (restored afterwards)."""
    original = (root / target).read_bytes()
    (root / target).write_bytes(content)
    try:
        tree = DirectoryTree(root)
        reader = StateReader(include_results=True)
        snapshot = reader.read(tree)
        again = reader.read(tree)  # the second read is served from the cache
        files = set(tree.entries())
    finally:
        (root / target).write_bytes(original)
    assert isinstance(snapshot, Snapshot)
    assert all(p.path in files and p.line >= 1 and p.column >= 1 and p.message for p in snapshot.problems), \
        snapshot.problems
    assert again.problems == snapshot.problems
    return snapshot


# --- strategies -------------------------------------------------------------------------

yamlish = st.lists(st.sampled_from(FRAGMENTS), max_size=60).map("".join)


# Edits that keep the file YAML come more often: they reach the meaning checks behind the parser.
MUTATIONS = ["delete", "insert", "replace", "copy-line", "indent"] + ["drop-line"] * 4 + ["value"] * 4
SCALAR_VALUE = re.compile(rb"(?<=: )[^\s,\[\]{}#'\"][^,\[\]{}#\n]*")


@st.composite
def mutated(draw: st.DrawFn, path: str) -> bytes:
    """A real file of the state repo with a few edits, as a careless hand edit makes them."""
    data = bytearray(_seed(path))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(MUTATIONS))
        at = draw(st.integers(0, len(data)))
        if action == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif action == "insert":
            data[at:at] = draw(st.sampled_from(FRAGMENTS)).encode()
        elif action == "replace" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif action == "value":  # one setting edited: `memory: 32GiB` -> `memory: ü`
            spans = [m.span() for m in SCALAR_VALUE.finditer(data)]
            if spans:
                start, end = draw(st.sampled_from(spans))
                data[start:end] = draw(st.sampled_from(FRAGMENTS)).encode()
        elif action in ("drop-line", "copy-line", "indent"):
            lines = data.split(b"\n")
            i = draw(st.sampled_from(range(len(lines))))
            if action == "drop-line":
                del lines[i]
            elif action == "copy-line":
                lines.insert(draw(st.integers(0, len(lines))), lines[i])
            else:
                lines[i] = draw(st.sampled_from([b" ", b"  ", b"\t"])) + lines[i]
            data = bytearray(b"\n".join(lines))
    return bytes(data)


def _seed(path: str) -> bytes:
    return SEEDS[path].encode() if path in SEEDS else (TEMPLATE / path).read_bytes()


def _paths(value: object, prefix: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Every key of every mapping and every item of every list, as paths from the root."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    found = []
    for key, child in items:
        found.append(prefix + (key,))
        found += _paths(child, prefix + (key,))
    return found


SCALARS = st.one_of(st.sampled_from(FRAGMENTS), st.integers(-3, 2**70), st.booleans(), st.none(),
                    st.floats(allow_nan=False), st.text(max_size=12))


@st.composite
def restructured(draw: st.DrawFn, path: str) -> bytes:
    """A real file, still well-formed YAML, with keys dropped or values swapped: reaches the meaning checks."""
    data = yaml.safe_load(_seed(path))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        if not paths:
            break
        where = draw(st.sampled_from(paths))
        parent = data
        for key in where[:-1]:
            parent = parent[key]
        if draw(st.booleans()):
            del parent[where[-1]]
        else:
            parent[where[-1]] = draw(SCALARS)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).encode()


def edited(path: str) -> st.SearchStrategy[bytes]:
    return st.one_of(mutated(path), restructured(path))


# --- the loader -----------------------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=2000))
def test_loader_survives_arbitrary_bytes(raw):
    parse_or_refuse(raw)


@FUZZ
@given(st.text(max_size=2000))
def test_loader_survives_arbitrary_text(text):
    parse_or_refuse(text)
    parse_or_refuse(text.encode("utf-8"))


@FUZZ
@given(yamlish)
def test_loader_survives_yaml_built_from_fragments(text):
    parse_or_refuse(text.encode("utf-8"))


@FUZZ
@given(st.sampled_from(TARGETS).flatmap(mutated))
def test_loader_survives_mutations_of_real_files(raw):
    parse_or_refuse(raw)


# --- the whole state reader ------------------------------------------------------------------

CLEAN_TARGETS = [t for t in TARGETS if not t.endswith(("status.yaml", "pipeline.lock.yaml"))]
STATUS, LOCK = "projects/ulm-0812/status.yaml", "projects/ulm-0812/pipeline.lock.yaml"


def _targets() -> list[object]:
    return [pytest.param(t, id=t.rsplit("/", 1)[-1]) for t in TARGETS]


def test_fuzzed_seeds_are_valid_to_begin_with(fuzz_repo):
    snapshot = read_repo_with(fuzz_repo, "winslow.yaml", (TEMPLATE / "winslow.yaml").read_bytes())
    assert snapshot.problems == ()
    assert snapshot.projects["ulm-0812"].status.runs[0].id == "1-detect-1"


@pytest.mark.parametrize("target", _targets())
def test_state_reader_survives_edits_of_each_file(fuzz_repo, target):
    def check(content: bytes) -> None:
        read_repo_with(fuzz_repo, target, content)
    FEWER(given(edited(target))(check))()


@pytest.mark.parametrize("target", CLEAN_TARGETS, ids=lambda t: t.rsplit("/", 1)[-1])
def test_state_reader_survives_fragments_and_bytes_in_each_file(fuzz_repo, target):
    @settings(FUZZ, max_examples=60)
    @given(st.one_of(yamlish.map(str.encode), st.binary(max_size=500)))
    def check(content):
        read_repo_with(fuzz_repo, target, content)
    check()


# --- the classic attacks, one by one -------------------------------------------------------------

def refused(raw: bytes | str, path: str = "x.yaml") -> list[Problem]:
    with pytest.raises(InvalidFile) as caught:
        parse_yaml(raw, path)
    assert all(located(p, path) for p in caught.value.problems)
    return caught.value.problems


def billion_laughs(levels: int = 10, width: int = 10) -> str:
    lines = ["l0: &l0 " + "[" + ", ".join(["lol"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_exponential_alias_bomb_is_refused_quickly():
    start = time.perf_counter()
    problems = refused(billion_laughs())
    assert time.perf_counter() - start < 2.0
    assert "alias bomb" in problems[0].message


def test_alias_bomb_in_a_project_is_one_problem_in_the_snapshot(fuzz_repo):
    snapshot = read_repo_with(fuzz_repo, "projects/ulm-0812/project.yaml", ("pipeline: tracking\n" + billion_laughs()).encode())
    assert [p.path for p in snapshot.problems] == ["projects/ulm-0812/project.yaml"]


def test_merge_keys_cannot_build_a_bomb_either():
    text = "a0: &a0 {k0: 1, k1: 1, k2: 1, k3: 1, k4: 1, k5: 1, k6: 1, k7: 1, k8: 1, k9: 1}\n"
    for i in range(1, 9):
        text += f"a{i}: &a{i} {{" + ", ".join(f"x{j}: *a{i - 1}" for j in range(10)) + "}\n"
    start = time.perf_counter()
    refused(text)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("text", ["a: &a [1, *a]\n", "a: &a {b: *a}\n", "&a [*a]\n", "- &a\n  - *a\n"])
def test_recursive_alias_is_refused(text):
    assert "refers to itself" in refused(text)[0].message


def test_a_mapping_merging_itself_is_refused():
    refused("env: &env\n  VIDEO: x\n  <<: *env\n")


def test_a_mapping_merging_itself_says_so_at_the_anchor():
    problems = refused("env: &env\n  VIDEO: x\n  <<: *env\n")
    assert [(p.line, p.column, p.message) for p in problems] == [(1, 6, "a mapping merges itself (recursive structure)")]


@pytest.mark.parametrize("opener,closer", [("[", "]"), ("{", "}"), ("[{a: ", "}]"), ("- ", "")])
def test_ten_thousand_deep_flow_nesting_is_refused_quickly(opener, closer):
    start = time.perf_counter()
    problems = refused(opener * 10_000 + "x" + closer * 10_000)
    assert time.perf_counter() - start < 1.0
    assert problems[0].message == f"nested deeper than {MAX_DEPTH} levels"


def test_ten_thousand_deep_unclosed_brackets_are_refused():
    assert refused("[" * 10_000)[0].message == f"nested deeper than {MAX_DEPTH} levels"


def test_ten_thousand_deep_indented_mappings_are_refused_by_size():
    """10,000 levels of one-space indentation are 50 MB: refused before any parsing."""
    text = "".join(" " * i + f"k{i}:\n" for i in range(10_000))
    start = time.perf_counter()
    assert "too large" in refused(text)[0].message
    assert time.perf_counter() - start < 1.0


def test_three_thousand_deep_indented_mappings_are_refused_by_depth():
    text = "".join(" " * i + f"k{i}:\n" for i in range(3_000))
    assert len(text.encode()) < MAX_FILE_BYTES
    start = time.perf_counter()
    problems = refused(text)
    assert time.perf_counter() - start < 1.0
    assert problems[0].message == f"nested deeper than {MAX_DEPTH} levels"
    assert problems[0].line == MAX_DEPTH + 1


def test_nesting_up_to_the_limit_is_accepted():
    doc = parse_yaml("[" * MAX_DEPTH + "]" * MAX_DEPTH, "x.yaml")
    depth, value = 0, doc.data
    while isinstance(value, list) and value:
        depth, value = depth + 1, value[0]
    assert depth == MAX_DEPTH - 1


def _write_big_file(path: Path, size: int) -> None:
    chunk = b"key: value value value value value value value value value value value value\n" * 13_000
    with open(path, "wb") as handle:
        while handle.tell() < size:
            handle.write(chunk)


@pytest.fixture(scope="module")
def repo_with_a_100mb_project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("big") / "repo"
    shutil.copytree(TEMPLATE, root)
    _write_big_file(root / "projects" / "ulm-0812" / "project.yaml", 100 * 1024 * 1024)
    return root


def test_100mb_bytes_are_refused_before_parsing():
    raw = b"a" * (100 * 1024 * 1024)
    start = time.perf_counter()
    problems = refused(raw)
    assert time.perf_counter() - start < 0.1
    assert problems[0].message == f"file is too large ({len(raw)} bytes; at most {MAX_FILE_BYTES})"


def test_100mb_project_file_is_refused_quickly(repo_with_a_100mb_project):
    start = time.perf_counter()
    snapshot = StateReader().read(DirectoryTree(repo_with_a_100mb_project))
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"{elapsed:.2f} s"
    [problem] = snapshot.problems
    assert (problem.path, problem.line, problem.column) == ("projects/ulm-0812/project.yaml", 1, 1)
    assert "too large" in problem.message


def test_100mb_project_file_is_refused_without_reading_it_whole(repo_with_a_100mb_project):
    tracemalloc.start()
    try:
        StateReader().read(DirectoryTree(repo_with_a_100mb_project))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * MAX_FILE_BYTES, f"peak {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("raw,where", [
    (b"name: Caf\xe9\n", (1, 10)),
    (b"a: 1\nb: \xff\xfe\n", (2, 4)),
    (b"\xff\xfea\x00:\x001\x00", (1, 1)),  # UTF-16 with a BOM is not UTF-8 either
    (b"a: \xed\xa0\x80\n", (1, 4)),  # an encoded surrogate
])
def test_non_utf8_bytes_are_refused_at_the_first_bad_byte(raw, where):
    [problem] = refused(raw)
    assert (problem.line, problem.column) == where
    assert problem.message.startswith("not UTF-8 text (byte 0x")


@pytest.mark.parametrize("raw", [b"a: x\x00y\n", b"\x00", b"a: 1\n\x00\n", b"'\x00'"])
def test_a_nul_byte_is_refused(raw):
    [problem] = refused(raw)
    assert "#x0000" in problem.message


def test_a_quoted_escaped_nul_is_just_text():
    assert parse_yaml('a: "x\\0y"\n', "x.yaml").data == {"a": "x\x00y"}


@pytest.mark.parametrize("raw", [b"", b"\n\n", b"# only a comment\n", b"---\n", b"\xef\xbb\xbf"])
def test_an_empty_file_is_a_document_of_none(raw):
    doc = parse_yaml(raw, "x.yaml")
    assert doc.data is None and doc.where(())[0] >= 1


def test_empty_project_file_is_one_problem_in_the_snapshot(fuzz_repo):
    snapshot = read_repo_with(fuzz_repo, "projects/ulm-0812/project.yaml", b"")
    assert [(p.path, p.line, p.column) for p in snapshot.problems] == [("projects/ulm-0812/project.yaml", 1, 1)]


@pytest.mark.parametrize("text,where", [
    ("a: 1\na: 2\n", (2, 1)),
    ("a: {b: 1, b: 2}\n", (1, 11)),
    ("- x: 1\n  y: 2\n  x: 3\n", (3, 3)),
    ("1: a\n'1': b\n", (2, 1)),
    ("base: &b {k: 1}\nm:\n  <<: *b\n  k: 2\n  k: 3\n", (5, 3)),
])
def test_duplicate_keys_are_refused_at_the_second_one(text, where):
    [problem] = refused(text)
    assert (problem.line, problem.column) == where
    assert problem.message.startswith("duplicate key")


def test_merge_keys_fill_in_without_overriding():
    doc = parse_yaml("base: &b {k: 1, j: 2}\nm:\n  <<: *b\n  k: 3\n", "x.yaml")
    assert doc.data["m"] == {"k": 3, "j": 2}


@pytest.mark.parametrize("text", [
    "!!python/object/apply:os.system [echo pwned]\n",
    "a: !!python/object/apply:os.system [echo pwned]\n",
    "!!python/object:collections.OrderedDict {a: 1}\n",
    "a: !!python/name:os.system\n",
    "a: !!python/object/new:type [x, [], {}]\n",
])
def test_python_tags_never_construct_objects(text):
    doc = parse_or_refuse(text)
    assert doc is None or plain(doc.data)


def test_multiple_documents_are_refused():
    assert "single document" in refused("a: 1\n---\nb: 2\n")[0].message


@pytest.mark.parametrize("text", ["a: .nan\n", "a: [1, .NaN]\n", "a: {b: .NAN}\n"])
def test_nan_is_refused(text):
    assert "NaN" in refused(text)[0].message


# --- values the constructor cannot build, positions past non-ASCII text, keys as written --------

@pytest.mark.parametrize("text", [
    "description: 2019-02-30\n",           # looks like a date, is none
    "a: 2019-13-01 10:00:00\n",
    "a: !!timestamp yesterday\n",
    "a: !!int abc\n",
    "a: !!float abc\n",
    "a: " + "9" * 5000 + "\n",             # over Python's 4300-digit int conversion limit
], ids=["bad-date", "bad-datetime", "timestamp-tag", "int-tag", "float-tag", "5000-digit-int"])
def test_scalars_that_cannot_be_constructed_are_a_problem_not_a_crash(text):
    parse_or_refuse(text)


def test_text_with_a_lone_surrogate_is_refused_not_a_crash():
    assert refused("pipeline: \ud800\n")[0].line == 1


def test_keys_are_kept_as_written():
    doc = parse_yaml("env: {NO: 1, on: x, Off: y, ~: z, 0x10: w}\n", "x.yaml")
    assert list(doc.data["env"]) == ["NO", "on", "Off", "~", "0x10"]


def test_a_nul_byte_after_non_ascii_text_is_located_by_character():
    [problem] = refused("a: ÄÖÜäöü\nb: x\x00\n".encode())
    assert (problem.line, problem.column) == (2, 5)


def test_a_bad_byte_after_non_ascii_text_is_located_by_character():
    [problem] = refused("a: ÄÖÜ ".encode() + b"\xff\n")
    assert (problem.line, problem.column) == (1, 8)


def test_huge_numbers_are_not_a_crash():
    doc = parse_or_refuse("a: 1.0e+400\nb: -1.0e+400\nc: " + "9" * 4000 + "\n")
    assert doc is not None and doc.data["a"] == math.inf and doc.data["b"] == -math.inf


# --- one pass over the parser's events: aliases, depth and the compiled schema check -----------

def test_a_hundred_thousand_unclosed_brackets_are_refused_at_the_first_too_deep():
    """No composer ever sees them: PyYAML's C composer recursed on such input and crashed the process."""
    for opener in ("[", "{a: ", "- "):
        [problem] = refused(opener * 100_000)
        assert problem.message == f"nested deeper than {MAX_DEPTH} levels"


def test_an_alias_is_a_copy_located_where_its_anchor_is_written():
    doc = parse_yaml("a: &x {k: [1, 2]}\nb: *x\nc: [*x]\n", "x.yaml")
    assert doc.data["b"] == doc.data["c"][0] == {"k": [1, 2]}
    assert doc.data["b"] is not doc.data["a"] and doc.data["b"]["k"] is not doc.data["a"]["k"]
    assert doc.where(("b", "k", 1)) == doc.where(("a", "k", 1)) == (1, 15)
    assert doc.where(("c", 0)) == (1, 4)


def test_the_value_budget_counts_what_aliases_expand_into():
    items = ", ".join(["1"] * 60_000)
    assert len(parse_yaml(f"a: &a [{items}]\n", "x.yaml").data["a"]) == 60_000
    assert "alias bomb" in refused(f"a: &a [{items}]\nb: *a\n")[0].message


def test_an_alias_cannot_nest_deeper_than_the_limit_either():
    half = MAX_DEPTH // 2 + 1
    problems = refused("a: &d " + "[" * half + "1" + "]" * half + "\nb: " + "[" * half + "*d" + "]" * half + "\n")
    assert problems[0].message == f"nested deeper than {MAX_DEPTH} levels"


@pytest.mark.parametrize("text,message", [
    ("a: &x 1\nb: &x 2\n", "invalid YAML: found duplicate anchor; first occurrence second occurrence"),
    ("a: *nowhere\n", "invalid YAML: found undefined alias"),
    ("a: &a [1, *a]\nb: *nowhere\n", "invalid YAML: found undefined alias"),
    ("<<: [1, [2]]\n", "'<<' merges only mappings"),
    ("? [a]\n: b\n", "a key must be a plain value, not a list or mapping"),
])
def test_anchor_and_merge_mistakes_are_named(text, message):
    assert refused(text)[0].message == message


KINDS = {"winslow.yaml": "winslow", "pipelines/tracking.yaml": "pipeline", "projects/ulm-0812/project.yaml": "project",
         STATUS: "status", LOCK: "pipeline-lock", "projects/ulm-0812/results/1-detect-1.yaml": "result"}


@pytest.mark.parametrize("target", _targets())
def test_the_compiled_schema_check_never_passes_what_jsonschema_refuses(target):
    """The fast check may refuse more (then jsonschema decides), never less: that would hide an error."""
    pytest.importorskip("jsonschema_rs")
    from reconciler import schemas
    kind = KINDS[target]

    @FEWER
    @given(edited(target))
    def check(raw):
        doc = parse_or_refuse(raw)
        if doc is not None and doc.data is not None and schemas._valid(kind, doc.data):
            assert not list(schemas.validator(kind).iter_errors(doc.data)), doc.data
    check()
