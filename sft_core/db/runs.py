"""Training runs (SFT, RAFT, preference): one row per run; the adapter's name in the engine is its id."""
from __future__ import annotations

import time

from sqlalchemy import delete, insert, select, update

from sft_core.db import column, one, rows, write
from sft_core.db.schema import ACTIVE, jobs as J, runs as T
from sft_core.store import dumps


def get(db, run_id: str) -> dict | None:
    return one(db, select(T).where(T.c.id == run_id))


def exists(db, run_id: str) -> bool:
    return one(db, select(T.c.id).where(T.c.id == run_id)) is not None


def insert_run(db, run_id: str, dataset: str, dataset_version: str, base_model: str, path: str,
               config: dict | str, status: str = "queued", created_at: float | None = None) -> None:
    write(db, insert(T).values(id=run_id, dataset=dataset, dataset_version=dataset_version, base_model=base_model,
                               status=status, created_at=created_at or time.time(), path=path,
                               config=config if isinstance(config, str) else dumps(config)))


def list_runs(db, status: str | tuple[str, ...] | None = None, newest_first: bool = True) -> list[dict]:
    q = select(T)
    if status is not None:
        q = q.where(T.c.status.in_((status,) if isinstance(status, str) else status))
    return rows(db, q.order_by(T.c.created_at.desc() if newest_first else T.c.created_at, T.c.id))


def ids(db, status: str | tuple[str, ...] | None = None, newest_first: bool = True) -> list[str]:
    return [r["id"] for r in list_runs(db, status, newest_first)]


def set_status(db, run_id: str, status: str) -> int:
    return write(db, update(T).where(T.c.id == run_id).values(status=status))


def set_metrics(db, run_id: str, metrics: dict) -> int:
    return write(db, update(T).where(T.c.id == run_id).values(metrics=dumps(metrics)))


def for_dataset(db, dataset: str) -> list[str]:
    return column(db, select(T.c.id).where(T.c.dataset == dataset))


def delete_run(db, run_id: str) -> int:
    return write(db, delete(T).where(T.c.id == run_id))


def finished(db, run_id: str, error: type, where: str, label: str | None = None) -> dict:
    """The row of a run whose adapter is ready, else ``error(where)`` saying why not: an unknown run,
    or one not (yet) succeeded. ``label``: how the run was named (e.g. ``sft:RUN``)."""
    run = get(db, run_id)
    if run is None:
        raise error(f"unknown run {run_id!r}" + (f" in {label}" if label else ""), where)
    if run["status"] != "succeeded":
        raise error(f"run {run_id} is {run['status']}, not finished: its adapter is not ready", where)
    return run


def training_on_dataset(db, dataset: str) -> list[str]:
    """Runs of ``dataset`` whose train job is queued or running."""
    return column(db, select(T.c.id).join(J, J.c.ref == T.c.id)
                  .where(J.c.kind == "train", T.c.dataset == dataset, J.c.status.in_(ACTIVE)))
