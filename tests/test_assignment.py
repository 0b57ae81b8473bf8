"""The task-assignment policy of blind rating (evals/rating/assignment.py), on plain data: no database.

tests/test_rating.py checks the same policy end to end through SQLite (next_task)."""
from __future__ import annotations

import itertools
from collections import Counter

from evals.rating.assignment import TaskLoad, choose_task, task_loads


def load(task_id, row_id, pair, n_assigned=0, mine=False) -> TaskLoad:
    return TaskLoad(task_id, row_id, frozenset(pair), n_assigned, mine)


def picks(tasks) -> set:
    """What 20 raters would be handed, with the list in either order: one task when the policy decides,
    not the tie-breaking draw (a rule that fails to separate two tasks picks both, with chance 1 - 2^-39)."""
    return {choose_task(order, f"camp:rater{k}") for order in (tasks, tasks[::-1]) for k in range(20)}


def test_fewest_assignments_first_even_on_a_busier_pair():
    tasks = [load("t1", "r1", "ab", 1), load("t2", "r2", "ac", 0), load("t3", "r3", "ac", 5, mine=True)]
    # pair ac has 5 assignments against ab's 1, but t2 has been handed out least
    assert picks(tasks) == {"t2"}


def test_then_the_least_covered_pair_then_the_least_covered_prompt():
    # every candidate has 0 assignments; the rater's own earlier tasks still count towards coverage
    pair = [load("old", "r1", "ab", 1, mine=True), load("ab2", "r2", "ab", 0), load("ac2", "r2", "ac", 0)]
    assert picks(pair) == {"ac2"}
    # pairs ab and ac both covered once; r1 was shown once, r3 never
    row = [load("o1", "r1", "ab", 1, mine=True), load("o2", "r2", "ac", 1, mine=True),
           load("r1ac", "r1", "ac", 0), load("r3ab", "r3", "ab", 0)]
    assert picks(row) == {"r3ab"}


def test_never_the_same_task_twice_and_none_when_all_handed_out():
    assert choose_task([], "c:carol") is None
    assert choose_task([load("t1", "r1", "ab", 3, mine=True), load("t2", "r2", "ab", 1, mine=True)], "c:carol") is None
    # the only unseen task wins even with the most assignments
    assert picks([load("t1", "r1", "ab", 0, mine=True), load("t2", "r2", "ab", 9)]) == {"t2"}


def test_exact_ties_are_reproducible_per_rater_and_differ_between_raters():
    tasks = [load(f"t{k}", f"r{k}", "ab") for k in range(10)]
    assert len({choose_task(tasks, "c:dave") for _ in range(5)}) == 1
    # ten tied tasks, twenty raters: all picking one task would take a 1e-19 coincidence of seeded draws
    assert len({choose_task(tasks, f"c:rater{k}") for k in range(20)}) > 1


def test_raters_in_turn_spread_over_tasks_pairs_and_prompts():
    """Four raters take turns asking (nobody votes, as when they start together). Each request sees
    the loads the earlier ones left; every pair and every prompt ends up covered evenly."""
    pairs = ["ab", "ac", "bc"]
    tasks = {f"{r}-{p}": {"row": r, "pair": p, "raters": set()} for r in ("r1", "r2", "r3", "r4") for p in pairs}
    handed = []
    for step, rater in zip(range(24), itertools.cycle(["w", "x", "y", "z"])):
        loads = [load(tid, t["row"], t["pair"], len(t["raters"]), rater in t["raters"]) for tid, t in tasks.items()]
        tid = choose_task(loads, f"camp:{rater}")
        assert rater not in tasks[tid]["raters"]
        tasks[tid]["raters"].add(rater)
        handed.append(tid)
        if step < len(tasks):  # fewer requests than tasks: each one gets a task nobody has yet
            assert len(set(handed)) == step + 1
    per_pair = Counter(tasks[t]["pair"] for t in handed)
    per_row = Counter(tasks[t]["row"] for t in handed)
    assert set(per_pair.values()) == {8} and set(per_row.values()) == {6}  # 24 = 3 pairs x 8 = 4 prompts x 6
    assert {len(t["raters"]) for t in tasks.values()} == {2}  # 24 handed out over 12 tasks: twice each


def test_task_loads_reads_sql_rows():
    # SUM(a.rater = ?) over a task with no assignments is SQL NULL: not the rater's
    rows = [{"id": "t1", "row_id": "r1", "system_left": "b", "system_right": "a", "n_assigned": 0, "mine": None},
            {"id": "t2", "row_id": "r1", "system_left": "a", "system_right": "c", "n_assigned": 2, "mine": 1}]
    assert task_loads(rows) == [load("t1", "r1", "ab", 0, False), load("t2", "r1", "ac", 2, True)]
