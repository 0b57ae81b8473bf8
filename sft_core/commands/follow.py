"""How the CLI runs a job: submit it, then wait for its turn and run it here while printing one progress
line (``jobs.describe``), or with ``--detach`` hand it to a background process and return at once."""
from __future__ import annotations

import sys
import threading

from sft_core import StudioError, jobs
from sft_core.store import Store
from sft_core.workspace import Workspace


def add_detach(parser, what: str) -> None:
    parser.add_argument("--detach", action="store_true", help=f"queue the {what} job and return at once")


def follow_job(job_id: str, ws: Workspace, store: Store) -> str:
    """Wait for the job's turn, run it here (a worker subprocess) and print its progress; returns the
    final status. Ctrl-C cancels the job (what it wrote stays, resumable where the kind allows)."""
    done = threading.Event()

    def show():
        last = ""
        while not done.wait(1.0):
            line = jobs.describe(jobs.job_row(job_id, store), store)
            if line != last:
                print(f"\r{line}", end="", file=sys.stderr, flush=True)
                last = line
    t = threading.Thread(target=show, daemon=True)
    t.start()
    try:
        return jobs.run_in_foreground(job_id, ws, store)
    except KeyboardInterrupt:
        job = jobs.job_row(job_id, store)
        jobs.cancel(job["ref"], ws, store, kind=job["kind"])
        raise
    finally:
        done.set()
        t.join(2)
        print(file=sys.stderr)


def run_job(job_id: str, ws: Workspace, store: Store, detach: bool, what: str) -> dict | None:
    """Follow the job (or detach it); returns its progress record when it succeeded here, None when
    detached; a failed or cancelled job is one error line naming its reason."""
    if detach:
        jobs.follow_detached(job_id, ws, store)
        print(f"job {job_id} queued; it runs in the background (`sft-studio jobs list`)")
        return None
    status = follow_job(job_id, ws, store)
    job = jobs.job_row(job_id, store)
    if status != "succeeded":
        raise StudioError(f"{what} {status}: {job.get('error') or 'see ' + str(ws.root / 'logs' / (job_id + '.log'))}",
                          job["kind"])
    return jobs.progress_of(job)
