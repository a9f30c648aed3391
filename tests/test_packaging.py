"""What ships: schemas that explain every field to an editor, and a wheel that works once installed.

The wheel test builds the package from this checkout, installs it into a fresh
virtual environment and runs `winslow` from a folder outside the checkout, so a
file that only exists in the checkout (and not in `reconciler/_data/`) shows up
as a failure here rather than on a user's machine.
"""
from __future__ import annotations

import configparser
import importlib.util
import json
import os
import site
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMA_DIR = REPO_ROOT / "schema"
TEMPLATE_DIR = REPO_ROOT / "state-repo-template"
SCHEMAS = sorted(SCHEMA_DIR.glob("*.schema.json"))

# Keywords whose subschemas describe a field (or an entry of a list or map): each needs a description.
_FIELD_MAPS = ("properties", "patternProperties", "$defs")
_FIELD_SCHEMAS = ("items", "additionalProperties", "unevaluatedProperties", "contains")
_FIELD_LISTS = ("prefixItems",)
# Keywords whose subschemas only combine others: walked through, no description of their own needed.
_PASS_THROUGH = ("allOf", "anyOf", "oneOf", "not", "if", "then", "else")


def _field_schemas(schema: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every subschema that stands for a field, item or map value, with a readable path to it."""
    if not isinstance(schema, dict):
        return
    for keyword in _FIELD_MAPS:
        for name, sub in schema.get(keyword, {}).items():
            yield from _field(sub, f"{where}.{name}" if keyword == "properties" else f"{where}/{keyword}/{name}")
    for keyword in _FIELD_SCHEMAS:
        sub = schema.get(keyword)
        if isinstance(sub, dict):  # `additionalProperties: false` is no field
            yield from _field(sub, f"{where}[]" if keyword == "items" else f"{where}/{keyword}")
    for keyword in _FIELD_LISTS:
        for index, sub in enumerate(schema.get(keyword, ())):
            yield from _field(sub, f"{where}[{index}]")
    for keyword in _PASS_THROUGH:
        subs = schema.get(keyword)
        for sub in subs if isinstance(subs, list) else [subs]:
            yield from _field_schemas(sub, f"{where}/{keyword}")


def _field(schema: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(schema, dict):
        yield where, schema
        yield from _field_schemas(schema, where)


def test_every_schema_field_is_described():
    """yaml-language-server shows `description` on hover: every field at every level must have one."""
    assert SCHEMAS, f"no schemas in {SCHEMA_DIR}"
    undescribed, fields = [], 0
    for path in SCHEMAS:
        schema = json.loads(path.read_text())
        Draft202012Validator.check_schema(schema)
        if not str(schema.get("description", "")).strip():
            undescribed.append(f"{path.name}: (the document)")
        for where, sub in _field_schemas(schema, ""):
            fields += 1
            description = sub.get("description")
            if not isinstance(description, str) or not description.strip():
                undescribed.append(f"{path.name}: {where.lstrip('.') or '(root)'}")
    assert not undescribed, "fields without a description:\n" + "\n".join(undescribed)
    assert fields > 100, f"the walk found only {fields} fields; is it still reaching nested schemas?"


def test_schema_examples_match_their_own_schema():
    """An example an editor offers must itself be valid where it is offered."""
    wrong = []

    def walk(node: Any, where: str, name: str) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("examples"), list) and "$ref" not in node:
                for example in node["examples"]:
                    for error in Draft202012Validator(node).iter_errors(example):
                        wrong.append(f"{name}: {where or '(root)'}: {example!r}: {error.message}")
            for key, value in node.items():
                if key not in ("examples", "enum", "const", "default"):
                    walk(value, f"{where}/{key}", name)
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{where}/{index}", name)

    for path in SCHEMAS:
        walk(json.loads(path.read_text()), "", path.name)
    assert not wrong, "\n".join(wrong)


def _without_checkout(env: dict[str, str]) -> dict[str, str]:
    """The caller's environment minus whatever could make the checkout importable."""
    return {k: v for k, v in env.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def _run(args: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(map(str, args))} exited {result.returncode} in {cwd}\n"
                                    f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def _template_files() -> set[str]:
    return {p.relative_to(TEMPLATE_DIR).as_posix() for p in TEMPLATE_DIR.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts}


def test_wheel_ships_schemas_and_template_and_installed_winslow_works_from_any_folder(tmp_path):
    base_env = _without_checkout(dict(os.environ))

    # Build the wheel. With hatchling importable it builds offline; otherwise pip fetches it (build isolation).
    dist = tmp_path / "dist"
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("hatchling") is not None else []
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", *isolation,
          "-w", dist, REPO_ROOT], cwd=tmp_path, env=base_env, timeout=300)
    wheels = sorted(dist.glob("winslow-*.whl"))
    assert len(wheels) == 1, f"expected one winslow wheel in {dist}: {sorted(p.name for p in dist.iterdir())}"
    wheel = wheels[0]

    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        data = "reconciler/_data"
        wanted = {f"{data}/schema/pipeline.schema.json"}
        wanted |= {f"{data}/schema/{p.name}" for p in SCHEMAS}
        wanted |= {f"{data}/state-repo-template/{name}" for name in (
            "winslow.yaml", "pipelines/tracking.yaml", "pipelines/demo.yaml", "projects/ulm-0812/project.yaml",
            "README.md", ".gitlab-ci.yml", ".github/workflows/validate.yml", ".pre-commit-config.yaml")}
        wanted |= {f"{data}/state-repo-template/{name}" for name in _template_files()}
        assert not wanted - names, f"missing from {wheel.name}: {sorted(wanted - names)}"
        for path in SCHEMAS:
            assert archive.read(f"{data}/schema/{path.name}") == path.read_bytes(), f"{path.name} differs in the wheel"
        assert "reconciler/cli.py" in names and "reconciler/resources.py" in names
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = configparser.ConfigParser()
        scripts.read_string(archive.read(entry_points).decode())
    assert scripts.has_section("console_scripts"), f"{entry_points} has no console_scripts"
    assert scripts["console_scripts"].get("winslow", "").replace(" ", "") == "reconciler.cli:main"

    # A fresh venv whose dependencies come from this interpreter. --system-site-packages exposes the base
    # interpreter's site-packages; when the tests themselves run in a venv, its site-packages are not among
    # them, so a .pth file adds this interpreter's site folders too (after the venv's own: the wheel wins).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], cwd=tmp_path,
         env=base_env)
    python = venv / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp_path, env=base_env).stdout.strip())
    outer = [p for p in [*site.getsitepackages(), site.getusersitepackages()]
             if Path(p).is_dir() and Path(p).resolve() != REPO_ROOT]
    (purelib / "zz-outer-site-packages.pth").write_text("".join(f"{p}\n" for p in outer))
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--disable-pip-version-check", wheel],
         cwd=tmp_path, env=base_env)

    # Run it from a folder outside the checkout, with a git that reads no user or system config.
    work = tmp_path / "elsewhere"
    home = tmp_path / "home"
    work.mkdir()
    home.mkdir()
    env = dict({k: v for k, v in base_env.items() if not k.startswith("GIT_")},
               HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull)
    winslow = venv / "bin" / "winslow"
    assert winslow.is_file(), f"pip did not install the winslow script into {venv / 'bin'}"

    version = _run([winslow, "--version"], cwd=work, env=env).stdout
    assert version.strip() == f"winslow {wheel.name.split('-')[1]}", version
    _run([winslow, "init", "newrepo"], cwd=work, env=env)
    created = {p.relative_to(work / "newrepo").as_posix() for p in (work / "newrepo").rglob("*")
               if p.is_file() and ".git" not in p.relative_to(work / "newrepo").parts[:1]}
    assert created == _template_files() | {f"schema/{p.name}" for p in SCHEMA_DIR.glob("*.json")}
    _run([winslow, "validate", "newrepo"], cwd=work, env=env)
    _run([python, "-m", "reconciler", "validate", "newrepo"], cwd=work, env=env)

    where = json.loads(_run([python, "-c", (
        "import json, reconciler, reconciler.resources as r; "
        "print(json.dumps({'package': reconciler.__file__, 'schema': str(r.schema_dir()), "
        "'template': str(r.template_dir())}))")], cwd=work, env=env).stdout)
    site_packages = purelib.resolve()
    for key, checkout in (("schema", SCHEMA_DIR), ("template", TEMPLATE_DIR)):
        found = Path(where[key]).resolve()
        assert found != checkout.resolve(), f"{key} comes from the checkout: {found}"
        assert found.is_relative_to(site_packages), f"{key} comes from {found}, not from {site_packages}"
        assert found == site_packages / "reconciler" / "_data" / checkout.name, found
    assert Path(where["package"]).resolve().is_relative_to(site_packages), where["package"]
