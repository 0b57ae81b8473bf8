"""Handing out blind tasks and recording votes.

``next_task`` hands a rater a task payload with the prompt and the two texts only — no system
names, no ids that encode them (which task: ``evals.rating.assignment``). Votes: ``left | right |
tie | both_bad``; one per rater per task (UNIQUE), changes keep history (``vote_history``).

Reveal after vote (``reveal_after_vote``, off by default): a campaign may tell each rater which
systems answered a task once they have voted on it (``reveal``), as a training aid for raters or a
demo. Only for that rater's own voted tasks, never before the vote; and a revealed vote can no
longer be changed (``change_vote`` refuses), since the rater has seen the names."""
from __future__ import annotations

import time

from evals.rating.assignment import choose_task, task_loads
from evals.rating.common import RatingError, campaign_row, check_rater, check_rating_open, check_vote, ctx
from sft_core.store import Store
from sft_core.workspace import Workspace


def next_task(campaign_id: str, rater: str, ws: Workspace | None = None, store: Store | None = None) -> dict | None:
    """A blind task for this rater, or None when they have seen every task of the campaign.

    A task handed out but not yet voted on comes back first (a page reload must not skip it); else
    ``assignment.choose_task`` picks one from every task's assignment counts. The choice and the
    assignment are one transaction."""
    ws, store = ctx(ws, store)
    rater = check_rater(rater)
    camp = campaign_row(store, campaign_id)
    check_rating_open(camp)
    with store.tx() as con:
        pending = con.execute(
            "SELECT t.* FROM rating_tasks t JOIN rating_assignments a ON a.task_id=t.id AND a.rater=? "
            "LEFT JOIN votes v ON v.task_id=t.id AND v.rater=? WHERE t.campaign_id=? AND v.id IS NULL "
            "ORDER BY a.assigned_at LIMIT 1", (rater, rater, campaign_id)).fetchone()
        task = dict(pending) if pending else None
        if task is None:
            rows = con.execute(
                "SELECT t.id, t.row_id, t.system_left, t.system_right, COUNT(a.rater) AS n_assigned,"
                " SUM(a.rater = ?) AS mine FROM rating_tasks t LEFT JOIN rating_assignments a ON a.task_id=t.id"
                " WHERE t.campaign_id=? GROUP BY t.id", (rater, campaign_id)).fetchall()
            best = choose_task(task_loads(rows), f"{campaign_id}:{rater}")
            if best is None:
                return None
            task = dict(con.execute("SELECT * FROM rating_tasks WHERE id=?", (best,)).fetchone())
            con.execute("INSERT INTO rating_assignments (task_id, rater, assigned_at) VALUES (?,?,?)",
                        (task["id"], rater, time.time()))
        return _payload(con, camp, task, rater)


def _payload(con, camp: dict, task: dict, rater: str) -> dict:
    """Only what the rater needs: the task id is a random uuid, the order is fixed per task.
    ``progress``: votes cast (``done``), tasks left (``remaining``), ``total`` in the campaign."""
    done = con.execute("SELECT COUNT(*) FROM votes WHERE campaign_id=? AND rater=?", (camp["id"], rater)).fetchone()[0]
    total = con.execute("SELECT COUNT(*) FROM rating_tasks WHERE campaign_id=?", (camp["id"],)).fetchone()[0]
    return {"task_id": task["id"], "prompt": task["prompt"],
            "reference": task["reference"] if camp["show_reference"] else None,
            "left": task["output_left"], "right": task["output_right"],
            "progress": {"done": done, "remaining": total - done, "total": total}}


def last_vote(campaign_id: str, rater: str, ws: Workspace | None = None, store: Store | None = None) -> dict | None:
    """The rater's own most recent vote, to undo it: the task's blind payload plus ``choice`` and
    ``comment`` (None when they have not voted). The app shows the task again; the rater's next
    choice replaces the vote through ``change_vote`` (the old one goes to vote_history)."""
    ws, store = ctx(ws, store)
    rater = check_rater(rater)
    camp = campaign_row(store, campaign_id)
    check_rating_open(camp)
    with store.tx() as con:
        row = con.execute("SELECT t.*, v.choice AS vote_choice, v.comment AS vote_comment FROM votes v "
                          "JOIN rating_tasks t ON t.id=v.task_id WHERE v.campaign_id=? AND v.rater=? "
                          "ORDER BY v.updated_at DESC, v.id DESC LIMIT 1", (campaign_id, rater)).fetchone()
        if row is None:
            return None
        return {**_payload(con, camp, dict(row), rater), "choice": row["vote_choice"], "comment": row["vote_comment"]}


def vote(campaign_id: str, task_id: str, rater: str, choice: str, comment: str = "",
         ws: Workspace | None = None, store: Store | None = None) -> None:
    ws, store = ctx(ws, store)
    rater, comment = check_rater(rater), check_vote(choice, comment)
    check_rating_open(campaign_row(store, campaign_id))
    with store.tx() as con:
        task = con.execute("SELECT id FROM rating_tasks WHERE id=? AND campaign_id=?", (task_id, campaign_id)).fetchone()
        if task is None:
            raise RatingError(f"task {task_id!r} is not part of campaign {campaign_id}", "task")
        if not con.execute("SELECT 1 FROM rating_assignments WHERE task_id=? AND rater=?", (task_id, rater)).fetchone():
            raise RatingError("this task was not assigned to you; press Next to get one", "task")
        if con.execute("SELECT 1 FROM votes WHERE task_id=? AND rater=?", (task_id, rater)).fetchone():
            raise RatingError("you already voted on this task; use change_vote to change it", "task")
        now = time.time()
        con.execute("INSERT INTO votes (campaign_id, task_id, rater, choice, comment, created_at, updated_at)"
                    " VALUES (?,?,?,?,?,?,?)", (campaign_id, task_id, rater, choice, comment, now, now))


def reveal(campaign_id: str, task_id: str, rater: str, ws: Workspace | None = None,
           store: Store | None = None) -> dict | None:
    """``{"left": system, "right": system}`` of a task this rater has voted on, when the campaign reveals
    identities after a vote; None otherwise (the campaign keeps them hidden, or the rater has not voted on
    that task: a task id alone reveals nothing)."""
    ws, store = ctx(ws, store)
    rater = check_rater(rater)
    if not campaign_row(store, campaign_id)["reveal_after_vote"]:
        return None
    row = store.query_one("SELECT t.system_left, t.system_right FROM rating_tasks t JOIN votes v ON v.task_id=t.id "
                          "WHERE t.id=? AND t.campaign_id=? AND v.rater=?", (task_id, campaign_id, rater))
    return {"left": row["system_left"], "right": row["system_right"]} if row else None


def change_vote(campaign_id: str, task_id: str, rater: str, choice: str, comment: str = "",
                ws: Workspace | None = None, store: Store | None = None) -> None:
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
        old = con.execute("SELECT * FROM votes WHERE task_id=? AND rater=? AND campaign_id=?",
                          (task_id, rater, campaign_id)).fetchone()
        if old is None:
            raise RatingError(f"you have no vote on task {task_id!r} to change; use vote", "task")
        con.execute("INSERT INTO vote_history (vote_id, choice, comment, changed_at) VALUES (?,?,?,?)",
                    (old["id"], old["choice"], old["comment"], time.time()))
        con.execute("UPDATE votes SET choice=?, comment=?, updated_at=? WHERE id=?",
                    (choice, comment, time.time(), old["id"]))
