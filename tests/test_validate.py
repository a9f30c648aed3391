"""`winslow validate` over the broken state repos in tests/broken-repos/, run as a real CLI.

Each folder in tests/broken-repos/ is one small state repo with one kind of mistake
(or, for `several-errors`, many). Its `expected.txt` holds the exact lines the
validator must print on stdout, one problem a line, in the order it prints them
(sorted by path, line, column):

    path:line:column: message

`path` is relative to the case folder, because the test runs `winslow validate`
inside it (DIR defaults to `.`, which prints paths as they are). The `--format json`
run names the folder explicitly and must give the same problems with that folder
as a prefix.

A case whose folder also holds `xfail.txt` shows a bug in reconciler/: its
expected.txt is the right output, xfail.txt says what goes wrong today, and the
tests of that case are strict xfails, so they turn red once the bug is fixed and
the marker should go.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CASES_DIR = Path(__file__).resolve().parent / "broken-repos"
TEMPLATE = REPO_ROOT / "state-repo-template"
PROBLEM_LINE = re.compile(r"^(?P<path>[^:\n]+):(?P<line>[1-9][0-9]*):(?P<column>[1-9][0-9]*): (?P<message>.+)$")
SUMMARY = re.compile(r"^(?P<count>\d+) errors?: \d+ files?, \d+ pipelines?, \d+ projects? checked in .+$")
COUNTED = re.compile(r"(\d+) (error|file|pipeline|project)(s?)\b")


def winslow(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess[str]:
    """`python -m reconciler ARGS` in `cwd`, importing this checkout."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "reconciler", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, encoding="utf-8", errors="replace", timeout=120)


def _case_names() -> list[str]:
    return sorted(p.name for p in CASES_DIR.iterdir() if p.is_dir())


def _case_params() -> list[object]:
    params = []
    for name in _case_names():
        xfail = CASES_DIR / name / "xfail.txt"
        marks = [pytest.mark.xfail(strict=True, reason=xfail.read_text().strip())] if xfail.exists() else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def expected_lines(case: str) -> list[str]:
    return (CASES_DIR / case / "expected.txt").read_text(encoding="utf-8").splitlines()


def assert_plurals_agree(summary: str) -> None:
    """`1 file`, `0 files`, `2 files`: every count in the summary line takes the right form of its noun."""
    counted = COUNTED.findall(summary)
    assert counted, summary
    for number, noun, plural in counted:
        assert (plural == "s") == (number != "1"), f"'{number} {noun}{plural}' in {summary!r}"


@pytest.fixture(scope="module")
def validated() -> dict[tuple[str, str], subprocess.CompletedProcess[str]]:
    """Every case validated once as text (inside the folder) and once as JSON (folder named), in parallel."""
    jobs = {}
    for case in _case_names():
        jobs[case, "text"] = (("validate",), CASES_DIR / case)
        jobs[case, "json"] = (("validate", f"tests/broken-repos/{case}", "--format", "json"), REPO_ROOT)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        futures = {key: pool.submit(winslow, *args, cwd=cwd) for key, (args, cwd) in jobs.items()}
        return {key: future.result() for key, future in futures.items()}


def test_every_case_has_well_formed_expectations_naming_its_own_files():
    assert len(_case_names()) >= 17
    for case in _case_names():
        lines = expected_lines(case)
        assert lines, f"{case}: expected.txt is empty (a broken repo must report something)"
        for line in lines:
            match = PROBLEM_LINE.match(line)
            assert match, f"{case}: not 'path:line:column: message': {line!r}"
            assert (CASES_DIR / case / match["path"]).is_file(), f"{case}: {match['path']} does not exist"


@pytest.mark.parametrize("case", _case_params())
def test_broken_repo_prints_exactly_the_expected_problems(validated, case):
    result = validated[case, "text"]
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout.splitlines() == expected_lines(case)
    assert result.returncode == 1
    summary = result.stderr.splitlines()
    assert len(summary) == 1 and SUMMARY.match(summary[0]), result.stderr
    assert int(SUMMARY.match(summary[0])["count"]) == len(expected_lines(case))
    assert_plurals_agree(summary[0])


@pytest.mark.parametrize("case", _case_params())
def test_broken_repo_json_lists_the_same_problems_under_the_named_folder(validated, case):
    result = validated[case, "json"]
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1
    assert result.stderr == ""
    report = json.loads(result.stdout)
    prefix = f"tests/broken-repos/{case}/"
    assert all(p["path"].startswith(prefix) for p in report["problems"]), report["problems"]
    lines = [f"{p['path'][len(prefix):]}:{p['line']}:{p['column']}: {p['message']}" for p in report["problems"]]
    assert lines == expected_lines(case)
    assert report["ok"] is False
    assert report["summary"]["errors"] == len(lines)


def test_no_broken_repo_makes_the_validator_crash(validated):
    """A broken file is an error message, never a traceback; known crashes have an xfail.txt saying 'crash:'."""
    crashed = {case for (case, _), result in validated.items() if "Traceback" in result.stderr}
    known = {case for case in crashed if (CASES_DIR / case / "xfail.txt").is_file()
             and (CASES_DIR / case / "xfail.txt").read_text().startswith("crash:")}
    assert crashed == known, f"cases that crash without a known bug: {sorted(crashed - known)}"


def test_text_output_prefixes_paths_with_the_folder_given():
    result = winslow("validate", "tests/broken-repos/unknown-pipeline/")
    assert result.stdout.splitlines() == [f"tests/broken-repos/unknown-pipeline/{line}"
                                          for line in expected_lines("unknown-pipeline")]
    assert result.returncode == 1


def test_template_validates_clean_with_a_one_line_summary():
    result = winslow("validate", "state-repo-template")
    assert (result.returncode, result.stderr) == (0, "")
    assert re.fullmatch(r"ok: \d+ files, 2 pipelines, 1 project checked in state-repo-template\n", result.stdout)


def test_template_validates_clean_as_json():
    result = winslow("validate", str(TEMPLATE), "--format", "json")
    assert (result.returncode, result.stderr) == (0, "")
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["problems"] == []
    assert report["summary"]["errors"] == 0 and report["summary"]["projects"] == 1


def test_validate_defaults_to_the_current_folder():
    result = winslow("validate", cwd=TEMPLATE)
    assert result.returncode == 0
    assert result.stdout.startswith("ok: ") and result.stdout.rstrip().endswith("checked in .")


def test_a_broken_repo_exits_1_with_the_summary_on_stderr():
    result = winslow("validate", str(CASES_DIR / "several-errors"))
    assert result.returncode == 1
    assert len(result.stdout.splitlines()) == len(expected_lines("several-errors")) >= 10
    assert re.fullmatch(r"\d+ errors: .*\n", result.stderr)


@pytest.mark.parametrize("output", ["text", "json"])
def test_missing_folder_gives_one_line_on_stderr_and_exit_1(tmp_path, output):
    missing = tmp_path / "no-such-repo"
    result = winslow("validate", str(missing), "--format", output)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and str(missing) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_file_instead_of_a_folder_gives_one_line_and_exit_1(tmp_path):
    not_a_folder = tmp_path / "winslow.yaml"
    not_a_folder.write_text("version: 1\n")
    result = winslow("validate", str(not_a_folder))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("output", ["text", "json"])
def test_a_folder_that_is_not_a_state_repo_is_one_line_on_stderr_and_exit_1(tmp_path, output):
    """Checking nothing and saying ok would turn a CI job pointed at the wrong folder green."""
    (tmp_path / "README.md").write_text("not a state repo\n")
    (tmp_path / "src").mkdir()
    result = winslow("validate", str(tmp_path), "--format", output)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (f"winslow: {tmp_path}: not a Winslow state repo: no winslow.yaml, pipelines/ or "
                             f"projects/ (create one with winslow init)\n")


def test_an_empty_folder_is_not_a_state_repo(tmp_path):
    result = winslow("validate", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.startswith("winslow: .: not a Winslow state repo") and result.stderr.count("\n") == 1


def test_a_state_repo_with_only_winslow_yaml_is_valid_and_counts_one_file(tmp_path):
    (tmp_path / "winslow.yaml").write_text("version: 1\n")
    result = winslow("validate", str(tmp_path))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"ok: 1 file, 0 pipelines, 0 projects checked in {tmp_path}\n"


def test_a_state_repo_with_only_pipelines_is_valid(tmp_path):
    shutil.copytree(TEMPLATE / "pipelines", tmp_path / "pipelines")
    result = winslow("validate", str(tmp_path))
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"ok: 2 files, 2 pipelines, 0 projects checked in {tmp_path}\n"


def test_one_error_one_pipeline_and_one_project_are_singular():
    result = winslow("validate", cwd=CASES_DIR / "request-lowered")
    assert result.stderr == "1 error: 6 files, 1 pipeline, 2 projects checked in .\n"


def test_tab_indentation_error_names_the_tab():
    result = winslow("validate", cwd=CASES_DIR / "tab-indented")
    assert "tab" in result.stdout.lower(), result.stdout


def test_symlink_out_of_the_repo_is_refused_and_its_target_never_shown(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root-password-hunter2\n")
    repo = tmp_path / "repo"
    (repo / "projects" / "ulm").mkdir(parents=True)
    (repo / "winslow.yaml").write_text("version: 1\n")
    (repo / "projects" / "ulm" / "project.yaml").symlink_to(secret)
    result = winslow("validate", str(repo))
    assert "hunter2" not in result.stdout + result.stderr
    assert result.returncode == 1
    assert "symbolic link" in result.stdout or "symlink" in result.stdout, result.stdout


def test_dangling_symlink_is_one_problem_not_a_traceback(tmp_path):
    (tmp_path / "projects" / "ulm").mkdir(parents=True)
    (tmp_path / "projects" / "ulm" / "project.yaml").symlink_to(tmp_path / "gone.yaml")
    result = winslow("validate", str(tmp_path))
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1
    assert len(result.stdout.splitlines()) == 1 and PROBLEM_LINE.match(result.stdout.splitlines()[0])


def test_a_fifo_named_project_yaml_does_not_hang_the_validator(tmp_path):
    (tmp_path / "projects" / "ulm").mkdir(parents=True)
    os.mkfifo(tmp_path / "projects" / "ulm" / "project.yaml")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    try:
        result = subprocess.run([sys.executable, "-m", "reconciler", "validate", str(tmp_path)], env=env,
                                capture_output=True, text=True, timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("validate did not return within 5 s")
    assert result.returncode == 1
    assert "regular file" in result.stdout, result.stdout


def _repo_with_status(root: Path, runs: str, observed: int = 1, request: int = 1) -> Path:
    """The template plus a status.yaml for its project holding `runs`, its project at run.request `request`."""
    shutil.copytree(TEMPLATE, root)
    project = next((root / "projects").iterdir())
    text = (project / "project.yaml").read_text()
    (project / "project.yaml").write_text(text.replace("  request: 0 ", f"  request: {request} ", 1))
    (project / "status.yaml").write_text(f"state: RUNNING\nobserved_request: {observed}\nruns:\n{runs}")
    return root


def test_a_request_lowered_below_what_the_nodes_observed_is_an_error_at_its_line(tmp_path):
    repo = _repo_with_status(tmp_path / "repo", "  - {id: 3-detect-1, request: 3, stage: detect, attempt: 1, "
                                                "state: RUNNING}\n", observed=3, request=2)
    result = winslow("validate", cwd=repo)
    line = next(n for n, text in enumerate((repo / "projects/ulm-0812/project.yaml").read_text().splitlines(), 1)
                if text.strip().startswith("request: 2"))
    assert result.stdout == (f"projects/ulm-0812/project.yaml:{line}:3: run.request 2 is below request 3 that the nodes "
                             f"already acted on (projects/ulm-0812/status.yaml), so they ignore it: requests only go up "
                             f"(3 keeps that execution, 4 starts a new one)\n")
    assert result.returncode == 1


@pytest.mark.parametrize(("asked", "observed"), [(3, 3), (4, 3), (1, 0)])
def test_a_request_at_or_above_what_the_nodes_observed_is_fine(tmp_path, asked, observed):
    repo = _repo_with_status(tmp_path / "repo", "  []\n", observed=observed, request=asked)
    result = winslow("validate", str(repo))
    assert (result.returncode, result.stderr) == (0, ""), result.stdout
    assert result.stdout.startswith("ok: ")


def test_a_lowered_request_leaves_the_project_valid_to_the_nodes():
    """The nodes go on with the request they observed: only validate calls the lowered one an error."""
    from reconciler.state import DirectoryTree, StateReader

    snapshot = StateReader().read(DirectoryTree(CASES_DIR / "request-lowered"))
    assert snapshot.problems == ()
    entry = snapshot.projects["ulm"]
    assert not entry.invalid and entry.project is not None and entry.project.run.request == 2


def test_a_run_whose_request_and_attempt_are_written_as_floats_keeps_its_integer_id(tmp_path):
    repo = _repo_with_status(tmp_path / "repo",
                             "  - {id: 1-detect-1, request: 1.0, stage: detect, attempt: 1.0, state: RUNNING}\n")
    result = winslow("validate", str(repo))
    assert (result.returncode, result.stderr) == (0, ""), result.stdout


def test_every_problem_is_one_line_even_when_a_value_holds_a_newline(tmp_path):
    repo = _repo_with_status(tmp_path / "repo", '  - {id: "1-detect-1", request: 1, stage: detect, attempt: 1, state: RUNNING,\n'
                                               '     log: "../secret\\nprojects/x:1:1: forged"}\n')
    result = winslow("validate", str(repo))
    assert result.returncode == 1
    [line] = result.stdout.splitlines()
    assert PROBLEM_LINE.match(line) and "leaves the state repo" in line, line


def test_validate_gives_the_same_problems_without_the_compiled_schema_check(monkeypatch):
    """jsonschema_rs only makes valid files faster: without it (ImportError) every answer is the same."""
    from reconciler import schemas
    from reconciler.state import DirectoryTree, StateReader

    def problems() -> list[object]:
        found = []
        for case in [*_case_names(), "../../state-repo-template"]:
            found += StateReader(include_results=True).read(DirectoryTree(CASES_DIR / case)).problems
        return found

    fast = problems()
    monkeypatch.setattr(schemas, "jsonschema_rs", None)
    schemas._fast.cache_clear()
    try:
        assert problems() == fast
    finally:
        schemas._fast.cache_clear()


def test_stage_inputs_must_stay_in_the_pool_and_have_their_variables_set(tmp_path: Path) -> None:
    (tmp_path / "winslow.yaml").write_text("version: 1\n")
    (tmp_path / "pipelines").mkdir()
    stage = "  - name: detect\n    image: x\n    command: [run]\n"
    (tmp_path / "pipelines" / "reads.yaml").write_text(f"name: reads\nstages:\n{stage}    inputs: ['videos/${{VIDEO}}']\n")
    (tmp_path / "pipelines" / "out.yaml").write_text(f"name: out\nstages:\n{stage}    inputs: [../secrets.txt]\n")
    for name, env in (("good", "env: {VIDEO: a.mp4}\n"), ("unset", ""), ("escapes", "env: {VIDEO: ../../etc/passwd}\n")):
        (tmp_path / "projects" / name).mkdir(parents=True)
        (tmp_path / "projects" / name / "project.yaml").write_text(f"pipeline: reads\n{env}run: {{request: 1}}\n")
    out = winslow("validate", str(tmp_path))
    assert out.returncode == 1
    lines = [line.removeprefix(f"{tmp_path}/") for line in out.stdout.splitlines()]
    assert any(line.startswith("pipelines/out.yaml:6:") and "'../secrets.txt' leaves the resource pool" in line
               for line in lines), lines
    assert any(line.startswith("projects/unset/project.yaml:") and "set VIDEO in env" in line for line in lines), lines
    assert any(line.startswith("projects/escapes/project.yaml:") and "leaves the resource pool" in line
               for line in lines), lines
    assert not any(line.startswith("projects/good/") for line in lines), lines


def test_a_lease_not_shorter_than_the_node_timeout_is_refused(tmp_path: Path) -> None:
    (tmp_path / "winslow.yaml").write_text("version: 1\ntimeouts:\n  node: 60s\n  lease: 2m\n")
    out = winslow("validate", str(tmp_path))
    assert out.returncode == 1
    assert "winslow.yaml:4:3: timeouts.lease must be shorter than timeouts.node" in out.stdout.replace(f"{tmp_path}/", "")
