"""The data-access layer: the tables (``schema``), their migrations, and one repository module per
aggregate (``datasets``, ``runs``, ``evals``, ``jobs``, ``kbs``, ``ratings``). Only these modules hold
SQL. Every repository function takes ``db``: a ``Store`` (the function opens its own transaction or
read) or the ``Connection`` of a ``store.tx()`` the caller is inside (the function joins it)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from sqlalchemy import Connection, Executable


@contextlib.contextmanager
def reading(db) -> Iterator[Connection]:
    if isinstance(db, Connection):
        yield db
    else:
        with db.read() as con:
            yield con


@contextlib.contextmanager
def writing(db) -> Iterator[Connection]:
    if isinstance(db, Connection):
        yield db
    else:
        with db.tx() as con:
            yield con


def rows(db, stmt: Executable) -> list[dict[str, Any]]:
    with reading(db) as con:
        return [dict(r._mapping) for r in con.execute(stmt)]


def one(db, stmt: Executable) -> dict[str, Any] | None:
    with reading(db) as con:
        r = con.execute(stmt).first()
        return dict(r._mapping) if r is not None else None


def scalar(db, stmt: Executable) -> Any:
    with reading(db) as con:
        return con.execute(stmt).scalar()


def column(db, stmt: Executable) -> list[Any]:
    with reading(db) as con:
        return list(con.execute(stmt).scalars())


def write(db, stmt: Executable, params: Any = None) -> int:
    """Run one write statement (in its own transaction unless ``db`` is one); returns the rowcount."""
    with writing(db) as con:
        return con.execute(stmt, params).rowcount if params is not None else con.execute(stmt).rowcount


def lock(con: Connection, name: str) -> None:
    """Serialise transactions that check-then-write across processes (job claims, rating assignment).
    SQLite: already serial (``BEGIN IMMEDIATE`` holds the database's write lock). PostgreSQL: a
    transaction-scoped advisory lock on ``name``, released at commit or rollback."""
    if con.dialect.name == "postgresql":
        from sqlalchemy import func, select
        con.execute(select(func.pg_advisory_xact_lock(func.hashtext(name))))
