"""`winslow upload` and `download` of a 2 GB file against plain `cp` and `scp` of the same file, in the same run.

    python bench/transfer.py [--size-gb 2] [--rounds 3] [--tmp DIR] [--keep]

The file is real data: a 16 MiB block of random bytes written over and over (nothing
compresses or deduplicates anywhere on the way, so repeating a block costs nothing in
realism). A sparse file would make reading it free, which no video is.

Page cache: the source was just written, so it is read from memory (it fits in RAM
here) by every command alike. Every destination is written into the page cache;
winslow then fsyncs it before the rename (the file is on disk when the command
returns) while plain `cp` and `scp` do not, so `cp + sync` is measured too. `sync`
runs before every measurement, so none pays for the previous one's writeback.

Measured, `--rounds` times each, in an order that alternates between rounds (medians):

  cp                 cp SRC DST on the same disk (GNU cp: copy_file_range, no user-space copy)
  cp + sync          the same, then `sync DST`: as durable as winslow's copy
  read + sha256      Python's hashlib reading SRC once: the floor of any copy that hashes every byte
  upload local       winslow upload SRC --storage ROOT (ROOT on the same disk)
  download local     winslow download resources/bench.bin DST --storage ROOT
  scp up / down      OpenSSH's scp over loopback to a private sshd on 127.0.0.1 (tests/sshd.py)
  upload ssh         winslow upload SRC --storage ssh://127.0.0.1:PORT/ROOT, through the same sshd
  download ssh       winslow download ... --storage ssh://...

Each winslow row is the whole command, interpreter start included, and hashes every
byte (sha256) as it passes; the download is checked against the hash the upload
recorded. The ratios divide the reference's time by winslow's: 1.0 is as fast as `cp`
(or `scp`), and the target is 0.8 or more. CPU is the user + system time of the command
and the children it waited for (not the sshd on the other end): unlike wall time, it
does not grow when other processes share the cores, so it is printed with the load
average before and after.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _host import describe  # bench/ is the script's folder: its first import path

HERE = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(HERE))
from tests.sshd import SshServer  # noqa: E402 - the repository root is on the path only now

BLOCK = 16 * 1024 * 1024
HASHLIB = """\
import hashlib, sys
buffer = memoryview(bytearray(4 << 20))
digest = hashlib.sha256()
with open(sys.argv[1], "rb", buffering=0) as handle:
    while n := handle.readinto(buffer):
        digest.update(buffer[:n])
"""


def write_source(path: Path, size: int) -> None:
    """`size` bytes of random data (one block repeated)."""
    block = os.urandom(BLOCK)
    with open(path, "wb") as handle:
        left = size
        while left:
            left -= handle.write(block[:min(BLOCK, left)])


class Bench:
    def __init__(self, folder: Path, size: int) -> None:
        self.folder = folder
        self.size = size
        self.source = folder / "source.bin"
        self.root = folder / "root"
        self.out = folder / "out"
        self.server = SshServer(folder / "sshd")

    def setup(self) -> None:
        (self.root / "resources").mkdir(parents=True)
        self.out.mkdir()
        write_source(self.source, self.size)
        self.server.prepare()
        self.server.start()
        self.winslow("upload", str(self.source), "bench.bin", "--storage", str(self.root))  # what downloads read

    def cleanup(self) -> None:
        self.server.stop()

    # -- the commands ------------------------------------------------------------------------------
    def winslow(self, *args: str, ssh: bool = False) -> None:
        env = self.server.env() if ssh else None
        done = subprocess.run([sys.executable, "-m", "reconciler", *args, "--quiet"], cwd=HERE, env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"winslow {' '.join(args)} failed: {done.stderr.strip()}")

    def scp(self, *args: str) -> None:
        subprocess.run(["scp", "-q", "-F", str(self.server.client_config), *args], check=True)

    def url(self) -> str:
        return self.server.url(self.root)

    def rows(self) -> dict[str, tuple[Callable[[], None], Path | None]]:
        """name -> (the command, what it writes: removed before it runs)."""
        stored = self.root / "resources/bench.bin"
        uploaded = self.root / "resources/up.bin"
        copied = self.out / "copy.bin"
        return {
            "cp": (lambda: subprocess.run(["cp", str(self.source), str(copied)], check=True), copied),
            "cp + sync": (lambda: subprocess.run(f"cp '{self.source}' '{copied}' && sync '{copied}'", shell=True,
                                                 check=True), copied),
            "read + sha256": (lambda: subprocess.run([sys.executable, "-c", HASHLIB, str(self.source)], check=True),
                              None),
            "upload local": (lambda: self.winslow("upload", str(self.source), "up.bin", "--storage", str(self.root)),
                             uploaded),
            "download local": (lambda: self.winslow("download", "resources/bench.bin", str(copied), "--storage",
                                                    str(self.root)), copied),
            "scp up": (lambda: self.scp(str(self.source), f"127.0.0.1:{uploaded}"), uploaded),
            "scp down": (lambda: self.scp(f"127.0.0.1:{stored}", str(copied)), copied),
            "upload ssh": (lambda: self.winslow("upload", str(self.source), "up.bin", "--storage", self.url(),
                                                ssh=True), uploaded),
            "download ssh": (lambda: self.winslow("download", "resources/bench.bin", str(copied), "--storage",
                                                  self.url(), ssh=True), copied),
        }

    def measure(self, command: Callable[[], None], writes: Path | None) -> tuple[float, float]:
        """Wall and CPU seconds of one run of `command`."""
        if writes is not None:
            writes.unlink(missing_ok=True)
        os.sync()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        command()
        elapsed = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if writes is not None and writes.stat().st_size != self.size:
            raise SystemExit(f"{writes} holds {writes.stat().st_size} bytes, not {self.size}")
        return elapsed, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def report(times: dict[str, list[tuple[float, float]]], size: int, rounds: int) -> None:
    median = {name: statistics.median(wall for wall, _ in values) for name, values in times.items()}
    print(f"{'':16} {'median s':>9} {'GB/s':>6} {'CPU s':>6}   (wall of each of {rounds} rounds, s)")
    for name, value in median.items():
        each = " ".join(f"{wall:.2f}" for wall, _ in times[name])
        cpu = statistics.median(cpu for _, cpu in times[name])
        print(f"{name:16} {value:9.2f} {size / value / 1e9:6.2f} {cpu:6.2f}   ({each})")
    print()
    for winslow, reference in (("upload local", "cp"), ("download local", "cp"), ("upload local", "cp + sync"),
                               ("download local", "cp + sync"), ("upload local", "read + sha256"),
                               ("download local", "read + sha256"), ("upload ssh", "scp up"),
                               ("download ssh", "scp down")):
        ratio = median[reference] / median[winslow]
        print(f"{winslow:15} vs {reference:13} {ratio:5.2f}  {'ok' if ratio >= 0.8 else 'below 0.8'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0, help="size of the file (GiB)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each row (the median is reported)")
    parser.add_argument("--tmp", type=Path, default=None, help="where the temp folder goes (default: $TMPDIR or /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = parser.parse_args()
    size = int(args.size_gb * 2**30)
    free = shutil.disk_usage(args.tmp or tempfile.gettempdir()).free
    if free < 5 * size:
        sys.exit(f"{free / 2**30:.1f} GiB free where the temp folder goes: not enough for --size-gb {args.size_gb}")
    folder = Path(tempfile.mkdtemp(prefix="winslow-bench-transfer-", dir=args.tmp))
    print(describe(f"a {args.size_gb:g} GiB file of random data in {folder} ({_filesystem(folder)})"))
    bench = Bench(folder, size)
    times: dict[str, list[tuple[float, float]]] = {}
    print(f"load average before: {_load()}")
    try:
        bench.setup()
        rows = bench.rows()
        for number in range(args.rounds):
            order = list(rows) if number % 2 == 0 else list(reversed(rows))
            for name in order:
                times.setdefault(name, []).append(bench.measure(*rows[name]))
        times = {name: times[name] for name in rows}
    finally:
        bench.cleanup()
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"load average after:  {_load()}")
    report(times, size, args.rounds)


def _load() -> str:
    return " ".join(f"{n:.2f}" for n in os.getloadavg())


def _filesystem(folder: Path) -> str:
    done = subprocess.run(["df", "--output=fstype,source", str(folder)], capture_output=True, text=True)
    lines = done.stdout.split("\n")
    return " on ".join(lines[1].split()) if done.returncode == 0 and len(lines) > 1 else "unknown filesystem"


if __name__ == "__main__":
    main()
