"""The seams hold: decide is pure by import, the read path only reads, the reconciler never imports the viewer."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# What the pure decision may bring along: plain data and pure functions only.
PURE = {"reconciler", "reconciler.buildplan", "reconciler.clock", "reconciler.decide", "reconciler.errors", "reconciler.facts",
        "reconciler.layout", "reconciler.model", "reconciler.placement", "reconciler.progress",
        "reconciler.snapshot", "reconciler.units"}
# Modules that do I/O of any kind; none of them may come with the pure decision.
IO_MODULES = {"subprocess", "socket", "yaml", "docker", "psutil", "jsonschema", "jsonschema_rs", "pynvml",
              "watchfiles", "shutil", "tempfile"}
# Modules that write to git or run stages; the read path must not bring any of them.
WRITERS = {"reconciler.gitsync", "reconciler.node", "reconciler.journal", "reconciler.report",
           "reconciler.resume", "reconciler.edit", "reconciler.storage", "reconciler.secrets", "reconciler.heartbeat",
           "reconciler.commands.change", "docker", "psutil", "pynvml"}


def loaded_by(module: str) -> set[str]:
    """The modules a fresh interpreter has after importing `module`, minus those it starts with."""
    code = ("import json, sys; before = set(sys.modules); import " + module +
            "; print(json.dumps(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


def test_importing_decide_progress_and_placement_loads_no_module_that_does_io() -> None:
    for module in ("reconciler.decide", "reconciler.progress", "reconciler.placement"):
        loaded = loaded_by(module)
        ours = {m for m in loaded if m.startswith("reconciler")}
        assert ours <= PURE, f"{module} brings {sorted(ours - PURE)}"
        assert not loaded & IO_MODULES, f"{module} brings {sorted(loaded & IO_MODULES)}"


def test_the_read_path_imports_nothing_that_writes_runs_or_loops() -> None:
    loaded = loaded_by("reconciler.repoview")
    assert "reconciler.repoview" in loaded and "reconciler.gitread" in loaded
    assert not loaded & WRITERS, f"the read path brings {sorted(loaded & WRITERS)}"
    assert not {m for m in loaded if m.startswith("reconciler.executors")}


def test_nothing_in_the_reconciler_imports_the_viewer() -> None:
    offenders = []
    for path in sorted((REPO / "reconciler").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name == "viewer" or name.startswith("viewer.") for name in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
