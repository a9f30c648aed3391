"""The Slurm executor against a real Slurm (tests/slurm.py): jobs, their states, and nodes that run them."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from reconciler.clock import seconds_between
from reconciler.executors.base import ExitInfo, LaunchSpec, StartInfo
from reconciler.executors.slurm import SlurmExecutor
from reconciler.executors.slurmjob import JOB_SCRIPT, sbatch_options
from reconciler.fencing import write_shared_lease
from reconciler.model import SlurmSettings
from tests.cluster import GIT_ENV, NodeProcess, StateRemote, git, wait_for
from tests.slurm import SlurmCluster, slurm_fixture  # noqa: F401 - the fixture

pytestmark = pytest.mark.slurm

PROJECT = "pipeline: {pipeline}\nrun:\n  request: 1\n  state: {state}\n"
LEASE_S = 4.0  # tests/cluster.py's NodeProcess: --lease 4s --node-timeout 6s


def spec(root: Path, run_id: str, command: tuple[str, ...], **more: object) -> LaunchSpec:
    fields: dict = {"project": "p", "run_id": run_id, "stage": "s", "node": "n1", "image": "none", "command": command,
                    "env": {}, "resources_dir": root / "storage/resources", "workspace_dir": root / f"storage/ws/{run_id}",
                    "input_dir": None, "log_path": root / f"storage/logs/p/{run_id}.log", **more}
    return LaunchSpec(**fields)


class Exits:
    def __init__(self) -> None:
        self.seen: list[ExitInfo] = []
        self.event = threading.Event()

    def __call__(self, info: ExitInfo) -> None:
        self.seen.append(info)
        self.event.set()

    def wait(self, timeout: float = 20) -> ExitInfo:
        assert self.event.wait(timeout), "no exit reported"
        return self.seen[-1]


@pytest.fixture
def executor(slurm: SlurmCluster, tmp_path: Path):
    exits = Exits()
    made = SlurmExecutor("n1", exits, tmp_path / "work", cluster="test")
    yield made, exits
    for run in made.running():
        made.stop(run.project, run.run_id, "test over")
    made.close()


@pytest.fixture
def remote(tmp_path: Path) -> StateRemote:
    return StateRemote(tmp_path)


@pytest.fixture
def start_node(slurm: SlurmCluster, remote: StateRemote, tmp_path: Path):
    nodes: list[NodeProcess] = []

    def start(name: str = "hpc", executor: str = "slurm", *extra: str) -> NodeProcess:
        node = NodeProcess(name, remote.remote, tmp_path / "storage", tmp_path / "work" / name, executor, extra,
                           env=slurm.env())
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


def run_of(remote: StateRemote, project: str, index: int = 0) -> dict:
    runs = remote.status(project).get("runs") or []
    return runs[index] if len(runs) > index else {}


def settled(remote: StateRemote, project: str) -> dict:
    """The project's first run once it ended and its log is on main."""
    def ended() -> dict | None:
        run = run_of(remote, project)
        return run if run.get("finished") and run.get("log") else None
    return wait_for(ended, 30, f"the run of {project} to end")


def approve(remote: StateRemote, branch: str) -> None:
    """Merge a resume branch as a person would, again when a node pushed to main first."""
    for _ in range(20):
        git(remote.clone, "fetch", "-q", "origin")
        git(remote.clone, "reset", "-q", "--hard", "origin/main")
        git(remote.clone, "merge", "-q", "--no-ff", "-m", "approve", branch)
        if subprocess.run(["git", "push", "-q", "origin", "main"], cwd=remote.clone, capture_output=True).returncode == 0:
            return
    raise AssertionError(f"could not push the merge of {branch}")


# -- the job, from the executor ---------------------------------------------------------


def test_resources_tags_and_settings_become_sbatch_options(tmp_path: Path) -> None:
    launch = spec(tmp_path, "1-s-1", ("true",), gpus=(0, 1), cpus=2.5, memory=3 * 2**30 + 1, timeout=90.0,
                  node_tags=("a100", "ulm"))
    settings = SlurmSettings(partition="gpu", account="lab", qos="high", flags=("--exclusive",))
    options = sbatch_options(launch, settings, "winslow:c:n1:p:1-s-1", frozenset({"a100", "v100"}), export_fd=7)
    assert "--gres=gpu:2" in options and "--cpus-per-task=3" in options and "--mem=3073M" in options
    assert "--time=2" in options  # whole minutes, rounded up: the tracker stops it on the second
    assert "--constraint=a100" in options  # a feature of the partition; ulm only routes stages to this node
    assert {"--partition=gpu", "--account=lab", "--qos=high", "--export-file=7", "--no-requeue"} <= set(options)
    assert options[-1] == "--exclusive" and f"--output={tmp_path / 'storage/logs/p/1-s-1.log'}" in options
    plain = sbatch_options(spec(tmp_path, "1-s-1", ("true",), cpus=None, memory=None), SlurmSettings(), "c")
    assert not [o for o in plain if o.startswith(("--gres", "--cpus", "--mem", "--time", "--constraint", "--part"))]


def test_gpu_job_gets_slurms_devices_and_its_env_stays_data(executor, slurm: SlurmCluster, tmp_path: Path) -> None:
    made, exits = executor
    command = ("sh", "-c", 'echo "cuda=$CUDA_VISIBLE_DEVICES trick=$TRICK arg=$1 cwd=$(pwd)"; exit 3', "sh", "${TRICK}")
    launch = spec(tmp_path, "1-gpu-1", command, env={"TRICK": "x; echo INJECTED"}, gpus=(1,), cpus=1.0,
                  memory=64 * 2**20, node_tags=("fast",))
    made.start(launch)
    ended = exits.wait()
    assert (ended.exit_code, ended.reason) == (3, None)
    log = launch.log_path.read_text()
    assert f"cuda=0 trick=x; echo INJECTED arg=x; echo INJECTED cwd={launch.workspace_dir}" in log  # Slurm's index
    assert "\nINJECTED" not in log and "with GPU 0" in log
    job = slurm.run("squeue", "--states=all", "--name=winslow-p-1-gpu-1", "--noheader", "--format=%f %b").split()
    assert job == ["fast", "gres:gpu:1"]  # the stage's tag that names a feature is a constraint
    assert made.running() == [] and not list((tmp_path / "work").glob("*/*.json"))  # released


def test_a_job_is_queued_until_slurm_runs_it_and_one_waiting_for_gpus_says_slurms_reason(executor,
                                                                                         tmp_path: Path) -> None:
    made, exits = executor
    heard: list[tuple[str, StartInfo]] = []
    made.on_start = lambda project, run_id, info: heard.append((run_id, info))
    assert made.start(spec(tmp_path, "1-s-1", ("sleep", "60"), gpus=(0, 1), memory=64 * 2**20)) == \
        StartInfo(None, queue="Slurm")  # submitted: it starts when Slurm says so
    waiting = spec(tmp_path, "1-s-2", ("true",), gpus=(0,), memory=64 * 2**20)
    made.start(waiting)
    wait_for(lambda: ("1-s-2", StartInfo(None, queue="Slurm", reason="Resources")) in heard, 10, "Slurm's reason")
    assert "is pending in Slurm's queue (Resources)" in waiting.log_path.read_text()
    (first, began), = [(run_id, info) for run_id, info in heard if info.started]
    assert first == "1-s-1" and [(r.run_id, r.started) for r in made.running()] == [("1-s-1", began.started),
                                                                                    ("1-s-2", None)]
    made.stop("p", "1-s-2", "aborted")
    assert exits.wait().reason == "aborted"


def job_script(tmp_path: Path, lease: Path, *command: str) -> subprocess.Popen[str]:
    """The job script as a compute node runs it, without Slurm: in a process group of its own, as a job is."""
    script = tmp_path / "winslow-job.sh"
    script.write_text(JOB_SCRIPT)
    return subprocess.Popen(["sh", str(script), str(tmp_path / "run.exit"), "", str(lease), "--", *command],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_the_job_script_runs_no_stage_once_its_nodes_lease_has_run_out(tmp_path: Path) -> None:
    lease = tmp_path / "lease"
    write_shared_lease(lease, time.time() - 1)  # the job waited in the queue while its node died
    job = job_script(tmp_path, lease, "sh", "-c", "echo RAN")
    out, _ = job.communicate(timeout=10)
    assert job.returncode == 1 and "RAN" not in out
    assert "had run out when the job started" in (tmp_path / "run.exit.lapsed").read_text()


def test_the_job_script_keeps_the_last_lease_it_read_whole(tmp_path: Path) -> None:
    lease = tmp_path / "lease"
    write_shared_lease(lease, time.time() + 1.5)
    began = time.monotonic()
    job = job_script(tmp_path, lease, "sleep", "30")
    time.sleep(0.5)
    lease.write_text(f"{time.time() + 60:.3f}")  # caught half-written (no newline yet): not believed
    out, _ = job.communicate(timeout=10)
    assert time.monotonic() - began < 5, out  # ended once the lease it read whole had passed
    assert job.returncode == 128 + signal.SIGTERM and "winslow: the node's lease ran out" in out
    assert (tmp_path / "run.exit").read_text() == "143\n"


# -- nodes that run jobs ------------------------------------------------------------------


def test_gpu_stage_runs_as_a_slurm_job_and_the_next_on_a_workstation_after_the_gate(remote, start_node,
                                                                                  slurm: SlurmCluster) -> None:
    pipeline = """\
name: video
stages:
  - name: detect
    image: none
    command: [sh, -c, 'echo "detect on GPU $CUDA_VISIBLE_DEVICES in $SLURM_JOB_PARTITION"; echo cars > cars.txt']
    resources: {gpus: 1, cpus: 2, memory: 256MiB}
    node_tags: [fast]
    pause_after: true
  - name: track
    image: none
    command: [sh, -c, 'echo "track $(cat "$WINSLOW_INPUT/cars.txt") on $WINSLOW_NODE"']
    node_tags: [workstation]
"""
    hpc_settings = "\nnodes: {hpc: {slurm: {partition: debug, flags: [--nice=7]}}}\n"
    settings = remote.read("winslow.yaml").replace("\nnodes: {}\n", hpc_settings)
    remote.write({"winslow.yaml": settings, "pipelines/video.yaml": pipeline,
                  "projects/v/project.yaml": PROJECT.format(pipeline="video", state="running")})
    start_node("hpc", "slurm", "--tag", "fast")
    start_node("ws", "process", "--tag", "workstation")
    wait_for(lambda: remote.status("v").get("state") == "WAITING", 40, "the gate after detect")
    detect = run_of(remote, "v")
    assert (detect["state"], detect["node"], detect["gpus"]) == ("SUCCEEDED", "hpc", [0])
    assert "detect on GPU 0 in debug" in remote.read("projects/v/logs/1-detect-1.log")
    job = slurm.run("squeue", "--states=all", "--name=winslow-v-1-detect-1", "--noheader", "--format=%P %y %b %f")
    assert job.split() == ["debug", "7", "gres:gpu:1", "fast"]  # winslow.yaml's settings, the stage's GPU and tag
    hpc = remote.read("nodes/hpc.yaml", "winslow/nodes/hpc")
    assert "model: Slurm gres/gpu" in hpc and "cpus: 8" in hpc  # the partition's capacity, not this machine's
    wait_for(lambda: "refs/heads/resume/v/1" in remote.refs(), 15, "the resume branch")
    wait_for(lambda: remote.status("v")["request"].get("proposed"), 10, "the gate to record its branch")
    approve(remote, "origin/resume/v/1")
    wait_for(lambda: remote.status("v").get("state") == "SUCCEEDED", 30, "track after the approval")
    track = run_of(remote, "v", 1)
    assert track["node"] == "ws" and "track cars on ws" in remote.read("projects/v/logs/2-track-1.log")


def test_failing_job_records_its_exit_code_and_an_overlong_one_ends_as_a_timeout(remote, start_node) -> None:
    failing = "name: bad\nstages:\n  - {name: x, image: none, command: [sh, -c, 'echo oops; exit 3']}\n"
    slow = "name: slow\nstages:\n  - {name: x, image: none, command: [sleep, '60'], timeout: 3s}\n"
    remote.write({"pipelines/bad.yaml": failing, "pipelines/slow.yaml": slow,
                  "projects/f/project.yaml": PROJECT.format(pipeline="bad", state="running"),
                  "projects/t/project.yaml": PROJECT.format(pipeline="slow", state="running")})
    start_node()
    failed = settled(remote, "f")
    assert (failed["state"], failed["exit_code"]) == ("FAILED", 3)
    assert "oops" in remote.read("projects/f/logs/1-x-1.log")
    timed_out = settled(remote, "t")
    assert timed_out["state"] == "FAILED" and timed_out["reason"] == "timeout after 3s"
    # Both jobs started at once: their queueing landed with their start, never as a PENDING project on main.
    shown = subprocess.run(["git", "--git-dir", str(remote.remote), "log", "-p", "main", "--", "projects/f/status.yaml",
                            "projects/t/status.yaml"], capture_output=True, text=True, check=True).stdout
    assert "+state: PENDING" not in shown, shown


def test_abort_cancels_the_job_within_seconds(remote, start_node, slurm: SlurmCluster) -> None:
    pipeline = "name: slow\nstages:\n  - {name: s, image: none, command: [sleep, '300']}\n"
    remote.write({"pipelines/slow.yaml": pipeline, "projects/p/project.yaml": PROJECT.format(pipeline="slow",
                                                                                              state="running")})
    start_node()
    wait_for(lambda: run_of(remote, "p").get("started"), 30, "the job to be submitted")
    wait_for(lambda: "runs on" in (remote.read("nodes/hpc.yaml", "winslow/nodes/hpc") or ""), 15, "the job to run")
    jobs = slurm.jobs()
    began = time.monotonic()
    remote.write({"projects/p/project.yaml": PROJECT.format(pipeline="slow", state="aborted")})
    run = settled(remote, "p")
    assert time.monotonic() - began < 10
    assert (run["state"], run["reason"]) == ("FAILED", "aborted")
    assert not set(jobs) & set(slurm.jobs())


def test_a_job_whose_slurm_node_fails_ends_lost(remote, start_node, slurm: SlurmCluster) -> None:
    pipeline = "name: slow\nstages:\n  - {name: s, image: none, command: [sleep, '300'], lost_retries: 0}\n"
    remote.write({"pipelines/slow.yaml": pipeline, "projects/p/project.yaml": PROJECT.format(pipeline="slow",
                                                                                              state="running")})
    start_node()
    wait_for(lambda: "runs on" in (remote.read("nodes/hpc.yaml", "winslow/nodes/hpc") or ""), 30, "the job to run")
    slurm.run("scontrol", "update", f"NodeName={slurm.host}", "State=DOWN", "Reason=winslow-test")
    try:
        run = settled(remote, "p")
    finally:
        slurm.resume()
    assert run["state"] == "LOST"
    assert re.fullmatch(rf"Slurm job \d+ ended because its node failed on {slurm.host} \(NODE_FAIL\)", run["reason"])
    assert remote.status("p")["state"] == "FAILED"  # no lost_retries left


def test_restarted_node_adopts_its_running_job_and_finalises_one_that_ended_meanwhile(remote, start_node,
                                                                                      slurm: SlurmCluster) -> None:
    long = "name: long\nstages:\n  - {name: s, image: none, command: [sh, -c, 'sleep 8; echo long done']}\n"
    short = "name: short\nstages:\n  - {name: s, image: none, command: [sh, -c, 'sleep 3; exit 4']}\n"
    remote.write({"pipelines/long.yaml": long, "pipelines/short.yaml": short,
                  "projects/l/project.yaml": PROJECT.format(pipeline="long", state="running"),
                  "projects/s/project.yaml": PROJECT.format(pipeline="short", state="running")})
    first = start_node("hpc", "slurm", "--lease", "30s", "--node-timeout", "40s")  # its jobs outlive a short restart
    wait_for(lambda: slurm.jobs("winslow-l-1-s-1") and slurm.jobs("winslow-s-1-s-1"), 30, "both jobs", interval=0.05)
    first.signal(signal.SIGKILL)
    first.proc.wait(timeout=10)
    wait_for(lambda: not slurm.jobs("winslow-s-1-s-1"), 15, "the short job to end while the node is down")
    second = start_node("hpc", "slurm", "--lease", "30s", "--node-timeout", "40s")
    short_run, long_run = settled(remote, "s"), settled(remote, "l")
    assert (short_run["state"], short_run["exit_code"]) == ("FAILED", 4)
    assert (long_run["state"], long_run["exit_code"]) == ("SUCCEEDED", 0)
    assert "long done" in remote.read("projects/l/logs/1-s-1.log")
    assert [r["id"] for r in remote.status("l")["runs"]] == ["1-s-1"]  # adopted, not run again
    adopted = re.findall(r"adopting: node=hpc project=(\w) run=1-s-1 job=\d+ state=(\w+)", second.log())
    assert sorted(adopted) == [("l", "running"), ("s", "failed")]  # the first life had nothing to adopt


def test_a_job_pending_in_slurms_queue_is_pending_with_slurms_reason_and_timed_from_its_start(remote, start_node,
                                                                                             slurm: SlurmCluster) -> None:
    timeout = 4.0
    pipeline = ("name: gpu\nstages:\n  - {name: detect, image: none, command: [sh, -c, 'sleep 1; echo ran'], "
                f"resources: {{gpus: 1, memory: 64MiB}}, timeout: {timeout:.0f}s}}\n")
    blocker = slurm.run("sbatch", "--parsable", "--gres=gpu:2", "--mem=64M", "--output=/dev/null",
                        "--wrap=sleep 60").strip()  # another user's job holds both GPUs: Winslow does not know
    try:
        wait_for(lambda: slurm.run("squeue", "-h", "-j", blocker, "-o", "%T").strip() == "RUNNING", 15, "the blocker")
        remote.write({"pipelines/gpu.yaml": pipeline, "projects/q/project.yaml": PROJECT.format(pipeline="gpu",
                                                                                                state="running")})
        start_node()
        queued = wait_for(lambda: remote.status("q").get("message") == "detect is queued in Slurm on hpc: Resources"
                          and remote.status("q"), 30, "the project to show Slurm's reason")
        assert queued["state"] == "PENDING"
        run = queued["runs"][0]
        assert (run["state"], run.get("started")) == ("RUNNING", None)  # claimed, not started
        assert run["events"][-1]["message"] == "queued in Slurm on hpc: Resources"
        shown = subprocess.run([sys.executable, "-m", "reconciler", "status", "--repo-dir", str(remote.clone)],
                               env=GIT_ENV, capture_output=True, text=True, timeout=60)
        assert re.search(r"\bq\s+gpu\s+PENDING\s+detect\s.*detect is queued in Slurm on hpc: Resources", shown.stdout), \
            shown.stdout + shown.stderr
        time.sleep(timeout + 0.5)  # queued longer than the stage's timeout, which counts from its start
    finally:
        slurm.run("scancel", blocker)
    run = settled(remote, "q")
    assert (run["state"], run["exit_code"]) == ("SUCCEEDED", 0), run
    assert seconds_between(run["claimed"], run["started"]) > timeout  # the start is the job's, not its submission
    assert remote.status("q")["state"] == "SUCCEEDED"


def test_a_job_ends_when_its_node_dies_before_another_node_may_take_its_run_over(remote, start_node, slurm: SlurmCluster,
                                                                                tmp_path: Path) -> None:
    beat = "while :; do date +%s.%N >> \"$WINSLOW_WORKSPACE/beat\"; sleep 0.2; done"
    pipeline = f"name: beat\nstages:\n  - {{name: s, image: none, command: [sh, -c, '{beat}'], lost_retries: 0}}\n"
    remote.write({"pipelines/beat.yaml": pipeline, "projects/p/project.yaml": PROJECT.format(pipeline="beat",
                                                                                              state="running")})
    beats = tmp_path / "storage/workspaces/p/1-s-1/beat"
    node = start_node()
    wait_for(lambda: beats.exists() and beats.read_text().strip(), 30, "the stage to run in its job")
    assert (tmp_path / "storage/.winslow/leases/hpc").read_text().endswith("\n")  # on the storage the job sees

    node.signal(signal.SIGKILL)  # the login node's Winslow dies; nothing else does
    killed = time.time()
    node.proc.wait(timeout=10)
    wait_for(lambda: not slurm.jobs("winslow-p-1-s-1"), 15, "the job to end on its own")

    last = float(beats.read_text().split()[-1])
    assert last - killed <= LEASE_S + 2, f"the stage ran {last - killed:.1f}s after its node died"
    log = (tmp_path / "storage/logs/p/1-s-1.log").read_text()
    assert "winslow: the node's lease ran out" in log
    start_node()  # back: the run ended for the node's failure, not the program's
    run = settled(remote, "p")
    assert run["state"] == "LOST" and run["reason"].startswith("fenced: the node's lease ran out"), run


@pytest.mark.docker
def test_cancelling_a_docker_job_removes_its_container(remote, start_node, busybox_image: str, docker_client) -> None:
    pipeline = f"name: box\nstages:\n  - {{name: s, image: {busybox_image}, command: [sh, -c, 'echo in-box; sleep 300']}}\n"
    remote.write({"pipelines/box.yaml": pipeline, "projects/slurmbox/project.yaml": PROJECT.format(pipeline="box",
                                                                                                    state="running")})
    start_node("hpc", "slurm", "--slurm-container", "docker")

    def containers() -> list:
        return docker_client.containers.list(all=True, filters={"label": ["winslow.project=slurmbox", "winslow.node=hpc"]})
    wait_for(lambda: containers() and "in-box" in (remote.read("nodes/hpc.yaml", "winslow/nodes/hpc") or ""), 30,
             "the container to run inside the job")
    remote.write({"projects/slurmbox/project.yaml": PROJECT.format(pipeline="box", state="aborted")})
    run = settled(remote, "slurmbox")
    assert (run["state"], run["reason"]) == ("FAILED", "aborted") and run["image"] == busybox_image
    wait_for(lambda: not containers(), 10, "the container to be removed")


def test_a_login_node_without_slurms_commands_is_told_at_start(tmp_path: Path) -> None:
    remote = StateRemote(tmp_path)
    (tmp_path / "bin").mkdir()
    done = subprocess.run([sys.executable, "-m", "reconciler", "node", "--repo", str(remote.remote), "--executor",
                           "slurm", "--work", str(tmp_path / "w")], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PATH": str(tmp_path / "bin")})
    assert done.returncode == 1 and "sinfo is not installed" in done.stderr
