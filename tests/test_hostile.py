"""Hostile input and chaos under real nodes: a seeded fuzz harness that keeps checking Winslow's invariants.

Every scenario runs real `winslow node` processes (process executor, a `--secrets` folder
holding one secret) against a real remote, with cases drawn from a seeded generator:

1. hostile workspaces: stages that leave symlink loops, links out of the workspace, FIFOs,
   unreadable, sparse multi-GB, deeply nested (past PATH_MAX), oddly named and 10,000+
   files, swap their log or their workspace for a link, a FIFO or a folder, leave children
   behind (deaf to TERM, or out of the group with setsid), print the secret across every
   cut of their log, and exit with a code of their choosing;
2. hostile projects: folder names (`..`, `.git`, `-rf`, ...) and env values a user might
   push to do harm, used in `sh -c` scripts, in argv and as a stage's input path;
3. node faults and user pushes: SIGKILL (and a restart), SIGSTOP/SIGCONT of two nodes and
   outages of the `git daemon` they use, while two users push edits to other projects.

The invariants, checked after every scenario:
- every exit is recorded as it happened: the exit code the stage chose (or, for a run the
  node stopped, the signal it ended by);
- at most one copy of a run is alive at any time (its marks never overlap another's);
- no object of the remote holds the secret, either half of it, bytes of /etc/passwd, or
  bytes of a file of the harness that a workspace or a log links to;
- nodes write nothing on main outside projects/<safe id>/, and nothing on disk outside the
  storage root and their work folder; no hostile value runs as a command;
- no user commit is lost and main is never rewritten;
- a node never stops cycling: it keeps beating, and a project pushed last still runs.

A case that finds a defect not fixed yet is left out of the draws (KNOWN_DEFECTS) and kept
as a strict xfail test of its own. Links a node might write through point at a file of the
harness, never at one of the system: the harness must not harm the machine that runs it.

WINSLOW_FUZZ_SEED=S replays a run (each test prints the seed it drew its cases from);
WINSLOW_FUZZ_TRIALS=N draws N cases of each scenario (default 1, to keep the suite short).
`bench/chaos.py` runs the same scenarios longer and prints figures.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from tests.cluster import GIT_ENV, GitDaemon, NodeProcess, StateRemote, git, wait_for

SEED = int(os.environ.get("WINSLOW_FUZZ_SEED", "17"))
TRIALS = max(1, int(os.environ.get("WINSLOW_FUZZ_TRIALS", "1")))
TOKEN = "FUZZ_TOKEN"  # the secret's name; its value is drawn per scenario
SECRET_LEN = 27
LOG_CUT = 1024  # logs.head, logs.tail and logs.live_tail in the scenarios' winslow.yaml
NODE_TIMEOUT_S, LEASE_S = 6.0, 4.0  # what tests/cluster.py gives every node
MAX_FILES = 10_000  # files one manifest lists at most; beyond them it says it was truncated
LEFTOVER_GRACE_S = 2.0  # the wrapper's TERM-to-KILL grace for what a stage left running
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # a folder name nodes may write under (layout.py)
NODE_OWNED = re.compile(rb"projects/([^/]+)/(?:status\.yaml|pipeline\.lock\.yaml|logs/[^/]+\.log|results/[^/]+\.yaml)\Z")
ROOT_ENTRIES = {"remote.git", "clone", "storage", "work", "secrets", "outside", "users", "daemon.log"}
IS_ROOT = os.geteuid() == 0


def draw(scenario: str, trial: int) -> random.Random:
    """The generator of one trial; its line is what replays a failure."""
    print(f"replay with: WINSLOW_FUZZ_SEED={SEED} (scenario {scenario}, trial {trial})")
    return random.Random(f"{SEED}/{scenario}/{trial}")


def secret_value(rng: random.Random) -> str:
    """A secret without hex digits, so that neither half can turn up inside a sha by chance."""
    letters = "GHJKLMNPQRSTUVWXYZghjkmnpqrstuvwxyz"
    return "".join(rng.choice(letters) for _ in range(13)) + "-" + "".join(rng.choice(letters) for _ in range(13))


def epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def spans(marks: Path) -> dict[str, tuple[float, float]]:
    """Each run's first and last mark (`<run id> <epoch>` lines)."""
    found: dict[str, tuple[float, float]] = {}
    for line in marks.read_text().splitlines() if marks.exists() else ():
        run, _, at = line.partition(" ")
        try:
            when = float(at)
        except ValueError:
            continue  # a line cut by a kill
        first, last = found.get(run, (when, when))
        found[run] = (min(first, when), max(last, when))
    return found


def overlaps(found: dict[str, tuple[float, float]]) -> list[str]:
    """Pairs of runs whose marks interleave: two copies alive at once."""
    ordered = sorted(found.items(), key=lambda item: item[1][0])
    return [f"{a} {sa:.2f}-{ea:.2f} and {b} {sb:.2f}-{eb:.2f}"
            for (a, (sa, ea)), (b, (sb, eb)) in zip(ordered, ordered[1:]) if sb <= ea]


def below(base: Path, relative: str) -> Path:
    """`base/relative` as text is joined (never `Path / "/etc/passwd"`, which is /etc/passwd), refused unless it stays
    below `base`: the harness writes hostile names into its own folders only."""
    path = Path(os.path.normpath(f"{base}/{relative}"))
    if base.resolve() not in path.resolve().parents:
        raise AssertionError(f"harness bug: {relative!r} leaves {base}")
    return path


@dataclass
class Harness:
    """A remote, a user's clone, a storage root, a secret folder and the nodes; what users wrote is noted."""

    root: Path
    secret: str
    remote: StateRemote = field(init=False)
    nodes: dict[str, NodeProcess] = field(default_factory=dict)
    user_paths: set[bytes] = field(default_factory=set)
    repo_url: str | None = None  # where nodes reach the remote (a git daemon), if not its folder

    def __post_init__(self) -> None:
        self.remote = StateRemote(self.root)
        self.storage = self.root / "storage"
        self.outside = self.root / "outside"  # the harness's own files: marks, markers
        self.outside.mkdir()
        # What links out of a workspace or a log point at where a write through them would hurt: a file of the
        # harness, whose bytes must never reach the remote and which must stay as it is.
        self.sentinel = self.outside / "sentinel"
        self.sentinel_text = "".join(f"sentinel line {i} {os.urandom(6).hex()}\n" for i in range(4))
        self.sentinel.write_text(self.sentinel_text)
        secrets = self.root / "secrets"
        secrets.mkdir()
        (secrets / TOKEN).write_text(self.secret + "\n")
        self.user_paths |= set(self.tree_paths("main"))
        git(self.remote.remote, "config", "core.logAllRefUpdates", "always")  # every update of main, in a reflog

    # -- users ------------------------------------------------------------------------------------
    def write(self, files: dict[str, str | None], message: str = "edit") -> None:
        self.user_paths |= {path.encode() for path in files}
        self.remote.write(files, message)

    def settings(self) -> None:
        """Small log cuts, so that a secret printed near one is cut across by it."""
        config = yaml.safe_load(self.remote.read("winslow.yaml") or "") or {}
        config["logs"] = {"head": LOG_CUT, "tail": LOG_CUT, "live_tail": LOG_CUT}
        self.write({"winslow.yaml": yaml.safe_dump(config, sort_keys=False)}, "small log cuts")

    # -- nodes ------------------------------------------------------------------------------------
    def start(self, name: str) -> NodeProcess:
        log = self.root / "work" / f"{name}.log"
        if log.exists():  # a restart: keep what the earlier life logged
            log.rename(log.with_name(f"{name}.{time.monotonic_ns()}.log"))
        node = NodeProcess(name, self.repo_url or self.remote.remote, self.storage, self.root / "work" / name,  # type: ignore[arg-type]
                           extra=("--secrets", str(self.root / "secrets")))
        self.nodes[name] = node
        return node

    def stop(self) -> None:
        """Stop the nodes, then end any stage they left running (a stage outlives its node by design; the harness
        leaves nothing behind): each by the process group its node's run record names."""
        for node in self.nodes.values():
            node.signal(signal.SIGCONT)
            node.stop()
        for record in (self.root / "work").glob("*/processes/*/*.json"):
            try:
                run = json.loads(record.read_text())
                if abs(psutil.Process(int(run["pid"])).create_time() - float(run["create_time"])) < 0.05:  # not reused
                    os.killpg(int(run["pgid"]), signal.SIGKILL)
            except (OSError, ValueError, KeyError, psutil.Error):
                continue

    def logs(self) -> str:
        return "".join(path.read_text(errors="replace") for path in sorted((self.root / "work").glob("*.log")))

    def where(self, projects: Iterable[str]) -> str:
        """Each project's state and runs, and the end of the node logs: what a timeout message needs."""
        lines = []
        for project in projects:
            status = self.remote.status(project)
            runs = [(r["id"], r["state"], r.get("exit_code"), r.get("reason"), bool(r.get("result")))
                    for r in status.get("runs") or []]
            lines.append(f"  {project}: {status.get('state')} {runs}")
        return "\n".join(lines) + "\nnode logs, last lines:\n" + self.logs()[-3000:]

    def beats(self, name: str) -> str | None:
        return self.remote.refs().get(f"refs/heads/winslow/nodes/{name}")

    def assert_cycling(self, names: Iterable[str], timeout: float = 15) -> None:
        """Each node is alive and its heartbeat branch moves."""
        for name in names:
            self._assert_beating(name, timeout)

    def _assert_beating(self, name: str, timeout: float) -> None:
        node = self.nodes[name]
        assert node.proc.poll() is None, f"node {name} ended by itself (exit {node.proc.returncode}):\n{node.log()[-3000:]}"
        before = self.beats(name)
        wait_for(lambda: self.beats(name) != before, timeout, f"the heartbeat of {name} to move")

    # -- what the remote holds --------------------------------------------------------------------
    def tree_paths(self, commit: str) -> list[bytes]:
        out = subprocess.run(["git", "--git-dir", str(self.remote.remote), "ls-tree", "-r", "-z", "--name-only", commit],
                             capture_output=True, check=True).stdout
        return [path for path in out.split(b"\0") if path]

    def objects(self) -> bytes:
        return subprocess.run(["git", "--git-dir", str(self.remote.remote), "cat-file", "--batch-all-objects", "--batch"],
                              capture_output=True, check=True).stdout

    def check_remote(self, forbidden: Iterable[bytes] = ()) -> dict[str, int]:
        """No object holds the secret, a half of it or a forbidden text; nodes wrote only under projects/<safe id>/."""
        blob = self.objects()
        value = self.secret.encode()
        half = len(value) // 2
        for what, needle in (("the secret", value), ("its first half", value[:half]), ("its second half", value[half:])):
            at = blob.find(needle)
            assert at < 0, f"{what} is in an object of the remote: ...{blob[max(0, at - 200):at + 100]!r}..."
        assert self.sentinel.read_text() == self.sentinel_text, "a node wrote through a link to a file outside"
        for needle in (*forbidden, *(line.encode() for line in self.sentinel_text.splitlines())):
            at = blob.find(needle)
            assert at < 0, f"{needle!r} is in an object of the remote: ...{blob[max(0, at - 200):at + 100]!r}..."
        commits = git(self.remote.remote, "log", "--format=%H", "main").split()
        stray = set()
        for commit in commits:
            for path in self.tree_paths(commit):
                if path in self.user_paths:
                    continue
                owned = NODE_OWNED.match(path)
                if owned is None or not SAFE_ID.match(owned.group(1).decode(errors="replace")):
                    stray.add(path)
        assert not stray, f"nodes wrote outside projects/<safe id>/ on main: {sorted(stray)[:20]}"
        return {"objects bytes": len(blob), "commits on main": len(commits)}

    def check_history(self, pushed: Iterable[str] = ()) -> int:
        """Every update of main was a fast-forward (its reflog), and every pushed user commit is on main."""
        chain = git(self.remote.remote, "rev-list", "--first-parent", "main").split()
        position = {sha: i for i, sha in enumerate(chain)}  # 0: the tip
        reflog = self.remote.remote / "logs" / "refs" / "heads" / "main"
        updates = 0
        for line in reflog.read_text().splitlines() if reflog.exists() else ():
            old, new = line.split()[:2]
            updates += 1
            if set(old) == {"0"}:
                continue
            if old in position and new in position and position[new] < position[old]:
                continue
            assert self.ancestor(old, new), f"main was rewritten: {old} -> {new}"
        on_main = set(git(self.remote.remote, "rev-list", "main").split())
        lost = [sha for sha in pushed if sha not in on_main]
        assert not lost, f"user commits lost from main: {lost}"
        return updates

    def ancestor(self, old: str, new: str) -> bool:
        return subprocess.run(["git", "--git-dir", str(self.remote.remote), "merge-base", "--is-ancestor", old, new],
                              capture_output=True).returncode == 0

    def check_disk(self, projects: Iterable[str]) -> None:
        """Nothing outside the storage root and the work folders; in storage, folders only for safe projects."""
        extra = {p.name for p in self.root.iterdir()} - ROOT_ENTRIES
        assert not extra, f"written beside the storage root: {sorted(extra)}"
        tops = {"resources", "workspaces", "logs"}
        assert {p.name for p in self.storage.iterdir()} <= tops | {".winslow"}, sorted(p.name for p in self.storage.iterdir())
        safe = {p for p in projects if SAFE_ID.match(p) and p not in (".", "..")}
        for top in ("workspaces", "logs", ".winslow/sha256/workspaces", ".winslow/sha256/logs"):
            folder = self.storage / top
            found = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
            assert found <= safe, f"storage/{top} has folders for {sorted(found - safe)}"
        records = self.storage / ".winslow" / "sha256"  # Winslow's hash records mirror the storage's own folders
        assert not records.is_dir() or {p.name for p in records.iterdir()} <= tops, sorted(records.iterdir())


# == 1. hostile workspaces ================================================================================

@dataclass
class Act:
    """What a stage does to its workspace (a shell snippet run there) and what its manifest must then say."""

    name: str
    script: str
    listed: dict[str, int | None] = field(default_factory=dict)  # path -> size (None: any)
    named: tuple[str, ...] = ()  # in `files`, `links` or `unlisted`: the manifest says something about it
    unlisted: dict[str, str] = field(default_factory=dict)  # path prefix -> words of the reason
    absent: tuple[str, ...] = ()  # not listed as a file and never followed into
    reached: str | None = None  # a path listed, or named unlisted with one of its folders


def _deep(rng: random.Random) -> Act:
    chunk = "/".join(["n"] * 50)
    rounds = rng.choice([1, 3, 45])  # 45 rounds of 50 levels: a path longer than PATH_MAX
    path = "/".join([chunk] * rounds) + "/bottom.txt"
    script = (f"i=0; while [ $i -lt {rounds} ]; do mkdir -p {chunk} && cd -P {chunk} || exit 9; i=$((i+1)); done;"
              " echo deep > bottom.txt")
    return Act("deep", script, reached=path)


def _odd_names(rng: random.Random) -> Act:
    names = ["new\nline.txt", "back\\slash.txt", "ünï cødé.txt", "-rf", ": colon #hash.txt", "*", "quote'\"both.txt",
             " lead space", "tab\there"]
    picked = rng.sample(names, 5)
    quoted = " ".join("'" + n.replace("'", "'\\''") + "'" for n in picked)
    script = (f"touch -- {quoted}; touch \"$(printf 'bad\\377byte.txt')\"; mkdir \"$(printf 'dir\\376')\";"
              " touch \"$(printf 'dir\\376')/inside.txt\"")
    return Act("odd-names", script, listed={n: 0 for n in picked},
               unlisted={"bad": "UTF-8", "dir": "UTF-8"})


def _unreadable(rng: random.Random) -> Act:
    script = "echo closed > unreadable.txt; chmod 000 unreadable.txt; mkdir locked; echo x > locked/in.txt; chmod 000 locked"
    if IS_ROOT:  # chmod does not stop root's reads: the files are simply listed (test_unreadable_... covers the rest)
        return Act("unreadable", script, listed={"unreadable.txt": 7, "locked/in.txt": 2})
    return Act("unreadable", script, unlisted={"unreadable.txt": "permission denied", "locked": "permission denied"})


def _links_out(rng: random.Random) -> Act:
    script = ('ln -s /etc/passwd passwd; ln -s "$SENTINEL" sentinel; ln -s "$(dirname "$SENTINEL")" outside; ln -s .. up;'
              ' ln -s ../../.. storage; ln -s / slash; ln -s ../../../logs logs')
    return Act("links-out", script, absent=("passwd", "sentinel", "outside", "up", "storage", "slash", "logs"))


ACTS: dict[str, Callable[[random.Random], Act]] = {
    "loop": lambda rng: Act("loop", "ln -s loop-b loop-a; ln -s loop-a loop-b; mkdir sub; ln -s . sub/self",
                            named=("loop-a", "loop-b"), absent=("loop-a", "loop-b", "sub/self")),
    "links-out": _links_out,
    "dangling": lambda rng: Act("dangling", "ln -s nowhere.txt dangling; echo in > real.txt; ln -s real.txt alias",
                                listed={"real.txt": 3}, named=("alias", "dangling"), absent=("dangling",)),
    "fifo": lambda rng: Act("fifo", "mkfifo fifo; mkdir pipes; mkfifo pipes/deep; echo ok > pipes/ok.txt",
                            listed={"pipes/ok.txt": 3}, absent=("fifo", "pipes/deep")),
    "unreadable": _unreadable,
    "deep": _deep,
    "odd-names": _odd_names,
    "secret-file": lambda rng: Act("secret-file", f'echo x > "named-${TOKEN}.txt"; ln -s "named-${TOKEN}.txt" "link-${TOKEN}"'),
    "many": lambda rng: Act("many", f"mkdir many && cd many && seq 1 {MAX_FILES + rng.randint(1, 50)} | xargs touch"),
    # Children left running: in the stage's group, deaf to TERM, and out of the group (setsid).
    "orphan": lambda rng: Act("orphan", _orphan("sh -c")),
    "orphan-deaf": lambda rng: Act("orphan-deaf", _orphan("sh -c", "trap '' TERM; ")),
    "orphan-setsid": lambda rng: Act("orphan-setsid", _orphan("setsid sh -c")),
}


def _orphan(start: str, first: str = "") -> str:
    """A child that marks the time every 0.2 s forever; it notes its pid, so the harness can end it if nobody did."""
    loop = f'{first}echo $$ >> "$LEFTOVER.pid"; while :; do date +%s.%N >> "$LEFTOVER"; sleep 0.2; done'
    return f"{start} '{loop}' & sleep 0.5"


def end_leftovers(pids: Path, leftover: Path) -> None:
    """End the children the stages of this harness left (each by its pid, once it is known to be one of them)."""
    for line in pids.read_text().split() if pids.exists() else ():
        try:
            if f"LEFTOVER={leftover}".encode() in Path(f"/proc/{int(line)}/environ").read_bytes().split(b"\0"):
                os.kill(int(line), signal.SIGKILL)
        except (OSError, ValueError):
            continue


ENDINGS = ("", "log-link", "log-fifo", "log-folder", "workspace-root", "workspace-storage")
# Cases that find a defect not fixed yet: the draws leave them out and each has a strict xfail test of its own
# below, which starts failing (XPASS) once the defect is fixed; then drop the entry here.
KNOWN_DEFECTS: dict[str, str] = {}  # none open


@dataclass
class WorkspaceCase:
    project: str
    acts: list[Act]
    code: int  # the exit code the stage chooses (137: it kills itself)
    ending: str  # "" or what it does to its log or workspace at the very end
    sparse_gb: int
    secret_log: bool
    script: str = ""


def draw_workspace_cases(rng: random.Random, projects: int, sparse_gb: int, known: bool = False) -> list[WorkspaceCase]:
    """`projects` stages; every ending and every act is drawn in each trial (`known`: KNOWN_DEFECTS' too), each act in
    a stage whose workspace stays a folder, so that its manifest is checked."""
    endings = [e for e in ENDINGS if e and (known or e not in KNOWN_DEFECTS)]
    rng.shuffle(endings)
    # The first stage keeps its log and workspace as they are: the secret across its log's cuts is checked there.
    endings = (["", *endings] + [rng.choice(["", *endings]) for _ in range(projects)])[:projects]
    kept = [i for i, ending in enumerate(endings) if not ending.startswith("workspace-")] or [0]
    names = sorted(ACTS)
    rng.shuffle(names)
    shares: list[list[str]] = [[] for _ in range(projects)]
    for j, name in enumerate(names):
        shares[kept[j % len(kept)]].append(name)
    cases = []
    for i in range(projects):
        others = sorted(set(ACTS) - set(shares[i]) - {"many"})  # 10,000 files once is enough
        extra = rng.sample(others, min(len(others), rng.randint(0, 2)))
        acts = [ACTS[name](rng) for name in shares[i] + extra]
        code = rng.choice([0, 0, 1, 2, 3, 42, 77, 125, 126, 127, 137, 255])
        case = WorkspaceCase(f"w{i}", acts, code, endings[i], sparse_gb if i == 0 else 0, i == 0 or rng.random() < 0.6)
        case.script = _workspace_script(case)
        cases.append(case)
    return cases


def _workspace_script(case: WorkspaceCase) -> str:
    lines = ["cd \"$WINSLOW_WORKSPACE\""]
    filler = "head -c {n} /dev/zero | tr '\\0' {c}"
    half = SECRET_LEN // 2
    if case.secret_log:  # the secret across the head cut, then across the live tail's cut while the stage sleeps
        lines += [filler.format(n=LOG_CUT - half, c="a"), f'printf %s "${TOKEN}"',
                  filler.format(n=3 * LOG_CUT, c="b"), f'printf %s "${TOKEN}"',
                  filler.format(n=LOG_CUT - half, c="c"), "sleep 1.5"]  # a heartbeat (1 s) carries that tail
    for act in case.acts:
        lines.append(f"( {act.script} ) </dev/null >/dev/null 2>&1")
    if case.sparse_gb:
        lines.append(f"truncate -s {case.sparse_gb}G sparse.bin")
    log = '"$WINSLOW_WORKSPACE/../../../logs/$WINSLOW_PROJECT/$WINSLOW_RUN.log"'
    lines.append({"": ":", "log-link": f'ln -sf "$SENTINEL" {log}', "log-fifo": f"rm -f {log}; mkfifo {log}",
                  "log-folder": f"rm -f {log}; mkdir {log}",
                  "workspace-root": 'cd /; rm -rf "$WINSLOW_WORKSPACE"; ln -s / "$WINSLOW_WORKSPACE"',
                  "workspace-storage": 'cd /; rm -rf "$WINSLOW_WORKSPACE"; ln -s ../.. "$WINSLOW_WORKSPACE"'}[case.ending])
    if case.secret_log:  # and across the tail cut: nothing may be printed after it
        lines += [f'printf %s "${TOKEN}"', filler.format(n=LOG_CUT - half, c="d")]
    lines.append("kill -KILL $$" if case.code == 137 else f"exit {case.code}")
    return "\n".join(lines)


def _pipeline(name: str, stages: list[dict[str, Any]]) -> str:
    return yaml.safe_dump({"name": name, "stages": stages}, sort_keys=False, allow_unicode=True, width=10_000)


def _manifest_problems(case: WorkspaceCase, manifest: dict[str, Any]) -> list[str]:
    files = {f["path"]: f["size"] for f in manifest.get("files") or []}
    unlisted = {u["path"]: u["reason"] for u in manifest.get("unlisted") or []}
    links = {link["path"] for link in manifest.get("links") or []}
    problems = []
    if case.ending.startswith("workspace-"):
        if files:
            problems.append(f"a workspace swapped for a link out was listed: {sorted(files)[:5]}")
        if "." not in unlisted:
            problems.append(f"a workspace swapped for a link is not named unlisted: {unlisted}")
        return problems
    for path in files:
        if path.startswith("/") or ".." in path.split("/"):
            problems.append(f"listed outside the workspace: {path!r}")
    many = any(act.name == "many" for act in case.acts)
    if bool(manifest.get("truncated")) != many or len(files) > MAX_FILES:
        problems.append(f"{len(files)} files listed, truncated: {manifest.get('truncated')}")
    last = max(files, default="") if manifest.get("truncated") else None  # the walk went in sorted order up to here

    def owed(path: str) -> bool:
        return last is None or path < last

    if case.sparse_gb and owed("sparse.bin") and files.get("sparse.bin") != case.sparse_gb << 30:
        problems.append(f"sparse.bin listed as {files.get('sparse.bin')}, not {case.sparse_gb << 30} bytes")
    for act in case.acts:
        for path, size in act.listed.items():
            if not owed(path):
                continue
            if path not in files or (size is not None and files[path] != size):
                problems.append(f"{act.name}: {path!r} not listed with size {size} (files: {files.get(path)})")
        for path in act.named:
            if owed(path) and path not in files and path not in links and path not in unlisted:
                problems.append(f"{act.name}: the manifest says nothing of {path!r}")
        for prefix, words in act.unlisted.items():
            named = [reason for path, reason in unlisted.items() if path.startswith(prefix)]
            if owed(prefix) and not any(words.lower() in reason.lower() for reason in named):
                problems.append(f"{act.name}: {prefix!r}... not named unlisted for '{words}' (unlisted: {unlisted})")
        for path in act.absent:
            if any(p == path or p.startswith(path + "/") for p in files):
                problems.append(f"{act.name}: {path!r} listed or followed")
        if act.reached and owed(act.reached) and act.reached not in files and not any(
                act.reached.startswith(path + "/") or act.reached == path for path in unlisted):
            problems.append(f"{act.name}: a file {len(act.reached)} characters deep is neither listed nor named unlisted")
    return problems


def project_yaml(pipeline: str, env: dict[str, Any] | None = None, request: int = 1, state: str = "running") -> str:
    data: dict[str, Any] = {"pipeline": pipeline}
    if env:
        data["env"] = env
    data["run"] = {"request": request, "state": state}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=10_000)


def _remove(folder: Path) -> None:
    """rm -rf, which (unlike shutil.rmtree) is not stopped by folders thousands of levels deep."""
    subprocess.run(["rm", "-rf", "--", str(folder)], check=False)


def hostile_workspaces(root: Path, rng: random.Random, projects: int = 6, sparse_gb: int = 2,
                       known: bool = False) -> dict[str, Any]:
    """One node runs `projects` stages drawn from ACTS; returns what was checked and figures. Raises on a violation."""
    harness = Harness(root, secret_value(rng))
    harness.settings()
    cases = draw_workspace_cases(rng, projects, sparse_gb, known)
    files: dict[str, str | None] = {}
    for case in cases:
        stage = {"name": "s", "image": "none", "secrets": [TOKEN], "retries": 0, "lost_retries": 0,
                 "command": ["sh", "-c", case.script]}
        files[f"pipelines/{case.project}.yaml"] = _pipeline(case.project, [stage])
        files[f"projects/{case.project}/project.yaml"] = project_yaml(
            case.project, {"LEFTOVER": str(harness.outside / f"leftover-{case.project}"), "SENTINEL": str(harness.sentinel)})
        print(f"{case.project}: {[a.name for a in case.acts]} ending={case.ending or '-'} exit={case.code} "
              f"sparse={case.sparse_gb}G secret_log={case.secret_log}")
    # A stage whose program is the secret itself: the reason it failed must not carry it.
    files["pipelines/ghost.yaml"] = _pipeline("ghost", [{"name": "g", "image": "none", "secrets": [TOKEN],
                                                          "command": [f"${{{TOKEN}}}"]}])
    files["projects/ghost/project.yaml"] = project_yaml("ghost")
    harness.write(files, "hostile workspaces")
    began = time.monotonic()
    harness.start("n1")
    try:
        def settled(project: str) -> bool:
            runs = harness.remote.status(project).get("runs") or []
            return bool(runs) and all(r.get("state") in ("SUCCEEDED", "FAILED", "LOST") for r in runs) \
                and bool(runs[0].get("result"))

        try:
            wait_for(lambda: all(settled(c.project) for c in cases), 60 + 10 * sparse_gb, "every stage to end and be listed")
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{harness.where([c.project for c in cases])}") from None
        settle_s = time.monotonic() - began
        wait_for(lambda: harness.remote.status("ghost").get("state") == "FAILED", 20, "the ghost stage to fail")
        # The node goes on cycling: a project pushed after all this still runs.
        harness.write({"pipelines/after.yaml": _pipeline("after", [{"name": "a", "image": "none", "command": ["true"]}]),
                       "projects/after/project.yaml": project_yaml("after")}, "after")
        wait_for(lambda: harness.remote.status("after").get("state") == "SUCCEEDED", 30, "a later project to run")
        harness.assert_cycling(["n1"])
        harness.stop()
        problems = []
        for case in cases:
            problems += [f"{case.project}: {p}" for p in _workspace_problems(harness, case)]
        assert not problems, "\n".join(problems)
        passwd = [line.encode() for line in Path("/etc/passwd").read_text().splitlines() if len(line) >= 16]
        figures = harness.check_remote(forbidden=passwd)
        harness.check_history()
        harness.check_disk([c.project for c in cases] + ["ghost", "after"])
        assert "Traceback" not in harness.logs(), harness.logs()[-4000:]
    finally:
        harness.stop()
        _remove(harness.storage / "workspaces")
        for case in cases:
            leftover = harness.outside / f"leftover-{case.project}"
            end_leftovers(Path(f"{leftover}.pid"), leftover)
    return {"stages": len(cases) + 2, "settled in s": round(settle_s, 1), **figures}


def _workspace_problems(harness: Harness, case: WorkspaceCase) -> list[str]:
    runs = harness.remote.status(case.project)["runs"]
    summary = [(r["id"], r["state"], r.get("exit_code"), r.get("reason")) for r in runs]
    if len(runs) != 1 or runs[0].get("exit_code") != case.code:
        return [f"the stage exited {case.code}, recorded {summary}"]
    problems = []
    if runs[0]["state"] != ("SUCCEEDED" if case.code == 0 else "FAILED"):
        problems.append(f"exit {case.code} recorded as {summary}")
    manifest = yaml.safe_load(harness.remote.read(runs[0]["result"]) or "{}")
    problems += _manifest_problems(case, manifest)
    leftover = harness.outside / f"leftover-{case.project}"
    if leftover.exists() and runs[0].get("finished"):
        after = max(float(x) for x in leftover.read_text().split()) - epoch(runs[0]["finished"])
        if after > LEFTOVER_GRACE_S + 1.5:
            problems.append(f"a child of the stage ran on {after:.1f}s after the stage ended")
    return problems


@pytest.mark.parametrize("trial", range(TRIALS))
def test_whatever_a_stage_leaves_its_exit_is_recorded_as_it_was_and_nothing_leaks(tmp_path: Path, trial: int) -> None:
    print(hostile_workspaces(tmp_path, draw("workspaces", trial)))


def one_stage(root: Path, script: str, env: dict[str, Any] | None = None) -> tuple[Harness, dict[str, Any]]:
    """One node runs one `sh -c script` stage; returns the harness (nodes stopped) and the listed run."""
    harness = Harness(root, secret_value(random.Random(SEED)))
    harness.write({"pipelines/one.yaml": _pipeline("one", [{"name": "s", "image": "none",
                                                            "command": ["sh", "-c", script]}]),
                   "projects/one/project.yaml": project_yaml("one", env)})
    harness.start("n1")
    try:
        def listed() -> dict[str, Any] | None:
            runs = harness.remote.status("one").get("runs") or []
            return runs[0] if runs and runs[0].get("result") else None
        run = wait_for(listed, 30, "the run to end and be listed")
    finally:
        harness.stop()
    assert isinstance(run, dict)
    return harness, run


def test_a_workspace_swapped_for_a_link_into_storage_lists_nothing_of_storage(tmp_path: Path) -> None:
    """`ln -s ../.. "$WINSLOW_WORKSPACE"`: the link stays inside the storage root, so it passes the storage's check."""
    case = WorkspaceCase("one", [], 0, "workspace-storage", 0, False)
    harness, run = one_stage(tmp_path, _workspace_script(case))
    manifest = yaml.safe_load(harness.remote.read(run["result"]) or "{}")
    assert not _manifest_problems(case, manifest), manifest


@pytest.mark.skipif(IS_ROOT, reason="running as root: chmod 000 does not stop root's reads, so nothing is unreadable")
def test_unreadable_files_are_named_in_the_manifest(tmp_path: Path) -> None:
    case = WorkspaceCase("one", [_unreadable(random.Random(SEED))], 0, "", 0, False)
    harness, run = one_stage(tmp_path, _workspace_script(case))
    assert run["exit_code"] == 0
    manifest = yaml.safe_load(harness.remote.read(run["result"]) or "{}")
    assert not _manifest_problems(case, manifest), manifest


# == 2. hostile project folders and env values ===============================================================

ENVUSE = _pipeline("envuse", [
    {"name": "use", "image": "none", "inputs": ["videos/${VIDEO}"],
     "command": ["sh", "-c", 'printf %s "${VIDEO}" > "$WINSLOW_WORKSPACE/seen"; cat "$WINSLOW_RESOURCES/videos/${VIDEO}";'
                             ' echo ${VIDEO} $VIDEO']},
    {"name": "argv", "image": "none", "command": ["printf", "%s", "${VIDEO}"]},
])
# VIDEO values a user might push that are valid: each must reach the stages as written, and run nothing.
VALID_VALUES: list[Any] = [
    "x; touch {mark}", "$(touch {mark})", "`touch {mark}`", "'; touch {mark}; '", '"; touch {mark}; "', "a b\tc",
    "line1\nline2", "-rf", "*", "%s%n%x", "ünïcødé.mp4",
    "/etc/passwd",  # videos//etc/passwd: a path in the pool
    "sub/../clip.mp4",
    12, True,  # a number or a boolean reaches a stage as text: 12, true
]
# VIDEO values that make the project INVALID: the input leaves the pool, names a variable nobody set, or is no text.
INVALID_VALUES: list[Any] = [
    "../../../../etc/passwd", "a/../../../../../etc/passwd", "../" * 12 + "etc/shadow", "${HOME}", "back\\slash",
    ["a", "list"],
]
# Project folders a user might push (git mktree makes even `..` and `.git`); none is a safe name, so none is run.
FOLDERS = ["-rf", "a b", "x" * 200, "ünïcødé", ".hidden", "$(id)", ";id;", "`id`", "new\nline", "back\\slash",
           "..", ".git", ".", "y" * 65]
SAFE_FOLDERS = ["A", "ok.-_1", "z" * 64]


def random_value(rng: random.Random) -> str:
    """A value of shell metacharacters, quotes, blanks and non-ASCII letters: valid (no `/`, `\\` or `${`), so it
    must reach every stage as it was written."""
    alphabet = "abcXYZ019 ;|&$()`'\"*?[]{}<>~#!%^=+,:@-.\t\nü€"
    while True:
        value = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        if "${" not in value and value not in (".", ".."):
            return value


def _entries(clone: Path, tree: str) -> dict[bytes, tuple[str, str, str]]:
    out = subprocess.run(["git", "ls-tree", "-z", tree], cwd=clone, env=GIT_ENV, capture_output=True, check=True).stdout
    found = {}
    for item in out.split(b"\0"):
        if item:
            meta, name = item.split(b"\t", 1)
            mode, kind, sha = meta.decode().split()
            found[name] = (mode, kind, sha)
    return found


def _mktree(clone: Path, entries: dict[bytes, tuple[str, str, str]]) -> str:
    lines = b"".join(f"{mode} {kind} {sha}\t".encode() + name + b"\0" for name, (mode, kind, sha) in entries.items())
    return subprocess.run(["git", "mktree", "-z"], cwd=clone, env=GIT_ENV, input=lines, capture_output=True,
                          check=True).stdout.decode().strip()


def push_projects(harness: Harness, projects: dict[str, str], message: str) -> str:
    """One commit on main adding projects/<name>/project.yaml whatever the name (built with git mktree, as a crafted
    push could be), retried on top of whatever the nodes pushed first; returns it."""
    clone = harness.remote.clone
    blobs = {name: subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=clone, env=GIT_ENV, input=text.encode(),
                                  capture_output=True, check=True).stdout.decode().strip() for name, text in projects.items()}
    for _ in range(50):
        git(clone, "fetch", "-q", "origin")
        base = git(clone, "rev-parse", "origin/main").strip()
        top = _entries(clone, base)
        folder = _entries(clone, top[b"projects"][2]) if b"projects" in top else {}
        for name, blob in blobs.items():
            folder[name.encode()] = ("040000", "tree", _mktree(clone, {b"project.yaml": ("100644", "blob", blob)}))
        top[b"projects"] = ("040000", "tree", _mktree(clone, folder))
        commit = git(clone, "commit-tree", _mktree(clone, top), "-p", base, "-m", message).strip()
        if subprocess.run(["git", "push", "-q", "origin", f"{commit}:refs/heads/main"], cwd=clone, env=GIT_ENV,
                          capture_output=True).returncode == 0:
            harness.user_paths |= {f"projects/{name}/project.yaml".encode() for name in projects}
            return commit
    raise AssertionError("could not push to the remote in 50 tries")


def _status_json(harness: Harness) -> dict[str, str]:
    """`winslow status --json` as a user runs it: each project's state."""
    out = subprocess.run([sys.executable, "-m", "reconciler", "status", "--json", "--repo-dir", str(harness.remote.clone)],
                         env=GIT_ENV, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return {row["project"]: row["state"] for row in json.loads(out.stdout)["projects"]}


def hostile_projects(root: Path, rng: random.Random, drawn: int = 4) -> dict[str, Any]:
    """Every value and folder of the tables above and `drawn` random values, pushed by a user; one node. Raises on a
    violation."""
    harness = Harness(root, secret_value(rng))
    mark = harness.outside / "PWNED"
    values = [value.replace("{mark}", str(mark)) if isinstance(value, str) else value for value in VALID_VALUES]
    rows: list[tuple[Any, str | None]] = [(value, str(value).lower() if isinstance(value, bool) else str(value))
                                          for value in values + [random_value(rng) for _ in range(drawn)]]
    rows += [(value, None) for value in INVALID_VALUES]
    videos = harness.storage / "resources" / "videos"
    (videos / "sub").mkdir(parents=True)
    cases: dict[str, tuple[Any, str | None]] = {}
    for i, (value, seen) in enumerate(rows):
        cases[f"e{i}"] = (value, seen)
        if seen is not None:  # the input the stage waits for
            target = below(videos, seen)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f"resource of e{i}\n")
    (videos / "safe.mp4").write_text("a safe video\n")
    unsafe = FOLDERS[:]
    rng.shuffle(unsafe)
    for project, (value, seen) in cases.items():
        print(f"{project}: VIDEO={value!r} -> {'INVALID' if seen is None else 'runs'}")
    print(f"unsafe folders: {unsafe!r}")
    harness.write({"pipelines/envuse.yaml": ENVUSE}, "envuse")
    projects = {name: project_yaml("envuse", {"VIDEO": value}) for name, (value, _) in cases.items()}
    projects.update({name: project_yaml("envuse", {"VIDEO": "safe.mp4"}) for name in unsafe + SAFE_FOLDERS})
    push_projects(harness, projects, "hostile projects")
    harness.start("n1")
    try:
        valid = [name for name, (_, seen) in cases.items() if seen is not None] + SAFE_FOLDERS
        invalid = [name for name, (_, seen) in cases.items() if seen is None]

        def states() -> dict[str, str | None]:
            return {name: harness.remote.status(name).get("state") for name in valid + invalid}

        def settled() -> bool:
            now = states()
            return all(now[n] in ("SUCCEEDED", "FAILED") for n in valid) and all(now[n] == "INVALID" for n in invalid)
        try:
            wait_for(settled, 90, "valid projects to run and invalid ones to be INVALID")
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{harness.where(valid + invalid)}") from None
        push_projects(harness, {"after": project_yaml("envuse", {"VIDEO": "safe.mp4"})}, "after")
        wait_for(lambda: harness.remote.status("after").get("state") == "SUCCEEDED", 30, "a later project to run")
        harness.assert_cycling(["n1"])
        shown = _status_json(harness)
    finally:
        harness.stop()
    problems = []
    for name, (value, seen) in cases.items():
        if seen is None:
            continue
        status = harness.remote.status(name)
        runs = status["runs"]
        if status["state"] != "SUCCEEDED":
            problems.append(f"{name} (VIDEO={value!r}) ended {status['state']}: {runs}")
            continue
        saw = below(harness.storage, f"{runs[0]['workspace']}/seen").read_bytes()
        if saw != seen.encode():
            problems.append(f"{name}: the shell stage saw VIDEO={saw!r}, not {seen!r}")
        argv_log = harness.remote.read(f"projects/{name}/logs/{runs[1]['id']}.log")
        if argv_log != seen:
            problems.append(f"{name}: the argv stage printed {argv_log!r}, not {seen!r}")
    for name in unsafe:
        if shown.get(name) != "INVALID":
            problems.append(f"folder {name!r}: winslow status says {shown.get(name)}")
    assert not problems, "\n".join(problems)
    assert not list(harness.outside.glob("PWNED*")), "an env value ran as a command"
    assert "uid=" not in harness.logs(), "a folder name ran as a command"
    passwd = [line.encode() for line in Path("/etc/passwd").read_text().splitlines() if len(line) >= 16]
    figures = harness.check_remote(forbidden=[*passwd, b"uid="])
    harness.check_history()
    harness.check_disk([*cases, *unsafe, *SAFE_FOLDERS, "after"])
    assert "Traceback" not in harness.logs(), harness.logs()[-4000:]
    return {"projects": len(projects) + 1, **figures}


@pytest.mark.parametrize("trial", range(TRIALS))
def test_hostile_folders_and_env_values_stay_data_and_nothing_is_written_for_unsafe_folders(tmp_path: Path,
                                                                                           trial: int) -> None:
    print(hostile_projects(tmp_path, draw("projects", trial)))


# == 3. node faults, git outages and user pushes ===============================================================

LONG = _pipeline("long", [{"name": "work", "image": "none", "lost_retries": 100, "secrets": [TOKEN], "command": [
    "sh", "-c", 'i=0; while [ $i -lt 600 ]; do echo "$WINSLOW_RUN $(date +%s.%N)" >> "$MARKS";'
                f' echo "tick $i ${TOKEN}"; i=$((i+1)); sleep 0.2; done']}])
QUICK = _pipeline("quick", [{"name": "q", "image": "none", "secrets": [TOKEN], "lost_retries": 100,
                             "command": ["sh", "-c", f'echo "${TOKEN}"; sleep "$NAP"; exit "$CODE"']}])


# A long freeze outlasts the node timeout (others take over); a short one stays within the lease; an outage stops
# the git daemon the nodes fetch from and push to for 1 to 5 s (longer than the lease: the nodes fence themselves).
FAULTS = ("kill", "freeze", "long-freeze", "outage")


@dataclass
class Fault:
    kind: str
    node: str
    at: float  # epoch seconds
    holding: dict[str, str]  # project -> the run the node held when struck


class User(threading.Thread):
    """A person with a clone who keeps pushing edits to their own projects until told to stop."""

    def __init__(self, harness: Harness, name: str, projects: list[str], rng: random.Random, stop: threading.Event,
                 most: int) -> None:
        super().__init__(name=f"user-{name}", daemon=True)
        self.harness, self.projects, self.rng, self.halt, self.most = harness, projects, rng, stop, most
        self.clone = harness.root / "users" / name
        git(harness.root, "clone", "-q", str(harness.remote.remote), str(self.clone))
        self.pushed: list[str] = []
        self.requests = dict.fromkeys(projects, 0)
        self.codes: dict[tuple[str, int], int] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.halt.is_set() and len(self.pushed) < self.most:
                self.push_one()
                self.halt.wait(self.rng.uniform(0.2, 1.5))
        except BaseException as exc:  # noqa: BLE001 - handed to the test, which raises it
            self.error = exc

    def push_one(self) -> None:
        project = self.rng.choice(self.projects)
        self.requests[project] += 1
        code = self.rng.choice([0, 0, 1, 3, 42])
        self.codes[(project, self.requests[project])] = code
        text = project_yaml("quick", {"CODE": code, "NAP": self.rng.choice([0, 0.5, 1.5])}, self.requests[project])
        path = f"projects/{project}/project.yaml"
        self.harness.user_paths.add(path.encode())
        for _ in range(100):
            git(self.clone, "fetch", "-q", "origin")
            git(self.clone, "reset", "-q", "--hard", "origin/main")
            (self.clone / path).parent.mkdir(parents=True, exist_ok=True)
            (self.clone / path).write_text(text)
            git(self.clone, "add", path)
            git(self.clone, "commit", "-qm", f"{project}: request {self.requests[project]}")
            if subprocess.run(["git", "push", "-q", "origin", "main"], cwd=self.clone, env=GIT_ENV,
                              capture_output=True).returncode == 0:
                self.pushed.append(git(self.clone, "rev-parse", "HEAD").strip())
                return
            self.halt.wait(self.rng.uniform(0, 0.3))
        raise AssertionError(f"{self.name} could not push in 100 tries")


class TipWatcher(threading.Thread):
    """Notes every tip of main it sees, about ten times a second."""

    def __init__(self, remote: Path, stop: threading.Event) -> None:
        super().__init__(name="tips", daemon=True)
        self.remote, self.halt = remote, stop
        self.tips: list[str] = []

    def run(self) -> None:
        while not self.halt.wait(0.1):
            tip = subprocess.run(["git", "--git-dir", str(self.remote), "rev-parse", "-q", "--verify", "refs/heads/main"],
                                 capture_output=True, text=True).stdout.strip()
            if tip and (not self.tips or self.tips[-1] != tip):
                self.tips.append(tip)


def holders_of(harness: Harness, projects: Iterable[str]) -> dict[str, tuple[str, str]]:
    """project -> (node, run) of each RUNNING run that has started."""
    found = {}
    for project in projects:
        for run in harness.remote.status(project).get("runs") or []:
            if run.get("state") == "RUNNING" and run.get("started"):
                found[project] = (run["node"], run["id"])
    return found


def node_faults(root: Path, rng: random.Random, seconds: float = 12, users_push: int = 12,
                long_projects: int = 2, known: bool = False, figures: dict[str, Any] | None = None) -> dict[str, Any]:
    """Three nodes under random kills, freezes and git outages while two users push; raises on a violation.

    Returns figures: the faults dealt and the takeover times after a SIGKILL or a long SIGSTOP of a node that held a
    long stage (fault to the retry's first mark)."""
    harness = Harness(root, secret_value(rng))
    longs = [f"c{i}" for i in range(long_projects)]
    marks = {p: harness.outside / f"marks-{p}" for p in longs}
    harness.write({"pipelines/long.yaml": LONG, "pipelines/quick.yaml": QUICK,
                   **{f"projects/{p}/project.yaml": project_yaml("long", {"MARKS": str(marks[p])}) for p in longs}},
                  "long stages")
    daemon = GitDaemon(root, root / "daemon.log")
    harness.repo_url = daemon.url
    stop = threading.Event()
    users = [User(harness, name, [f"u{name}{i}" for i in range(2)], random.Random(rng.random()), stop, users_push)
             for name in ("a", "b")]
    watcher = TipWatcher(harness.remote.remote, stop)
    faults: list[Fault] = []
    restarts: dict[str, float] = {}  # killed node -> when it comes back
    names = ("n1", "n2", "n3")
    try:
        for name in names:
            harness.start(name)
        wait_for(lambda: len(holders_of(harness, longs)) == len(longs), 40, "the long stages to start")
        watcher.start()
        for user in users:
            user.start()
        deadline = time.monotonic() + seconds
        kinds = [kind for kind in FAULTS if known or kind not in KNOWN_DEFECTS]
        first = rng.sample(kinds, len(kinds))  # every kind of fault in every trial
        while time.monotonic() < deadline:
            for name, when in list(restarts.items()):
                if time.monotonic() >= when:
                    harness.start(name)
                    del restarts[name]
            kind = first.pop() if first else rng.choice([*kinds, "rest", "rest"])
            holders = holders_of(harness, longs)
            live = [n for n in names if n not in restarts]
            held = sorted({node for node, _ in holders.values() if node in live})
            if kind in ("kill", "freeze", "long-freeze") and live:
                victim = rng.choice(held) if held and rng.random() < 0.7 else rng.choice(live)
                holding = {p: run for p, (node, run) in holders.items() if node == victim}
                faults.append(Fault(kind, victim, time.time(), holding))
                print(f"{time.strftime('%X')} {kind} {victim} holding {holding}")
                node = harness.nodes[victim]
                if kind == "kill":
                    node.signal(signal.SIGKILL)
                    node.proc.wait(timeout=10)
                    node.stop()
                    restarts[victim] = time.monotonic() + rng.uniform(1, 10)
                else:
                    node.signal(signal.SIGSTOP)
                    time.sleep(rng.uniform(0.5, 2.5) if kind == "freeze" else rng.uniform(NODE_TIMEOUT_S + 0.5, 9))
                    node.signal(signal.SIGCONT)
            elif kind == "outage":
                faults.append(Fault(kind, "git", time.time(), {}))
                print(f"{time.strftime('%X')} git outage")
                daemon.stop()
                time.sleep(rng.uniform(1, 5))
                daemon.start()
            else:
                time.sleep(rng.uniform(0.5, 2))
        stop.set()
        for name in restarts:
            harness.start(name)
        for user in users:
            user.join(timeout=60)
            if user.error is not None:
                raise user.error
        watcher.join(timeout=5)
        # The chaos is over: the long stages are aborted, and a project pushed now must still run.
        harness.write({**{f"projects/{p}/project.yaml": project_yaml("long", {"MARKS": str(marks[p])}, state="aborted")
                          for p in longs},
                       "projects/fin/project.yaml": project_yaml("quick", {"CODE": 0, "NAP": 0})}, "the end")
        wait_for(lambda: harness.remote.status("fin").get("state") == "SUCCEEDED", 60, "a project pushed last to run")
        wait_for(lambda: not holders_of(harness, longs), 30, "the aborted stages to stop")
        last = {p: user.requests[p] for user in users for p in user.projects}
        mine = list(last)

        def settled(project: str) -> bool:  # its last request placed and run, and nothing of it running
            status = harness.remote.status(project)
            return (status.get("observed_request", 0) >= last[project] and status.get("state") not in STILL
                    and not any(r["state"] == "RUNNING" for r in status.get("runs") or []))

        try:  # a stage lasts 1.5 s at most: a run still RUNNING by then is an exit nobody recorded
            wait_for(lambda: all(settled(p) for p in mine), 30, "every exit to be recorded")
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{harness.where(mine)}") from None
        harness.assert_cycling(names)
    finally:
        stop.set()
        harness.stop()
        daemon.close()
    found = {p: spans(marks[p]) for p in longs}
    figures = {} if figures is None else figures  # filled before any check, so a caller sees them on a violation too
    ends = {(p, r["id"]): (r["state"], epoch(r["finished"]) if r.get("finished") else None)
            for p in longs for r in harness.remote.status(p).get("runs") or []}
    figures.update({"faults": [f.kind for f in faults], "takeovers s": _takeovers(faults, found, ends),
                    "user pushes": sum(len(user.pushed) for user in users), "tips seen": len(watcher.tips)})
    for project, runs in found.items():
        recorded = [(r["id"], r["node"], r["state"], r.get("reason"), r.get("started"), r.get("finished"))
                    for r in harness.remote.status(project).get("runs") or []]
        assert not overlaps(runs), f"{project}: two copies alive at once: {overlaps(runs)}; recorded: {recorded}"
    problems = []
    for user in users:
        for project in user.projects:
            for run in harness.remote.status(project).get("runs") or []:
                problems += _exit_problems(project, run)
    assert not problems, "\n".join(problems)
    pushed = [sha for user in users for sha in user.pushed]
    updates = harness.check_history(pushed)
    tips = watcher.tips
    for old, new in zip(tips, tips[1:]):
        assert harness.ancestor(old, new), f"main moved from {old} to {new}, which does not contain it"
    figures["updates of main"] = updates
    figures.update(harness.check_remote())
    harness.check_disk([*longs, "fin", *(p for user in users for p in user.projects)])
    return figures


STOPPED = ("superseded", "aborted", "stopped")  # reasons of a run the node itself ended
STILL = ("PENDING", "RUNNING")  # a project's states while its request is still to be run


def _exit_problems(project: str, run: dict[str, Any]) -> list[str]:
    """A run records the exit code its program chose (its env's CODE), or, when the node ended it (a newer request,
    an abort, a lost node), the signal it ended by, none, or its own code if it exited before the stop reached it."""
    chosen, code, reason = int(run["env"]["CODE"]), run.get("exit_code"), run.get("reason") or ""
    where = f"{project} {run['id']} ({run['state']}, {reason or 'no reason'})"
    if run["state"] == "LOST" or any(word in reason for word in STOPPED):
        ended = (None, chosen, 128 + signal.SIGTERM, 128 + signal.SIGKILL)
        return [] if code in ended else [f"{where}: stopped, yet exit {code}"]
    if code != chosen:
        return [f"{where}: the program exited {chosen}, recorded {code}"]
    if run["state"] not in ("RUNNING", "SUCCEEDED" if code == 0 else "FAILED"):
        return [f"{where}: exit {code} recorded as {run['state']}"]
    return []


def _takeovers(faults: list[Fault], found: dict[str, dict[str, tuple[float, float]]],
               ends: dict[tuple[str, str], tuple[str, float | None]]) -> list[tuple[str, float]]:
    """(fault, seconds) from a kill or long freeze of a node holding a long stage to its next attempt's first mark,
    for each run that fault made LOST (not one ended otherwise, or marked LOST before it, or adopted on a restart)."""
    times = []
    for fault in faults:
        if fault.kind not in ("kill", "long-freeze"):
            continue
        for project, run in fault.holding.items():
            state, ended = ends.get((project, run), ("", None))
            if state != "LOST" or ended is None or ended < fault.at:
                continue
            later = sorted(first for other, (first, _) in found[project].items() if other != run and first > fault.at)
            if later:
                times.append((fault.kind, round(later[0] - fault.at, 2)))
    return times


@pytest.mark.cluster
@pytest.mark.parametrize("trial", range(TRIALS))
def test_node_kills_freezes_and_git_outages_never_run_two_copies_lose_a_commit_or_stop_a_node(tmp_path: Path,
                                                                                             trial: int) -> None:
    figures = node_faults(tmp_path, draw("faults", trial))
    print(figures)
    # A takeover waits for the node timeout (6 s) and a grace period or two: anything near a minute is a stall.
    assert all(seconds < 40 for _, seconds in figures["takeovers s"]), figures["takeovers s"]


def _freeze_during_fetch(node: NodeProcess, until: float) -> bool:
    """SIGSTOP the node while a `git fetch` it started is running (the fetch goes on and ends without it)."""
    parent = psutil.Process(node.proc.pid)
    while time.monotonic() < until:
        for child in parent.children(recursive=True):
            try:
                if "fetch" in child.cmdline():
                    node.signal(signal.SIGSTOP)
                    return True
            except psutil.Error:
                continue
    return False


@pytest.mark.cluster
def test_a_node_frozen_during_its_fetch_does_not_judge_a_live_node_lost(tmp_path: Path) -> None:
    """The holder pauses 2.5 s, within its lease; meanwhile a user's push wakes the other node, which is frozen for 7 s
    with that fetch in flight. The holder beats again after its pause: after the thaw nobody may mark its run LOST."""
    harness = Harness(tmp_path, secret_value(random.Random(SEED)))
    harness.write({"pipelines/long.yaml": LONG, "projects/c0/project.yaml": project_yaml("long", {"MARKS": str(tmp_path / "m")})})
    for name in ("n1", "n2"):
        harness.start(name)
    try:
        held = wait_for(lambda: holders_of(harness, ["c0"]).get("c0"), 30, "the stage to start")
        assert isinstance(held, tuple)
        holder, other = held[0], next(name for name in harness.nodes if name != held[0])
        harness.nodes[holder].signal(signal.SIGSTOP)
        paused = time.monotonic()
        time.sleep(1)  # the other node has seen the holder's last beat by now
        harness.write({"notes.txt": "a user's edit\n"}, "a user's edit")  # wakes the other node: it fetches
        caught = _freeze_during_fetch(harness.nodes[other], paused + 2.4)
        frozen = time.monotonic()
        time.sleep(max(0.0, paused + 2.5 - time.monotonic()))
        harness.nodes[holder].signal(signal.SIGCONT)
        if not caught:
            pytest.skip("no fetch of the other node was caught in flight")
        time.sleep(max(0.0, frozen + 7 - time.monotonic()))
        harness.nodes[other].signal(signal.SIGCONT)
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and all(r["state"] == "RUNNING" for r in harness.remote.status("c0")["runs"]):
            time.sleep(0.2)
    finally:
        harness.stop()
    runs = [(r["id"], r["node"], r["state"], r.get("reason")) for r in harness.remote.status("c0")["runs"]]
    copies = overlaps(spans(tmp_path / "m"))
    assert runs == [("1-work-1", holder, "RUNNING", None)], f"{holder} paused 2.5 s and beat again: {runs}" + (
        f"; two copies alive: {copies}" if copies else "")


def test_a_stage_ends_with_its_killed_node_when_the_lease_file_is_gone_too(tmp_path: Path) -> None:
    """The stage's supervisor reads the node's lease from <work>/lease every second. The node is killed and its work
    folder's lease vanishes with it (wiped, or a failing disk): the stage must still end once the last lease it read
    ran out, before another node may take the run over."""
    harness = Harness(tmp_path, secret_value(random.Random(SEED)))
    marks = harness.outside / "marks"
    harness.write({"pipelines/long.yaml": LONG, "projects/c0/project.yaml": project_yaml("long", {"MARKS": str(marks)})})
    node = harness.start("n1")
    try:
        wait_for(lambda: holders_of(harness, ["c0"]).get("c0"), 30, "the stage to start")
        wait_for(lambda: len(spans(marks)) == 1, 10, "the stage's first marks")
        node.signal(signal.SIGKILL)
        killed = time.time()
        (tmp_path / "work" / "n1" / "lease").unlink()
        time.sleep(LEASE_S + 2.5)
        last = max(end for _, end in spans(marks).values())
    finally:
        harness.stop()
    assert last < killed + LEASE_S + 1.5, f"the stage ran on {last - killed:.1f}s after its node was killed"
