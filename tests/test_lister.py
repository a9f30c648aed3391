"""Workspaces are listed beside the exit path, survive a restart, and never lose an exit to a failure."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from reconciler.facts import LISTED
from reconciler.journal import Journal
from reconciler.lister import Lister


def wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def listed(journal: Journal) -> dict[tuple[str, str], dict]:
    return {(f.project, f.run_id): f.manifest or {} for f in journal.pending() if f.kind == LISTED}


def test_a_listing_becomes_a_fact_and_its_marker_goes(tmp_path: Path) -> None:
    journal, wake = Journal(tmp_path / "journal.jsonl"), threading.Event()
    lister = Lister(tmp_path / "to-list", lambda p, r: {"files": [{"path": "a", "size": 1, "sha256": "0" * 64}]},
                    journal, wake)
    lister.start()
    lister.list_later("p", "1-a-1")
    lister.wait_for({("p", "1-a-1")}, 10)
    assert listed(journal)[("p", "1-a-1")]["files"][0]["path"] == "a"
    assert wake.is_set() and not (tmp_path / "to-list" / "p" / "1-a-1").exists()
    lister.stop()


def test_what_an_earlier_life_left_unlisted_is_listed_at_start(tmp_path: Path) -> None:
    (tmp_path / "to-list" / "p").mkdir(parents=True)
    (tmp_path / "to-list" / "p" / "2-b-1").touch()
    journal = Journal(tmp_path / "journal.jsonl")
    lister = Lister(tmp_path / "to-list", lambda p, r: {"files": []}, journal, threading.Event())
    lister.start()
    wait_until(lambda: ("p", "2-b-1") in listed(journal))
    lister.stop()


def test_a_listing_that_fails_still_becomes_a_fact_that_says_why(tmp_path: Path) -> None:
    def broken(project: str, run_id: str) -> dict:
        raise RuntimeError("Symlink loop from '/w/a'")
    journal = Journal(tmp_path / "journal.jsonl")
    lister = Lister(tmp_path / "to-list", broken, journal, threading.Event())
    lister.start()
    lister.list_later("p", "1-a-1")
    wait_until(lambda: ("p", "1-a-1") in listed(journal))
    (unlisted,) = listed(journal)[("p", "1-a-1")]["unlisted"]
    assert "Symlink loop" in unlisted["reason"]
    lister.stop()


def test_waiting_for_a_slow_listing_is_bounded(tmp_path: Path) -> None:
    release = threading.Event()

    def slow(project: str, run_id: str) -> dict:
        release.wait(10)
        return {"files": []}
    lister = Lister(tmp_path / "to-list", slow, Journal(tmp_path / "journal.jsonl"), threading.Event())
    lister.start()
    lister.list_later("p", "1-a-1")
    began = time.monotonic()
    lister.wait_for({("p", "1-a-1")}, 0.2)
    assert 0.15 < time.monotonic() - began < 2.0
    release.set()
    lister.stop()
