"""Chaos and hostile input for longer than the test suite can: tests/test_hostile.py's scenarios, N trials each.

    .venv/bin/python bench/chaos.py                            # 3 trials of each scenario, seed 17
    .venv/bin/python bench/chaos.py --trials 10 --seed 5       # more trials, another seed
    .venv/bin/python bench/chaos.py --only faults --seconds 180
    .venv/bin/python bench/chaos.py --only workspaces --trial 4 --seed 5   # replay one trial
    .venv/bin/python bench/chaos.py --keep                     # keep each trial's folder

Each trial runs real `winslow node` processes (process executor, a secret folder) on a local
bare remote, exactly as the tests do, with bigger draws: more hostile workspaces and a larger
sparse file, more random env values, and a longer stretch of node kills, freezes, git outages
and user pushes. After each trial it checks the invariants the tests check and prints the
figures. A fourth scenario, `takeover`, times one fault at a time: the node running a stage is
killed, or frozen past the node timeout, and the other node takes the stage over. At the end it
prints the takeover times (the fault to the retry's first mark), min/median/max, for those
single faults and for the faults amid the chaos, with nodes on `--heartbeat 1s
--node-timeout 6s --lease 4s` as tests/cluster.py starts them.
A trial that breaks an invariant is reported with the line that replays it (and the figures it
gathered), and the run goes on; the exit status is 1 if any did. Unlike the tests, it draws the
cases of known defects too (`KNOWN_DEFECTS` in the test file) unless `--skip-known`. It needs
the test dependencies (pytest, PyYAML, psutil): run it with the checkout's .venv.
"""
from __future__ import annotations

import argparse
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _host import describe  # bench/ is the script's folder: its first import path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests import test_hostile as hostile  # noqa: E402
from tests.cluster import wait_for  # noqa: E402

CHECKED = {
    "workspaces": "each stage's exit code recorded as it chose; its manifest lists what it could and names what it "
                  "could not, never following a link out; no child outlives its stage; the secret (or a half) and "
                  "bytes of /etc/passwd or of a file linked from a workspace or a log never reach an object of the "
                  "remote; nodes write only below projects/<safe id>/ and the storage root; a later project still runs",
    "projects": "hostile env values reach stages as data (byte for byte, in sh -c and in argv) and run nothing; "
                "values that leave the resource pool and unsafe folder names (.., .git, -rf, ...) are INVALID and get "
                "nothing written; nothing of /etc/passwd or the secret on the remote; a later project still runs",
    "faults": "at most one live copy of each long stage (marks never overlap); every exit recorded as chosen or as "
              "the node's stop; no pushed user commit lost; main only fast-forwarded (its reflog and the tips seen); "
              "no secret on the remote; every node still beating and a project pushed last still runs",
    "takeover": "one fault at a time: the node running a stage is killed (SIGKILL, not restarted) or frozen "
                "(SIGSTOP past the node timeout, then SIGCONT); the other node must take the stage over, and the "
                "first copy must end before the retry begins",
}


def takeover(root: Path, rng: random.Random, figures: dict[str, Any]) -> None:
    """Two nodes, one long stage; kill its node, then (a fresh cluster) freeze it: each fault alone, timed."""
    for fault in (signal.SIGKILL, signal.SIGSTOP):
        ended, retry = one_takeover(root / fault.name, rng, fault)
        figures.setdefault("takeovers s", []).append(("kill" if fault == signal.SIGKILL else "long-freeze", retry))
        figures[f"{fault.name}: first copy ended after s"] = ended
        figures[f"{fault.name}: retry began after s"] = retry


def one_takeover(folder: Path, rng: random.Random, fault: signal.Signals) -> tuple[float, float]:
    """Seconds from the fault to the end of the struck copy, and to the retry's first mark."""
    harness = hostile.Harness(folder, hostile.secret_value(rng))
    marks = harness.outside / "marks"
    harness.write({"pipelines/long.yaml": hostile.LONG,
                   "projects/c0/project.yaml": hostile.project_yaml("long", {"MARKS": str(marks)})})
    for name in ("n1", "n2"):
        harness.start(name)
    try:
        held = wait_for(lambda: hostile.holders_of(harness, ["c0"]).get("c0"), 30, "the stage to start")
        assert isinstance(held, tuple)
        node, run = held
        wait_for(lambda: len(marks.read_text().splitlines()) >= 5, 15, "the stage's first marks")
        time.sleep(rng.uniform(0, 1))  # anywhere in the heartbeat's period
        struck = time.time()
        harness.nodes[node].signal(fault)
        wait_for(lambda: len(hostile.spans(marks)) >= 2, 60, "the new attempt's first mark")
        if fault == signal.SIGSTOP:
            time.sleep(1)
            harness.nodes[node].signal(signal.SIGCONT)  # thawed, it must not bring its copy back
        time.sleep(2)
    finally:
        harness.stop()
    found = hostile.spans(marks)
    assert not hostile.overlaps(found), f"{fault.name}: two copies alive at once: {hostile.overlaps(found)}"
    retry = min(first for other, (first, _) in found.items() if other != run)
    return round(found[run][1] - struck, 2), round(retry - struck, 2)


Scenario = Callable[[Path, random.Random, dict[str, Any]], object]


def scenarios(args: argparse.Namespace) -> dict[str, Scenario]:
    known = not args.skip_known
    return {
        "workspaces": lambda root, rng, figures: figures.update(hostile.hostile_workspaces(
            root, rng, projects=args.projects, sparse_gb=args.sparse_gb, known=known)),
        "projects": lambda root, rng, figures: figures.update(hostile.hostile_projects(root, rng, drawn=args.values)),
        "faults": lambda root, rng, figures: hostile.node_faults(root, rng, seconds=args.seconds, users_push=10 ** 6,
                                                                 known=known, figures=figures),
        "takeover": takeover,
    }


def run_trial(name: str, scenario: Scenario, seed: int, trial: int, keep: bool) -> tuple[dict[str, Any], bool, float]:
    """The trial's figures (those gathered before a violation too), whether it kept every invariant, and its seconds."""
    root = Path(tempfile.mkdtemp(prefix=f"winslow-chaos-{name}-"))
    began = time.monotonic()
    figures: dict[str, Any] = {}
    ok = True
    try:
        scenario(root, random.Random(f"{seed}/{name}/{trial}"), figures)  # the tests' derivation of a trial's draws
    except Exception:  # noqa: BLE001 - a broken invariant is a finding to report, and the next trial still runs
        ok = False
        print(f"  BROKEN: {name} trial {trial}; replay: .venv/bin/python bench/chaos.py --only {name} --seed {seed} "
              f"--trial {trial} --keep")
        print("    " + traceback.format_exc(limit=1).strip().replace("\n", "\n    ")[-3000:])
    finally:
        if keep:
            print(f"  kept {root}")
        else:
            subprocess.run(["rm", "-rf", "--", str(root)], check=False)  # workspaces thousands of folders deep
    return figures, ok, time.monotonic() - began


def spread(values: list[float]) -> str:
    if not values:
        return "none"
    return (f"min {min(values):.1f} s, median {statistics.median(values):.1f} s, max {max(values):.1f} s "
            f"(n={len(values)})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="trials of each scenario (default 3)")
    parser.add_argument("--trial", type=int, help="run only this trial number (to replay one)")
    parser.add_argument("--seed", type=int, default=hostile.SEED, help=f"the seed of every draw (default {hostile.SEED})")
    parser.add_argument("--only", choices=sorted(CHECKED), action="append", help="run only this scenario (repeatable)")
    parser.add_argument("--projects", type=int, default=10, help="hostile workspaces per trial (default 10)")
    parser.add_argument("--sparse-gb", type=int, default=4, help="size of the sparse file one stage leaves (default 4)")
    parser.add_argument("--values", type=int, default=20, help="random env values per trial (default 20)")
    parser.add_argument("--seconds", type=float, default=90, help="seconds of faults and pushes per trial (default 90)")
    parser.add_argument("--keep", action="store_true", help="keep each trial's folder (remote, storage, node logs)")
    parser.add_argument("--skip-known", action="store_true",
                        help="leave out the cases of known defects (tests/test_hostile.py KNOWN_DEFECTS), as the tests do")
    args = parser.parse_args()
    if shutil.which("git") is None:
        parser.error("git is not installed")
    print(describe(f"git {subprocess.run(['git', '--version'], capture_output=True, text=True).stdout.split()[-1]}"))
    print(f"seed {args.seed}; nodes: --heartbeat 1s --node-timeout {hostile.NODE_TIMEOUT_S:.0f}s "
          f"--lease {hostile.LEASE_S:.0f}s --poll 1s (tests/cluster.py)")
    known = ", ".join(hostile.KNOWN_DEFECTS)
    print(f"known defects ({known}): {'left out' if args.skip_known else 'drawn too (--skip-known leaves them out)'}")
    trials = [args.trial] if args.trial is not None else list(range(args.trials))
    failed = 0
    takeovers: dict[tuple[str, str], list[float]] = {}
    faults: dict[str, int] = {}
    for name, scenario in scenarios(args).items():
        if args.only and name not in args.only:
            continue
        print(f"\n== {name}: {CHECKED[name]}")
        for trial in trials:
            figures, ok, seconds = run_trial(name, scenario, args.seed, trial, args.keep)
            failed += not ok
            for kind, took in figures.pop("takeovers s", []):
                takeovers.setdefault((name, kind), []).append(took)
            for kind in figures.pop("faults", []):
                faults[kind] = faults.get(kind, 0) + 1
            print(f"  trial {trial}: {'ok' if ok else 'BROKEN'} in {seconds:.0f} s: "
                  + ", ".join(f"{k} {v}" for k, v in figures.items()))
    if faults:
        print("\nfaults dealt in the faults scenario: " + ", ".join(f"{k} {n}" for k, n in sorted(faults.items())))
    if takeovers:
        print("takeover: from the fault on the node running a stage to the retry's first mark")
        for (name, kind), times in sorted(takeovers.items()):
            what = "SIGKILL" if kind == "kill" else "SIGSTOP past the node timeout"
            where = "alone" if name == "takeover" else "amid other faults and pushes"
            print(f"  {what}, {where}: {spread(times)}")
        print(f"  (its floor is the node timeout, {hostile.NODE_TIMEOUT_S:.0f} s, after the node's last beat; amid "
              "faults, a killed node restarted within its lease adopts its stage and counts no takeover)")
    print(f"\n{len(trials) * len(args.only or CHECKED) - failed} trials kept every invariant, {failed} broke one")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
