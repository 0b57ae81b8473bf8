"""The worker process of every job kind but training: ``python -m sft_core.worker --job-id J --db-url URL``.

Training keeps its own process (``sft_core.train``: Trainer callbacks, ``accelerate launch`` on several
GPUs); every other kind (eval, kb_build, example) runs here, through one shared
``WorkerContext`` that gives each kind the same services:

* heartbeat: ``jobs.heartbeat_at`` every few seconds from a thread, independent of how long a step takes;
* cancel: SIGTERM (sent by ``jobs.cancel`` to the worker's process group) or the job's
  ``cancel_requested`` flag set ``ctx.cancelled``; a kind checks ``ctx.check_cancel()`` between units of
  work and stops there, keeping what it wrote (exit code 3, status ``cancelled``);
* progress: ``ctx.progress(done, total, **extra)`` stores ``{done, total, rate, eta_s, ...}`` as JSON in
  ``jobs.progress`` (throttled), which the app and the CLI read;
* exit record: ``logs/<job_id>.exit.json`` says how the worker ended (code, error), so a queue that was not
  watching (the app restarted meanwhile) settles the job from it (``jobs.reconcile``);
* log: stdout and stderr go to ``logs/<job_id>.log`` (opened by the parent, ``jobs.run_job``).

A kind's entry point is ``fn(ctx, payload) -> None``, named in ``ENTRIES`` as "module:function" so the
worker imports only what the kind needs.
"""
from __future__ import annotations

import argparse
import importlib
import json
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from sft_core import StudioError
from sft_core.config import StudioSettings
from sft_core.db import jobs as job_rows
from sft_core.store import Store, loads, open_store
from sft_core.workspace import Workspace, atomic_write_json

from sft_core.train import EXIT_CANCELLED  # noqa: E402  (3: the same code for every kind of worker)

EXIT_OK, EXIT_FAILED = 0, 1
HEARTBEAT_EVERY_S = 5.0
PROGRESS_EVERY_S = 1.0

ENTRIES = {
    "eval": "evals.runner:job_entry",
    "kb_build": "sft_core.retrieval:job_entry",
    "example": "sft_core.example:job_entry",
    "merge": "sft_core.artifacts:job_entry",
    "export": "sft_core.artifacts:job_entry",
    "synth": "sft_core.synth:job_entry",
}


class Cancelled(KeyboardInterrupt):
    """Raised by ``WorkerContext.check_cancel`` once cancel was requested.

    A KeyboardInterrupt on purpose: code that stops cleanly on Ctrl-C (the eval marks itself
    ``interrupted``, resumable) stops the same way on a cancel, and ``except Exception`` never swallows it."""


def exit_path(ws: Workspace, job_id: str) -> Path:
    return ws.root / "logs" / f"{job_id}.exit.json"


def log_path(ws: Workspace, job_id: str) -> Path:
    return ws.root / "logs" / f"{job_id}.log"


class WorkerContext:
    """One job's services, and the context its kind works in: workspace, store, the studio's settings (read
    once by the worker's entry point: the default base model, how to start an engine)."""

    def __init__(self, job_id: str, store: Store, ws: Workspace, settings: StudioSettings):
        self.job_id, self.store, self.ws, self.settings = job_id, store, ws, settings
        job = job_rows.get(store, job_id)
        if job is None:
            raise StudioError(f"unknown job {job_id!r}", "job")
        self.job = job
        self.kind = job["kind"]
        self.payload = loads(job["payload"], {}) or {}
        self.cancelled = threading.Event()
        self._stop = threading.Event()
        self._last_progress = 0.0
        self._started = time.time()
        self._first = None  # (time, done) at the first progress report: the rate excludes start-up

    # -- services -----------------------------------------------------------------------------
    def start(self) -> "WorkerContext":
        signal.signal(signal.SIGTERM, lambda *_: self.cancelled.set())
        threading.Thread(target=self._beat, name="job-heartbeat", daemon=True).start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_EVERY_S):
            try:
                if job_rows.beat(self.store, self.job_id):
                    self.cancelled.set()
            except Exception as e:  # a busy database must not kill the worker; the next beat retries
                print(f"heartbeat: {e}", file=sys.stderr, flush=True)

    def check_cancel(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled("cancelled")

    def progress(self, done: int, total: int, force: bool = False, **extra) -> None:
        """Store progress (and derived rate / ETA); at most once a second unless ``force``."""
        now = time.time()
        if self._first is None:
            self._first = (now, done)
        if not force and now - self._last_progress < PROGRESS_EVERY_S and done < total:
            return
        self._last_progress = now
        t0, d0 = self._first
        # the rate counts only work done in this process (a resumed eval starts at its stored answers)
        # and only once it has run a few seconds, so one quick first batch does not show a silly rate
        rate = (done - d0) / (now - t0) if now - t0 >= 2.0 and done > d0 else None
        eta = (total - done) / rate if rate and total else None
        info = {"done": done, "total": total, "rate": rate, "eta_s": eta, "elapsed_s": now - self._started,
                "updated_at": now, **extra}
        try:
            job_rows.set_progress(self.store, self.job_id, json.dumps(info))
        except Exception as e:
            print(f"progress: {e}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()

    def record_exit(self, code: int, error: str | None) -> None:
        try:
            atomic_write_json(exit_path(self.ws, self.job_id),
                              {"job_id": self.job_id, "code": code, "error": error, "time": time.time()})
        except OSError as e:
            print(f"could not write the exit record: {e}", file=sys.stderr)


def _entry(kind: str):
    spec = ENTRIES.get(kind)
    if spec is None:
        raise StudioError(f"no worker for job kind {kind!r}", "kind")
    module, fn = spec.split(":")
    return getattr(importlib.import_module(module), fn)


def run(job_id: str, store: Store, ws: Workspace, settings: StudioSettings) -> int:
    ctx = WorkerContext(job_id, store, ws, settings).start()
    code, error = EXIT_FAILED, None
    try:
        _entry(ctx.kind)(ctx, ctx.payload)
        code = EXIT_OK
    except (Cancelled, KeyboardInterrupt):
        code = EXIT_CANCELLED
    except StudioError as e:
        error = str(e)
        print(f"error: {e}", file=sys.stderr, flush=True)
    except Exception as e:  # the reason is kept for the UI; the traceback goes to the log
        error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        ctx.close()
    ctx.record_exit(code, error)
    return code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sft_core.worker")
    ap.add_argument("--job-id", required=True)
    ap.add_argument("--db-url", required=True)
    ap.add_argument("--home", required=True)
    args = ap.parse_args(argv)
    ws = Workspace.at(args.home)
    store = open_store(args.db_url)
    try:
        return run(args.job_id, store, ws, StudioSettings.from_env())
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
