"""`sft-studio jobs list|show|cancel`: every long operation (train, eval, kb_build, example, merge,
export) is a job in one queue; this is its view from the command line."""
from __future__ import annotations

import json
import time

from sft_core import StudioError, jobs
from sft_core.db import jobs as job_rows
from sft_core.store import open_store
from sft_core.workspace import Workspace


def _ctx():
    ws = Workspace.from_env()
    store = open_store(ws.db_url)
    jobs.reconcile(store, ws=ws)  # a worker that died while nobody watched shows as failed, with the reason
    return ws, store


def cmd_list(args) -> int:
    ws, store = _ctx()
    rows = (job_rows.recent(store, args.limit) if args.all
            else job_rows.live_or_since(store, time.time() - 86400, args.limit))
    if not rows:
        print("no jobs" + ("" if args.all else " in the last 24 hours (--all shows older ones)"))
    for job in rows:
        print(f"{job['id']:14s} {jobs.describe(job, store)}")
    return 0


def cmd_show(args) -> int:
    ws, store = _ctx()
    job = jobs.job_row(args.job_id, store)
    out = {k: job.get(k) for k in ("id", "kind", "ref", "status", "error", "pid", "created_at", "started_at",
                                   "ended_at", "heartbeat_at")}
    out["payload"] = json.loads(job.get("payload") or "{}")
    out["progress"] = jobs.progress_of(job)
    out["line"] = jobs.describe(job, store)
    print(json.dumps(out, indent=2, default=str))
    return 0


def cmd_cancel(args) -> int:
    ws, store = _ctx()
    job = jobs.job_row(args.job_id, store)
    if job["status"] not in ("queued", "running"):
        raise StudioError(f"job {args.job_id} is {job['status']}, nothing to cancel", "job")
    print(f"{args.job_id}: {jobs.cancel(job['ref'], ws, store, kind=job['kind'])}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("jobs", help="the job queue: training, evals, knowledge-base builds, merges, exports")
    s = p.add_subparsers(dest="jobs_cmd", metavar="ACTION", required=True)
    ls = s.add_parser("list", help="live jobs and those of the last 24 hours")
    ls.add_argument("--all", action="store_true", help="every job, however old")
    ls.add_argument("--limit", type=int, default=50)
    ls.set_defaults(func=cmd_list)
    for name, fn, help_ in [("show", cmd_show, "one job's state, payload and progress"),
                            ("cancel", cmd_cancel, "cancel a queued or running job")]:
        q = s.add_parser(name, help=help_)
        q.add_argument("job_id")
        q.set_defaults(func=fn)
