"""The store's connection: one SQLAlchemy engine per database URL, SQLite or PostgreSQL.

* ``sqlite:///PATH`` (the default): WAL mode, a busy timeout, and every write transaction taken with
  ``BEGIN IMMEDIATE``, so several processes (the app, job workers, CLI calls) share one file safely;
  reads run in a deferred transaction (one consistent snapshot).
* ``postgresql://USER@HOST:PORT/DB`` (psycopg 3, the ``cluster`` extra): the same tables and
  migrations; the password comes only from the environment (``PGPASSWORD`` or a ``~/.pgpass``), never
  from a file of the studio's.
* The tables are declared in ``sft_core/db/schema.py`` and brought up to date on open
  (``sft_core/db/migrations.py``). SQL lives only in the repositories under ``sft_core/db/``; the rest
  of the code calls them with a ``Store`` (or the connection of a ``store.tx()`` it is inside).
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from typing import Any, Iterator

from sqlalchemy import Connection, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

from sft_core import StudioError


class StoreError(StudioError):
    pass


def _redacted(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _engine_url(url: str):
    try:
        u = make_url(url)
    except ArgumentError:
        raise StoreError(f"{url!r} is not a database URL (sqlite:///PATH or postgresql://USER@HOST/DB)",
                         "SFT_STUDIO_DB_URL") from None
    if u.get_backend_name() == "sqlite":
        return u.set(drivername="sqlite+pysqlite")
    if u.get_backend_name() == "postgresql":
        if u.password:
            raise StoreError("the database URL must not carry a password: set PGPASSWORD (or ~/.pgpass) in the "
                             "environment instead", "SFT_STUDIO_DB_URL")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise StoreError("postgresql:// needs psycopg 3: pip install 'sft-studio[cluster]'",
                             "SFT_STUDIO_DB_URL") from None
        return u.set(drivername="postgresql+psycopg")
    raise StoreError(f"unsupported database {u.get_backend_name()!r} in {_redacted(url)}: use sqlite:///PATH or "
                     "postgresql://USER@HOST:PORT/DB", "SFT_STUDIO_DB_URL")


class Store:
    """A thread-safe handle on one database. ``tx()`` is a write transaction (joined when nested in the
    same thread); repositories read through ``read()``, which reuses the thread's open transaction."""

    def __init__(self, url: str):
        from sft_core.db import migrations
        self.url = url
        eu = _engine_url(url)
        self.dialect = eu.get_backend_name()
        self._local = threading.local()
        if self.dialect == "sqlite":
            path = eu.database or ""
            if path and path != ":memory:":
                from pathlib import Path
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine = create_engine(eu, connect_args={"timeout": 60.0, "check_same_thread": False})
            self._sqlite_events()
        else:
            self.engine = create_engine(eu, pool_pre_ping=True, pool_size=5, max_overflow=10,
                                        connect_args={"connect_timeout": 10})
        try:
            migrations.upgrade(self)
        except OperationalError as e:
            self.engine.dispose()
            reason = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
            raise StoreError(f"cannot open the database {_redacted(url)}: {reason}", "SFT_STUDIO_DB_URL") from None
        except NoSuchModuleError as e:
            raise StoreError(f"no driver for {_redacted(url)}: {e}", "SFT_STUDIO_DB_URL") from None

    def _sqlite_events(self) -> None:
        @event.listens_for(self.engine, "connect")
        def _on_connect(dbapi_con, _record):
            dbapi_con.isolation_level = None  # the driver emits no BEGIN of its own: ours below does
            for pragma in ("journal_mode=WAL", "busy_timeout=60000", "foreign_keys=ON", "synchronous=NORMAL"):
                dbapi_con.execute(f"PRAGMA {pragma}")

        @event.listens_for(self.engine, "begin")
        def _on_begin(con):
            # writes take the write lock up front (no upgrade deadlock between two readers turned writers)
            con.exec_driver_sql("BEGIN IMMEDIATE" if con.get_execution_options().get("write") else "BEGIN")

    @contextlib.contextmanager
    def tx(self) -> Iterator[Connection]:
        """A write transaction: commit at the end, roll back on any exception."""
        con = getattr(self._local, "con", None)
        if con is not None:  # nested: join the outer transaction
            yield con
            return
        for attempt in range(50):
            try:
                con = self.engine.connect().execution_options(write=True)
                con.begin()
                break
            except OperationalError as e:  # SQLite busy beyond busy_timeout: retry briefly
                if con is not None:
                    con.close()
                    con = None
                if "locked" not in str(e) or attempt == 49:
                    raise
                time.sleep(0.05 * (attempt + 1))
        self._local.con = con
        try:
            yield con
            con.commit()
        except BaseException:
            con.rollback()
            raise
        finally:
            self._local.con = None
            con.close()

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read: inside this thread's open ``tx()`` it sees that transaction's writes."""
        con = getattr(self._local, "con", None)
        if con is not None:
            yield con
            return
        with self.engine.connect() as con:
            try:
                yield con
            finally:
                con.rollback()

    def close(self) -> None:
        self.engine.dispose()


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, default=str)


def loads(s: str | None, default: Any = None) -> Any:
    return default if s in (None, "") else json.loads(s)


_STORES: dict[str, Store] = {}
_LOCK = threading.Lock()


def open_store(url: str) -> Store:
    """One Store per URL per process."""
    with _LOCK:
        st = _STORES.get(url)
        if st is None:
            st = _STORES[url] = Store(url)
        return st
