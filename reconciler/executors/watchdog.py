"""The Docker executor's watchdog: a small process beside the node that ends its containers when the node cannot.

    python -m reconciler.executors.watchdog --node NAME --cluster ID --work DIR

A node killed (`kill -9`, an OOM kill of the node alone) or frozen (SIGSTOP, a paused
VM) cannot stop its own containers, and the others start its runs again once its node
timeout has passed. The watchdog lives outside the node process: it reads the node's
lease file (renewed with each heartbeat the node pushes) every second, and once the
lease has run out it stops every container of that node (`docker stop`, TERM then KILL
after a grace) and leaves why in `DIR/lapsed/<container name>`, so the node, when it comes
back, records those runs LOST and not FAILED. The lease is shorter than the node timeout:
the containers end before any other node may take their runs over. A lease file that
cannot be read (gone with the work folder, a failing disk) leaves the last time read standing.

One watchdog per node and work folder (its pid in `DIR/watchdog.pid`). It ends itself
once the lease has lapsed and no container of the node is left; a node that starts
again starts a new one. It never touches another node's or another cluster's containers.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from reconciler.executors._wrap import Lease
from reconciler.fencing import FENCED, LEASE_FILE

CHECK_S = 1.0
STOP_GRACE_S = 10
PIDFILE = "watchdog.pid"
LAPSED = "lapsed"  # folder of notes, one per container the watchdog stopped


def _containers(node: str, cluster: str) -> list[str]:
    labels = ["--filter", f"label=winslow.node={node}"] + (["--filter", f"label=winslow.cluster={cluster}"]
                                                            if cluster else [])
    out = subprocess.run(["docker", "ps", "--format", "{{.Names}}", *labels], capture_output=True,
                         text=True, timeout=30, check=False)
    return [name for name in out.stdout.split() if name]


def watch(node: str, cluster: str, work: Path) -> int:
    lease = Lease(str(work / LEASE_FILE))
    notes = work / LAPSED
    temp = work / f".{PIDFILE}.{os.getpid()}"
    temp.write_text(f"{os.getpid()}\n")
    os.replace(temp, work / PIDFILE)  # the newest watchdog of this work folder is the one
    while True:
        if not _still_me(work):
            return 0  # a newer watchdog took over
        expired = lease.lapsed()
        if expired is not None:
            try:
                names = _containers(node, cluster)
            except (OSError, subprocess.SubprocessError):
                names = None  # the engine does not answer: try again
            if names == []:
                return 0  # nothing left to guard; a node that comes back starts a new watchdog
            if names:
                why = (f"{FENCED}the lease of {node} ran out at {time.strftime('%H:%M:%S', time.gmtime(expired))} "
                       f"UTC (the node stopped or froze); its watchdog stopped the container before another node "
                       f"may take the run over")
                notes.mkdir(parents=True, exist_ok=True)
                for name in names:
                    (notes / name).write_text(why + "\n")
                subprocess.run(["docker", "stop", "-t", str(STOP_GRACE_S), *names], capture_output=True,
                               timeout=STOP_GRACE_S + 60, check=False)
                print(f"winslow watchdog: stopped {', '.join(names)}: {why}", flush=True)
        time.sleep(CHECK_S)


def _still_me(work: Path) -> bool:
    try:
        return int((work / PIDFILE).read_text().strip()) == os.getpid()
    except (OSError, ValueError):
        return False


def ensure(node: str, cluster: str, work: Path) -> int:
    """Start the node's watchdog unless one is running already; returns its pid."""
    pidfile = work / PIDFILE
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"reconciler.executors.watchdog" in cmdline and f"{node}".encode() in cmdline:
            return pid
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "watchdog.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "reconciler.executors.watchdog", "--node", node,
                                 "--cluster", cluster, "--work", str(work)], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, close_fds=True,
                                cwd=str(Path(__file__).resolve().parents[2]))
    return proc.pid


def note(work: Path, container: str) -> str | None:
    """Why the watchdog stopped this container, if it did (read once: the note is removed)."""
    path = work / LAPSED / container
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    path.unlink(missing_ok=True)
    return text or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reconciler.executors.watchdog", description=__doc__)
    parser.add_argument("--node", required=True)
    parser.add_argument("--cluster", default="")
    parser.add_argument("--work", required=True, type=Path)
    args = parser.parse_args(argv)
    return watch(args.node, args.cluster, args.work)


if __name__ == "__main__":
    sys.exit(main())
