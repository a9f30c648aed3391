"""A real Slurm cluster of one node on 127.0.0.1, for the Slurm executor's tests.

`slurm` (the fixture, one per test session) starts Debian's `munged`, `slurmctld` and
`slurmd` without systemd in a fresh folder: its own munge key and socket, a `slurm.conf`
with free ports and its own state, spool and log folders, and two fake GPUs given to Slurm
as GRES backed by character devices made with `mknod` (plain files are refused as GPUs), so
`--gres=gpu:N` jobs run and see `CUDA_VISIBLE_DEVICES`. `SLURM_CONF` is exported for the
session (client commands look for DNS SRV records without it), and `SlurmCluster.env()`
gives it to a `winslow node` process. The daemons are stopped by their PIDs. Under CI=true
a cluster that cannot start fails the test instead of skipping it (`.ci/run` installs
`slurmctld slurmd slurm-client munge`).
"""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest

MUNGED = Path("/usr/sbin/munged")
SLURMCTLD = Path("/usr/sbin/slurmctld")
SLURMD = Path("/usr/sbin/slurmd")
START_S = 20.0
GPUS = 2
CPUS = 8  # more than the test machine has: config_overrides lets slurmd take the configured size
MEMORY_MIB = 8192

SLURM_CONF = """\
ClusterName=winslowtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={dir}/munge/munge.socket
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={dir}/log/jobcomp.txt
MinJobAge=300
KillWait=5
ReturnToService=2
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} Gres=gpu:{gpus} Feature=fast State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""

GRES_CONF = """\
AutoDetect=off
NodeName={host} Name=gpu File={dir}/dev/nvidia[0-{last}]
"""


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the Slurm tests must run; .ci/run installs slurmctld slurmd slurm-client munge)",
                    pytrace=False)
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class SlurmCluster:
    dir: Path
    host: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    def env(self) -> dict[str, str]:
        """What a process needs to reach this cluster with Slurm's commands."""
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *args: str) -> str:
        return subprocess.run(list(args), env={**os.environ, **self.env()}, capture_output=True, text=True,
                              check=True, timeout=30).stdout

    def jobs(self, name: str | None = None) -> list[str]:
        """The ids of the jobs (of this name) Slurm still runs or queues."""
        return self.run("squeue", "--noheader", "--format=%i", *([f"--name={name}"] if name else [])).split()

    def prepare(self) -> None:
        for folder in ("munge", "state", "spool", "log", "dev"):
            (self.dir / folder).mkdir(parents=True, exist_ok=True)
        (self.dir / "munge").chmod(0o700)
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o400)
        for index in range(GPUS):
            device = self.dir / "dev" / f"nvidia{index}"
            if not device.exists():
                os.mknod(device, 0o666 | 0o020000, os.makedev(1, 3))  # a character device, as a GPU is
        values = {"host": self.host, "dir": self.dir, "ctld_port": _free_port(), "d_port": _free_port(),
                  "cpus": CPUS, "memory": MEMORY_MIB, "gpus": GPUS, "last": GPUS - 1}
        self.conf.write_text(SLURM_CONF.format(**values))
        (self.dir / "gres.conf").write_text(GRES_CONF.format(**values))

    def start(self) -> None:
        munge = self.dir / "munge"
        self._spawn([str(MUNGED), "-F", "--force", f"--key-file={munge / 'munge.key'}", f"--socket={munge / 'munge.socket'}",
                     f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                     f"--seed-file={munge / 'munge.seed'}"], "munged")
        self._wait(lambda: (munge / "munge.socket").exists(), "munged's socket")
        self._spawn([str(SLURMCTLD), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._spawn([str(SLURMD), "-D", "-f", str(self.conf)], "slurmd")
        self._wait(self.idle, "the node to be idle")

    def resume(self) -> None:
        """Bring the node back after a test took it down (ReturnToService=2 may have done so already)."""
        subprocess.run(["scontrol", "update", f"NodeName={self.host}", "State=RESUME"], env={**os.environ, **self.env()},
                       capture_output=True, timeout=30)
        self._wait(self.idle, "the node to be back")

    def idle(self) -> bool:
        """The cluster's one node is up and runs nothing."""
        try:
            return self.run("sinfo", "--noheader", "--Node", "--format=%T").strip() == "idle"
        except subprocess.SubprocessError:
            return False

    def _spawn(self, command: list[str], name: str) -> None:
        with open(self.dir / "log" / f"{name}.out", "ab") as out:
            self.procs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               env={**os.environ, **self.env()}))

    def _wait(self, ready: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {what}: {self.logs()}")
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"timed out after {START_S:.0f}s waiting for {what}: {self.logs()}")

    def logs(self) -> str:
        return " | ".join(path.read_text(errors="replace")[-400:] for path in sorted((self.dir / "log").glob("*.out")))

    def stop(self) -> None:
        """Cancel what is left, then stop the daemons by PID, the last started first."""
        try:
            self.run("scancel", "--full", "--user=root")
        except (subprocess.SubprocessError, OSError):
            pass
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self.procs.clear()


@pytest.fixture(scope="session", name="slurm")
def slurm_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A one-node Slurm cluster with two fake GPUs on 127.0.0.1; SLURM_CONF points at it for the session."""
    for program in (MUNGED, SLURMCTLD, SLURMD):
        if not program.exists():
            _unavailable(f"{program} is missing (apt-get install slurmctld slurmd slurm-client munge)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.prepare()
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        cluster.stop()
        _unavailable(f"Slurm does not start: {exc}")
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    if before is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = before
    cluster.stop()
