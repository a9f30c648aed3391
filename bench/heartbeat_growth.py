"""How much one idle node adds to the remote per day through its heartbeat branch.

Runs a node (process executor, no work) against a local bare remote with a fast
heartbeat, measures the remote's object store after N beats, and scales to a day of
beats at the default 5 s interval. Unreachable objects count: a git server keeps
them for two weeks unless it prunes sooner.

    python bench/heartbeat_growth.py [--beats 120] [--interval 0.25]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reconciler.commands.init import init_repo  # noqa: E402
from reconciler.gitcmd import IDENTITY  # noqa: E402


def object_bytes(repo: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(repo / "objects"):
        total += sum((Path(dirpath) / name).stat().st_size for name in filenames)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beats", type=int, default=120)
    parser.add_argument("--interval", type=float, default=0.25, help="heartbeat interval for the run (seconds)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="winslow-hb-") as tmp:
        root = Path(tmp)
        init_repo(root / "clone", root / "remote.git")
        remote = root / "remote.git"
        before = object_bytes(remote)
        node = subprocess.Popen([sys.executable, "-m", "reconciler", "node", "--repo", str(remote), "--storage",
                                 str(root / "storage"), "--name", "idle", "--executor", "process", "--work",
                                 str(root / "work"), "--heartbeat", str(args.interval), "--lease", "30s"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **IDENTITY})
        try:
            deadline = time.monotonic() + args.beats * args.interval * 4 + 30
            ticks = 0
            while time.monotonic() < deadline and ticks < args.beats:
                time.sleep(1)
                out = subprocess.run(["git", "--git-dir", str(remote), "show", "winslow/nodes/idle:nodes/idle.tick"],
                                     capture_output=True, text=True).stdout.strip()
                ticks = int(out) if out.isdigit() else 0
        finally:
            node.terminate()
            node.wait(timeout=20)
        grown = object_bytes(remote) - before
        commits = int(subprocess.run(["git", "--git-dir", str(remote), "rev-list", "--count", "winslow/nodes/idle"],
                                     capture_output=True, text=True).stdout.strip() or 0)
        subprocess.run(["git", "--git-dir", str(remote), "gc", "-q", "--prune=now"], check=True)
        after_gc = object_bytes(remote) - before
    per_beat = grown / max(ticks, 1)
    per_day = per_beat * 86400 / 5
    print(f"beats: {ticks}, commits on the branch now: {commits}")
    print(f"remote objects grew {grown / 1024:.1f} KiB ({per_beat:.0f} B per beat, loose, unreachable ones included)")
    print(f"at one beat per 5 s: {per_day / 2**20:.1f} MiB per node-day before the server prunes; "
          f"{after_gc / 1024:.1f} KiB stay after `git gc --prune=now`")


if __name__ == "__main__":
    main()
