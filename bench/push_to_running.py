"""From a user's `git push` to the stage's container running, against the physical floor.

Starts one real node (Docker executor) on a local bare remote, then, N times, bumps a
project's request in a user's clone and pushes; the latency is the Docker engine's
`start` event of that run's container minus the moment the push began. The floor,
measured in the same run, is a `git push` of one small commit plus a raw
`docker run -d` of the same image.

    python bench/push_to_running.py [--trials 30]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import docker
from _host import describe  # bench/ is the script's folder: its first import path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reconciler.commands.init import init_repo  # noqa: E402
from reconciler.gitcmd import IDENTITY  # noqa: E402

ENV = {**os.environ, **IDENTITY}
IMAGE = "winslow-test/busybox:1"
PIPELINE = (f"name: quick\nstages:\n  - {{name: s, image: '{IMAGE}', command: ['true'], "
            f"resources: {{cpus: 0.1, memory: 64MiB}}}}\n")


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, env=ENV, check=True, capture_output=True)


def push_request(clone: Path, request: int) -> float:
    """Bump the request as a user would; returns when the successful push began."""
    for _ in range(20):
        git(clone, "fetch", "-q", "origin")
        git(clone, "reset", "-q", "--hard", "origin/main")
        path = clone / "projects/b/project.yaml"
        path.write_text(path.read_text().replace(f"request: {request - 1}", f"request: {request}"))
        git(clone, "commit", "-qam", f"request {request}")
        began = time.time()
        if subprocess.run(["git", "push", "-q", "origin", "main"], cwd=clone, env=ENV, capture_output=True).returncode == 0:
            return began
    sys.exit("the user's push was rejected 20 times")


def ensure_image(client: docker.DockerClient) -> None:
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        sys.exit(f"image {IMAGE} missing: run the test suite once (it builds it) or build it from busybox-static")


def machine() -> str:
    git_version = subprocess.run(["git", "--version"], capture_output=True, text=True).stdout.split()[-1]
    return describe(f"git {git_version}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--node-log", type=Path, help="keep the node's debug log here (phase timings per cycle)")
    parser.add_argument("--projects", type=int, default=1,
                        help="projects in the repo: the measured one plus idle ones (10000: the large-repo figure)")
    args = parser.parse_args()
    client = docker.from_env()
    ensure_image(client)
    with tempfile.TemporaryDirectory(prefix="winslow-bench-") as tmp:
        root = Path(tmp)
        clone, remote = root / "clone", root / "remote.git"
        init_repo(clone, remote)
        (clone / "pipelines/quick.yaml").write_text(PIPELINE)
        (clone / "projects/b").mkdir(parents=True)
        (clone / "projects/b/project.yaml").write_text("pipeline: quick\nrun: {request: 0}\n")
        for i in range(args.projects - 1):  # idle projects: a large repo around the one measured
            (clone / f"projects/idle-{i:05d}").mkdir(parents=True)
            (clone / f"projects/idle-{i:05d}/project.yaml").write_text("pipeline: quick\nrun: {request: 0, state: paused}\n")
        git(clone, "add", "-A")
        git(clone, "commit", "-qm", "bench project")
        git(clone, "push", "-q", "origin", "main")

        started: dict[str, float] = {}
        events = client.events(decode=True, filters={"event": "start", "label": ["winslow.project=b"]})
        arrived = threading.Condition()

        def listen() -> None:
            for event in events:
                with arrived:
                    run = event.get("Actor", {}).get("Attributes", {}).get("winslow.run")
                    started[run] = event["timeNano"] / 1e9
                    arrived.notify_all()

        threading.Thread(target=listen, daemon=True).start()
        log = open(root / "node.log", "wb")
        verbose = ["-v"] if args.node_log else []
        node = subprocess.Popen([sys.executable, "-m", "reconciler", *verbose, "node", "--repo", str(remote), "--storage",
                                 str(root / "storage"), "--name", "bench", "--executor", "docker", "--work",
                                 str(root / "work")], stdout=log, stderr=subprocess.STDOUT, env=ENV)
        latencies, pushes = [], []
        try:
            time.sleep(3)  # the node is up and has seen the empty request
            settle_until = time.monotonic() + 300
            while time.monotonic() < settle_until and subprocess.run(  # a large repo: its first commit lands
                    ["git", "--git-dir", str(remote), "cat-file", "-e", "main:projects/b/status.yaml"],
                    capture_output=True).returncode != 0:
                time.sleep(0.5)
            for request in range(1, args.trials + 1):
                began = push_request(clone, request)
                pushes.append(time.time() - began)
                run = f"{request}-s-1"
                with arrived:
                    if not arrived.wait_for(lambda run=run: run in started, timeout=30):
                        sys.exit(f"run {run} never started; see {root / 'node.log'}")
                latencies.append(started[run] - began)
                if args.node_log:
                    print(f"trial {request}: push began {time.strftime('%H:%M:%S', time.localtime(began))}"
                          f"{began % 1:.3f}"[:-4] + f", container started +{(started[run] - began) * 1000:.0f}ms")
                time.sleep(0.5)  # let the run finish and land
        finally:
            node.terminate()
            node.wait(timeout=20)
            events.close()
            if args.node_log:
                args.node_log.write_bytes((root / "node.log").read_bytes())

        raw = []
        for _ in range(10):
            began = time.time()
            container = client.containers.run(IMAGE, ["true"], detach=True)
            raw.append(time.time() - began)
            container.remove(force=True)

    floor = statistics.median(pushes) + statistics.median(raw)
    median, p95 = statistics.median(latencies), percentile(latencies, 0.95)
    print(f"machine: {machine()}")
    print(f"trials: {len(latencies)}, projects in the repo: {args.projects}")
    print(f"{'measure':<34}{'median':>10}{'p95':>10}")
    print(f"{'git push (user, local remote)':<34}{statistics.median(pushes) * 1000:>8.0f}ms"
          f"{percentile(pushes, .95) * 1000:>8.0f}ms")
    print(f"{'raw docker run -d (busybox)':<34}{statistics.median(raw) * 1000:>8.0f}ms{percentile(raw, .95) * 1000:>8.0f}ms")
    print(f"{'floor: push + docker run':<34}{floor * 1000:>8.0f}ms")
    print(f"{'winslow: push -> container running':<34}{median * 1000:>8.0f}ms{p95 * 1000:>8.0f}ms")
    print(f"ratio to floor (median): {median / floor:.2f}x   target: median < 500 ms, p95 < 1500 ms -> "
          f"{'met' if median < 0.5 and p95 < 1.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
