"""The job queue's rows: claims, heartbeats, cancel flags, progress and the final state.

The queue's rules (which job runs next, who settles a vanished worker) live in ``sft_core/jobs.py``;
this module only reads and writes rows. A claim is a check-then-write: callers hold ``lock_queue`` in
the claiming transaction, so any number of processes never run two accelerator jobs at once."""
from __future__ import annotations

import time
import uuid

from sqlalchemy import case, delete, insert, select, update

from sft_core.db import lock, one, rows, write, writing
from sft_core.db.schema import ACTIVE, jobs as T
from sft_core.store import dumps

_NEWEST = (T.c.created_at.desc(), T.c.id.desc())


def lock_queue(con) -> None:
    lock(con, "sft_studio_job_queue")


def insert_job(db, kind: str, ref: str, payload: dict, status: str = "queued") -> str:
    job_id = uuid.uuid4().hex[:12]
    write(db, insert(T).values(id=job_id, kind=kind, status=status, ref=ref, payload=dumps(payload),
                               created_at=time.time()))
    return job_id


def get(db, job_id: str) -> dict | None:
    return one(db, select(T).where(T.c.id == job_id))


def latest(db, ref: str, kind: str | None = None, live_first: bool = False) -> dict | None:
    """The newest job of a ref (of ``kind``); with ``live_first``, a queued or running one before any other."""
    q = select(T).where(T.c.ref == ref)
    if kind:
        q = q.where(T.c.kind == kind)
    order = ((case((T.c.status.in_(ACTIVE), 0), else_=1),) if live_first else ()) + _NEWEST
    return one(db, q.order_by(*order).limit(1))


def live(db, ref: str | None = None, kind: str | None = None) -> list[dict]:
    """Queued and running jobs (of a ref, of a kind), oldest first."""
    q = select(T).where(T.c.status.in_(ACTIVE))
    if ref is not None:
        q = q.where(T.c.ref == ref)
    if kind is not None:
        q = q.where(T.c.kind == kind)
    return rows(db, q.order_by(T.c.created_at, T.c.id))


def with_status(db, status: str, limit: int | None = None) -> list[dict]:
    """Jobs in one state, oldest first (the queue's order)."""
    q = select(T).where(T.c.status == status).order_by(T.c.created_at, T.c.id)
    return rows(db, q.limit(limit) if limit else q)


def recent(db, limit: int = 50, status: str | tuple[str, ...] | None = None) -> list[dict]:
    """Newest first."""
    q = select(T)
    if status is not None:
        q = q.where(T.c.status.in_((status,) if isinstance(status, str) else status))
    return rows(db, q.order_by(*_NEWEST).limit(limit))


def queued_ahead(db, job: dict) -> list[dict]:
    """Queued jobs created before ``job`` (ties broken by id)."""
    return rows(db, select(T).where(T.c.status == "queued", (T.c.created_at < job["created_at"])
                                    | ((T.c.created_at == job["created_at"]) & (T.c.id < job["id"]))))


def mark_running(db, job_id: str, now: float) -> None:
    write(db, update(T).where(T.c.id == job_id).values(status="running", started_at=now, heartbeat_at=now))


def set_worker(db, job_id: str, pid: int | None, pid_start: str | None, worker_ref: str | None) -> None:
    write(db, update(T).where(T.c.id == job_id).values(pid=pid, pid_start=pid_start, worker_ref=worker_ref,
                                                        heartbeat_at=time.time()))


def beat(db, job_id: str) -> bool:
    """Record a heartbeat; returns whether cancel was requested (one round trip for both)."""
    with writing(db) as con:
        con.execute(update(T).where(T.c.id == job_id).values(heartbeat_at=time.time()))
        return bool(con.execute(select(T.c.cancel_requested).where(T.c.id == job_id)).scalar())


def cancel_requested(db, job_id: str) -> bool:
    r = one(db, select(T.c.cancel_requested).where(T.c.id == job_id))
    return bool(r and r["cancel_requested"])


def request_cancel(db, job_id: str) -> None:
    write(db, update(T).where(T.c.id == job_id).values(cancel_requested=1))


def set_progress(db, job_id: str, progress_json: str) -> None:
    write(db, update(T).where(T.c.id == job_id).values(progress=progress_json))


def cancel_queued(db, job_id: str) -> bool:
    return write(db, update(T).where(T.c.id == job_id, T.c.status == "queued")
                 .values(status="cancelled", ended_at=time.time())) == 1


def finish(db, job_id: str, status: str, error: str | None = None) -> bool:
    """Settle a running job; False when someone else settled it first."""
    return write(db, update(T).where(T.c.id == job_id, T.c.status == "running")
                 .values(status=status, ended_at=time.time(), error=error)) == 1


def delete_for(db, ref: str, kind: str | None = None) -> int:
    q = delete(T).where(T.c.ref == ref)
    return write(db, q.where(T.c.kind == kind) if kind else q)


def live_or_since(db, since: float, limit: int = 50) -> list[dict]:
    """Queued and running jobs, and any created after ``since``; newest first."""
    q = select(T).where(T.c.status.in_(ACTIVE) | (T.c.created_at > since))
    return rows(db, q.order_by(*_NEWEST).limit(limit))


def count(db, kind: str | tuple[str, ...] | None = None, status: str | tuple[str, ...] | None = None) -> int:
    """How many jobs (of these kinds, in these states)."""
    from sqlalchemy import func

    from sft_core.db import scalar
    q = select(func.count()).select_from(T)
    if kind is not None:
        q = q.where(T.c.kind.in_((kind,) if isinstance(kind, str) else kind))
    if status is not None:
        q = q.where(T.c.status.in_((status,) if isinstance(status, str) else status))
    return scalar(db, q)
