"""Dataset versions: one row per (name, content hash)."""
from __future__ import annotations

import time

from sqlalchemy import delete, func, insert, select

from sft_core.db import column, one, rows, scalar, writing
from sft_core.db.schema import datasets as T
from sft_core.store import dumps


def add_version(db, name: str, version: str, path: str, source: str | None, n_rows: int, splits: dict) -> bool:
    """Record a version; False when that (name, version) was stored already (kept as it was)."""
    with writing(db) as con:
        if con.execute(select(T.c.version).where(T.c.name == name, T.c.version == version)).first():
            return False
        con.execute(insert(T).values(name=name, version=version, created_at=time.time(), path=path, source=source,
                                     n_rows=n_rows, splits=dumps(splits)))
        return True


def list_versions(db, name: str | None = None) -> list[dict]:
    """Newest first; every dataset's, or one name's."""
    q = select(T)
    if name is not None:
        q = q.where(T.c.name == name)
    return rows(db, q.order_by(T.c.created_at.desc(), T.c.version))


def get(db, name: str, version: str | None = None) -> dict | None:
    """That version, or the newest one of ``name``."""
    if version:
        return one(db, select(T).where(T.c.name == name, T.c.version == version))
    return one(db, select(T).where(T.c.name == name).order_by(T.c.created_at.desc()).limit(1))


def names(db, newest_first: bool = False) -> list[str]:
    """Each name once: alphabetical, or by its newest version."""
    if newest_first:
        return column(db, select(T.c.name).group_by(T.c.name).order_by(func.max(T.c.created_at).desc()))
    return column(db, select(T.c.name).distinct().order_by(T.c.name))


def count_versions(db, name: str) -> int:
    return scalar(db, select(func.count()).select_from(T).where(T.c.name == name))


def delete_dataset(db, name: str) -> list[str]:
    """Delete every version of ``name``; returns their paths."""
    with writing(db) as con:
        paths = list(con.execute(select(T.c.path).where(T.c.name == name)).scalars())
        con.execute(delete(T).where(T.c.name == name))
        return paths
