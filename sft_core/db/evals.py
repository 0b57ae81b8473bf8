"""Evaluations: one row per eval (its answers and metrics live in its directory)."""
from __future__ import annotations

import time

from sqlalchemy import delete, insert, select, update

from sft_core.db import column, one, rows, write
from sft_core.db.schema import ACTIVE, evals as T
from sft_core.store import dumps


def get(db, eval_id: str) -> dict | None:
    return one(db, select(T).where(T.c.id == eval_id))


def insert_eval(db, eval_id: str, dataset: str, dataset_version: str, split: str, systems: list, path: str,
                config: dict, status: str = "queued") -> None:
    write(db, insert(T).values(id=eval_id, dataset=dataset, dataset_version=dataset_version, split=split,
                               systems=dumps(systems), status=status, created_at=time.time(), path=path,
                               config=dumps(config)))


def list_evals(db, status: str | tuple[str, ...] | None = None) -> list[dict]:
    """Newest first."""
    q = select(T)
    if status is not None:
        q = q.where(T.c.status.in_((status,) if isinstance(status, str) else status))
    return rows(db, q.order_by(T.c.created_at.desc(), T.c.id))


def ids(db, status: str | tuple[str, ...] | None = None) -> list[str]:
    return [r["id"] for r in list_evals(db, status)]


def active_for_dataset(db, dataset: str) -> list[str]:
    return column(db, select(T.c.id).where(T.c.dataset == dataset, T.c.status.in_(ACTIVE)))


def set_status(db, eval_id: str, status: str, only_from: tuple[str, ...] | None = None) -> int:
    """Set the status (only when it is one of ``only_from``, if given); returns rows changed."""
    q = update(T).where(T.c.id == eval_id)
    if only_from:
        q = q.where(T.c.status.in_(only_from))
    return write(db, q.values(status=status))


def delete_eval(db, eval_id: str) -> int:
    return write(db, delete(T).where(T.c.id == eval_id))
