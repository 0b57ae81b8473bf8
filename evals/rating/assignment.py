"""Which task a rater gets next: a pure policy over plain data (the caller reads the database).

Among the tasks this rater has not been handed yet, the one with the fewest assignments so far
(assignments, not votes, so raters working at the same time spread out), then the least-covered
system pair, then the least-covered prompt; exact ties are broken by a draw seeded from the
campaign, the rater and how many tasks they have left, so a rater's sequence is reproducible but
raters differ. (A task handed out and not yet voted on comes back before any of this: the caller
looks that up first, so a page reload does not skip it.)"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class TaskLoad:
    """One task of a campaign and how often it has been handed out."""
    task_id: str
    row_id: str
    systems: frozenset[str]  # the task's system pair (the side each is on does not matter here)
    n_assigned: int  # assignments to any rater so far
    mine: bool  # already handed to the rater who asks


def task_loads(rows: Iterable[dict]) -> list[TaskLoad]:
    """From rows with id, row_id, system_left, system_right, n_assigned and mine (SQL's NULL = 0)."""
    return [TaskLoad(r["id"], r["row_id"], frozenset((r["system_left"], r["system_right"])), int(r["n_assigned"]),
                     bool(r["mine"])) for r in rows]


def choose_task(tasks: Sequence[TaskLoad], tie_key: str) -> str | None:
    """The id of the task to hand out next, or None when the rater has been handed every task.

    ``tie_key`` names the rater within the campaign (e.g. ``"<campaign>:<rater>"``); it only seeds
    the draw that breaks exact ties."""
    pair_cov, row_cov = Counter(), Counter()
    for t in tasks:
        pair_cov[t.systems] += t.n_assigned
        row_cov[t.row_id] += t.n_assigned
    unseen = [t for t in tasks if not t.mine]
    if not unseen:
        return None
    rng = random.Random(f"{tie_key}:{len(unseen)}")  # breaks exact ties only
    return min(unseen, key=lambda t: (t.n_assigned, pair_cov[t.systems], row_cov[t.row_id], rng.random())).task_id
