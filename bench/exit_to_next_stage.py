"""From a stage's exit to the next stage running, when the stage leaves a large workspace.

Starts one real node (process executor: no Docker needed) on a local bare remote and
pushes a project whose pipeline has two stages: the first writes --size-gb of real bytes
(`dd if=/dev/zero bs=4M`, in files of at most 1 GiB) into $WINSLOW_WORKSPACE and exits 0,
the second just exits. From the status the node records on the remote
(`git show main:projects/<p>/status.yaml`) it reports the time between stage 1's
`finished` and stage 2's `started`, and the wall time from the push to the project's
SUCCEEDED on the remote. Whatever the node does between the two stages (today: hashing
the whole workspace for the result manifest) shows up in that gap.

The physical references, measured in the same run on the same files (page cache as the
node found it: just written, so warm when it fits in memory): `sha256sum` of the
workspace (what hashing it costs) and `cat > /dev/null` (what reading it costs). When
the checkout under test has `reconciler/manifests.py`, also `build_manifest()` on the
same workspace, without a cache and then with a warm one.

    python bench/exit_to_next_stage.py [--size-gb 5] [--runs 1] [--keep] [--source DIR]

--source is the checkout whose reconciler the node runs (default: this one), e.g. a
`git worktree` of an older commit for a before/after comparison. Everything it creates
(a temp folder, the node process and any stage process it left) is removed at the end;
--keep leaves the folder (and the node's log) in place and says where.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _host import describe  # bench/ is the script's folder: its first import path

HERE = Path(__file__).resolve().parent.parent
IDENTITY = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@winslow", "GIT_COMMITTER_NAME": "bench",
            "GIT_COMMITTER_EMAIL": "bench@winslow"}
MIB_PER_FILE = 1024
HASHLIB = """\
import hashlib, sys
buffer = memoryview(bytearray(4 << 20))
for name in sys.argv[1:]:
    digest = hashlib.sha256()
    with open(name, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(buffer[:n])
"""
PROJECT = "pipeline: big\nrun: {{request: {request}}}\n"


def pipeline(size_mib: int, image: str = "none") -> str:
    """Stage `write` leaves size_mib MiB (a multiple of 4) in files of at most 1 GiB; stage `next` does nothing."""
    parts, left, i = [], size_mib, 0
    while left > 0:
        count = min(left, MIB_PER_FILE) // 4
        parts.append(f'dd if=/dev/zero of="$WINSLOW_WORKSPACE/part-{i:03}.bin" bs=4M count={count} status=none')
        left -= count * 4
        i += 1
    script = " && ".join(parts) or "true"
    return ("name: big\nstages:\n"
            f"  - name: write\n    image: {image}\n    command: [sh, -c, '{script}']\n"
            f"  - name: next\n    image: {image}\n    command: ['true']\n")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.source = args.source.resolve()
        self.root = Path(tempfile.mkdtemp(prefix="winslow-exit-bench-", dir=args.tmp))
        self.remote, self.clone, self.storage = self.root / "remote.git", self.root / "clone", self.root / "storage"
        path = os.pathsep.join([str(self.source), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.env = {**os.environ, **IDENTITY, "PYTHONPATH": path}
        self.node: subprocess.Popen[bytes] | None = None
        self.node_log = self.root / "node.log"
        self.children: dict[int, float] = {}  # pid -> create time, so a reused pid is never hit

    # -- setup ---------------------------------------------------------------------------------
    def python(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, *args], env=self.env, cwd=self.root, capture_output=True, text=True,
                              **kwargs)

    def git(self, *args: str, cwd: Path | None = None) -> str:
        return subprocess.run(["git", *args], cwd=cwd or self.clone, env=self.env, check=True, capture_output=True,
                              text=True).stdout

    def code_under_test(self) -> str:
        where = self.python("-c", "import reconciler; print(reconciler.__file__)").stdout.strip()
        if not where or not Path(where).resolve().is_relative_to(self.source):
            sys.exit(f"the node would not run {self.source}'s reconciler (it imports {where or 'nothing'}); "
                     "is the folder a checkout of Winslow?")
        try:
            commit = self.git("rev-parse", "--short", "HEAD", cwd=self.source).strip()
            dirty = " + uncommitted changes" if self.git("status", "--porcelain", "--untracked-files=no",
                                                         "reconciler", cwd=self.source).strip() else ""
        except subprocess.CalledProcessError:
            commit, dirty = "not a git checkout", ""
        return f"{Path(where).parent} ({commit}{dirty})"

    def setup(self) -> None:
        made = self.python("-m", "reconciler", "init", str(self.clone), "--remote", str(self.remote))
        if made.returncode:
            sys.exit(f"winslow init failed: {made.stderr.strip()}")
        size_mib = max(4, int(round(self.args.size_gb * 256)) * 4)
        (self.clone / "pipelines").mkdir(exist_ok=True)
        image = self.args.image if self.args.executor == "docker" else "none"
        (self.clone / "pipelines/big.yaml").write_text(pipeline(size_mib, image))
        self.git("add", "-A")
        self.git("commit", "-qm", "bench pipeline")
        self.git("push", "-q", "origin", "main")

    def start_node(self) -> None:
        log = open(self.node_log, "wb")
        self.node = subprocess.Popen([sys.executable, "-m", "reconciler", "node", "--repo", str(self.remote),
                                      "--storage", str(self.storage), "--name", "bench", "--executor", self.args.executor,
                                      "--work", str(self.root / "work")],
                                     stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root)
        log.close()
        time.sleep(3)  # the node is up and has fetched once
        if self.node.poll() is not None:
            sys.exit(f"the node exited at once:\n{self.node_log.read_text(errors='replace')[-3000:]}")

    # -- one run -------------------------------------------------------------------------------
    def push_project(self, project: str) -> float:
        for _ in range(20):
            self.git("fetch", "-q", "origin")
            self.git("reset", "-q", "--hard", "origin/main")
            (self.clone / "projects" / project).mkdir(parents=True, exist_ok=True)
            (self.clone / "projects" / project / "project.yaml").write_text(PROJECT.format(request=1))
            self.git("add", "-A")
            self.git("commit", "-qm", f"bench {project}")
            began = time.time()
            if subprocess.run(["git", "push", "-q", "origin", "main"], cwd=self.clone, env=self.env,
                              capture_output=True).returncode == 0:
                return began
        sys.exit("the push was rejected 20 times")

    def status(self, project: str) -> dict[str, Any]:
        shown = subprocess.run(["git", "--git-dir", str(self.remote), "show", f"main:projects/{project}/status.yaml"],
                               capture_output=True, text=True)
        return (yaml.safe_load(shown.stdout) or {}) if shown.returncode == 0 else {}

    def remember_children(self) -> None:
        """The node's descendants (stages run in their own process group and may outlive it)."""
        if self.node is None:
            return
        try:
            import psutil
            for child in psutil.Process(self.node.pid).children(recursive=True):
                self.children.setdefault(child.pid, child.create_time())
        except Exception:  # noqa: BLE001 - psutil missing or the node gone: nothing to remember
            pass

    def run_once(self, number: int) -> dict[str, float]:
        project = f"big{number}"
        deadline = time.monotonic() + 120 + 120 * self.args.size_gb
        began = self.push_project(project)
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            self.remember_children()
            status = self.status(project)
            if status.get("state") in ("SUCCEEDED", "FAILED", "INVALID"):
                break
            if self.node is not None and self.node.poll() is not None:
                sys.exit(f"the node died; its log: {self.node_log}")
            time.sleep(0.2)
        landed = time.time()
        if status.get("state") != "SUCCEEDED":
            raise RuntimeError(f"project {project} ended {status.get('state', 'nowhere')} "
                               f"(status: {status}); node log: {self.node_log}")
        runs = {run["stage"] if "stage" in run else run["id"].split("-")[1]: run for run in status["runs"]}
        write, after = runs["write"], runs["next"]
        figures = {
            "write": stamp(write["finished"]) - stamp(write["started"]),
            "gap": stamp(after["started"]) - stamp(write["finished"]),
            "wall": landed - began,
        }
        workspace = self.storage / "workspaces" / project / write["id"]
        files = sorted(str(p) for p in workspace.iterdir())
        size = sum(os.path.getsize(p) for p in files)
        figures["bytes"] = size
        figures["cat"] = timed(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files])
        figures["sha256sum"] = timed(["sha256sum", *files])
        if shutil.which("openssl"):
            figures["openssl"] = timed(["openssl", "dgst", "-sha256", *files])
        figures["hashlib"] = timed([sys.executable, "-c", HASHLIB, *files])
        figures.update(self.manifest_reference(workspace))
        if not self.args.keep:
            shutil.rmtree(self.storage / "workspaces" / project, ignore_errors=True)
        return figures

    def manifest_reference(self, workspace: Path) -> dict[str, float]:
        if not (self.source / "reconciler" / "manifests.py").exists():
            return {}
        code = ("import sys, time\nfrom reconciler.manifests import HashCache, build_manifest\n"
                "cache = HashCache(racy_s=0)\n"
                "for c in (None, cache, cache):\n"
                "    t = time.perf_counter(); build_manifest(sys.argv[1], 'w', cache=c)\n"
                "    print(time.perf_counter() - t)\n")
        done = self.python("-c", code, str(workspace))
        if done.returncode:
            print(f"build_manifest failed: {done.stderr.strip()[-500:]}", file=sys.stderr)
            return {}
        times = [float(x) for x in done.stdout.split()]
        return {"manifest_cold": times[0], "manifest_warm": times[2]}

    # -- the end -------------------------------------------------------------------------------
    def cleanup(self) -> None:
        if self.node is not None:
            self.remember_children()
            if self.node.poll() is None:
                self.node.send_signal(signal.SIGTERM)
                try:
                    self.node.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.node.kill()
                    self.node.wait(timeout=5)
        for pid, created in sorted(self.children.items()):  # a stage the node left behind: by PID, if still it
            try:
                import psutil
                process = psutil.Process(pid)
                if process.create_time() == created:
                    process.kill()
            except Exception:  # noqa: BLE001 - gone already, or psutil missing
                pass
        if self.args.keep:
            print(f"kept: {self.root} (node log: {self.node_log})")
        else:
            shutil.rmtree(self.root, ignore_errors=True)


def stamp(text: str) -> float:
    return dt.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()


def timed(command: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return describe(f"{memory:.0f} GiB memory")


def report(results: list[dict[str, float]], code: str) -> None:
    gib = results[0]["bytes"] / 2**30
    print(f"machine: {machine()}")
    print(f"node code: {code}")
    print(f"workspace: {gib:.2f} GiB in files of at most {MIB_PER_FILE} MiB, written by dd from /dev/zero; "
          f"runs: {len(results)}")
    rows = [("stage 1 writes the workspace", "write", False),
            ("exit -> next stage started", "gap", True),
            ("push -> project SUCCEEDED (wall)", "wall", False),
            ("reference: cat > /dev/null", "cat", True),
            ("reference: sha256sum (coreutils)", "sha256sum", True),
            ("reference: openssl dgst -sha256", "openssl", True),
            ("reference: python hashlib.sha256, 4 MiB", "hashlib", True),
            ("reference: build_manifest, no cache", "manifest_cold", True),
            ("reference: build_manifest, warm cache", "manifest_warm", False)]
    heads = "".join(f"{f'run {i + 1}':>10}" for i in range(len(results)))
    print(f"{'measure':<40}{heads}{'median':>10}{'GiB/s':>8}")
    for label, key, rate in rows:
        values = [r[key] for r in results if key in r]
        if not values:
            continue
        median = statistics.median(values)
        speed = f"{gib / median:>8.2f}" if rate and median > 0 else ""
        print(f"{label:<40}{''.join(f'{v:>9.2f}s' for v in values)}{median:>9.2f}s{speed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=5.0, help="size of the workspace stage 1 leaves (GiB)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--executor", choices=("process", "docker"), default="process",
                        help="docker: both stages are containers (--image); the figure is then exit to container running")
    parser.add_argument("--image", default="winslow-test/busybox:1", help="the stages' image with --executor docker")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder, the workspaces and the node log")
    parser.add_argument("--source", type=Path, default=HERE, help="checkout whose reconciler the node runs")
    parser.add_argument("--tmp", type=Path, default=None, help="where the temp folder goes (default: $TMPDIR or /tmp)")
    args = parser.parse_args()
    free = shutil.disk_usage(args.tmp or tempfile.gettempdir()).free / 2**30
    if free < args.size_gb * (args.runs if args.keep else 1) + 1:
        sys.exit(f"{free:.1f} GiB free where the temp folder goes: not enough for --size-gb {args.size_gb}")
    bench = Bench(args)
    results = []
    try:
        code = bench.code_under_test()
        bench.setup()
        bench.start_node()
        for number in range(1, args.runs + 1):
            results.append(bench.run_once(number))
    finally:
        bench.cleanup()
    report(results, code)


if __name__ == "__main__":
    main()
