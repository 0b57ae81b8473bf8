"""Handing out blind tasks and recording votes.

``next_task`` hands a rater a task payload with the prompt and the two texts only — no system
names, no ids that encode them (which task: ``evals.rating.assignment``). Votes: ``left | right |
tie | both_bad``; one per rater per task (UNIQUE), changes keep history (``vote_history``).

Reveal after vote (``reveal_after_vote``, off by default): a campaign may tell each rater which
systems answered a task once they have voted on it (``reveal``), as a training aid for raters or a
demo. Only for that rater's own voted tasks, never before the vote; and a revealed vote can no
longer be changed (``change_vote`` refuses), since the rater has seen the names."""
from __future__ import annotations

from evals.rating.assignment import choose_task, task_loads
from evals.rating.common import RatingError, campaign_row, check_rater, check_rating_open, check_vote, ctx
from sft_core.db import ratings as rating_rows
from sft_core.store import Store
from sft_core.workspace import Workspace


def next_task(campaign_id: str, rater: str, ws: Workspace, store: Store | None = None) -> dict | None:
    """A blind task for this rater, or None when they have seen every task of the campaign.

    A task handed out but not yet voted on comes back first (a page reload must not skip it); else
    ``assignment.choose_task`` picks one from every task's assignment counts. The choice and the
    assignment are one write transaction, serialised per campaign (``rating_rows.lock_campaign``: on
    PostgreSQL too), so raters asking at once never read the same counts."""
    ws, store = ctx(ws, store)
    rater = check_rater(rater)
    camp = campaign_row(store, campaign_id)
    check_rating_open(camp)
    with store.tx() as con:
        rating_rows.lock_campaign(con, campaign_id)
        task = rating_rows.pending_task(con, campaign_id, rater)
        if task is None:
            best = choose_task(task_loads(rating_rows.task_loads(con, campaign_id, rater)), f"{campaign_id}:{rater}")
            if best is None:
                return None
            task = rating_rows.get_task(con, best)
            rating_rows.assign(con, task["id"], rater)
        return _payload(con, camp, task, rater)


def _payload(con, camp: dict, task: dict, rater: str) -> dict:
    """Only what the rater needs: the task id is a random uuid, the order is fixed per task.
    ``progress``: votes cast (``done``), tasks left (``remaining``), ``total`` in the campaign."""
    done = rating_rows.count_votes(con, camp["id"], rater)
    total = rating_rows.count_tasks(con, camp["id"])
    return {"task_id": task["id"], "prompt": task["prompt"],
            "reference": task["reference"] if camp["show_reference"] else None,
            "left": task["output_left"], "right": task["output_right"],
            "progress": {"done": done, "remaining": total - done, "total": total}}


def last_vote(campaign_id: str, rater: str, ws: Workspace, store: Store | None = None) -> dict | None:
    """The rater's own most recent vote, to undo it: the task's blind payload plus ``choice`` and
    ``comment`` (None when they have not voted). The app shows the task again; the rater's next
    choice replaces the vote through ``change_vote`` (the old one goes to vote_history)."""
    ws, store = ctx(ws, store)
    rater = check_rater(rater)
    camp = campaign_row(store, campaign_id)
    check_rating_open(camp)
    with store.read() as con:  # one snapshot: the vote and the progress beside it
        row = rating_rows.last_vote(con, campaign_id, rater)
        if row is None:
            return None
        return {**_payload(con, camp, row, rater), "choice": row["vote_choice"], "comment": row["vote_comment"]}


def vote(campaign_id: str, task_id: str, rater: str, choice: str, comment: str = "", *,
         ws: Workspace, store: Store | None = None) -> None:
    ws, store = ctx(ws, store)
    rater, comment = check_rater(rater), check_vote(choice, comment)
    check_rating_open(campaign_row(store, campaign_id))
    with store.tx() as con:  # the checks and the insert: one write transaction, serialised per campaign
        rating_rows.lock_campaign(con, campaign_id)
        if rating_rows.get_task(con, task_id, campaign_id) is None:
            raise RatingError(f"task {task_id!r} is not part of campaign {campaign_id}", "task")
        if not rating_rows.is_assigned(con, task_id, rater):
            raise RatingError("this task was not assigned to you; press Next to get one", "task")
        if rating_rows.get_vote(con, task_id, rater) is not None:
            raise RatingError("you already voted on this task; use change_vote to change it", "task")
        rating_rows.add_vote(con, campaign_id, task_id, rater, choice, comment)


def reveal(campaign_id: str, task_id: str, rater: str, ws: Workspace,
           store: Store | None = None) -> dict | None:
    """``{"left": system, "right": system}`` of a task this rater has voted on, when the campaign reveals
    identities after a vote; None otherwise (the campaign keeps them hidden, or the rater has not voted on
    that task: a task id alone reveals nothing)."""
    ws, store = ctx(ws, store)
    rater = check_rater(rater)
    if not campaign_row(store, campaign_id)["reveal_after_vote"]:
        return None
    row = rating_rows.voted_task_systems(store, campaign_id, task_id, rater)
    return {"left": row["system_left"], "right": row["system_right"]} if row else None


def change_vote(campaign_id: str, task_id: str, rater: str, choice: str, comment: str = "", *,
                ws: Workspace, store: Store | None = None) -> None:
    """Replace a rater's vote; the previous one is kept in vote_history. Refused where the campaign
    revealed the systems after the vote: a changed vote would no longer be blind."""
    ws, store = ctx(ws, store)
    rater, comment = check_rater(rater), check_vote(choice, comment)
    camp = campaign_row(store, campaign_id)
    check_rating_open(camp)
    if camp["reveal_after_vote"]:
        raise RatingError(f"campaign {campaign_id} shows the systems after each vote, so a vote cannot be changed "
                          "(it would no longer be blind)", "vote")
    with store.tx() as con:
        rating_rows.lock_campaign(con, campaign_id)
        old = rating_rows.get_vote(con, task_id, rater, campaign_id)
        if old is None:
            raise RatingError(f"you have no vote on task {task_id!r} to change; use vote", "task")
        rating_rows.replace_vote(con, old, choice, comment)
