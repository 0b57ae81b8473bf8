"""SQLite store: datasets, jobs, runs, evals, knowledge bases, ratings.

* WAL mode, a busy timeout, and every write inside a transaction (``BEGIN IMMEDIATE``), so several
  processes (the app, job workers, CLI calls) can share one database safely.
* The URL is configurable (``SFT_STUDIO_DB_URL``); only ``sqlite:///PATH`` is implemented, and all
  SQL here is plain enough to port to a server database.
* Each domain registers its tables in ``SCHEMAS`` (created with IF NOT EXISTS on open).
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from sft_core import StudioError

SCHEMAS: dict[str, str] = {}

SCHEMAS["datasets"] = """
CREATE TABLE IF NOT EXISTS datasets (
    name        TEXT NOT NULL,
    version     TEXT NOT NULL,          -- content hash (short)
    created_at  REAL NOT NULL,
    path        TEXT NOT NULL,
    source      TEXT,                   -- original file name
    n_rows      INTEGER NOT NULL,
    splits      TEXT NOT NULL,          -- JSON {split: n_rows}
    PRIMARY KEY (name, version)
);
"""

SCHEMAS["jobs"] = """
CREATE TABLE IF NOT EXISTS jobs (
    id            TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,        -- train | eval | ...
    status        TEXT NOT NULL CHECK (status IN ('queued','running','succeeded','failed','cancelled')),
    ref           TEXT,                 -- run id / eval id the job works on
    payload       TEXT NOT NULL DEFAULT '{}',
    created_at    REAL NOT NULL,
    started_at    REAL,
    ended_at      REAL,
    pid           INTEGER,
    pid_start     TEXT,                 -- the pid's process start time, checked before any signal
    heartbeat_at  REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error         TEXT,
    progress      TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, created_at);
"""

SCHEMAS["runs"] = """
CREATE TABLE IF NOT EXISTS runs (
    id            TEXT PRIMARY KEY,     -- also the adapter's name in the engine
    dataset       TEXT NOT NULL,
    dataset_version TEXT NOT NULL,
    base_model    TEXT NOT NULL,
    status        TEXT NOT NULL,
    created_at    REAL NOT NULL,
    path          TEXT NOT NULL,
    config        TEXT NOT NULL DEFAULT '{}',
    metrics       TEXT NOT NULL DEFAULT '{}'
);
"""

SCHEMAS["evals"] = """
CREATE TABLE IF NOT EXISTS evals (
    id          TEXT PRIMARY KEY,
    dataset     TEXT NOT NULL,
    dataset_version TEXT NOT NULL,
    split       TEXT NOT NULL,
    systems     TEXT NOT NULL,          -- JSON list
    status      TEXT NOT NULL,
    created_at  REAL NOT NULL,
    path        TEXT NOT NULL,
    config      TEXT NOT NULL DEFAULT '{}'
);
"""

SCHEMAS["kbs"] = """
CREATE TABLE IF NOT EXISTS kbs (
    name        TEXT PRIMARY KEY,
    path        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    n_docs      INTEGER NOT NULL,
    n_chunks    INTEGER NOT NULL,
    embedder    TEXT NOT NULL
);
"""

# Blind human rating (evals/rating/): one vote per rater per task; history of changed votes.
SCHEMAS["ratings"] = """
CREATE TABLE IF NOT EXISTS campaigns (
    id          TEXT PRIMARY KEY,
    eval_id     TEXT NOT NULL,
    systems     TEXT NOT NULL,          -- JSON list
    show_reference INTEGER NOT NULL DEFAULT 1 CHECK (show_reference IN (0, 1)),
    created_at  REAL NOT NULL,
    -- the columns below were added later (LATER_COLUMNS adds them to older databases): open_rating =
    -- anyone may join under a self-chosen name (bound to a signed key); published_at / closed_at end
    -- the rating and show results to raters; guidelines = what raters read before they vote;
    -- reveal_after_vote = a rater learns which systems were A and B, only on tasks they have voted on
    name        TEXT NOT NULL DEFAULT '',
    open_rating INTEGER NOT NULL DEFAULT 0 CHECK (open_rating IN (0, 1)),
    published_at REAL,
    closed_at   REAL,
    guidelines  TEXT NOT NULL DEFAULT '',
    reveal_after_vote INTEGER NOT NULL DEFAULT 0 CHECK (reveal_after_vote IN (0, 1))
);
-- Server-issued rater identities; votes.rater holds raters.id for raters who came in through the app.
-- invite: a secret link for one campaign (only its sha256 is kept); open: a self-chosen name bound to
-- an HMAC-signed key (open campaigns); hf: a Hugging Face account (OAuth, on a Space).
CREATE TABLE IF NOT EXISTS raters (
    id          TEXT PRIMARY KEY,       -- inv-<hex> | open-<hex> | hf:<username>
    kind        TEXT NOT NULL CHECK (kind IN ('invite', 'open', 'hf')),
    name        TEXT NOT NULL,          -- display name
    campaign_id TEXT REFERENCES campaigns(id),  -- invites: the one campaign they admit to
    token_sha256 TEXT UNIQUE,           -- invites: sha256 of the secret token
    created_at  REAL NOT NULL,
    revoked_at  REAL,
    CHECK ((kind = 'invite') = (token_sha256 IS NOT NULL AND campaign_id IS NOT NULL))
);
CREATE TABLE IF NOT EXISTS rating_tasks (
    id          TEXT PRIMARY KEY,
    campaign_id TEXT NOT NULL REFERENCES campaigns(id),
    row_id      TEXT NOT NULL,
    system_left TEXT NOT NULL,
    system_right TEXT NOT NULL,
    prompt      TEXT NOT NULL,
    reference   TEXT,
    output_left TEXT NOT NULL,
    output_right TEXT NOT NULL,
    CHECK (system_left <> system_right),
    UNIQUE (campaign_id, row_id, system_left, system_right)
);
CREATE TABLE IF NOT EXISTS rating_assignments (
    task_id     TEXT NOT NULL REFERENCES rating_tasks(id),
    rater       TEXT NOT NULL,
    assigned_at REAL NOT NULL,
    PRIMARY KEY (task_id, rater)
);
CREATE TABLE IF NOT EXISTS votes (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    campaign_id TEXT NOT NULL REFERENCES campaigns(id),
    task_id     TEXT NOT NULL REFERENCES rating_tasks(id),
    rater       TEXT NOT NULL,
    choice      TEXT NOT NULL CHECK (choice IN ('left','right','tie','both_bad')),
    comment     TEXT NOT NULL DEFAULT '' CHECK (length(comment) <= 2000),
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    UNIQUE (task_id, rater),
    FOREIGN KEY (task_id, rater) REFERENCES rating_assignments(task_id, rater)  -- only assigned tasks
);
CREATE TABLE IF NOT EXISTS vote_history (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    vote_id     INTEGER NOT NULL REFERENCES votes(id),
    choice      TEXT NOT NULL,
    comment     TEXT NOT NULL,
    changed_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS votes_campaign ON votes(campaign_id);
CREATE INDEX IF NOT EXISTS rating_assignments_rater ON rating_assignments(rater);
-- one task per unordered system pair and row, whichever side each system is shown on
CREATE UNIQUE INDEX IF NOT EXISTS rating_tasks_pair ON rating_tasks(
    campaign_id, row_id, min(system_left, system_right), max(system_left, system_right));
"""


class StoreError(StudioError):
    pass


# Columns added to existing tables after their first release: {table: {column: declaration}}.
LATER_COLUMNS: dict[str, dict[str, str]] = {
    "jobs": {"pid_start": "TEXT"},  # the worker's start time (/proc), so a reused pid is never signalled
    "campaigns": {"name": "TEXT NOT NULL DEFAULT ''",  # evals/rating/; in the order they were added
                  "open_rating": "INTEGER NOT NULL DEFAULT 0 CHECK (open_rating IN (0, 1))",
                  "published_at": "REAL", "closed_at": "REAL", "guidelines": "TEXT NOT NULL DEFAULT ''",
                  "reveal_after_vote": "INTEGER NOT NULL DEFAULT 0 CHECK (reveal_after_vote IN (0, 1))"},
}


def _sqlite_path(url: str) -> str:
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///"):] or ":memory:"
    if url.startswith("sqlite://"):
        return ":memory:"
    raise StoreError(f"unsupported database URL {url!r}: only sqlite:///PATH is implemented", "SFT_STUDIO_DB_URL")


class Store:
    """A thread-safe handle: one SQLite connection per thread, opened lazily."""

    def __init__(self, url: str):
        self.url = url
        self.path = _sqlite_path(url)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # executescript commits implicitly, so schemas are applied outside tx()
        con = self.connection()
        for sql in SCHEMAS.values():
            con.executescript(sql)
        for table, cols in LATER_COLUMNS.items():  # older databases: columns added since (SCHEMAS creates tables only)
            have = {r["name"] for r in con.execute(f"PRAGMA table_info({table})")}
            for col, decl in cols.items():
                if col not in have:
                    try:
                        con.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")
                    except sqlite3.OperationalError as e:  # another process added it first
                        if "duplicate column" not in str(e):
                            raise

    def connection(self) -> sqlite3.Connection:
        con = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA busy_timeout=60000")
            con.execute("PRAGMA foreign_keys=ON")
            con.execute("PRAGMA synchronous=NORMAL")
            self._local.con = con
        return con

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: BEGIN IMMEDIATE (takes the write lock up front), commit or roll back."""
        con = self.connection()
        if con.in_transaction:  # nested: join the outer transaction
            yield con
            return
        for attempt in range(50):
            try:
                con.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as e:  # busy beyond busy_timeout: retry briefly
                if "locked" not in str(e) or attempt == 49:
                    raise
                time.sleep(0.05 * (attempt + 1))
        try:
            yield con
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def query(self, sql: str, params: tuple | dict = ()) -> list[dict]:
        return [dict(r) for r in self.connection().execute(sql, params).fetchall()]

    def query_one(self, sql: str, params: tuple | dict = ()) -> dict | None:
        row = self.connection().execute(sql, params).fetchone()
        return dict(row) if row is not None else None

    def execute(self, sql: str, params: tuple | dict = ()) -> int:
        """Run one write statement in its own transaction; returns rowcount."""
        with self.tx() as con:
            return con.execute(sql, params).rowcount

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None:
            con.close()
            self._local.con = None


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


def finished_run(store: Store, run_id: str, error: type[StudioError], where: str, label: str | None = None) -> dict:
    """The row (status, base_model) of a run whose adapter is ready, else ``error(where)`` saying why not:
    an unknown run, or one not (yet) succeeded. ``label``: how the run was named (e.g. ``sft:RUN``)."""
    run = store.query_one("SELECT status, base_model FROM runs WHERE id=?", (run_id,))
    if run is None:
        raise error(f"unknown run {run_id!r}" + (f" in {label}" if label else ""), where)
    if run["status"] != "succeeded":
        raise error(f"run {run_id} is {run['status']}, not finished: its adapter is not ready", where)
    return run
