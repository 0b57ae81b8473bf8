"""Blind human rating (``evals/rating/``): campaigns, raters, tasks, assignments, votes and their history.

The rules (who may vote, which task comes next, what a rater may see) live in ``evals/rating/``; this
module only reads and writes rows. Handing out a task and recording a vote are check-then-writes: the
callers hold ``lock_campaign`` in that transaction, so concurrent raters serialise on PostgreSQL as they
do on SQLite (``BEGIN IMMEDIATE``). The schema refuses a double vote, a vote on an unassigned task and a
second task for one unordered system pair whatever the code does."""
from __future__ import annotations

import time

from sqlalchemy import case, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from sft_core.db import column, lock, one, rows, scalar, write, writing
from sft_core.db.schema import (campaigns as C, rating_assignments as A, rating_tasks as T, raters as R,
                                vote_history as H, votes as V)
from sft_core.store import dumps


def lock_campaign(con, campaign_id: str) -> None:
    """Serialise task hand-out and vote recording within one campaign (call first in the transaction)."""
    lock(con, f"rating:{campaign_id}")


# ---- campaigns ------------------------------------------------------------------------------------
def add_campaign(db, campaign_id: str, eval_id: str, systems: list[str], name: str, show_reference: bool,
                 open_rating: bool, guidelines: str, reveal_after_vote: bool, tasks: list[dict]) -> None:
    """The campaign and its tasks (dicts of rating_tasks' columns, ``campaign_id`` filled in here), at once."""
    with writing(db) as con:
        con.execute(insert(C).values(id=campaign_id, eval_id=eval_id, systems=dumps(systems),
                                     show_reference=int(bool(show_reference)), created_at=time.time(), name=name,
                                     open_rating=int(bool(open_rating)), guidelines=guidelines,
                                     reveal_after_vote=int(bool(reveal_after_vote))))
        if tasks:
            con.execute(insert(T), [{**t, "campaign_id": campaign_id} for t in tasks])


def get_campaign(db, campaign_id: str) -> dict | None:
    return one(db, select(C).where(C.c.id == campaign_id))


def list_campaigns(db, eval_id: str | None = None, newest_first: bool = True) -> list[dict]:
    """Every campaign (of an eval) with its ``n_tasks`` and ``n_votes``."""
    n_tasks = select(func.count()).select_from(T).where(T.c.campaign_id == C.c.id).scalar_subquery()
    n_votes = select(func.count()).select_from(V).where(V.c.campaign_id == C.c.id).scalar_subquery()
    q = select(C, n_tasks.label("n_tasks"), n_votes.label("n_votes"))
    if eval_id is not None:
        q = q.where(C.c.eval_id == eval_id)
    order = (C.c.created_at.desc(), C.c.id.desc()) if newest_first else (C.c.created_at, C.c.id)
    return rows(db, q.order_by(*order))


def campaign_ids(db, eval_id: str | None = None, newest_first: bool = False) -> list[str]:
    """Campaign ids (of an eval), oldest first unless ``newest_first``."""
    q = select(C.c.id)
    if eval_id is not None:
        q = q.where(C.c.eval_id == eval_id)
    order = (C.c.created_at.desc(), C.c.id.desc()) if newest_first else (C.c.created_at, C.c.id)
    return column(db, q.order_by(*order))


def publish(db, campaign_id: str) -> int:
    """Set ``published_at`` now, unless it was set already; returns rows changed."""
    return write(db, update(C).where(C.c.id == campaign_id, C.c.published_at.is_(None))
                 .values(published_at=time.time()))


def close(db, campaign_id: str) -> int:
    """Set ``closed_at`` now, unless it was set already; returns rows changed."""
    return write(db, update(C).where(C.c.id == campaign_id, C.c.closed_at.is_(None)).values(closed_at=time.time()))


# ---- raters ---------------------------------------------------------------------------------------
def add_rater(db, rater_id: str, kind: str, name: str, campaign_id: str | None = None,
              token_sha256: str | None = None, created_at: float | None = None) -> None:
    write(db, insert(R).values(id=rater_id, kind=kind, name=name, campaign_id=campaign_id, token_sha256=token_sha256,
                               created_at=time.time() if created_at is None else created_at))


def ensure_rater(db, rater_id: str, kind: str, name: str) -> bool:
    """Add the rater unless that id exists (kept as it was); True when added. Safe against a concurrent add."""
    with writing(db) as con:
        if con.execute(select(R.c.id).where(R.c.id == rater_id)).first():
            return False
        try:
            with con.begin_nested():  # a SAVEPOINT: a racing insert's conflict leaves the outer transaction usable
                con.execute(insert(R).values(id=rater_id, kind=kind, name=name, created_at=time.time()))
        except IntegrityError:
            if con.execute(select(R.c.id).where(R.c.id == rater_id)).first():
                return False
            raise
        return True


def get_rater(db, rater_id: str) -> dict | None:
    return one(db, select(R).where(R.c.id == rater_id))


def list_raters(db, name: str | None = None, kind: str | None = None, campaign_id: str | None = None) -> list[dict]:
    """Raters (by display name, kind, invite campaign), oldest first."""
    q = select(R)
    if name is not None:
        q = q.where(R.c.name == name)
    if kind is not None:
        q = q.where(R.c.kind == kind)
    if campaign_id is not None:
        q = q.where(R.c.campaign_id == campaign_id)
    return rows(db, q.order_by(R.c.created_at, R.c.id))


def invite_by_token_hash(db, token_sha256: str) -> dict | None:
    """The live invite rater (id, name, campaign_id) holding this token hash."""
    return one(db, select(R.c.id, R.c.name, R.c.campaign_id)
               .where(R.c.token_sha256 == token_sha256, R.c.kind == "invite", R.c.revoked_at.is_(None)))


def live_open_rater(db, rater_id: str) -> dict | None:
    """The open-rating rater (id, name), unless revoked."""
    return one(db, select(R.c.id, R.c.name).where(R.c.id == rater_id, R.c.kind == "open", R.c.revoked_at.is_(None)))


def revoke_rater(db, rater_id: str, at: float | None = None) -> int:
    return write(db, update(R).where(R.c.id == rater_id).values(revoked_at=time.time() if at is None else at))


# ---- tasks and assignments ------------------------------------------------------------------------
def get_task(db, task_id: str, campaign_id: str | None = None) -> dict | None:
    q = select(T).where(T.c.id == task_id)
    return one(db, q.where(T.c.campaign_id == campaign_id) if campaign_id is not None else q)


def tasks(db, campaign_id: str) -> list[dict]:
    """A campaign's tasks, by row then id."""
    return rows(db, select(T).where(T.c.campaign_id == campaign_id).order_by(T.c.row_id, T.c.id))


def count_tasks(db, campaign_id: str) -> int:
    return scalar(db, select(func.count()).select_from(T).where(T.c.campaign_id == campaign_id))


def pending_task(db, campaign_id: str, rater: str) -> dict | None:
    """The rater's oldest task handed out and not voted on yet."""
    q = (select(T).join(A, (A.c.task_id == T.c.id) & (A.c.rater == rater))
         .outerjoin(V, (V.c.task_id == T.c.id) & (V.c.rater == rater))
         .where(T.c.campaign_id == campaign_id, V.c.id.is_(None))
         .order_by(A.c.assigned_at, T.c.id).limit(1))
    return one(db, q)


def task_loads(db, campaign_id: str, rater: str) -> list[dict]:
    """Per task of the campaign (by id): id, row_id, system_left, system_right, ``n_assigned`` (to anyone)
    and ``mine`` (1 when handed to ``rater`` already, else 0)."""
    q = (select(T.c.id, T.c.row_id, T.c.system_left, T.c.system_right, func.count(A.c.rater).label("n_assigned"),
                func.coalesce(func.sum(case((A.c.rater == rater, 1), else_=0)), 0).label("mine"))
         .select_from(T).outerjoin(A, A.c.task_id == T.c.id).where(T.c.campaign_id == campaign_id)
         .group_by(T.c.id, T.c.row_id, T.c.system_left, T.c.system_right).order_by(T.c.id))
    return rows(db, q)


def assign(db, task_id: str, rater: str) -> None:
    write(db, insert(A).values(task_id=task_id, rater=rater, assigned_at=time.time()))


def is_assigned(db, task_id: str, rater: str) -> bool:
    return one(db, select(A.c.task_id).where(A.c.task_id == task_id, A.c.rater == rater)) is not None


def assignments(db, campaign_id: str | None = None, rater: str | None = None) -> list[dict]:
    """Assignments (of a campaign, of a rater), oldest first."""
    q = select(A)
    if campaign_id is not None:
        q = q.join(T, T.c.id == A.c.task_id).where(T.c.campaign_id == campaign_id)
    if rater is not None:
        q = q.where(A.c.rater == rater)
    return rows(db, q.order_by(A.c.assigned_at, A.c.task_id, A.c.rater))


# ---- votes ----------------------------------------------------------------------------------------
def get_vote(db, task_id: str, rater: str, campaign_id: str | None = None) -> dict | None:
    q = select(V).where(V.c.task_id == task_id, V.c.rater == rater)
    return one(db, q.where(V.c.campaign_id == campaign_id) if campaign_id is not None else q)


def add_vote(db, campaign_id: str, task_id: str, rater: str, choice: str, comment: str) -> None:
    now = time.time()
    write(db, insert(V).values(campaign_id=campaign_id, task_id=task_id, rater=rater, choice=choice, comment=comment,
                               created_at=now, updated_at=now))


def replace_vote(db, old: dict, choice: str, comment: str) -> None:
    """Keep ``old`` (a votes row) in vote_history, then overwrite its choice and comment."""
    with writing(db) as con:
        con.execute(insert(H).values(vote_id=old["id"], choice=old["choice"], comment=old["comment"],
                                     changed_at=time.time()))
        con.execute(update(V).where(V.c.id == old["id"]).values(choice=choice, comment=comment, updated_at=time.time()))


def count_votes(db, campaign_id: str | None = None, rater: str | None = None) -> int:
    q = select(func.count()).select_from(V)
    if campaign_id is not None:
        q = q.where(V.c.campaign_id == campaign_id)
    if rater is not None:
        q = q.where(V.c.rater == rater)
    return scalar(db, q)


def votes(db, campaign_id: str | None = None, rater: str | None = None, task_id: str | None = None) -> list[dict]:
    """votes rows (of a campaign, a rater, a task), in the order they were cast."""
    q = select(V)
    for col, value in ((V.c.campaign_id, campaign_id), (V.c.rater, rater), (V.c.task_id, task_id)):
        if value is not None:
            q = q.where(col == value)
    return rows(db, q.order_by(V.c.id))


def votes_with_tasks(db, campaign_id: str, texts: bool = False, rater: str | None = None) -> list[dict]:
    """A campaign's votes (every votes column) with their task's ``row_id``, ``system_left`` and
    ``system_right``, in the order cast; ``texts`` adds the task's prompt, reference, output_left,
    output_right and the rater's display name (``rater_name``, the rater id when unknown)."""
    cols = [V, T.c.row_id, T.c.system_left, T.c.system_right]
    if texts:
        cols += [T.c.prompt, T.c.reference, T.c.output_left, T.c.output_right,
                 func.coalesce(R.c.name, V.c.rater).label("rater_name")]
    q = select(*cols).select_from(V).join(T, T.c.id == V.c.task_id)
    if texts:
        q = q.outerjoin(R, R.c.id == V.c.rater)
    q = q.where(V.c.campaign_id == campaign_id)
    if rater is not None:
        q = q.where(V.c.rater == rater)
    return rows(db, q.order_by(V.c.id))


def last_vote(db, campaign_id: str, rater: str) -> dict | None:
    """The rater's most recently cast or changed vote: its task's row plus ``vote_choice`` and ``vote_comment``."""
    return one(db, select(T, V.c.choice.label("vote_choice"), V.c.comment.label("vote_comment"))
               .select_from(V).join(T, T.c.id == V.c.task_id)
               .where(V.c.campaign_id == campaign_id, V.c.rater == rater)
               .order_by(V.c.updated_at.desc(), V.c.id.desc()).limit(1))


def voted_task_systems(db, campaign_id: str, task_id: str, rater: str) -> dict | None:
    """(system_left, system_right) of a task of the campaign, only when ``rater`` has voted on it."""
    return one(db, select(T.c.system_left, T.c.system_right).join(V, V.c.task_id == T.c.id)
               .where(T.c.id == task_id, T.c.campaign_id == campaign_id, V.c.rater == rater))


def history(db, vote_id: int | None = None, campaign_id: str | None = None, rater: str | None = None) -> list[dict]:
    """vote_history rows (of a vote, a campaign, a rater), oldest first."""
    q = select(H)
    if campaign_id is not None or rater is not None:
        q = q.join(V, V.c.id == H.c.vote_id)
        if campaign_id is not None:
            q = q.where(V.c.campaign_id == campaign_id)
        if rater is not None:
            q = q.where(V.c.rater == rater)
    if vote_id is not None:
        q = q.where(H.c.vote_id == vote_id)
    return rows(db, q.order_by(H.c.id))
