"""The store on both backends it supports: SQLite (the default) and a real PostgreSQL server started by
this module (``tests/pg_server.py``). The same tests run on each: migrations, the schema's constraints,
concurrent job claims (one accelerator job at a time across processes), 20 processes × 50 votes, and
clear errors for a bad database URL."""
from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, inspect, select, update
from sqlalchemy.exc import IntegrityError

from sft_core import db
from sft_core.db import evals as eval_rows, jobs as job_rows, migrations, ratings, runs as run_rows, schema
from sft_core.store import Store, StoreError
from tests import pg_server

REPO = str(Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def pg():
    try:
        server = pg_server.PgServer().start()
    except pg_server.Unavailable as e:
        pytest.skip(f"PostgreSQL could not start here, its half of the matrix is NOT tested: {e}")
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, ws, monkeypatch):
    """(name, url) of an empty database of each backend; SFT_STUDIO_DB_URL points at it, so the
    workspace, its subprocesses and spawned pools all use it."""
    if request.param == "sqlite":
        url = f"sqlite:///{ws.root / 'studio.db'}"
    else:
        server = request.getfixturevalue("pg")
        monkeypatch.setenv(pg_server.PASSWORD_ENV, server.password)
        url = server.create_database()
    monkeypatch.setenv("SFT_STUDIO_DB_URL", url)
    return request.param, url


@pytest.fixture
def bstore(backend):
    st = Store(backend[1])
    yield st
    st.close()


# ------------------------------------------------------------------------------------------------
# Schema and migrations
# ------------------------------------------------------------------------------------------------
def _shape(store: Store) -> dict:
    """Tables → their column names: what a migration must reproduce. CHECK constraints are
    compared by behaviour instead (version 0 declared its own without names)."""
    with store.read() as con:
        ins = inspect(con)
        return {t: {c["name"] for c in ins.get_columns(t)} for t in sorted(schema.metadata.tables)}


def test_a_fresh_database_is_at_head_with_every_table(bstore):
    with bstore.read() as con:
        assert migrations.current(con) == migrations.HEAD
        assert set(schema.metadata.tables) <= set(inspect(con).get_table_names())


def test_a_version_0_sqlite_database_upgrades_in_place_keeping_its_rows(tmp_path):
    """A database written by the studio before versioned migrations (its DDL kept below, as shipped,
    without the columns added later) upgrades to the same shape as a fresh one, rows intact."""
    old = tmp_path / "old.db"
    con = sqlite3.connect(old)
    con.executescript(V0_DDL)
    con.execute("INSERT INTO runs VALUES ('r1','d','v','m','succeeded',1.0,'/p','{}','{}')")
    con.execute("INSERT INTO jobs (id, kind, status, ref, created_at) VALUES ('j1','train','succeeded','r1',1.0)")
    con.execute("INSERT INTO campaigns (id, eval_id, systems, created_at) VALUES ('c1','e1','[]',1.0)")
    con.commit()
    con.close()
    st = Store(f"sqlite:///{old}")
    fresh = Store(f"sqlite:///{tmp_path / 'fresh.db'}")
    assert _shape(st) == _shape(fresh)
    assert run_rows.get(st, "r1")["status"] == "succeeded"
    assert job_rows.get(st, "j1")["worker_ref"] is None
    assert ratings.get_campaign(st, "c1")["reveal_after_vote"] == 0
    with st.read() as c:
        assert migrations.current(c) == migrations.HEAD
    eval_rows.insert_eval(st, "e1", "d", "v", "test", ["prompt"], "/e", {})
    for set_status, row in ((run_rows.set_status, "r1"), (eval_rows.set_status, "e1")):
        with pytest.raises(IntegrityError):  # the status enums the migration added
            set_status(st, row, "exploded")


def test_opening_twice_at_once_migrates_once(backend):
    """Four processes open the same empty database at the same moment: one creates, the rest see HEAD."""
    code = ("import sys; sys.path.insert(0, %r)\nfrom sft_core.store import Store\nStore(%r)\n" % (REPO, backend[1]))
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(4)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, errs
    st = Store(backend[1])
    with st.read() as c:
        assert migrations.current(c) == migrations.HEAD
        assert c.execute(select(migrations._version)).all() == [(migrations.HEAD,)]


@pytest.mark.parametrize("table,status", [("runs", "exploded"), ("evals", "done"), ("jobs", "paused")])
def test_status_enums_are_enforced_by_the_schema(bstore, table, status):
    run_rows.insert_run(bstore, "r1", "d", "v", "m", "/p", {})
    eval_rows.insert_eval(bstore, "e1", "d", "v", "test", ["prompt"], "/e", {})
    job_rows.insert_job(bstore, "train", "r1", {})
    t = schema.metadata.tables[table]
    with pytest.raises(IntegrityError, match="(?i)check"):
        db.write(bstore, update(t).values(status=status))
    for good in {"runs": schema.RUN_STATUSES, "evals": schema.EVAL_STATUSES, "jobs": schema.JOB_STATUSES}[table]:
        db.write(bstore, update(t).values(status=good))


def test_vote_rules_are_schema_constraints(bstore):
    """One vote per rater and task, only on an assigned task, a known choice, a bounded comment, and one
    task per unordered pair of systems: refused by the database itself, whoever writes."""
    T, A, V = schema.rating_tasks, schema.rating_assignments, schema.votes
    with bstore.tx() as con:
        con.execute(schema.campaigns.insert().values(id="c1", eval_id="e1", systems="[]", created_at=1.0))
        con.execute(T.insert().values(id="t1", campaign_id="c1", row_id="r1", system_left="a", system_right="b",
                                      prompt="p", output_left="x", output_right="y"))
        con.execute(A.insert().values(task_id="t1", rater="ann", assigned_at=1.0))
    vote = dict(campaign_id="c1", task_id="t1", rater="ann", choice="left", created_at=1.0, updated_at=1.0)
    db.write(bstore, V.insert().values(**vote))
    bad = [(vote, "twice"), (vote | {"rater": "bob"}, "unassigned"), (vote | {"choice": "maybe"}, "choice"),
           (vote | {"comment": "x" * 2001}, "comment length")]
    for row, why in bad:
        with pytest.raises(IntegrityError):
            db.write(bstore, V.insert().values(**row))
            pytest.fail(f"accepted a vote that breaks: {why}")
    with pytest.raises(IntegrityError):  # the same pair shown the other way round
        db.write(bstore, T.insert().values(id="t2", campaign_id="c1", row_id="r1", system_left="b",
                                           system_right="a", prompt="p", output_left="y", output_right="x"))
    assert db.scalar(bstore, select(V.c.id).where(V.c.rater == "ann")) is not None


# ------------------------------------------------------------------------------------------------
# Concurrency: claims and votes from many processes
# ------------------------------------------------------------------------------------------------
CLAIMER = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
from sft_core import jobs
from sft_core.db import jobs as job_rows
from sft_core.store import Store
from sft_core.workspace import Workspace
store, ws = Store({url!r}), Workspace.at({home!r})
while time.time() < {go}:  # every process starts claiming at the same moment (imports take unequal time)
    time.sleep(0.01)
end = time.time() + 90
while time.time() < end:
    job = jobs.claim(store)
    if job is None:
        if not job_rows.live(store):
            break
        time.sleep(0.02)
        continue
    start = time.time()
    time.sleep(0.15)
    with open({log!r}, "a") as f:
        f.write(json.dumps([{name!r}, job["id"], start, time.time()]) + "\n")
    jobs._finish(store, job, "succeeded", ws=ws)
    time.sleep(0.05)  # a dispatcher polls: the others get their turn at the next job
"""


def test_processes_claiming_together_never_run_two_accelerator_jobs_at_once(backend, bstore, tmp_path):
    """Four processes (four apps or workers on one database) claim from one queue of 12 accelerator jobs:
    every job runs exactly once and the recorded run intervals never overlap."""
    for i in range(12):
        db.write(bstore, schema.jobs.insert().values(id=f"acc{i:02d}", kind="eval", status="queued", ref=f"e{i}",
                                                     payload=json.dumps({"accelerator": True}),
                                                     created_at=time.time() + i))
    log = tmp_path / "runs.jsonl"
    go = time.time() + 8  # after every process has imported (seconds on a loaded 2-core machine)
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER.format(repo=REPO, url=backend[1], log=str(log),
                                                                     name=f"app-{k}", go=go,
                                                                     home=str(tmp_path / "home"))])
             for k in range(4)]
    for p in procs:
        assert p.wait(180) == 0
    runs = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(r[1] for r in runs) == [f"acc{i:02d}" for i in range(12)]
    runs.sort(key=lambda r: r[2])
    for a, b in zip(runs, runs[1:]):
        assert a[3] <= b[2], f"two accelerator jobs overlapped: {a} and {b}"
    assert len({r[0] for r in runs}) >= 2, "one process took every job: the test did not exercise concurrency"


def _voter(args):
    db_url, home, cid, rater = args
    from evals import rating
    from sft_core.workspace import Workspace
    ws, st = Workspace.at(home), Store(db_url)
    n = 0
    for _ in range(50):
        t = rating.next_task(cid, rater, ws, store=st)
        rating.vote(cid, t["task_id"], rater, "left" if n % 3 else "tie", ws=ws, store=st)
        n += 1
    return n


def test_twenty_processes_fifty_votes_each(backend, ws, bstore):
    from evals import rating
    from tests.test_rating import SYSTEMS, make_eval
    cid = rating.create_campaign(make_eval(ws, bstore, 20), SYSTEMS, ws=ws, store=bstore)  # 60 tasks
    ctx = mp.get_context("spawn")  # real, fresh processes, each with its own connection
    with ctx.Pool(20) as pool:
        counts = pool.map(_voter, [(backend[1], str(ws.root), cid, f"rater{i}") for i in range(20)])
    assert sum(counts) == 1000
    V = schema.votes
    assert db.scalar(bstore, select(func.count()).select_from(V)) == 1000
    pairs = db.rows(bstore, select(V.c.task_id, V.c.rater))
    assert len({(r["task_id"], r["rater"]) for r in pairs}) == 1000  # no rater voted twice on a task
    assert db.scalar(bstore, select(func.count()).select_from(schema.rating_assignments)) == 1000
    res = rating.results(cid, ws=ws, store=bstore)
    assert res["n_votes"] == 1000 and res["n_raters"] == 20
    assert res["agreement"]["tasks_with_several_raters"] == 60
    # the spread bound and its derivation: tests/test_rating.py (greedy least-assigned-first; skewed
    # rater speeds give spreads of 1-3 in simulation, an assignment ignoring coverage spreads >= 5)
    per_task: dict[str, int] = {}
    for r in pairs:
        per_task[r["task_id"]] = per_task.get(r["task_id"], 0) + 1
    assert len(per_task) == 60 and max(per_task.values()) - min(per_task.values()) <= 4, per_task


# ------------------------------------------------------------------------------------------------
# Bad configuration: a clear error naming the setting, quickly, and nothing written
# ------------------------------------------------------------------------------------------------
def test_bad_database_urls_are_clear_errors(pg, monkeypatch, tmp_path):
    monkeypatch.setenv(pg_server.PASSWORD_ENV, pg.password)
    cases = [
        ("mysql://u@h/db", "unsupported database 'mysql'"),
        ("not a url", "not a database URL"),
        (f"postgresql://postgres:secret@127.0.0.1:{pg.port}/postgres", "must not carry a password"),
        (f"postgresql://postgres@127.0.0.1:{pg_server._free_port()}/postgres", "cannot open the database"),
        (f"postgresql://postgres@127.0.0.1:{pg.port}/no_such_db", "no_such_db"),
    ]
    for url, said in cases:
        t0 = time.monotonic()
        with pytest.raises(StoreError, match=said) as e:
            Store(url)
        assert e.value.where == "SFT_STUDIO_DB_URL"
        assert "secret" not in str(e.value)
        assert time.monotonic() - t0 < 30, f"{url}: the error took {time.monotonic() - t0:.0f}s"
    monkeypatch.setenv(pg_server.PASSWORD_ENV, "wrong")
    with pytest.raises(StoreError, match="password authentication failed"):
        Store(pg.url("postgres"))


def test_a_failed_transaction_leaves_nothing_behind(bstore):
    """A run and its job are written together or not at all (jobs.submit_train's transaction)."""
    with pytest.raises(RuntimeError):
        with bstore.tx() as con:
            run_rows.insert_run(con, "r1", "d", "v", "m", "/p", {})
            job_rows.insert_job(con, "train", "r1", {})
            raise RuntimeError("crash between the two writes")
    assert run_rows.get(bstore, "r1") is None and job_rows.latest(bstore, "r1") is None


# The studio's schema as shipped before versioned migrations (sft_core/store.py up to ddc1707), minus the
# columns added later, which the migration must add: what a user's existing studio.db looks like.
V0_DDL = """
CREATE TABLE datasets (name TEXT NOT NULL, version TEXT NOT NULL, created_at REAL NOT NULL, path TEXT NOT NULL,
    source TEXT, n_rows INTEGER NOT NULL, splits TEXT NOT NULL, PRIMARY KEY (name, version));
CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('queued','running','succeeded','failed','cancelled')),
    ref TEXT, payload TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL, started_at REAL, ended_at REAL,
    pid INTEGER, heartbeat_at REAL, cancel_requested INTEGER NOT NULL DEFAULT 0, error TEXT,
    progress TEXT NOT NULL DEFAULT '{}');
CREATE INDEX jobs_status ON jobs(status, created_at);
CREATE TABLE runs (id TEXT PRIMARY KEY, dataset TEXT NOT NULL, dataset_version TEXT NOT NULL,
    base_model TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL, path TEXT NOT NULL,
    config TEXT NOT NULL DEFAULT '{}', metrics TEXT NOT NULL DEFAULT '{}');
CREATE TABLE evals (id TEXT PRIMARY KEY, dataset TEXT NOT NULL, dataset_version TEXT NOT NULL, split TEXT NOT NULL,
    systems TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL, path TEXT NOT NULL,
    config TEXT NOT NULL DEFAULT '{}');
CREATE TABLE kbs (name TEXT PRIMARY KEY, path TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    n_docs INTEGER NOT NULL, n_chunks INTEGER NOT NULL, embedder TEXT NOT NULL);
CREATE TABLE campaigns (id TEXT PRIMARY KEY, eval_id TEXT NOT NULL, systems TEXT NOT NULL,
    show_reference INTEGER NOT NULL DEFAULT 1 CHECK (show_reference IN (0, 1)), created_at REAL NOT NULL);
CREATE TABLE raters (id TEXT PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('invite', 'open', 'hf')),
    name TEXT NOT NULL, campaign_id TEXT REFERENCES campaigns(id), token_sha256 TEXT UNIQUE,
    created_at REAL NOT NULL, revoked_at REAL,
    CHECK ((kind = 'invite') = (token_sha256 IS NOT NULL AND campaign_id IS NOT NULL)));
CREATE TABLE rating_tasks (id TEXT PRIMARY KEY, campaign_id TEXT NOT NULL REFERENCES campaigns(id),
    row_id TEXT NOT NULL, system_left TEXT NOT NULL, system_right TEXT NOT NULL, prompt TEXT NOT NULL,
    reference TEXT, output_left TEXT NOT NULL, output_right TEXT NOT NULL, CHECK (system_left <> system_right),
    UNIQUE (campaign_id, row_id, system_left, system_right));
CREATE TABLE rating_assignments (task_id TEXT NOT NULL REFERENCES rating_tasks(id), rater TEXT NOT NULL,
    assigned_at REAL NOT NULL, PRIMARY KEY (task_id, rater));
CREATE TABLE votes (id INTEGER PRIMARY KEY AUTOINCREMENT, campaign_id TEXT NOT NULL REFERENCES campaigns(id),
    task_id TEXT NOT NULL REFERENCES rating_tasks(id), rater TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('left','right','tie','both_bad')),
    comment TEXT NOT NULL DEFAULT '' CHECK (length(comment) <= 2000), created_at REAL NOT NULL,
    updated_at REAL NOT NULL, UNIQUE (task_id, rater),
    FOREIGN KEY (task_id, rater) REFERENCES rating_assignments(task_id, rater));
CREATE TABLE vote_history (id INTEGER PRIMARY KEY AUTOINCREMENT, vote_id INTEGER NOT NULL REFERENCES votes(id),
    choice TEXT NOT NULL, comment TEXT NOT NULL, changed_at REAL NOT NULL);
CREATE INDEX votes_campaign ON votes(campaign_id);
CREATE INDEX rating_assignments_rater ON rating_assignments(rater);
CREATE UNIQUE INDEX rating_tasks_pair ON rating_tasks(
    campaign_id, row_id, min(system_left, system_right), max(system_left, system_right));
"""
