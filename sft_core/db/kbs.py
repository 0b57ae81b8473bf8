"""Knowledge bases: one row per KB (its index lives in its directory)."""
from __future__ import annotations

import time

from sqlalchemy import select

from sft_core.db import column, rows, writing
from sft_core.db.schema import kbs as T


def upsert(db, name: str, path: str, n_docs: int, n_chunks: int, embedder: str,
           created_at: float | None = None) -> None:
    """Insert the KB, or update its counts and embedder when it is rebuilt (``created_at`` kept)."""
    now = time.time()
    values = dict(path=path, updated_at=now, n_docs=n_docs, n_chunks=n_chunks, embedder=embedder)
    with writing(db) as con:
        from sqlalchemy import insert, update
        if con.execute(update(T).where(T.c.name == name).values(**values)).rowcount == 0:
            con.execute(insert(T).values(name=name, created_at=created_at or now, **values))


def list_kbs(db, newest_first: bool = False) -> list[dict]:
    """By name, or most recently updated first."""
    return rows(db, select(T).order_by(T.c.updated_at.desc() if newest_first else T.c.name))


def names(db, newest_first: bool = False) -> list[str]:
    return column(db, select(T.c.name).order_by(T.c.updated_at.desc() if newest_first else T.c.name))


def get(db, name: str) -> dict | None:
    from sft_core.db import one
    return one(db, select(T).where(T.c.name == name))
