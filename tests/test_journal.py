"""The journal keeps what a node saw until it is on the remote, across crashes."""
from __future__ import annotations

from pathlib import Path

from reconciler.facts import Fact
from reconciler.journal import Journal


def test_facts_survive_a_restart_until_settled(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    started = Fact("started", "p", "1-a-1", "2026-01-01T00:00:00Z", image_digest="sha256:abc")
    exited = Fact("exited", "p", "1-a-1", "2026-01-01T01:00:00Z", exit_code=3, reason=None,
                  manifest={"files": [], "total_size": 0})
    journal.record(started)
    journal.record(exited)
    reborn = Journal(path)
    assert reborn.pending() == (started, exited)
    assert reborn.pending()[1].manifest == {"files": [], "total_size": 0}
    reborn.settle({started.key})
    assert Journal(path).pending() == (exited,)


def test_a_line_torn_by_a_crash_is_skipped_and_the_rest_kept(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    journal.record(Fact("exited", "p", "1-a-1", "t1", exit_code=0))
    with open(path, "a") as handle:
        handle.write('{"kind": "exited", "project": "p", "run_')  # the crash came mid-write
    assert [f.run_id for f in Journal(path).pending()] == ["1-a-1"]


def test_the_same_fact_recorded_twice_is_one_fact(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal.jsonl")
    fact = Fact("exited", "p", "1-a-1", "t1", exit_code=0)
    journal.record(fact)
    journal.record(fact)
    assert journal.pending() == (fact,)


def test_a_manifest_is_kept_beside_the_journal_and_not_rewritten_when_other_facts_settle(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(path)
    files = [{"path": f"f{i}.bin", "size": i, "sha256": "0" * 64} for i in range(5000)]
    listed = Fact("listed", "p", "1-a-1", "t2", manifest={"files": files, "total_size": 0})
    started = Fact("started", "p", "1-b-1", "t3")
    journal.record(listed)
    journal.record(started)
    assert path.stat().st_size < 1000  # the journal line names the manifest's file instead of holding it
    (side,) = journal.manifests.iterdir()
    written = side.stat().st_mtime_ns
    journal.settle({started.key})
    assert side.stat().st_mtime_ns == written
    assert Journal(path).pending()[0].manifest == {"files": files, "total_size": 0}
    journal.settle({listed.key})
    assert list(journal.manifests.iterdir()) == [] and Journal(path).pending() == ()
