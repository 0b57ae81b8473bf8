"""Versioned migrations: ``schema_version`` holds the number of the last one applied.

* A new database gets the current schema (``schema.metadata``) in one step and is stamped ``HEAD``.
* A database from before versioning (tables present, no ``schema_version``) is version 0: the studio's
  first schema, plus whichever of the columns added since (``pid_start``, the campaign columns) it lacks.
* Each step is a function of Alembic's ``Operations`` (batch mode: on SQLite a constraint is added by
  rebuilding the table, rows kept), run inside one transaction that also bumps the version. Several
  processes opening the store at once serialise on that transaction (SQLite's write lock, PostgreSQL's
  advisory lock), and the loser sees the version the winner wrote.

To change the schema: edit ``schema.py`` and append a step here that brings the previous version to it;
``tests/test_store_backends.py`` checks that an upgraded database equals a fresh one.
"""
from __future__ import annotations

from typing import Callable

from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy import Column, Connection, Integer, MetaData, Table, Text, inspect, select, text

from sft_core.db import schema

_version = Table("schema_version", MetaData(), Column("version", Integer, nullable=False))

# Columns added to version 0's tables after their first release, in the order they were added.
_V0_LATER_COLUMNS = {
    "jobs": {"pid_start": Text()},
    "campaigns": {"name": Text(), "open_rating": Integer(), "published_at": None, "closed_at": None,
                  "guidelines": Text(), "reveal_after_vote": Integer()},
}


def _v1_complete_version_0(op: Operations, con: Connection) -> None:
    """Version 0 databases may predate some tables (the rating ones came later; the old store created a
    missing table on open) and some columns: add those they lack. Tables created here have the current
    shape, which the later steps leave as it is."""
    from sqlalchemy import Float
    have_tables = set(inspect(con).get_table_names())
    schema.metadata.create_all(con, tables=[t for name, t in schema.metadata.tables.items()
                                            if name not in have_tables])
    for table, cols in _V0_LATER_COLUMNS.items():
        if table not in have_tables:
            continue
        have = {c["name"] for c in inspect(con).get_columns(table)}
        for name in cols:
            if name in have:
                continue
            col = schema.metadata.tables[table].c[name]
            op.add_column(table, Column(name, col.type if cols[name] is not None else Float(), nullable=col.nullable,
                                        server_default=col.server_default))


def _v2_status_checks_and_worker_ref(op: Operations, con: Connection) -> None:
    """Status enums enforced by the schema (runs, evals; jobs had its CHECK already) and the jobs'
    ``worker_ref`` (where the worker runs: a local pid or a Ray submission)."""
    ins = inspect(con)
    for table, values in (("runs", schema.RUN_STATUSES), ("evals", schema.EVAL_STATUSES)):
        name = f"{table}_status_check"
        if name not in {c.get("name") for c in ins.get_check_constraints(table)}:  # absent unless step 1 made the table
            with op.batch_alter_table(table) as b:
                b.create_check_constraint(name, f"status IN {values!r}")
    if "worker_ref" not in {c["name"] for c in ins.get_columns("jobs")}:
        op.add_column("jobs", Column("worker_ref", Text()))


STEPS: list[Callable[[Operations, Connection], None]] = [_v1_complete_version_0, _v2_status_checks_and_worker_ref]
HEAD = len(STEPS)


def _lock(con: Connection) -> None:
    if con.dialect.name == "postgresql":  # SQLite: BEGIN IMMEDIATE already holds the write lock
        con.execute(text("SELECT pg_advisory_xact_lock(hashtext('sft_studio_migrate'))"))


def current(con: Connection) -> int | None:
    """The applied version; None for an empty database; 0 for one from before versioning."""
    names = set(inspect(con).get_table_names())
    if "schema_version" in names:
        return con.execute(select(_version.c.version)).scalar_one()
    return 0 if names & set(schema.metadata.tables) else None


def upgrade(store) -> int:
    """Bring the store's database to ``HEAD``; returns the version it was at."""
    with store.tx() as con:
        _lock(con)
        found = current(con)
        if found == HEAD:
            return found
        if found is None:
            schema.metadata.create_all(con)
            _version.create(con)
            con.execute(_version.insert().values(version=HEAD))
            return 0
        if found > HEAD:
            from sft_core.store import StoreError
            raise StoreError(f"the database is at schema version {found}, newer than this code's {HEAD}: upgrade "
                             "SFT Studio", "SFT_STUDIO_DB_URL")
        op = Operations(MigrationContext.configure(con, opts={"render_as_batch": True}))
        for step in STEPS[found:]:
            step(op, con)
        if found == 0:
            _version.create(con)
            con.execute(_version.insert().values(version=HEAD))
        else:
            con.execute(_version.update().values(version=HEAD))
        return found
