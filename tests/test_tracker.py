"""The run tracker on its own, around an engine that keeps its runs in memory.

The tracker is pure bookkeeping, so a fake engine shows every rule of it
quickly: an exit reaches on_exit exactly once, a run stays in running() until
on_exit returned, a failed on_exit leaves the run for a later running(),
timeouts and stops carry their reason, a run starts once, close() ends the
watchers, a queued run's timeout counts from the start its engine reports.
The real engines are tested against Docker, real processes and Slurm.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from reconciler.clock import add_seconds, utcnow
from reconciler.errors import ExecutorError
from reconciler.executors import tracker as tracking
from reconciler.executors.base import ExitInfo, LaunchSpec, RunningInfo, StartInfo
from reconciler.executors.tracker import STOP_GRACE_S, Ended, Found, RunTracker

NODE = "n1"
PROJECT = "ulm"
STARTED = "2026-01-01T00:00:00.000Z"
FINISHED = "2026-01-01T01:00:00.000Z"
BOUND_S = 5.0  # no wait in these tests is longer


@dataclass(eq=False)
class FakeRun:
    project: str
    run_id: str
    end: threading.Event = field(default_factory=threading.Event)  # set: ended or interrupted
    ended: Ended | None = None
    broken: bool = False  # wait() raises, as an engine that lost its connection

    def __str__(self) -> str:
        return f"fake={self.run_id}"


class FakeEngine:
    """Holds its runs in a dict, as Docker holds containers, until the tracker releases them."""

    name = "fake"
    images = False

    def __init__(self) -> None:
        self.held: dict[tuple[str, str], FakeRun] = {}
        self.prepared: set[tuple[str, str]] = set()
        self.stops: list[tuple[str, float]] = []
        self.released: list[str] = []
        self.found_timeout: float | None = None
        self.found_elapsed = 0.0
        self.queues = False  # spawn queues its runs, as a batch system does; the test reports their start
        self.found_queued = False
        self.listings = 0  # calls of runs(): each is an API call or a batch command for a real engine

    def finish(self, run_id: str, code: int | None, reason: str | None = None, started: str | None = None) -> None:
        run = self.held[(PROJECT, run_id)]
        run.ended = Ended(code, FINISHED, reason, started)
        run.end.set()

    def hold(self, run_id: str) -> FakeRun:
        """A run of an earlier life of the node: the tracker has to adopt it."""
        run = self.held[(PROJECT, run_id)] = FakeRun(PROJECT, run_id)
        return run

    def prepare(self, spec: LaunchSpec) -> None:
        self.prepared.add((spec.project, spec.run_id))
        self.hold(spec.run_id)  # like a created container: listed, not started

    def discard(self, project: str, run_id: str) -> None:
        self.prepared.discard((project, run_id))
        self.held.pop((project, run_id), None)

    def spawn(self, spec: LaunchSpec) -> tuple[FakeRun, StartInfo]:
        if spec.command == ("no-such-program",):
            raise ExecutorError(f"program 'no-such-program' not found on {NODE}")
        self.prepared.discard((spec.project, spec.run_id))
        run = self.held[(spec.project, spec.run_id)] = FakeRun(spec.project, spec.run_id)
        return run, StartInfo(None, queue="fake") if self.queues else StartInfo(started=STARTED)

    def wait(self, run: FakeRun, closing: threading.Event) -> Ended | None:
        if run.broken:
            raise ConnectionError("the engine went away")
        run.end.wait(BOUND_S)
        return None if closing.is_set() else run.ended

    def stop(self, run: FakeRun, grace: float) -> None:
        self.stops.append((run.run_id, grace))
        self.finish(run.run_id, 143, "killed by signal SIGTERM")

    def runs(self) -> list[tuple[str, str]]:
        self.listings += 1
        return list(self.held)

    def adopt(self, project: str, run_id: str) -> Found[FakeRun] | None:
        run = self.held.get((project, run_id))
        if run is None:
            return None
        state = "exited" if run.ended else "running"
        if self.found_queued:
            return Found(run, None, state, self.found_timeout, queued=True)
        return Found(run, STARTED, state, self.found_timeout, self.found_elapsed)

    def release(self, run: FakeRun) -> None:
        self.released.append(run.run_id)
        del self.held[(run.project, run.run_id)]

    def interrupt(self, run: FakeRun) -> None:
        run.end.set()


class Exits:
    """on_exit for the tracker: records each report; fails the first `failures` calls."""

    def __init__(self, failures: int = 0) -> None:
        self.queue: queue.Queue[ExitInfo] = queue.Queue()
        self.failures = failures
        self.calls = 0

    def __call__(self, info: ExitInfo) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("the journal is full")
        self.queue.put(info)

    def next(self) -> ExitInfo:
        try:
            return self.queue.get(timeout=BOUND_S)
        except queue.Empty:
            pytest.fail(f"no exit reported within {BOUND_S}s")

    def assert_none(self, within: float = 0.2) -> None:
        with pytest.raises(queue.Empty):
            self.queue.get(timeout=within)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {BOUND_S}s")
        time.sleep(0.01)


def spec(run_id: str = "1-a-1", timeout: float | None = None, command: tuple[str, ...] = ("true",)) -> LaunchSpec:
    return LaunchSpec(project=PROJECT, run_id=run_id, stage="a", node=NODE, image="none", command=command, env={},
                      resources_dir=Path("/nonexistent"), workspace_dir=Path("/nonexistent"), input_dir=None,
                      log_path=Path("/nonexistent/log"), timeout=timeout)


def watchers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("winslow-fake-")]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def exits() -> Exits:
    return Exits()


@pytest.fixture
def tracker(engine: FakeEngine, exits: Exits) -> Iterator[RunTracker[FakeRun]]:
    made = RunTracker(NODE, exits, engine)
    yield made
    made.close()


def test_an_exit_is_reported_exactly_once_then_released(tracker, engine, exits) -> None:
    assert tracker.start(spec()) == StartInfo(started=STARTED)
    assert tracker.running() == [RunningInfo(PROJECT, "1-a-1", STARTED)]

    engine.finish("1-a-1", 3)

    assert exits.next() == ExitInfo(PROJECT, "1-a-1", 3, FINISHED, None)
    wait_until(lambda: engine.released == ["1-a-1"], "released after the report")
    assert tracker.running() == []
    tracker.stop(PROJECT, "1-a-1", "late")  # after the exit: nothing to stop
    assert engine.stops == []
    exits.assert_none()
    assert exits.calls == 1


def test_a_run_stays_in_running_until_on_exit_has_returned(engine) -> None:
    entered, leave = threading.Event(), threading.Event()

    def slow_journal(info: ExitInfo) -> None:
        entered.set()
        leave.wait(BOUND_S)

    tracker = RunTracker(NODE, slow_journal, engine)
    try:
        tracker.start(spec())
        engine.finish("1-a-1", 0)
        assert entered.wait(BOUND_S)

        assert [r.run_id for r in tracker.running()] == ["1-a-1"]  # exited, but not reported yet
        leave.set()
        wait_until(lambda: tracker.running() == [], "the reported run to leave running()")
    finally:
        tracker.close()


def test_a_failed_on_exit_keeps_the_run_and_a_later_running_reports_it_again(engine) -> None:
    exits = Exits(failures=1)
    tracker = RunTracker(NODE, exits, engine)
    try:
        tracker.start(spec())
        engine.finish("1-a-1", 4)
        wait_until(lambda: exits.calls == 1, "the first, failing report")
        assert engine.released == []  # kept: nothing reached the journal

        tracker.running()  # adopts it again

        assert exits.next() == ExitInfo(PROJECT, "1-a-1", 4, FINISHED, None)
        wait_until(lambda: engine.released == ["1-a-1"], "released after the second report")
        assert tracker.running() == []
        assert exits.calls == 2
    finally:
        tracker.close()


def test_a_timeout_stops_the_run_and_names_itself_as_the_reason(tracker, engine, exits) -> None:
    tracker.start(spec(timeout=1.0))

    info = exits.next()

    assert engine.stops == [("1-a-1", STOP_GRACE_S)]
    assert (info.exit_code, info.reason) == (143, "timeout after 1s")


def test_an_adopted_run_keeps_the_deadline_it_had(tracker, engine, exits) -> None:
    engine.hold("1-a-1")
    engine.found_timeout, engine.found_elapsed = 3600.0, 3599.9  # a tenth of a second left

    assert [r.run_id for r in tracker.running()] == ["1-a-1"]

    assert exits.next().reason == "timeout after 1h00m"


def test_the_first_stop_reason_wins_over_the_engines_and_over_later_stops(tracker, engine, exits) -> None:
    tracker.start(spec())

    tracker.stop(PROJECT, "1-a-1", "aborted")
    tracker.stop(PROJECT, "1-a-1", "deleted")

    assert exits.next() == ExitInfo(PROJECT, "1-a-1", 143, FINISHED, "aborted")
    assert engine.stops == [("1-a-1", STOP_GRACE_S)]


def test_a_stop_of_a_run_it_does_not_follow_adopts_the_run_first(tracker, engine, exits) -> None:
    engine.hold("1-a-1")

    tracker.stop(PROJECT, "1-a-1", "aborted")
    tracker.stop(PROJECT, "no-such-run", "aborted")  # nothing held: nothing happens

    assert (exits.next().run_id, engine.stops) == ("1-a-1", [("1-a-1", STOP_GRACE_S)])
    exits.assert_none()


def test_the_same_run_cannot_start_twice_but_a_failed_start_can_be_retried(tracker, engine) -> None:
    with pytest.raises(ExecutorError, match="not found on n1"):
        tracker.start(spec(command=("no-such-program",)))
    tracker.start(spec())

    with pytest.raises(ExecutorError, match="^run 1-a-1 of ulm is already running on n1$"):
        tracker.start(spec())
    assert [r.run_id for r in tracker.running()] == ["1-a-1"]


def test_a_prepared_run_is_not_adopted_and_starts_once(tracker, engine) -> None:
    tracker.prepare(spec())
    assert tracker.running() == []  # held by the engine, but not started: not adopted either

    tracker.start(spec())

    assert [r.run_id for r in tracker.running()] == ["1-a-1"]
    with pytest.raises(ExecutorError, match="already running"):
        tracker.start(spec())


def test_a_discarded_run_leaves_nothing_behind(tracker, engine) -> None:
    tracker.prepare(spec())
    tracker.discard(PROJECT, "1-a-1")

    assert (engine.held, tracker.running()) == ({}, [])
    tracker.start(spec())  # the claim may come again
    assert [r.run_id for r in tracker.running()] == ["1-a-1"]


def test_a_watcher_that_fails_leaves_the_run_to_a_later_adoption(tracker, engine, exits) -> None:
    engine.hold("1-a-1").broken = True
    tracker.running()
    wait_until(lambda: not watchers(), "the broken watcher to end")

    engine.held[(PROJECT, "1-a-1")].broken = False
    engine.finish("1-a-1", 0)
    tracker.running()

    assert exits.next().exit_code == 0


def test_close_ends_every_watcher_reports_nothing_and_starts_nothing(engine, exits) -> None:
    tracker = RunTracker(NODE, exits, engine)
    tracker.start(spec("1-a-1"))
    tracker.start(spec("2-a-1", timeout=0.2))
    assert len(watchers()) == 2

    began = time.monotonic()
    tracker.close()

    assert time.monotonic() - began < 2.5
    assert watchers() == []
    with pytest.raises(ExecutorError, match="closed"):
        tracker.start(spec("3-a-1"))
    time.sleep(0.3)  # past the second run's timeout: the timer was cancelled
    assert engine.stops == []
    exits.assert_none()

    later = RunTracker(NODE, exits, engine)  # the node restarted: its runs went on
    try:
        assert [r.run_id for r in later.running()] == ["1-a-1", "2-a-1"]
    finally:
        later.close()


class Starts:
    """on_start for the tracker: records what it hears; fails the first `failures` calls."""

    def __init__(self, failures: int = 0) -> None:
        self.seen: list[tuple[str, StartInfo]] = []
        self.failures = failures

    def __call__(self, project: str, run_id: str, info: StartInfo) -> None:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("the journal is full")
        self.seen.append((run_id, info))


def test_a_queued_run_is_not_timed_while_it_waits_and_its_timeout_counts_from_its_start(tracker, engine, exits):
    engine.queues = True
    starts = tracker.on_start = Starts()
    assert tracker.start(spec(timeout=0.3)) == StartInfo(None, queue="fake")
    assert tracker.running() == [RunningInfo(PROJECT, "1-a-1", None)]
    waiting = StartInfo(None, queue="fake", reason="Resources")

    assert tracker.report_start(PROJECT, "1-a-1", waiting)
    exits.assert_none(within=0.5)  # longer than its timeout, in the queue: nothing stops it
    began, clock = utcnow(), time.monotonic()
    assert tracker.report_start(PROJECT, "1-a-1", StartInfo(started=began))
    assert tracker.running() == [RunningInfo(PROJECT, "1-a-1", began)]
    assert tracker.report_start(PROJECT, "1-a-1", StartInfo(started=FINISHED))  # said once: the first start stands

    assert exits.next().reason.startswith("timeout after")
    assert time.monotonic() - clock >= 0.25  # its 0.3 s counted from the start, not from the submission
    assert engine.stops == [("1-a-1", STOP_GRACE_S)]
    assert starts.seen == [("1-a-1", waiting), ("1-a-1", StartInfo(started=began))]


def test_an_adopted_queued_run_waits_for_its_start_and_then_keeps_the_deadline_it_had(tracker, engine, exits):
    engine.hold("1-a-1")
    engine.found_queued, engine.found_timeout = True, 3600.0
    assert tracker.running() == [RunningInfo(PROJECT, "1-a-1", None)]
    exits.assert_none()

    began_long_ago = add_seconds(utcnow(), -3599.9)  # it began while nobody watched: a tenth of a second left
    assert began_long_ago and tracker.report_start(PROJECT, "1-a-1", StartInfo(started=began_long_ago))

    assert exits.next().reason == "timeout after 1h00m"


def test_a_start_the_node_could_not_record_is_reported_again(tracker, engine, exits) -> None:
    engine.queues = True
    starts = tracker.on_start = Starts(failures=1)
    tracker.start(spec())

    assert not tracker.report_start(PROJECT, "1-a-1", StartInfo(started=STARTED))
    assert tracker.running() == [RunningInfo(PROJECT, "1-a-1", None)]  # still queued, for the engine to say again
    assert tracker.report_start(PROJECT, "1-a-1", StartInfo(started=STARTED))
    assert (starts.seen, tracker.running()) == ([("1-a-1", StartInfo(started=STARTED))],
                                                [RunningInfo(PROJECT, "1-a-1", STARTED)])


def test_a_queued_run_that_began_and_ended_between_two_looks_reports_its_start_before_its_exit(engine) -> None:
    said: list[str] = []
    tracker = RunTracker(NODE, lambda info: said.append(f"exited {info.exit_code}"), engine)
    tracker.on_start = lambda project, run_id, info: said.append(f"started {info.started}")
    engine.queues = True
    try:
        tracker.start(spec())
        engine.finish("1-a-1", 0, started=STARTED)
        wait_until(lambda: len(said) == 2, "the start and the exit")
        assert said == [f"started {STARTED}", "exited 0"]
    finally:
        tracker.close()


def test_a_run_that_started_at_once_tells_on_start_nothing(tracker, engine, exits) -> None:
    starts = tracker.on_start = Starts()
    tracker.start(spec())
    assert tracker.report_start(PROJECT, "1-a-1", StartInfo(started=FINISHED))  # not queued: nothing to report
    engine.finish("1-a-1", 0)
    exits.next()
    assert starts.seen == []


def test_running_asks_the_engine_first_after_a_failure_and_then_only_now_and_then(engine, monkeypatch) -> None:
    exits = Exits(failures=1)
    tracker = RunTracker(NODE, exits, engine)
    try:
        engine.hold("0-a-1")  # from an earlier life
        assert [r.run_id for r in tracker.running()] == ["0-a-1"]
        tracker.start(spec())
        for _ in range(5):
            tracker.running()
        assert engine.listings == 1  # it follows what it started: nothing to ask

        engine.finish("1-a-1", 4)
        wait_until(lambda: exits.calls == 1, "the failing report")
        tracker.running()  # the engine keeps the run: asked again, and it is adopted and reported
        assert engine.listings == 2
        assert exits.next().run_id == "1-a-1"

        later = time.monotonic() + tracking.RELIST_S
        monkeypatch.setattr(tracking, "time", SimpleNamespace(monotonic=lambda: later))
        tracker.running()
        assert engine.listings == 3
    finally:
        tracker.close()


def test_a_stop_note_outlives_the_tracker_until_the_exit_is_reported_and_a_stale_one_goes(engine, tmp_path) -> None:
    notes = tmp_path / "stops"
    first = RunTracker(NODE, Exits(), engine, notes)
    engine.stop = lambda run, grace: engine.stops.append((run.run_id, grace))  # TERM sent; it has not ended yet
    first.start(spec())
    first.stop(PROJECT, "1-a-1", "superseded by request 2")
    first.close()  # the node dies before the run ends
    (notes / "gone").mkdir()
    (notes / "gone" / "3-b-1.stop").write_text("aborted")  # its run was removed while nobody watched
    engine.finish("1-a-1", 143, "killed by signal SIGTERM")

    exits = Exits()
    second = RunTracker(NODE, exits, engine, notes)
    try:
        second.running()
        assert exits.next() == ExitInfo(PROJECT, "1-a-1", 143, FINISHED, "superseded by request 2")
        wait_until(lambda: engine.released == ["1-a-1"], "released after the report")
        wait_until(lambda: _notes_left(notes) == [], "every note gone: the reported run's and the stale one")
    finally:
        second.close()


def _notes_left(notes: Path) -> list[Path] | None:
    """The stop notes there are; None while the tracker removes a folder under the listing."""
    try:
        return sorted(notes.rglob("*.stop"))
    except FileNotFoundError:
        return None
