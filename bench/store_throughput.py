"""Claim and vote throughput of the store with 20 concurrent clients, on SQLite and on PostgreSQL.

Each backend gets a fresh database (PostgreSQL: a throwaway server on this machine, as the tests start
it: tests/pg_server.py). Then, per backend:

* claims: 600 queued jobs (light, so two run at once); 20 processes loop ``jobs.claim`` → finish until
  the queue is empty. Prints claimed jobs/s.
* votes: a campaign of 60 tasks; 20 processes (raters) each take their next task and vote, 50 times
  (1,000 votes). Prints votes/s.

The baseline is SQLite measured in the same run; the ratio is PostgreSQL / SQLite. Both servers run on
the same machine as the clients, so on 2 cores the clients compete with the database for the CPU: a
managed PostgreSQL on its own host would look better than this.

    python bench/store_throughput.py [--clients 20] [--jobs 600] [--votes-each 50]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _warm() -> None:
    """Pool initializer: imports happen before the clock starts."""
    import evals.rating  # noqa: F401
    import sft_core.jobs  # noqa: F401


def _ready(_) -> None:
    time.sleep(0.3)


def _pool(ctx, n: int):
    pool = ctx.Pool(n, initializer=_warm)
    pool.map(_ready, range(2 * n), chunksize=1)  # every worker has started and imported
    return pool


def _claimer(url: str) -> int:
    from sft_core import jobs
    from sft_core.db import jobs as job_rows
    from sft_core.store import Store
    st, n = Store(url), 0
    while True:
        job = jobs.claim(st)
        if job is None:
            if not job_rows.with_status(st, "queued", limit=1):
                return n
            time.sleep(0.001)
            continue
        job_rows.finish(st, job["id"], "succeeded")
        n += 1


def _voter(args) -> int:
    url, home, cid, rater, n_votes = args
    from evals import rating
    from sft_core.store import Store
    from sft_core.workspace import Workspace
    ws, st = Workspace.at(home), Store(url)
    for i in range(n_votes):
        t = rating.next_task(cid, rater, ws, store=st)
        rating.vote(cid, t["task_id"], rater, "left" if i % 3 else "tie", ws=ws, store=st)
    return n_votes


def run_backend(name: str, url: str, home: Path, args) -> dict:
    from sft_core.db import jobs as job_rows, schema
    from sft_core import db
    from sft_core.store import Store
    from sft_core.workspace import Workspace
    from tests.test_rating import SYSTEMS, make_eval
    from evals import rating
    os.environ["SFT_STUDIO_DB_URL"] = url
    st = Store(url)
    now = time.time()
    with st.tx() as con:
        con.execute(schema.jobs.insert(), [dict(id=f"j{i:05d}", kind="kb_build", status="queued", ref=f"kb{i}",
                                                payload="{}", created_at=now + i * 1e-3) for i in range(args.jobs)])
    ctx = mp.get_context("spawn")
    with _pool(ctx, args.clients) as pool:
        t0 = time.perf_counter()
        claimed = pool.map(_claimer, [url] * args.clients)
        claim_s = time.perf_counter() - t0
    assert sum(claimed) == args.jobs and not job_rows.with_status(st, "queued"), claimed
    ws = Workspace.at(home)
    cid = rating.create_campaign(make_eval(ws, st, 20), SYSTEMS, ws=ws, store=st)  # 60 tasks
    with _pool(ctx, args.clients) as pool:
        t0 = time.perf_counter()
        votes = pool.map(_voter, [(url, str(ws.root), cid, f"rater{i}", args.votes_each) for i in range(args.clients)])
        vote_s = time.perf_counter() - t0
    from sqlalchemy import func, select
    n_votes = db.scalar(st, select(func.count()).select_from(schema.votes))
    assert n_votes == sum(votes) == args.clients * args.votes_each, (n_votes, votes)
    return {"backend": name, "claims_per_s": args.jobs / claim_s, "claim_s": claim_s,
            "votes_per_s": n_votes / vote_s, "vote_s": vote_s, "busiest_claimer": max(claimed)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--jobs", type=int, default=600)
    ap.add_argument("--votes-each", type=int, default=50)
    args = ap.parse_args()
    from tests import pg_server
    results = []
    with tempfile.TemporaryDirectory(prefix="store-bench-") as tmp:
        tmp = Path(tmp)
        results.append(run_backend("sqlite", f"sqlite:///{tmp / 'sqlite' / 'studio.db'}", tmp / "sqlite", args))
        server = pg_server.PgServer().start()
        try:
            os.environ[pg_server.PASSWORD_ENV] = server.password
            results.append(run_backend("postgresql", server.create_database(), tmp / "pg", args))
        finally:
            server.stop()
    base = results[0]
    print(f"{'backend':<12}{'claims/s':>10}{'votes/s':>10}")
    for r in results:
        print(f"{r['backend']:<12}{r['claims_per_s']:>10.1f}{r['votes_per_s']:>10.1f}")
    pg = results[1]
    print(f"ratio postgresql/sqlite: claims {pg['claims_per_s'] / base['claims_per_s']:.2f}, "
          f"votes {pg['votes_per_s'] / base['votes_per_s']:.2f}  ({args.clients} clients, {os.cpu_count()} CPUs)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
