"""How long `winslow validate` takes on a state repo of 10,000 projects, next to the physical floor.

    python3 bench/validate_10k.py                 # generate in a temp dir, 3 runs each, print a table
    python3 bench/validate_10k.py --dir /tmp/big  # generate there (or reuse it if it is already there)
    python3 bench/validate_10k.py --profile       # also cProfile one in-process validation

The repo is realistic: a handful of pipelines, 10,000 projects, a fifth of them with a
status.yaml of several runs (and a pipeline lock and result manifests), as a busy
cluster leaves them. Three timings, each the median of --runs runs, page cache warm:

- validate: `python -m reconciler validate DIR`, wall clock, a fresh process each time;
- read:     every file that validate reads, opened and read whole (what `cat` does);
- yaml:     the same files read and loaded with PyYAML's CSafeLoader (`yaml.load`).

Target: validate under 10 s.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _host import describe  # bench/ is the script's folder: its first import path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = REPO_ROOT / "state-repo-template"
TARGET_S = 10.0
HEX = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
PIPELINES = {"tracking": ["detect", "cleanup", "analyse"], "demo": ["detect", "track", "analyse"],
             "counting": ["decode", "count"], "calibration": ["undistort", "stitch", "detect", "export"],
             "reidentify": ["embed", "match", "report"]}


def pipeline_yaml(name: str, stages: list[str]) -> str:
    lines = [f"name: {name}", f"description: Benchmark pipeline {name}.", "stages:"]
    for i, stage in enumerate(stages):
        lines += [f"  - name: {stage}", "    image: tracker:1.4",
                  f"    command: [java, -jar, /app/tracker.jar, {stage}, \"/resources/${{VIDEO}}\"]",
                  f"    env: {{STAGE_MODE: {stage}}}",
                  f"    resources: {{gpus: {1 if i == 0 else 0}, cpus: 4, memory: {8 * (i + 1)}GiB}}",
                  "    timeout: 12h", "    retries: 1", f"    pause_after: {'true' if i == 0 else 'false'}"]
    return "\n".join(lines) + "\n"


def project_yaml(i: int, pipeline: str, stages: list[str]) -> str:
    return (f"name: Intersection {i}\n"
            f"description: Drone flight {i} over an intersection.\n"
            f"pipeline: {pipeline}\n"
            f"tags: [city-{i % 40}, drone, batch-{i // 1000}]\n"
            f"env: {{VIDEO: flights/{i:05d}/DJI_0001.MP4, LANES: '{2 + i % 4}'}}\n"
            f"run:\n  request: {1 + i % 3}\n  from: {stages[0]}\n  until: {stages[-1]}\n  state: running\n")


def status_yaml(project: str, stages: list[str], request: int) -> str:
    out = ["state: WAITING", "message: waiting for approval", f"observed_request: {request}",
           "request:", f"  number: {request}", f"  from: {stages[0]}", f"  until: {stages[-1]}",
           "  step: false", f"  next: {stages[1]}", "  since: '2024-05-01T10:00:00+00:00'",
           "  env: {VIDEO: flights/x/DJI_0001.MP4}", "updated: '2024-05-01T12:00:00+00:00'", "runs:"]
    for req in range(1, request + 1):
        for stage in stages[:2]:
            rid = f"{req}-{stage}-1"
            out += [f"  - id: {rid}", f"    request: {req}", f"    stage: {stage}", "    attempt: 1",
                    "    state: SUCCEEDED", "    node: gpu-box-1", "    gpus: [0]",
                    "    claimed: '2024-05-01T10:00:00+00:00'", "    started: '2024-05-01T10:00:01+00:00'",
                    "    finished: '2024-05-01T11:00:00+00:00'", "    exit_code: 0", "    image: tracker:1.4",
                    f"    image_digest: sha256:{HEX}", "    env: {VIDEO: flights/x/DJI_0001.MP4, STAGE_MODE: x}",
                    f"    workspace: workspaces/{project}/{rid}", f"    log: projects/{project}/logs/{rid}.log",
                    f"    result: projects/{project}/results/{rid}.yaml", "    events:",
                    "      - {time: '2024-05-01T10:00:00+00:00', message: claimed by gpu-box-1}",
                    "      - {time: '2024-05-01T10:00:01+00:00', message: container started}",
                    "      - {time: '2024-05-01T11:00:00+00:00', message: exited 0}"]
    return "\n".join(out) + "\n"


def lock_yaml(pipeline: str, stages: list[str], request: int) -> str:
    body = "".join("  " + line + "\n" for line in pipeline_yaml(pipeline, stages).splitlines())
    return f"request: {request}\nsource: pipelines/{pipeline}.yaml\ncommit: null\npipeline:\n{body}"


def result_yaml(project: str, rid: str) -> str:
    files = "".join(f"  - {{path: out/part-{k}.csv, size: {1000 + k}, sha256: {HEX}}}\n" for k in range(5))
    return (f"project: {project}\nrun: {rid}\nworkspace: workspaces/{project}/{rid}\n"
            f"total_size: 5010\nfiles:\n{files}")


def generate(root: Path, projects: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(TEMPLATE / "winslow.yaml", root / "winslow.yaml")
    (root / "pipelines").mkdir(exist_ok=True)
    for name, stages in PIPELINES.items():
        (root / "pipelines" / f"{name}.yaml").write_text(pipeline_yaml(name, stages))
    names = list(PIPELINES)
    for i in range(projects):
        project = f"p{i:05d}"
        pipeline = names[i % len(names)]
        stages = PIPELINES[pipeline]
        folder = root / "projects" / project
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "project.yaml").write_text(project_yaml(i, pipeline, stages))
        if i % 5 == 0:  # a fifth have run: status with several runs, a lock, result manifests
            request = 1 + i % 3
            (folder / "status.yaml").write_text(status_yaml(project, stages, request))
            (folder / "pipeline.lock.yaml").write_text(lock_yaml(pipeline, stages, request))
            (folder / "results").mkdir(exist_ok=True)
            for stage in stages[:2]:
                (folder / "results" / f"{request}-{stage}-1.yaml").write_text(result_yaml(project, f"{request}-{stage}-1"))


def yaml_files(root: Path) -> list[Path]:
    found = [root / "winslow.yaml"]
    for top in ("pipelines", "projects"):
        for dirpath, dirnames, filenames in os.walk(root / top):
            dirnames[:] = [d for d in dirnames if d != "logs"]
            found += [Path(dirpath) / f for f in filenames if f.endswith(".yaml")]
    return found


def median_time(runs: int, work) -> tuple[float, object]:
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run_validate(root: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "reconciler", "validate", str(root)], env=env,
                          capture_output=True, text=True)


def read_all(root: Path) -> int:
    total = 0
    for path in yaml_files(root):
        with open(path, "rb") as handle:
            total += len(handle.read())
    return total


def load_all(root: Path) -> int:
    loader = yaml.CSafeLoader
    count = 0
    for path in yaml_files(root):
        with open(path, "rb") as handle:
            yaml.load(handle.read(), Loader=loader)
        count += 1
    return count


def machine() -> str:
    return describe(f"PyYAML {yaml.__version__} ({'libyaml' if yaml.__with_libyaml__ else 'no libyaml'})")


def profile(root: Path, top: int) -> str:
    sys.path.insert(0, str(REPO_ROOT))
    from reconciler.commands.validate import check_dir
    profiler = cProfile.Profile()
    profiler.enable()
    check_dir(root)
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="where to generate the repo (kept; reused if it has projects/)")
    parser.add_argument("--projects", type=int, default=10_000, help="number of projects (default 10000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per timing; the median is shown (default 3)")
    parser.add_argument("--profile", action="store_true", help="also cProfile one in-process validation")
    parser.add_argument("--top", type=int, default=25, help="functions shown by --profile (default 25)")
    args = parser.parse_args()

    scratch = None
    if args.dir is None:
        scratch = tempfile.mkdtemp(prefix="winslow-bench-")
        root = Path(scratch) / "repo"
    else:
        root = args.dir
    try:
        if not (root / "projects").is_dir():
            start = time.perf_counter()
            generate(root, args.projects)
            print(f"generated {args.projects} projects in {root} ({time.perf_counter() - start:.1f} s)")
        files = yaml_files(root)
        size = read_all(root)  # also warms the page cache
        check = run_validate(root)
        if check.returncode != 0:
            print(check.stdout[-2000:], check.stderr[-2000:], file=sys.stderr)
            print("the generated repo does not validate clean", file=sys.stderr)
            return 1

        with tempfile.TemporaryDirectory() as empty:
            (Path(empty) / "winslow.yaml").write_text("version: 1\n")  # a folder without it is not a state repo
            startup, _ = median_time(args.runs, lambda: run_validate(Path(empty)))
        validate, _ = median_time(args.runs, lambda: run_validate(root))
        read, _ = median_time(args.runs, lambda: read_all(root))
        load, _ = median_time(args.runs, lambda: load_all(root))

        print(f"machine:  {machine()}")
        print(f"repo:     {len(files)} YAML files, {size / 2**20:.1f} MiB, "
              f"{sum(1 for f in files if f.name == 'project.yaml')} projects, {len(PIPELINES)} pipelines")
        print(f"{'what':<44}{'median s':>10}{'x read':>10}{'x yaml':>10}")
        rows = [("read every file (cat)", read), ("CSafeLoader yaml.load of every file", load),
                ("winslow validate, empty repo (start-up)", startup), ("winslow validate", validate)]
        for name, seconds in rows:
            print(f"{name:<44}{seconds:>10.2f}{seconds / read:>10.1f}{seconds / load:>10.1f}")
        verdict = "meets" if validate < TARGET_S else "MISSES"
        print(f"validate {verdict} the {TARGET_S:.0f} s target ({validate:.2f} s, median of {args.runs})")
        if args.profile:
            print(profile(root, args.top))
        return 0
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
