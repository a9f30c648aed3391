"""The process executor runs real stages on this machine and reports each exit exactly once."""
from __future__ import annotations

import errno
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from reconciler.errors import ExecutorError
from reconciler.executors.base import ExitInfo, LaunchSpec
from reconciler.executors.process import UNKNOWN_EXIT, ProcessExecutor

NODE = "node-1"
PROJECT = "ulm"
EXIT_WAIT_S = 15.0
REPO = Path(__file__).resolve().parent.parent


class Exits:
    """Collects on_exit reports; every wait is bounded."""

    def __init__(self) -> None:
        self.queue: queue.Queue[ExitInfo] = queue.Queue()

    def __call__(self, info: ExitInfo) -> None:
        self.queue.put(info)

    def next(self, timeout: float = EXIT_WAIT_S) -> ExitInfo:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no exit reported within {timeout}s")

    def assert_none(self, within: float = 0.5) -> None:
        with pytest.raises(queue.Empty):
            extra = self.queue.get(timeout=within)
            pytest.fail(f"unexpected exit report: {extra}")


def wait_until(condition: Callable[[], bool], timeout: float = EXIT_WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(0.05)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """The executor's record folder; any process a test left behind is killed afterwards."""
    path = tmp_path / "state"
    yield path
    for record in path.glob("*/*.json"):
        try:
            os.killpg(json.loads(record.read_text())["pgid"], signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass


@pytest.fixture
def exits() -> Exits:
    return Exits()


@pytest.fixture
def executor(state_dir: Path, exits: Exits) -> Iterator[ProcessExecutor]:
    """A process executor for node-1 whose exits land in `exits`."""
    ex = ProcessExecutor(NODE, exits, state_dir)
    yield ex
    ex.close()


@pytest.fixture
def make_spec(tmp_path: Path) -> Callable[..., LaunchSpec]:
    """A LaunchSpec for run `1-<stage>-1` with the given command and folders under tmp_path."""

    def make(*command: str, stage: str = "detect", **changes: object) -> LaunchSpec:
        run_id = f"1-{stage}-1"
        values: dict[str, object] = dict(
            project=PROJECT, run_id=run_id, stage=stage, node=NODE, image="unused", command=tuple(command),
            env={}, resources_dir=tmp_path / "resources", workspace_dir=tmp_path / "ws" / run_id,
            input_dir=None, log_path=tmp_path / "logs" / f"{run_id}.log",
        )
        values.update(changes)
        return LaunchSpec(**values)  # type: ignore[arg-type]

    return make


def records(state_dir: Path) -> list[Path]:
    return sorted(state_dir.glob("*/*.json"))


def test_stage_output_goes_to_the_log_and_its_files_to_the_workspace(executor, exits, make_spec, state_dir):
    spec = make_spec("sh", "-c", 'echo hello; echo oops >&2; echo data > "$WINSLOW_WORKSPACE/result.txt"; pwd')

    started = executor.start(spec)
    info = exits.next()

    assert started.started.endswith("Z")
    assert (info.project, info.run_id, info.exit_code, info.reason) == (PROJECT, spec.run_id, 0, None)
    assert info.finished.endswith("Z")
    assert spec.log_path.read_text().splitlines() == ["hello", "oops", str(spec.workspace_dir.absolute())]
    assert (spec.workspace_dir / "result.txt").read_text() == "data\n"
    wait_until(lambda: list(state_dir.glob("*/*")) == [])  # the record goes once on_exit has returned
    exits.assert_none()


def test_the_log_is_appended_to_not_replaced(executor, exits, make_spec):
    spec = make_spec("echo", "second")
    spec.log_path.parent.mkdir(parents=True)
    spec.log_path.write_text("first\n")

    executor.start(spec)
    exits.next()

    assert spec.log_path.read_text() == "first\nsecond\n"


@pytest.mark.parametrize("code", [1, 3, 42])
def test_exit_code_is_reported(executor, exits, make_spec, code):
    executor.start(make_spec("sh", "-c", f"exit {code}"))

    info = exits.next()

    assert (info.exit_code, info.reason) == (code, None)


def test_variables_in_the_command_are_expanded_from_the_stage_env(executor, exits, make_spec):
    spec = make_spec("echo", "${GREETING}", "run=${WINSLOW_RUN}", "${UNKNOWN_NAME}", env={"GREETING": "hi"})

    executor.start(spec)
    exits.next()

    assert spec.log_path.read_text() == "hi run=1-detect-1 ${UNKNOWN_NAME}\n"


def test_an_env_value_is_data_never_code_in_a_shell_script(executor, exits, make_spec, tmp_path):
    """`sh -c` scripts are left to the shell, which expands ${VIDEO} from the environment as a value."""
    pwned = tmp_path / "pwned"
    spec = make_spec("sh", "-c", 'echo "video=${VIDEO}"', env={"VIDEO": f"x; touch {pwned}"})
    executor.start(spec)
    exits.next()
    assert not pwned.exists()
    assert spec.log_path.read_text() == f"video=x; touch {pwned}\n"


def test_the_stage_sees_winslow_variables_and_the_host_basics(executor, exits, make_spec, tmp_path):
    (tmp_path / "in").mkdir()
    spec = make_spec("sh", "-c", 'echo "$WINSLOW_PROJECT|$WINSLOW_STAGE|$WINSLOW_NODE|$WINSLOW_INPUT|$PATH"',
                     input_dir=tmp_path / "in")

    executor.start(spec)
    exits.next()

    assert spec.log_path.read_text() == f"{PROJECT}|detect|{NODE}|{tmp_path / 'in'}|{os.environ['PATH']}\n"


def test_gpus_reach_the_stage_through_cuda_visible_devices(executor, exits, make_spec):
    spec = make_spec("sh", "-c", 'echo "$CUDA_VISIBLE_DEVICES|$NVIDIA_VISIBLE_DEVICES|$CUDA_DEVICE_ORDER"',
                     gpus=(1, 3))

    executor.start(spec)
    exits.next()

    assert spec.log_path.read_text() == "1,3|1,3|PCI_BUS_ID\n"


def test_a_stage_without_gpus_sees_none(executor, exits, make_spec, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    spec = make_spec("sh", "-c", 'echo "[${CUDA_VISIBLE_DEVICES-unset}]"')

    executor.start(spec)
    exits.next()

    assert spec.log_path.read_text() == "[]\n"


def test_stop_ends_a_long_stage_with_its_reason(executor, exits, make_spec):
    spec = make_spec("sleep", "60")
    executor.start(spec)

    began = time.monotonic()
    executor.stop(PROJECT, spec.run_id, "aborted")
    executor.stop(PROJECT, spec.run_id, "a second reason is ignored")
    info = exits.next(timeout=10)

    assert time.monotonic() - began < 10
    assert (info.exit_code, info.reason) == (128 + signal.SIGTERM, "aborted")
    assert executor.running() == []
    exits.assert_none()


def test_stop_reaches_every_process_of_the_stage(executor, exits, make_spec):
    spec = make_spec("sh", "-c", 'sleep 60 & echo $! > child.pid; wait')
    executor.start(spec)
    pid_file = spec.workspace_dir / "child.pid"
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() != "")
    child = psutil.Process(int(pid_file.read_text()))

    executor.stop(PROJECT, spec.run_id, "aborted")
    exits.next(timeout=10)

    wait_until(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, timeout=10)


def test_what_a_stage_leaves_running_in_the_background_ends_with_it(executor, exits, make_spec):
    spec = make_spec("sh", "-c", 'sleep 77 & echo $! > child.pid')  # the stage itself ends at once
    executor.start(spec)
    assert exits.next(timeout=10).exit_code == 0
    child = int((spec.workspace_dir / "child.pid").read_text())
    wait_until(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE,
               timeout=10)


def test_a_child_that_left_the_stage_s_group_with_setsid_ends_with_the_stage_too(executor, exits, make_spec):
    spec = make_spec("sh", "-c", 'setsid sleep 77 </dev/null >/dev/null 2>&1 & echo $! > child.pid; sleep 0.3')
    executor.start(spec)
    assert exits.next(timeout=15).exit_code == 0
    child = int((spec.workspace_dir / "child.pid").read_text())
    wait_until(lambda: not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE,
               timeout=10)


def test_a_stage_ended_by_its_supervisor_when_the_lease_lapses_says_so(make_spec, state_dir, tmp_path):
    from reconciler.executors.process import ProcessExecutor
    from reconciler.fencing import FENCED, write_lease

    lease = tmp_path / "lease"
    write_lease(lease, time.time() + 1.5)  # a node that then stops renewing it (killed or frozen)
    ended = Exits()
    executor = ProcessExecutor("n1", ended, state_dir, lease_file=lease)
    try:
        executor.start(make_spec("sleep", "60"))
        info = ended.next(timeout=20)
        assert info.reason is not None and info.reason.startswith(FENCED) and "lease" in info.reason
    finally:
        executor.close()


def test_a_stage_that_ignores_term_is_killed_after_the_grace(executor, exits, make_spec):
    spec = make_spec("sh", "-c", 'trap "" TERM; echo ready; sleep 60')
    executor.start(spec)
    wait_until(lambda: spec.log_path.exists() and "ready" in spec.log_path.read_text())

    began = time.monotonic()
    executor.stop(PROJECT, spec.run_id, "aborted")
    info = exits.next(timeout=15)

    assert 4 < time.monotonic() - began < 12
    assert (info.exit_code, info.reason) == (128 + signal.SIGKILL, "aborted")


def test_timeout_stops_the_stage_with_a_timeout_reason(executor, exits, make_spec):
    executor.start(make_spec("sleep", "60", timeout=1.0))

    info = exits.next(timeout=10)

    assert (info.exit_code, info.reason) == (128 + signal.SIGTERM, "timeout after 1s")


def test_death_by_signal_is_reported_as_128_plus_the_signal(executor, exits, make_spec):
    executor.start(make_spec("sh", "-c", "kill -KILL $$"))

    info = exits.next()

    assert (info.exit_code, info.reason) == (137, "killed by signal SIGKILL")


def test_missing_program_is_an_executor_error(executor, exits, make_spec, state_dir):
    with pytest.raises(ExecutorError, match=r"^program 'no-such-program-xyz' not found on node-1$"):
        executor.start(make_spec("no-such-program-xyz", "--flag"))

    assert records(state_dir) == []
    assert executor.running() == []
    exits.assert_none()


def test_a_file_that_is_not_executable_is_an_executor_error(executor, make_spec, tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")

    with pytest.raises(ExecutorError, match=r"is not executable on node-1$"):
        executor.start(make_spec(str(script)))


def test_the_same_run_cannot_start_twice(executor, exits, make_spec):
    spec = make_spec("sleep", "60")
    executor.start(spec)

    with pytest.raises(ExecutorError, match="already running on node-1"):
        executor.start(spec)

    executor.stop(PROJECT, spec.run_id, "aborted")
    exits.next()


def test_running_lists_live_runs(executor, exits, make_spec):
    long = make_spec("sleep", "60", stage="detect")
    short = make_spec("true", stage="clean")
    executor.start(long)
    executor.start(short)
    exits.next()

    running = executor.running()

    assert [(r.project, r.run_id) for r in running] == [(PROJECT, long.run_id)]
    assert running[0].started and running[0].started.endswith("Z")
    executor.stop(PROJECT, long.run_id, "aborted")
    exits.next()


def test_a_closed_executor_starts_nothing(executor, make_spec):
    executor.close()

    with pytest.raises(ExecutorError, match="closed"):
        executor.start(make_spec("true"))


def test_close_ends_the_watchers_and_the_stage_goes_on(make_spec, state_dir):
    executor = ProcessExecutor(NODE, Exits(), state_dir)
    spec = make_spec("sleep", "60")
    executor.start(spec)
    pid = json.loads(records(state_dir)[0].read_text())["pid"]

    executor.close()

    assert [t for t in threading.enumerate() if t.name == f"winslow-process-{spec.run_id}"] == []
    assert psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # the next executor adopts it


def _gated_stage(make_spec: Callable[..., LaunchSpec], code: int) -> LaunchSpec:
    """A stage that runs until a file named `go` appears in its workspace, then exits with `code`."""
    return make_spec("sh", "-c", f"while [ ! -f go ]; do sleep 0.05; done; echo finished; exit {code}")


def test_a_new_executor_adopts_a_running_stage_and_reports_its_real_exit_code(make_spec, state_dir):
    first_exits, second_exits = Exits(), Exits()
    first = ProcessExecutor(NODE, first_exits, state_dir)
    spec = _gated_stage(make_spec, 7)
    started = first.start(spec)
    first.close()

    second = ProcessExecutor(NODE, second_exits, state_dir)
    try:
        running = second.running()
        assert [(r.project, r.run_id, r.started) for r in running] == [(PROJECT, spec.run_id, started.started)]
        (spec.workspace_dir / "go").touch()
        info = second_exits.next()
    finally:
        second.close()

    assert (info.project, info.run_id, info.exit_code, info.reason) == (PROJECT, spec.run_id, 7, None)
    assert "finished" in spec.log_path.read_text()
    wait_until(lambda: records(state_dir) == [])
    first_exits.assert_none()
    second_exits.assert_none()


@pytest.mark.parametrize("pidfd", ["available", "missing"])
def test_an_adopted_stage_is_waited_for_through_its_pidfd_or_polled_without_one(make_spec, state_dir, monkeypatch,
                                                                                 pidfd):
    first = ProcessExecutor(NODE, Exits(), state_dir)
    spec = _gated_stage(make_spec, 3)
    first.start(spec)
    pid = json.loads(records(state_dir)[0].read_text())["pid"]
    first.close()
    opened: list[int] = []
    real_pidfd_open = os.pidfd_open

    def pidfd_open(target: int, flags: int = 0) -> int:
        opened.append(target)
        if pidfd == "missing":
            raise OSError(errno.ENOSYS, "pidfd_open")  # an old kernel
        return real_pidfd_open(target, flags)

    monkeypatch.setattr(os, "pidfd_open", pidfd_open)
    exits = Exits()
    second = ProcessExecutor(NODE, exits, state_dir)
    try:
        assert [r.run_id for r in second.running()] == [spec.run_id]
        (spec.workspace_dir / "go").touch()
        info = exits.next()
    finally:
        second.close()

    assert (info.exit_code, info.reason) == (3, None)
    assert opened == [pid]


def test_an_adopted_stage_can_be_stopped_with_its_reason(make_spec, state_dir):
    first = ProcessExecutor(NODE, Exits(), state_dir)
    spec = make_spec("sleep", "60")
    first.start(spec)
    first.close()

    second_exits = Exits()
    second = ProcessExecutor(NODE, second_exits, state_dir)
    try:
        second.stop(PROJECT, spec.run_id, "aborted")
        info = second_exits.next(timeout=10)
    finally:
        second.close()

    assert (info.exit_code, info.reason) == (128 + signal.SIGTERM, "aborted")


def test_a_stage_that_ended_while_nobody_watched_is_reported_with_its_real_exit_code(make_spec, state_dir):
    first_exits, second_exits = Exits(), Exits()
    first = ProcessExecutor(NODE, first_exits, state_dir)
    spec = _gated_stage(make_spec, 5)
    first.start(spec)
    pid = json.loads(records(state_dir)[0].read_text())["pid"]
    first.close()
    (spec.workspace_dir / "go").touch()
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)

    second = ProcessExecutor(NODE, second_exits, state_dir)
    try:
        second.running()  # adopts it; listed until its exit is reported
        info = second_exits.next()
        wait_until(lambda: second.running() == [])
    finally:
        second.close()

    assert (info.run_id, info.exit_code, info.reason) == (spec.run_id, 5, None)
    wait_until(lambda: records(state_dir) == [])
    first_exits.assert_none()
    second_exits.assert_none()


def _killed_reconciler(spec: LaunchSpec, state_dir: Path, notes: Path | None = None, then: str = "") -> None:
    """A reconciler in a process of its own starts `spec`, runs the Python in `then`, and is killed hard."""
    script = textwrap.dedent(f"""
        import threading, time
        from pathlib import Path
        from reconciler.executors.base import LaunchSpec
        from reconciler.executors.process import ProcessExecutor
        notes = {str(notes) if notes else None!r}
        ex = ProcessExecutor({NODE!r}, lambda info: None, Path({str(state_dir)!r}), notes=notes and Path(notes))
        ex.start(LaunchSpec(project={PROJECT!r}, run_id={spec.run_id!r}, stage="detect", node={NODE!r},
                            image="unused", command={spec.command!r}, env={{}},
                            resources_dir=Path({str(spec.resources_dir)!r}),
                            workspace_dir=Path({str(spec.workspace_dir)!r}), input_dir=None,
                            log_path=Path({str(spec.log_path)!r})))
    """) + textwrap.dedent(then) + 'print("ready", flush=True)\nthreading.Event().wait(60)\n'
    reconciler = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert reconciler.stdout is not None
        assert reconciler.stdout.readline().strip() == "ready"
    finally:
        reconciler.kill()
        reconciler.wait(timeout=10)


def test_a_stage_outlives_a_killed_reconciler_and_its_exit_code_still_arrives(make_spec, state_dir):
    """The reconciler is a real separate process, killed hard: the stage is no child of ours."""
    spec = _gated_stage(make_spec, 9)
    _killed_reconciler(spec, state_dir)

    exits = Exits()
    second = ProcessExecutor(NODE, exits, state_dir)
    try:
        assert [r.run_id for r in second.running()] == [spec.run_id]
        (spec.workspace_dir / "go").touch()
        info = exits.next()
    finally:
        second.close()

    assert (info.exit_code, info.reason) == (9, None)
    wait_until(lambda: records(state_dir) == [])


def test_a_stop_s_reason_outlives_a_reconciler_killed_before_the_stage_ended(make_spec, state_dir, tmp_path):
    """Stopped, then killed hard while the stage still winds down: the next life reports why it was stopped."""
    notes = tmp_path / "stops"
    spec = make_spec("sh", "-c", "trap 'sleep 0.5; exit 143' TERM; touch up; while :; do sleep 0.05; done")
    _killed_reconciler(spec, state_dir, notes, then=f"""
        for _ in range(200):  # until the stage has set its trap
            if Path({str(spec.workspace_dir / "up")!r}).exists():
                break
            time.sleep(0.05)
        ex.stop({PROJECT!r}, {spec.run_id!r}, "superseded by request 5")
    """)  # killed before the stage's trap has ended it
    pid = json.loads(records(state_dir)[0].read_text())["pid"]
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)

    exits = Exits()
    second = ProcessExecutor(NODE, exits, state_dir, notes=notes)
    try:
        second.running()  # adopts the ended run
        info = exits.next()
        wait_until(lambda: second.running() == [])
    finally:
        second.close()

    assert (info.exit_code, info.reason) == (143, "superseded by request 5")
    wait_until(lambda: records(state_dir) == [])
    assert list(notes.rglob("*")) == []  # the reason is gone with the record it explained


def test_a_record_whose_process_is_gone_without_an_exit_code_reports_it_unknown(executor, exits, state_dir):
    record = state_dir / PROJECT / "1-detect-1.json"
    record.parent.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait(timeout=10)
    record.write_text(json.dumps({
        "project": PROJECT, "run_id": "1-detect-1", "pid": dead.pid, "pgid": dead.pid,
        "create_time": 1.0, "started": "2026-01-01T00:00:00.000Z", "started_epoch": 1.0,
    }))

    executor.running()  # adopts it; listed until its exit is reported
    info = exits.next()
    wait_until(lambda: executor.running() == [])

    assert (info.run_id, info.exit_code, info.reason) == ("1-detect-1", None, UNKNOWN_EXIT)
    wait_until(lambda: not record.exists())


def test_an_exit_is_reported_again_after_a_restart_when_on_exit_failed(make_spec, state_dir):
    def failing(info: ExitInfo) -> None:
        raise RuntimeError("the journal is full")

    first = ProcessExecutor(NODE, failing, state_dir)
    spec = make_spec("sh", "-c", "exit 4")
    first.start(spec)
    wait_until(lambda: first.running() == [])
    first.close()
    assert len(records(state_dir)) == 1

    exits = Exits()
    second = ProcessExecutor(NODE, exits, state_dir)
    try:
        second.running()
        info = exits.next()
    finally:
        second.close()

    assert (info.exit_code, info.reason) == (4, None)
    wait_until(lambda: records(state_dir) == [])
