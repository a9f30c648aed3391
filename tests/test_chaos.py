"""Chaos under real nodes: a node killed, frozen or cut off while its stage runs never leaves two live copies of the
stage, and a git outage that every node sees restarts nothing.

Three node processes (process executor) reach one remote through a `git daemon` on
127.0.0.1 and share one storage. The stage appends `<run id> <time>` to a marker file every
0.2 s; each copy's lines span the time it was alive, and a sampler lists the stage's processes
ten times a second. A node is killed with SIGKILL (its stage process left behind, as an OOM
kill of the node alone does), frozen with SIGSTOP past the node timeout, or cut off alone (its
own TCP proxy to the daemon closed); the stage's supervisor (the wrapper, reading the node's
lease file) must end it before another node's attempt begins.

WINSLOW_CHAOS_KILLS=N and WINSLOW_CHAOS_FREEZES=N set the number of faults in a row (10 and 5).
"""
from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.cluster import GitDaemon, NodeProcess, StateRemote, TcpProxy, wait_for

KILLS = int(os.environ.get("WINSLOW_CHAOS_KILLS", "10"))
FREEZES = int(os.environ.get("WINSLOW_CHAOS_FREEZES", "5"))
LEASE_S, NODE_TIMEOUT_S = 4, 6  # NodeProcess's settings
SCRIPT = 'i=0; while [ $i -lt {n} ]; do echo "$WINSLOW_RUN $(date +%s.%N)" >> "$MARKS"; i=$((i+1)); sleep 0.2; done'
STAGE = ("name: long\nstages:\n  - name: work\n    image: none\n    lost_retries: {retries}\n"
         "    command: [sh, -c, '{script}']\n")


def long_stage(rounds: int = 150, retries: int = 3) -> str:
    """A pipeline whose one stage marks 5 times a second for `rounds` marks."""
    return STAGE.format(retries=retries, script=SCRIPT.format(n=rounds))


def spans(marks: Path) -> dict[str, tuple[float, float]]:
    """Each run's first and last mark."""
    found: dict[str, tuple[float, float]] = {}
    for line in marks.read_text().splitlines():
        run, _, at = line.partition(" ")
        when = float(at)
        first, last = found.get(run, (when, when))
        found[run] = (min(first, when), max(last, when))
    return found


def running(remote: StateRemote, project: str = "p", started: bool = True) -> tuple[str, str] | None:
    """(node, run) of the project's RUNNING run, if any: one whose start is on record, or (`started=False`) one
    that is claimed (its start may wait a few seconds to share a commit; its marks say it runs)."""
    runs = remote.status(project).get("runs") or []
    live = [r for r in runs if r["state"] == "RUNNING" and (r.get("started") or not started)]
    return (live[-1]["node"], live[-1]["id"]) if live else None


def holder(remote: StateRemote, project: str = "p") -> str | None:
    held = running(remote, project)
    return held[0] if held else None


class Copies(threading.Thread):
    """Lists the stage's live copies (`sh -c SCRIPT` with this test's MARKS) ten times a second; keeps the most seen."""

    def __init__(self, marks: Path) -> None:
        super().__init__(name="copies", daemon=True)
        self.marks = str(marks)
        self.most = 0
        self.seen_twice: list[float] = []
        self.halt = threading.Event()

    def pids(self) -> list[int]:
        """One pid per copy: the shell's own `$(date ...)` subshells (forks with the same command line) are left out."""
        found: dict[int, int] = {}  # pid -> parent pid
        for proc in psutil.process_iter(["cmdline", "ppid"]):
            cmdline = proc.info["cmdline"] or []
            if cmdline[:2] != ["sh", "-c"] or "$MARKS" not in (cmdline[2:3] or [""])[0]:
                continue
            try:
                if proc.environ().get("MARKS") == self.marks:
                    found[proc.pid] = proc.info["ppid"]
            except psutil.Error:
                continue
        return [pid for pid, parent in found.items() if parent not in found]

    def run(self) -> None:
        while not self.halt.wait(0.1):
            count = len(self.pids())
            self.most = max(self.most, count)
            if count > 1:
                self.seen_twice.append(time.time())

    def end(self) -> None:
        """Stop sampling, and end the copies still alive (stages this test started, by their pids)."""
        self.halt.set()
        if self.is_alive():
            self.join(timeout=5)
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


class Cluster:
    """A remote served by `git daemon`, three nodes, one storage; with `proxies`, each node reaches the daemon through
    a TCP proxy of its own."""

    def __init__(self, root: Path, extra: tuple[str, ...] = (), proxies: bool = False,
                 names: tuple[str, ...] = ("n1", "n2", "n3")) -> None:
        self.root, self.extra = root, extra
        self.remote = StateRemote(root)
        self.daemon = GitDaemon(root, root / "daemon.log")
        self.proxies = {name: TcpProxy(("127.0.0.1", self.daemon.port)) for name in names} if proxies else {}
        self.nodes: dict[str, NodeProcess] = {}
        for name in names:
            self.start(name)

    def start(self, name: str) -> None:
        if name in self.nodes:
            self.nodes[name].stop()
        url = self.proxies[name].url("remote.git") if self.proxies else self.daemon.url
        self.nodes[name] = NodeProcess(name, url, self.root / "storage", self.root / "work" / name, extra=self.extra)

    def tip(self, name: str) -> str | None:
        return self.remote.refs().get(f"refs/heads/winslow/nodes/{name}")

    def rejoined(self, name: str, since: str | None, timeout: float = 30) -> None:
        wait_for(lambda: self.tip(name) != since, timeout, f"{name}'s next heartbeat")

    def close(self) -> None:
        for node in self.nodes.values():
            node.signal(signal.SIGCONT)
            node.stop()
        for proxy in self.proxies.values():
            proxy.cut()
        self.daemon.close()


def project(marks: Path, state: str = "running") -> str:
    return f"pipeline: long\nenv: {{MARKS: {marks}}}\nrun: {{request: 1, state: {state}}}\n"


def started_after(marks: Path, known: int, timeout: float) -> tuple[str, tuple[float, float]]:
    """The first attempt beyond the `known` ones: (run, its span so far)."""
    wait_for(lambda: len(spans(marks)) > known, timeout, "another node's new attempt")
    return sorted(spans(marks).items(), key=lambda item: item[1][0])[known]


def figures(values: list[float]) -> str:
    return f"{min(values):.1f} / {statistics.median(values):.1f} / {max(values):.1f} s" if values else "none"


def faults_in_a_row(tmp_path: Path, fault: signal.Signals, trials: int) -> None:
    """`trials` times: strike the node running the stage; another node's attempt must begin within the node timeout
    + 10 s, and never beside the struck one's. A killed node is started again, a frozen one thawed; each rejoins."""
    marks = tmp_path / "marks.txt"
    marks.touch()
    cluster = Cluster(tmp_path)
    cluster.remote.write({"pipelines/long.yaml": long_stage(rounds=5000, retries=trials + 3),
                          "projects/p/project.yaml": project(marks)}, "p")
    copies = Copies(marks)
    ended, began = [], []
    restarted: dict[str, str | None] = {}  # killed node -> its branch's tip when it was struck
    try:
        copies.start()
        for trial in range(trials):
            held = wait_for(lambda: running(cluster.remote, started=False), 40, "the stage to be claimed by a node")
            assert isinstance(held, tuple)
            victim, struck_run = held
            wait_for(lambda run=struck_run: run in spans(marks), 10, "the stage's marks")
            known = len(spans(marks))
            tip = cluster.tip(victim)
            struck = time.time()
            cluster.nodes[victim].signal(fault)
            run, (first, _) = started_after(marks, known, NODE_TIMEOUT_S + 10)
            began.append(first - struck)
            if fault == signal.SIGKILL:
                cluster.start(victim)  # it rejoins while the next fault is dealt to the node that took over
                restarted[victim] = tip
            else:
                time.sleep(1)
                cluster.nodes[victim].signal(signal.SIGCONT)  # it thaws: it must not publish its stale run
                cluster.rejoined(victim, tip)
            ended.append(spans(marks)[struck_run][1] - struck)
            print(f"{fault.name} {trial + 1}: {victim} struck; {struck_run} ended after {ended[-1]:.1f}s; "
                  f"{run} began after {began[-1]:.1f}s")
        for name, tip in restarted.items():
            cluster.rejoined(name, tip)
    finally:
        try:
            copies.end()
        finally:
            cluster.close()
    found = spans(marks)
    ordered = sorted(found.items(), key=lambda item: item[1][0])
    both = [f"{a} and {b}" for (a, (_, end)), (b, (start, _)) in zip(ordered, ordered[1:]) if start <= end]
    print(f"{fault.name} x{trials}: struck copy ended after {figures(ended)}; next attempt began after "
          f"{figures(began)} (min / median / max); most copies alive at once: {copies.most}")
    assert not both, f"two copies alive at once: {both}"
    assert copies.most == 1, f"the process listing showed two copies at {copies.seen_twice}"
    assert all(seconds <= NODE_TIMEOUT_S + 10 for seconds in began), began
    runs = cluster.remote.status("p")["runs"]
    lost = [r for r in runs if r["state"] == "LOST"]
    assert len(lost) == trials, [(r["id"], r["node"], r["state"], r.get("reason")) for r in runs]


@pytest.mark.cluster
def test_a_node_killed_ten_times_in_a_row_never_leaves_two_copies_of_its_stage(tmp_path: Path) -> None:
    faults_in_a_row(tmp_path, signal.SIGKILL, KILLS)


@pytest.mark.cluster
def test_a_node_frozen_past_its_timeout_five_times_never_leaves_two_copies_and_rejoins(tmp_path: Path) -> None:
    faults_in_a_row(tmp_path, signal.SIGSTOP, FREEZES)


@pytest.mark.cluster
def test_a_node_cut_off_alone_stops_its_stage_before_the_retry_starts_elsewhere(tmp_path: Path) -> None:
    """Its proxy to the git daemon closes: the others still reach the remote, it does not; its lease lapses."""
    marks = tmp_path / "marks.txt"
    marks.touch()
    cluster = Cluster(tmp_path, proxies=True)
    cluster.remote.write({"pipelines/long.yaml": long_stage(rounds=1000), "projects/p/project.yaml": project(marks)})
    copies = Copies(marks)
    try:
        victim = wait_for(lambda: holder(cluster.remote), 40, "the stage to run on a node")
        assert isinstance(victim, str)
        wait_for(lambda: len(spans(marks)) == 1, 10, "the stage's marks")
        copies.start()
        cut = time.time()
        cluster.proxies[victim].cut()
        run, (first, _) = started_after(marks, 1, NODE_TIMEOUT_S + 10)
        tip = cluster.tip(victim)
        cluster.proxies[victim].restore()
        cluster.rejoined(victim, tip)
        time.sleep(2)  # time to publish, if it were to publish its stale run
    finally:
        try:
            copies.end()
        finally:
            cluster.close()
    (old, (_, end)), _ = sorted(spans(marks).items(), key=lambda item: item[1][0])[:2]
    print(f"cut off: {old} ended {end - cut:.1f}s after the cut, {run} began {first - cut:.1f}s after it")
    assert end < first, f"two copies alive at once: {old} until {end}, {run} from {first}"
    assert end < cut + LEASE_S + 1.5, "the stage outlived the lease of its cut-off node"
    assert copies.most == 1
    runs = {r["id"]: (r["node"], r["state"]) for r in cluster.remote.status("p")["runs"]}
    assert runs[old] == (victim, "LOST"), runs


@pytest.mark.cluster
def test_a_git_outage_of_a_minute_under_three_nodes_restarts_nothing(tmp_path: Path) -> None:
    """With a lease and node timeout longer than the outage (as the defaults are: 3 and 4 minutes), a git server down
    60 s costs no stage: nobody is judged lost on time it could not reach the remote, and nobody fences itself."""
    seconds = float(os.environ.get("WINSLOW_CHAOS_OUTAGE_S", "60"))
    cluster = Cluster(tmp_path, extra=("--lease", "90s", "--node-timeout", "120s"))
    projects = [f"p{i}" for i in range(3)]
    marks = {p: tmp_path / f"marks-{p}.txt" for p in projects}
    for path in marks.values():
        path.touch()
    cluster.remote.write({"pipelines/long.yaml": long_stage(rounds=int((seconds + 60) * 5)),
                          **{f"projects/{p}/project.yaml": project(marks[p]) for p in projects}})
    try:
        wait_for(lambda: all(holder(cluster.remote, p) for p in projects), 40, "the three stages to run")
        tips = {name: cluster.tip(name) for name in cluster.nodes}
        cluster.daemon.stop()
        time.sleep(seconds)
        cluster.daemon.start()
        for name, tip in tips.items():
            cluster.rejoined(name, tip)
        time.sleep(3)
        runs = {p: [(r["id"], r["state"]) for r in cluster.remote.status(p)["runs"]] for p in projects}
        logs = {name: node.log() for name, node in cluster.nodes.items()}
        cluster.remote.write({f"projects/{p}/project.yaml": project(marks[p], "aborted")
                              for p in projects}, "the end")
        wait_for(lambda: all(holder(cluster.remote, p) is None for p in projects), 30, "the stages to be aborted")
    finally:
        try:
            for path in marks.values():
                Copies(path).end()
        finally:
            cluster.close()  # whatever the sampler did: the nodes and the daemon end with the test
    assert runs == {p: [("1-work-1", "RUNNING")] for p in projects}, runs
    for p in projects:
        times = sorted(float(line.split()[1]) for line in marks[p].read_text().splitlines())
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert max(gaps) < 2, f"{p}'s stage stopped for {max(gaps):.1f}s"
    assert not any("fenced" in log.lower() for log in logs.values()), "a node fenced itself over a shared outage"


DOCKER_STAGE = ("name: long\nstages:\n  - name: work\n    image: {image}\n    lost_retries: 3\n"
                "    command: [sh, -c, 'i=0; while [ $i -lt 150 ]; do cut -d\" \" -f1 /proc/uptime"
                " >> \"$WINSLOW_WORKSPACE/marks\"; i=$((i+1)); sleep 0.2; done']\n")


def uptime_spans(storage: Path) -> dict[str, tuple[float, float]]:
    """Each attempt's first and last mark, on the kernel's uptime clock (the same inside every container)."""
    found = {}
    for marks in sorted((storage / "workspaces" / "p").glob("*/marks")):
        times = [float(line) for line in marks.read_text().split()]
        if times:
            found[marks.parent.name] = (min(times), max(times))
    return found


def test_a_killed_docker_node_leaves_no_container_beside_the_retry(tmp_path: Path, busybox_image: str) -> None:
    """The watchdog outside the node process stops the killed node's container before the retry starts."""
    remote = StateRemote(tmp_path)
    storage = tmp_path / "storage"
    remote.write({"pipelines/long.yaml": DOCKER_STAGE.format(image=busybox_image),
                  "projects/p/project.yaml": "pipeline: long\nrun: {request: 1}\n"}, "p")
    nodes = {name: NodeProcess(name, remote.remote, storage, tmp_path / "work" / name, executor="docker")
             for name in ("n1", "n2")}
    try:
        victim = wait_for(lambda: holder(remote), 60, "the stage to start on a node")
        assert isinstance(victim, str)
        wait_for(lambda: sum(len(s) for s in [uptime_spans(storage)]) >= 1, 20, "the stage's first marks")
        nodes[victim].signal(signal.SIGKILL)
        other = next(name for name in nodes if name != victim)
        wait_for(lambda: holder(remote) == other, 60, "the other node to take the stage over")
        wait_for(lambda: len(uptime_spans(storage)) >= 2, 30, "the new attempt's first mark")
        time.sleep(1.5)
    finally:
        for node in nodes.values():
            node.stop()  # the survivor's container keeps running; its watchdog stops it once the lease lapses
    found = uptime_spans(storage)
    first, second = sorted(found.items(), key=lambda item: item[1][0])[:2]
    assert first[1][1] < second[1][0], f"two copies alive at once: {found}"
    assert "stopped" in (tmp_path / "work" / victim / "watchdog.log").read_text()


def test_a_short_freeze_of_the_node_kills_nothing(tmp_path: Path) -> None:
    """A node frozen for less than its lease: its stage runs on, nobody takes it over, one attempt in all."""
    remote = StateRemote(tmp_path)
    marks = tmp_path / "marks.txt"
    marks.touch()
    remote.write({"pipelines/long.yaml": long_stage(rounds=40),
                  "projects/p/project.yaml": f"pipeline: long\nenv: {{MARKS: {marks}}}\nrun: {{request: 1}}\n"}, "p")
    nodes = {name: NodeProcess(name, remote.remote, tmp_path / "storage", tmp_path / "work" / name)
             for name in ("n1", "n2")}
    try:
        victim = wait_for(lambda: holder(remote), 30, "the stage to start on a node")
        assert isinstance(victim, str)
        nodes[victim].signal(signal.SIGSTOP)
        time.sleep(2.5)  # shorter than the lease (4 s) and the node timeout (6 s)
        nodes[victim].signal(signal.SIGCONT)
        wait_for(lambda: remote.status("p").get("state") == "SUCCEEDED", 40, "the stage to finish where it ran")
    finally:
        for node in nodes.values():
            node.signal(signal.SIGCONT)
            node.stop()
    runs = remote.status("p")["runs"]
    assert [(r["id"], r["state"], r["node"]) for r in runs] == [("1-work-1", "SUCCEEDED", victim)]
    assert list(spans(marks)) == ["1-work-1"]
