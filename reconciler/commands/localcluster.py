"""`winslow cluster up|down|status`: a state repo, a git daemon, N nodes and the viewer, all on this machine.

For trying multi-node behaviour (placement, a node killed and its work taken over, drain)
without more machines. `up` starts each process detached (a session of its own, its output
in DIR/logs/) and records its pid with its start time in DIR/cluster.json; `down` signals
exactly those, and only while a pid still names the process that was started: pids get
reused, and a stranger that inherited one is left alone.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from reconciler.commands.demo import say, winslow_command
from reconciler.commands.init import init_repo
from reconciler.errors import ConfigError, WinslowError
from reconciler.gitcmd import IDENTITY, git
from reconciler.wake import RemoteWatcher

MARKER = ".winslow-cluster"
RECORD = "cluster.json"
REMOTE = "remote.git"
DAEMON = "git-daemon"
VIEWER = "viewer"
MAX_NODES = 32
CREATE_TIME_TOLERANCE_S = 0.05
POLL_S = 0.5  # the longest a wait goes without looking, where nothing can wake it (a port opening, no pidfd)
KILL_WAIT_S = 5.0


@dataclass(frozen=True)
class Started:
    """One process `up` started: enough to find it again, and to know it is still the same one."""

    name: str
    pid: int
    create_time: float
    log: str
    argv: list[str]


@dataclass(frozen=True)
class Record:
    """DIR/cluster.json: what `up` made and started, for `down` and `status`."""

    dir: str
    executor: str
    repo_url: str
    viewer_url: str
    storage: str
    processes: list[Started]

    def with_process(self, started: Started) -> Record:
        return Record(self.dir, self.executor, self.repo_url, self.viewer_url, self.storage,
                      [*self.processes, started])


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("cluster", help="a local cluster on this machine: a served state repo, nodes, the viewer",
                            description="Run a whole Winslow cluster on this machine for trying multi-node behaviour: "
                                        "a state repo served by `git daemon` on 127.0.0.1, N nodes as separate "
                                        "processes sharing one storage folder, and the viewer. (To drain or reserve "
                                        "a node of a real cluster, see `winslow drain` and `winslow reserve`.)")
    verbs = parser.add_subparsers(dest="cluster_command", metavar="{up,down,status}", required=True)
    up = verbs.add_parser("up", help="create (or reuse) DIR and start the git daemon, the nodes and the viewer",
                          description="Create a state repo under DIR (or reuse the one there), serve it with "
                                      "`git daemon` on 127.0.0.1, start N nodes (node-1, node-2, ...) and the viewer, "
                                      "each detached with its log in DIR/logs/, and wait until every node has sent a "
                                      "heartbeat and the viewer answers. Every pid goes into DIR/cluster.json.\n\n"
                                      "example: winslow cluster up --nodes 3 --executor process")
    up.add_argument("--nodes", type=_node_count, default=3, help=f"how many nodes (1 to {MAX_NODES}, default 3)")
    up.add_argument("--executor", choices=("auto", "docker", "process"), default="auto",
                    help="how the nodes run stages; auto (default): Docker when an engine answers, else host processes")
    up.add_argument("--port-base", type=_port_base, metavar="PORT",
                    help="serve git on PORT and the viewer on PORT+1 (default: free ports)")
    up.add_argument("--timeout", type=float, default=60,
                    help="give up when the nodes and the viewer are not ready after this many seconds (default 60)")
    stopping = "give each process this many seconds after SIGTERM before SIGKILL (default 20)"
    down = verbs.add_parser("down", help="stop what `up` started in DIR",
                            description="Stop exactly the processes recorded in DIR/cluster.json, each only while its "
                                        "pid still names the process that was started: SIGTERM, then SIGKILL after "
                                        "the grace. The nodes and the viewer stop first, the git daemon last. The "
                                        "folder (state repo, storage, logs) stays for the next `up`.")
    down.add_argument("--grace", type=float, default=20, help=stopping)
    status = verbs.add_parser("status", help="which of the processes `up` started in DIR are alive",
                              description="List the processes recorded in DIR/cluster.json and whether each is alive; "
                                          "exit 0 when all are, else 1.")
    for verb, func in ((up, run_up), (down, run_down), (status, run_status)):
        verb.add_argument("--dir", type=Path, default=Path("winslow-cluster"),
                          help="the cluster's folder (default: ./winslow-cluster)")
        verb.set_defaults(func=func)


def _node_count(text: str) -> int:
    return _whole_number(text, 1, MAX_NODES)


def _port_base(text: str) -> int:
    return _whole_number(text, 1024, 65534)


def _whole_number(text: str, low: int, high: int) -> int:
    try:
        number = int(text)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: not a whole number from {low} to {high}")
    return number


# --- up ---

def run_up(args: argparse.Namespace) -> int:
    root = args.dir.resolve()
    running = _running(root)
    if running:
        raise ConfigError(f"a cluster already runs in {root} ({len(running)} of its processes alive); stop it with "
                          f"`{winslow_command()} cluster down --dir {root}`")
    executor, why = _choose_executor(args.executor)
    git_port, viewer_port = _ports(args.port_base)
    repo, remote, storage = _prepare(root)
    record = Record(str(root), executor, f"git://127.0.0.1:{git_port}/{REMOTE}", f"http://127.0.0.1:{viewer_port}/",
                    str(storage), [])
    (root / RECORD).unlink(missing_ok=True)
    try:
        record = _start(root, remote, record, git_port, viewer_port, args.nodes, args.timeout)
    except BaseException:
        say("The cluster did not come up; stopping what started:")
        _stop(_read_record(root).processes if (root / RECORD).exists() else [], KILL_WAIT_S)
        (root / RECORD).unlink(missing_ok=True)
        raise
    _report(root, repo, record, why)
    return 0


def _choose_executor(wanted: str) -> tuple[str, str]:
    """The executor the nodes use and a few words saying why."""
    if wanted == "process":
        return "process", "host processes (--executor process)"
    try:
        import docker

        docker.from_env(timeout=10).ping()
    except Exception as exc:  # noqa: BLE001 - docker-py raises many kinds when no engine answers
        if wanted == "docker":
            raise ConfigError(f"no Docker engine answers ({type(exc).__name__}); try --executor process") from None
        return "process", "host processes: no Docker engine answers here"
    return "docker", "Docker containers" + (" (--executor docker)" if wanted == "docker" else ": an engine answers")


def _prepare(root: Path) -> tuple[Path, Path, Path]:
    """DIR with a state repo (made once, reused after), its bare remote, storage, logs and work folders."""
    if root.exists() and not (root / MARKER).exists() and (not root.is_dir() or any(root.iterdir())):
        raise ConfigError(f"{root} exists and is not a Winslow cluster folder; choose another --dir")
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("a local Winslow cluster: winslow cluster up|down|status --dir this folder\n")
    repo, remote, storage = root / "repo", root / REMOTE, root / "storage"
    if not (remote / "HEAD").exists():
        init_repo(repo, remote)
    for folder in (storage, root / "logs", root / "work"):
        folder.mkdir(exist_ok=True)
    return repo, remote, storage


def _ports(base: int | None) -> tuple[int, int]:
    """The git daemon's port and the viewer's: `base` and the next one if both are free, else two the OS picks."""
    if base is not None:
        for port in (base, base + 1):
            if not _port_free(port):
                raise ConfigError(f"port {port} on 127.0.0.1 is in use; choose another --port-base")
        return base, base + 1
    with socket.socket() as first, socket.socket() as second:  # both held open, so the OS gives two different ones
        first.bind(("127.0.0.1", 0))
        second.bind(("127.0.0.1", 0))
        return int(first.getsockname()[1]), int(second.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _start(root: Path, remote: Path, record: Record, git_port: int, viewer_port: int, nodes: int,
           timeout: float) -> Record:
    """Start the daemon, the nodes and the viewer, recording each at once; return when all are ready."""
    deadline = time.monotonic() + timeout
    daemon = ["git", "daemon", "--reuseaddr", "--listen=127.0.0.1", f"--port={git_port}", f"--base-path={root}",
              "--export-all", "--enable=receive-pack", "--informative-errors", str(remote)]
    record = _spawn(root, record, DAEMON, daemon)
    _await_port(git_port, record.processes[-1], deadline)
    before = _heartbeats(remote)
    names = [f"node-{index}" for index in range(1, nodes + 1)]
    for name in names:
        record = _spawn(root, record, name, [
            sys.executable, "-m", "reconciler", "node", "--repo", record.repo_url, "--name", name,
            "--executor", record.executor, "--storage", record.storage, "--work", str(root / "work" / name)])
    # The viewer reads the remote's folder, not the daemon: a folder is watched, so a push shows at once.
    record = _spawn(root, record, VIEWER, [
        sys.executable, "-m", "reconciler", "viewer", "--repo", str(remote), "--storage", record.storage,
        "--port", str(viewer_port), "--work", str(root / "work" / VIEWER)])
    _await_ready(remote, record, {name: before.get(name) for name in names}, deadline)
    return record


def _spawn(root: Path, record: Record, name: str, argv: list[str]) -> Record:
    """Start one process detached (its own session, so a Ctrl-C in this terminal does not reach it) and record it."""
    log = root / "logs" / f"{name}.log"
    with open(log, "ab") as out:  # a process started again adds to its log
        popen = subprocess.Popen(argv, cwd=root, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 env={**os.environ, **IDENTITY}, start_new_session=True)
    try:
        create_time = psutil.Process(popen.pid).create_time()
    except psutil.NoSuchProcess:
        raise WinslowError(f"{name} stopped as soon as it started; see {log}") from None
    record = record.with_process(Started(name, popen.pid, create_time, str(log), argv))
    _write_record(root, record)
    return record


def _await_port(port: int, daemon: Started, deadline: float) -> None:
    while time.monotonic() < deadline:
        _check_alive(daemon)
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise WinslowError(f"the git daemon does not listen on port {port}; see {daemon.log}")


def _heartbeats(remote: Path) -> dict[str, str]:
    """Each node's heartbeat branch tip on the remote, by node name."""
    out = git(remote, "for-each-ref", "--format=%(objectname) %(refname)", "refs/heads/winslow/nodes/")
    return {ref.rsplit("/", 1)[1]: sha for sha, ref in (line.split(" ", 1) for line in out.splitlines())}


def _await_ready(remote: Path, record: Record, before: dict[str, str | None], deadline: float) -> None:
    """Until every node has pushed a new heartbeat and the viewer answers; woken by every push to the remote."""
    wake = threading.Event()
    watcher = RemoteWatcher(str(remote), wake, poll=POLL_S)
    watcher.start()
    try:
        while time.monotonic() < deadline:
            wake.clear()
            for started in record.processes:
                _check_alive(started)
            tips = _heartbeats(remote)
            if all(tips.get(name) not in (None, tip) for name, tip in before.items()) and _answers(record.viewer_url):
                return
            wake.wait(POLL_S)
    finally:
        watcher.stop()
    silent = sorted(name for name, tip in before.items() if _heartbeats(remote).get(name) in (None, tip))
    what = f"no heartbeat from {', '.join(silent)}" if silent else f"the viewer does not answer at {record.viewer_url}"
    raise WinslowError(f"the cluster did not come up in time ({what}); see the logs in {Path(record.dir) / 'logs'}")


def _check_alive(started: Started) -> None:
    if _same_process(started) is None:
        raise WinslowError(f"{started.name} stopped while the cluster came up; see {started.log}")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


def _report(root: Path, repo: Path, record: Record, why: str) -> None:
    winslow = winslow_command()
    nodes = [p for p in record.processes if p.name not in (DAEMON, VIEWER)]
    say(f"Winslow cluster in {root}: {len(nodes)} nodes running stages as {why}")
    say(f"  state repo:  {record.repo_url}   (git clone it, push to it)")
    say(f"  a clone:     {repo}   (its origin is {root / REMOTE})")
    say(f"  viewer:      {record.viewer_url}")
    say(f"  storage:     {record.storage}   (winslow upload FILE DIR/ --storage {record.storage})")
    for started in record.processes:
        say(f"  {started.name + ':':<12} pid {started.pid:<8} log {started.log}")
    say(f"Which are alive: {winslow} cluster status --dir {root}")
    say(f"Stop them all:   {winslow} cluster down --dir {root}")


# --- down and status ---

def run_down(args: argparse.Namespace) -> int:
    root = args.dir.resolve()
    record = _read_record(root)
    left = _stop(record.processes, args.grace)
    if left:
        raise WinslowError(f"could not stop {', '.join(left)}; {root / RECORD} is kept")
    (root / RECORD).unlink()
    say(f"The cluster in {root} is down; its state repo, storage and logs stay for the next `cluster up`.")
    return 0


def run_status(args: argparse.Namespace) -> int:
    root = args.dir.resolve()
    record = _read_record(root)
    say(f"Winslow cluster in {root} ({record.executor} executor): {record.repo_url}, viewer {record.viewer_url}")
    alive = 0
    for started in record.processes:
        running = _same_process(started) is not None
        alive += running
        say(f"  {started.name + ':':<12} pid {started.pid:<8} {'running' if running else 'not running':<12} "
            f"log {started.log}")
    say(f"{alive} of {len(record.processes)} running")
    return 0 if alive == len(record.processes) else 1


def _running(root: Path) -> list[Started]:
    if not (root / RECORD).exists():
        return []
    return [started for started in _read_record(root).processes if _same_process(started) is not None]


def _stop(processes: list[Started], grace: float) -> list[str]:
    """Stop the nodes and the viewer, then the git daemon (the nodes push as they stop); the names left running."""
    left: list[str] = []
    for wave in ([p for p in processes if p.name != DAEMON], [p for p in processes if p.name == DAEMON]):
        left += _stop_wave(wave, grace)
    return left


def _stop_wave(wave: list[Started], grace: float) -> list[str]:
    live: dict[str, psutil.Process] = {}
    for started in wave:
        process = _same_process(started)
        if process is None:
            say(f"  {started.name} (pid {started.pid}) was not running" + _reused(started))
            continue
        try:
            process.send_signal(signal.SIGTERM)  # psutil refuses if the pid was reused since
        except psutil.NoSuchProcess:
            say(f"  {started.name} (pid {started.pid}) was not running")
            continue
        live[started.name] = process
    if not live:
        return []
    stubborn = _await_exit(list(live.values()), grace)
    for process in stubborn:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    unkillable = _await_exit(stubborn, KILL_WAIT_S)
    left = []
    for name, process in live.items():
        if process in unkillable:
            left.append(name)
            say(f"  {name} (pid {process.pid}) is still running after SIGKILL")
        elif process in stubborn:
            say(f"  killed {name} (pid {process.pid}): still running {grace:g}s after SIGTERM")
        else:
            say(f"  stopped {name} (pid {process.pid})")
    return left


def _reused(started: Started) -> str:
    return "; its pid now names another process, left alone" if psutil.pid_exists(started.pid) else ""


def _same_process(started: Started) -> psutil.Process | None:
    """The recorded process if this pid still names it (not a later one that got the pid) and it is alive."""
    try:
        process = psutil.Process(started.pid)
        if abs(process.create_time() - started.create_time) > CREATE_TIME_TOLERANCE_S:
            return None
        return process if _alive(process) else None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _await_exit(processes: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait, woken by each process's pidfd, until all have ended or `timeout` passed; those still alive."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    fds = []
    for process in processes:
        try:
            fds.append(os.pidfd_open(process.pid))  # readable once it has ended
            poller.register(fds[-1], select.POLLIN)
        except (AttributeError, OSError):  # not Linux 5.3+, or it has ended already: POLL_S bounds the wait
            pass
    try:
        alive = [p for p in processes if _alive(p)]
        while alive and (remaining := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(min(remaining, POLL_S) * 1000):
                poller.unregister(fd)
            alive = [p for p in alive if _alive(p)]
        return alive
    finally:
        for fd in fds:
            os.close(fd)


# --- the record ---

def _write_record(root: Path, record: Record) -> None:
    path = root / RECORD
    temporary = path.with_name(f".{RECORD}.tmp")
    temporary.write_text(json.dumps(asdict(record), indent=2) + "\n")
    temporary.replace(path)  # whole or not at all: a `down` never reads half a record


def _read_record(root: Path) -> Record:
    path = root / RECORD
    if not path.exists():
        raise WinslowError(f"no cluster in {root}: nothing recorded in {path} (start one with `cluster up`)")
    try:
        data = json.loads(path.read_text())
        processes = [Started(str(p["name"]), int(p["pid"]), float(p["create_time"]), str(p["log"]),
                             [str(a) for a in p["argv"]]) for p in data["processes"]]
        return Record(str(data["dir"]), str(data["executor"]), str(data["repo_url"]), str(data["viewer_url"]),
                      str(data["storage"]), processes)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WinslowError(f"{path}: not a cluster record ({type(exc).__name__}: {exc})") from None
