"""What one cycle leaves for the next: when a cycle may decide nothing, which projects stay quiet, the timers."""
from __future__ import annotations

import time

import pytest

from reconciler.decide import Plan
from reconciler.facts import EXITED, STARTED, Fact
from reconciler.memory import STARTED_DELAY_S, DecisionMemory, Inputs
from reconciler.model import ClusterConfig
from reconciler.snapshot import Snapshot

CONFIG = ClusterConfig()


def inputs(tip: str = "a", local: frozenset[tuple[str, str]] = frozenset(), resumes: frozenset[str] = frozenset(),
           basis: object = "nodes") -> Inputs:
    return Inputs(tip, basis, frozenset(), local, resumes)


def snapshot(commit: str, projects: dict, base: str | None = None, changed: frozenset[str] | None = None) -> Snapshot:
    return Snapshot(commit, CONFIG, {}, projects, base=base, changed=changed)


def test_only_inputs_that_gave_an_empty_plan_may_be_skipped() -> None:
    memory = DecisionMemory()
    first = snapshot("a", {})
    memory.remember(Plan(), first, inputs(), set())
    assert memory.unchanged(inputs())
    assert not memory.unchanged(inputs(tip="b"))  # main moved
    memory.remember(Plan(stops=[object()]), first, inputs(), set())  # type: ignore[list-item]
    assert not memory.unchanged(inputs())  # a plan that did something is followed by a real cycle


def test_a_stage_waiting_for_its_claimer_keeps_the_cycle_deciding() -> None:
    memory = DecisionMemory()
    memory.remember(Plan(waiting=["p/1-a-1"]), snapshot("a", {}), inputs(), set())
    assert memory.due() and not memory.unchanged(inputs())
    assert memory.sleep_budget(CONFIG) <= CONFIG.grace / 2


def test_quiet_projects_carry_over_unless_their_entry_local_runs_or_resume_branches_changed() -> None:
    memory = DecisionMemory()
    p, q, r = object(), object(), object()
    before = snapshot("a", {"p": p, "q": q, "r": r})
    memory.remember(Plan(quiet=frozenset({"p", "q", "r"})), before, inputs(), set())
    after = snapshot("b", {"p": p, "q": object(), "r": r})  # q's files changed
    now = inputs(tip="b", local=frozenset({("r", "1-a-1")}))  # a run of r started here
    assert memory.quiet(after, now) == {"p"}
    by_diff = snapshot("b", {"p": p, "q": object(), "r": r}, base="a", changed=frozenset({"q"}))
    assert memory.quiet(by_diff, now) == {"p"}
    assert memory.quiet(after, inputs(tip="b", resumes=frozenset({"resume/p/1"}))) == {"r"}
    assert memory.quiet(after, inputs(tip="b", basis="other nodes")) == frozenset()


def test_a_fresh_start_is_held_and_falls_due_on_its_own() -> None:
    memory = DecisionMemory()
    fact = Fact(STARTED, "p", "1-a-1", "t")
    memory.started(fact)
    held = memory.fresh_starts((fact,))
    assert held == {fact.key}
    memory.remember(Plan(), snapshot("a", {}), inputs(), held)
    assert not memory.due()
    assert 0 < memory.sleep_budget(CONFIG) <= STARTED_DELAY_S
    assert memory.fresh_starts(()) == set()  # once on main (settled) it is forgotten


def test_a_fresh_start_waits_for_its_own_end_not_for_another_run_s_commit() -> None:
    memory = DecisionMemory()
    young, other = Fact(STARTED, "p", "1-a-1", "t"), Fact(STARTED, "q", "1-a-1", "t")
    memory.started(young)
    memory.started(other)
    ended = Fact(EXITED, "q", "1-a-1", "t", 0)
    assert memory.fresh_starts((young, other, ended)) == {young.key}  # q's start goes with q's end; p's waits


def test_a_start_that_falls_due_takes_every_younger_one_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = DecisionMemory()
    old, young = Fact(STARTED, "p", "1-a-1", "t"), Fact(STARTED, "q", "1-a-1", "t")
    memory.started(old)
    later = time.monotonic() + STARTED_DELAY_S - 1
    monkeypatch.setattr(time, "monotonic", lambda: later)
    memory.started(young)
    assert memory.fresh_starts((old, young)) == {old.key, young.key}
    monkeypatch.setattr(time, "monotonic", lambda: later + 1.5)
    assert memory.fresh_starts((old, young)) == set()
    assert memory.fresh_starts((Fact(STARTED, "r", "1-a-1", "t"),)) == set()  # an earlier life's: due at once


def test_a_start_recorded_while_the_facts_were_read_is_still_held_when_it_reaches_them() -> None:
    memory = DecisionMemory()
    fact = Fact(STARTED, "p", "1-a-1", "t")
    memory.started(fact)
    assert memory.fresh_starts(()) == set()  # this cycle read the journal a moment before the start was recorded
    assert memory.fresh_starts((fact,)) == {fact.key}  # the next cycle sees it: still young, still held
