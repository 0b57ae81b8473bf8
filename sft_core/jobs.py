"""Job queue in SQLite: queued -> running -> succeeded | failed | cancelled.

* One job runs at a time per machine (per database): claiming is a transaction that refuses while
  another job is running, so the app's dispatcher and a CLI `sft-studio train` can share the queue.
* A job is a separate process (``build_command`` per kind, from a registry), so a crash or an
  out-of-memory kill never takes the app down. The parent records its pid, watches its exit code
  and the cancel flag; the worker heartbeats.
* A job whose process vanished (kill -9 while nobody watched, machine restart) is found by
  ``reconcile`` (pid gone or heartbeat stale) and marked failed with the reason.
* Cancel: a queued job is cancelled at once; a running one gets a flag (and SIGTERM, except a multi-GPU
  launcher: its ranks read the flag), stops after its current step, keeps its checkpoint, and ends
  ``cancelled``. ``resume`` queues it again.
* GPUs (``sft_core/gpu.py``): before an accelerator job starts, the environment check; a kind with
  ``devices`` (training) gets its GPUs through CUDA_VISIBLE_DEVICES and waits for a managed inference
  engine sharing them to yield.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from sft_core import StudioError, gpu, job_backends
from sft_core.config import TrainConfig, to_dict
from sft_core.job_backends import _alive, _proc_start, _same_process  # noqa: F401 (tests use them)
from sft_core.job_kinds import (JOB_KINDS, JobError, JobKind, _exit_record, _train_build, _worker_outcome,  # noqa: F401
                                needs_accelerator, needs_gpu_alone, register_job_kind, train_command, train_devices)
from sft_core.db import jobs as job_rows, runs as run_rows
from sft_core.store import Store, loads, open_store
from sft_core.workspace import Workspace, atomic_write_json, safe_name

log = logging.getLogger(__name__)

HEARTBEAT_STALE_S = 120.0  # the train worker beats every 5 s from a thread; the watching parent too
PID_GRACE_S = 30.0
FINAL = ("succeeded", "failed", "cancelled")


LIGHT_SLOTS = 2  # jobs that need no accelerator (a small index build) that may run at once, beside it


def new_run_id(cfg: TrainConfig) -> str:
    if cfg.run_name:
        return safe_name(cfg.run_name, "run_name")
    return f"{cfg.dataset[:40]}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def submit_train(cfg: TrainConfig, ws: Workspace, store: Store | None = None) -> str:
    """Validate (before any process starts), create the run directory and queue the job."""
    from sft_core.train import validate_train_config
    store = store or open_store(ws.db_url)
    check_backend(cfg.num_gpus)
    facts = validate_train_config(cfg, ws, store)
    run_id = new_run_id(cfg)
    run_dir = ws.runs_dir(run_id)
    if run_dir.exists() or run_rows.exists(store, run_id):
        raise JobError(f"run {run_id!r} exists already; pick another run_name", "run_name")
    run_dir.mkdir(parents=True)
    resolved = to_dict(cfg) | {"dataset_version": facts["dataset_version"]}
    atomic_write_json(run_dir / "config.json", {"config": resolved, "workspace": str(ws.root), **facts})
    now = time.time()
    try:
        with store.tx() as con:
            run_rows.insert_run(con, run_id, cfg.dataset, facts["dataset_version"], cfg.base_model, str(run_dir),
                                resolved, created_at=now)
            _insert_job(con, "train", run_id, {})
    except BaseException:
        import shutil
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_id


def _insert_job(con, kind: str, ref: str, payload: dict) -> str:
    return job_rows.insert_job(con, kind, ref, payload)


def submit(kind: str, ref: str, payload: dict | None = None, *, ws: Workspace,
           store: Store | None = None) -> str:
    """Queue a job of a registered kind (evals use this)."""
    if kind not in JOB_KINDS:
        raise JobError(f"unknown job kind {kind!r}", "kind")
    check_backend()
    store = store or open_store(ws.db_url)
    with store.tx() as con:
        return _insert_job(con, kind, ref, payload or {})


# ------------------------------------------------------------------------------------------------
# Queue operations
# ------------------------------------------------------------------------------------------------
def latest_job(ref: str, store: Store, kind: str | None = None) -> dict | None:
    """The newest job of a ref (a run's id is the ref of its train jobs and of its merge/export jobs)."""
    return job_rows.latest(store, ref, kind)


def cancel(run_id: str, ws: Workspace, store: Store | None = None, kind: str | None = None) -> str:
    """Cancel a run's (or eval's) queued or running job — of ``kind`` when given; with none, the newest live
    job of the ref, else its newest job. Returns the job's new state."""
    store = store or open_store(ws.db_url)
    with store.tx() as con:
        job = job_rows.latest(con, run_id, kind, live_first=True)
        if job is None:
            raise JobError(f"no job for {run_id!r}", "run")
        if job["status"] == "queued":
            job_rows.cancel_queued(con, job["id"])
            kind = JOB_KINDS.get(job["kind"])
            if kind and kind.on_finish:
                kind.on_finish(job, "cancelled", ws, store)  # joins this transaction
            return "cancelled"
        if job["status"] != "running":
            raise JobError(f"{run_id} is {job['status']}, nothing to cancel", "run")
        job_rows.request_cancel(con, job["id"])
    # only the job's own worker is signalled: a pid whose start time differs was reused by another process.
    # A multi-GPU launcher is not signalled: every rank reads the flag itself (its heartbeat thread) and
    # they stop together after a checkpoint; a signalled launcher would report the run as failed.
    if job.get("pid") and _same_process(job["pid"], job.get("pid_start")) and not _runs_launcher(job["pid"]):
        try:
            os.killpg(job["pid"], signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    return "cancelling"


def _runs_launcher(pid: int) -> bool:
    """Whether the process is a multi-GPU launcher (``accelerate launch``), from its command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return gpu.LAUNCHER_MODULE in f.read().decode(errors="replace").split("\0")
    except OSError:
        return False


def resume(run_id: str, ws: Workspace, store: Store | None = None) -> str:
    """Queue a failed or cancelled run again; it continues from its last checkpoint."""
    from sft_core.train import last_checkpoint
    store = store or open_store(ws.db_url)
    reconcile(store, ws=ws)
    run = run_rows.get(store, run_id)
    if run is None:
        raise JobError(f"unknown run {run_id!r}", "run")
    check_backend(int(loads(run["config"], {}).get("num_gpus", 0) or 0))
    if last_checkpoint(Path(run["path"])) is None:
        raise JobError(f"run {run_id} has no checkpoint yet; start it again instead", "run")
    with store.tx() as con:  # the state is checked in the transaction that re-queues: two resumes queue one job
        run = run_rows.get(con, run_id)
        if run is None:
            raise JobError(f"unknown run {run_id!r} (deleted meanwhile)", "run")
        if run["status"] not in ("failed", "cancelled"):
            raise JobError(f"run {run_id} is {run['status']}; only failed or cancelled runs resume", "run")
        if job_rows.live(con, ref=run_id):
            raise JobError(f"run {run_id} already has a queued or running job", "run")
        run_rows.set_status(con, run_id, "queued")
        return _insert_job(con, "train", run_id, {"resume": True})


def reconcile(store: Store, watched: set[str] | None = None, *, ws: Workspace) -> list[str]:
    """Settle running jobs that nobody is watching any more. Returns the ids whose state changed.

    A worker that ended while its watcher was gone (app restart, closed terminal) gets the status it
    recorded itself (the kind's ``outcome``); one that vanished (kill -9, out of memory, machine
    restart) or stopped heartbeating (hung, or its pid now belongs to another process) is failed."""
    settled = []
    for job in job_rows.with_status(store, "running"):
        if watched and job["id"] in watched:
            continue
        beat = job["heartbeat_at"] or job["started_at"] or 0
        silent = time.time() - beat
        ref = job.get("worker_ref") or ""
        if ref.startswith("ray:"):
            backend = job_backends.backend_for_ref(ref)
            gone = not backend.alive(ref)
            if not gone and backend.waiting(ref):
                continue  # queued in the cluster for its resources (GPUs): no worker yet to heartbeat
        elif job["pid"]:
            gone = not _same_process(job["pid"], job.get("pid_start"))
        else:  # claimed, process not started yet: give the starter a moment
            gone = silent > PID_GRACE_S
        if not gone and silent <= HEARTBEAT_STALE_S:
            continue
        kind = JOB_KINDS.get(job["kind"])
        recorded = kind.outcome(job, ws, store) if (gone and kind and kind.outcome) else None
        if recorded:
            status, error = recorded
        elif gone:
            status, error = "failed", "worker process disappeared (killed, out of memory, or machine restart)"
        else:
            status, error = "failed", f"worker stopped reporting for {silent:.0f}s"
        if _finish(store, job, status, error, ws=ws):
            settled.append(job["id"])
    return settled


def _finish(store: Store, job: dict, status: str, error: str | None = None, *, ws: Workspace) -> bool:
    if not job_rows.finish(store, job["id"], status, error):
        return False  # someone else settled it first
    kind = JOB_KINDS.get(job["kind"])
    if kind and kind.on_finish:
        kind.on_finish(job, status, ws, store)
    return True


def claim(store: Store, job_id: str | None = None) -> dict | None:
    """Take the oldest queued job whose resources are free (or ``job_id`` when it is next in line).

    Resources: one accelerator slot (jobs of kinds that declare it run one at a time, in queue order)
    and ``LIGHT_SLOTS`` for the rest. The check and the claim are one write transaction (BEGIN
    IMMEDIATE on SQLite, an advisory lock on PostgreSQL), so any number of processes sharing the database
    never run two accelerator jobs at once."""
    with store.tx() as con:
        job_rows.lock_queue(con)
        running = job_rows.with_status(con, "running")
        heavy_busy = any(needs_accelerator(r) for r in running)
        light_free = LIGHT_SLOTS - sum(not needs_accelerator(r) for r in running)
        row, heads = None, {}
        for q in job_rows.with_status(con, "queued"):
            heavy = needs_accelerator(q)
            heads.setdefault(heavy, q)  # first in line for each resource (FIFO within it)
            if len(heads) == 2:
                break
        for heavy, q in sorted(heads.items(), key=lambda kv: (kv[1]["created_at"], kv[1]["id"])):
            if (heavy and heavy_busy) or (not heavy and light_free <= 0):
                continue
            if job_id and q["id"] != job_id:
                continue
            row = q
            break
        if row is None:
            return None
        now = time.time()
        job_rows.mark_running(con, row["id"], now)
        job = row | {"status": "running", "started_at": now}
        if job["kind"] == "train":
            run_rows.set_status(con, job["ref"], "running")
        return job


def _describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = " (out of memory or kill -9)" if -code == signal.SIGKILL else ""
        return f"worker killed by {name}{hint}"
    return f"worker exited with code {code}"


def run_job(job: dict, ws: Workspace, store: Store, on_output: Callable[[str], None] | None = None) -> str:
    """Run a claimed job's process to the end; returns its final status."""
    kind = JOB_KINDS[job["kind"]]
    try:
        argv = kind.build_command(job, ws, store)
    except StudioError as e:
        _finish(store, job, "failed", str(e), ws=ws)
        return "failed"
    log_path = _log_path(job, ws, store)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        backend = job_backends.backend_from_env()
    except StudioError as e:
        _finish(store, job, "failed", str(e), ws=ws)
        return "failed"
    gpu_env = {}
    if backend.name == "local":  # on a cluster, the scheduler picks the node and its GPUs
        gpu_env, ended = _prepare_gpus(job, kind, ws, store, log_path)
        if ended:
            return ended
    env = {**os.environ, "SFT_STUDIO_HOME": str(ws.root), "PYTHONUNBUFFERED": "1", **gpu_env}
    launcher = gpu.LAUNCHER_MODULE in argv  # its ranks stop on the cancel flag; its exit code says little
    try:
        handle = backend.start(argv, env, log_path, num_gpus=cluster_gpus(job, store), job_id=job["id"])
    except StudioError as e:  # the cluster went away between submit and start
        _finish(store, job, "failed", str(e), ws=ws)
        return "failed"
    pid = getattr(handle, "pid", None)
    job_rows.set_worker(store, job["id"], pid, _proc_start(pid) if pid else None, handle.ref)
    sent_term, last_beat = False, time.time()
    while (code := handle.poll()) is None:
        time.sleep(0.5)
        if time.time() - last_beat > 5 and (pid is None or _alive(pid)):  # kinds whose worker does not beat itself
            last_beat = time.time()
            job_rows.beat(store, job["id"])
        if job_rows.cancel_requested(store, job["id"]) and not sent_term and not launcher:
            sent_term = True
            handle.terminate()
    cancel_asked = job_rows.cancel_requested(store, job["id"])
    from sft_core.train import EXIT_CANCELLED
    recorded = kind.outcome(job, ws, store) if launcher and kind.outcome else None  # rank 0's exit record
    if recorded:
        status, err = recorded
    elif code == 0:
        status, err = "succeeded", None
    elif code == EXIT_CANCELLED or (cancel_asked and code in (EXIT_CANCELLED, -signal.SIGTERM)):
        status, err = "cancelled", None
    else:
        status, err = "failed", _error_reason(job, ws, store) or getattr(handle, "reason", None) or _describe_exit(code)
    _finish(store, job, status, err, ws=ws)
    return status


def cluster_gpus(job: dict, store: Store) -> int:
    """The GPUs a job asks a cluster scheduler for: a training run's ``num_gpus`` (locally 0 means all
    that training may use; on a cluster it means a CPU run: set it to train on GPUs there)."""
    if job["kind"] != "train":
        return 0
    run = run_rows.get(store, job["ref"])
    return int(loads(run["config"], {}).get("num_gpus", 0) or 0) if run else 0


def check_backend(num_gpus: int = 0) -> None:
    """At submit time, before anything is written: the configured job backend can take the job (a Ray
    address that answers, a GPU node when the run asks for GPUs). StudioError naming the setting."""
    job_backends.backend_from_env().check(num_gpus)


def _prepare_gpus(job: dict, kind: JobKind, ws: Workspace, store: Store, log_path: Path) -> tuple[dict, str | None]:
    """Before an accelerator job's worker starts: the environment check (a GPU that nvidia-smi sees and
    torch cannot use fails the job with the reason, rather than a run on the CPU), the worker's GPUs
    (CUDA_VISIBLE_DEVICES) and, where a managed inference engine shares them, its turn to yield (the
    job is already marked running, so an engine about to come back sees it and stays asleep).
    Returns (environment for the worker, final status when the job ended here)."""
    if not (needs_accelerator(job) or kind.devices):
        return {}, None

    def beat():  # no worker pid yet: the runner keeps the job from looking vanished
        job_rows.beat(store, job["id"])

    def cancelled() -> bool:
        return job_rows.cancel_requested(store, job["id"])

    try:
        inv = gpu.require_usable_gpu("gpu")
        devices = kind.devices(job, store, inv) if kind.devices and inv.count else []
        if not devices:
            return {}, None
        if gpu.engines_in_the_way(gpu.engine_states(ws), devices):
            with open(log_path, "a") as f:
                f.write(f"GPU {','.join(map(str, devices))}: waiting for the inference engine to give it up\n")
        if not gpu.wait_for_engines(ws, devices, timeout_s=gpu.YIELD_TIMEOUT_S, beat=beat, cancelled=cancelled):
            _finish(store, job, "cancelled", None, ws=ws)
            return {}, "cancelled"
    except StudioError as e:
        _finish(store, job, "failed", str(e), ws=ws)
        return {}, "failed"
    return gpu.device_env(devices, inv), None


def _log_path(job: dict, ws: Workspace, store: Store) -> Path:
    if job["kind"] == "train":
        run = run_rows.get(store, job["ref"])
        if run:
            return Path(run["path"]) / "worker.log"
    return ws.root / "logs" / f"{job['id']}.log"


def _error_reason(job: dict, ws: Workspace, store: Store) -> str | None:
    if job["kind"] != "train":
        recorded = _worker_outcome(job, ws, store)
        return recorded[1] if recorded else None
    p = _log_path(job, ws, store).parent / "error.txt"
    if p.exists():
        text = p.read_text().strip()
        p.unlink()
        return text or None
    return None


# ------------------------------------------------------------------------------------------------
# Dispatcher: one per process that wants queued jobs to run (the app)
# ------------------------------------------------------------------------------------------------
_DISPATCHERS: dict[str, threading.Thread] = {}


def dispatch_forever(ws: Workspace, store: Store, poll_s: float = 1.0, stop: threading.Event | None = None) -> None:
    """Claim jobs as their resources free up and watch each in its own thread (an accelerator job and
    light jobs side by side); settle jobs nobody watches any more (``reconcile``)."""
    watching: dict[str, threading.Thread] = {}
    while not (stop and stop.is_set()):
        try:
            for jid in [j for j, t in watching.items() if not t.is_alive()]:
                watching.pop(jid)
            reconcile(store, watched=set(watching), ws=ws)
            job = claim(store)
            if job:
                t = threading.Thread(target=_watch_job, args=(job, ws, store), name=f"job-{job['id']}", daemon=True)
                watching[job["id"]] = t
                t.start()
                continue
        except Exception:  # never let the dispatcher die; the job's own state says what failed
            log.exception("job dispatcher error")
        time.sleep(poll_s)


def _watch_job(job: dict, ws: Workspace, store: Store) -> None:
    try:
        run_job(job, ws, store)
    except Exception as e:  # the job must not stay 'running' because its watcher broke
        log.exception("job %s watcher failed", job["id"])
        _finish(store, job, "failed", f"watcher error: {type(e).__name__}: {e}", ws=ws)


def start_dispatcher(ws: Workspace, store: Store) -> threading.Thread:
    key = store.url
    t = _DISPATCHERS.get(key)
    if t is None or not t.is_alive():
        t = threading.Thread(target=dispatch_forever, args=(ws, store), name="job-dispatcher", daemon=True)
        t.start()
        _DISPATCHERS[key] = t
    return t


def run_in_foreground(job_id: str, ws: Workspace, store: Store, on_wait: Callable[[], None] | None = None) -> str:
    """Wait for our turn in the queue, then run the job here (CLI)."""
    while True:
        reconcile(store, ws=ws)
        job = job_rows.get(store, job_id)
        if job["status"] in FINAL:
            return job["status"]
        if job["status"] == "queued":
            claimed = claim(store, job_id)
            if claimed:
                return run_job(claimed, ws, store)
        if on_wait:
            on_wait()
        time.sleep(1.0)


# ------------------------------------------------------------------------------------------------
# Reading a job's state (app, CLI), and running one detached from the CLI
# ------------------------------------------------------------------------------------------------
def job_row(job_id: str, store: Store) -> dict:
    job = job_rows.get(store, job_id)
    if job is None:
        raise JobError(f"unknown job {job_id!r}", "job")
    return job


def queue_position(job: dict, store: Store) -> int:
    """1 + the number of queued jobs ahead of this queued one that compete for the same resource."""
    heavy = needs_accelerator(job)
    ahead = [q for q in job_rows.queued_ahead(store, job) if needs_accelerator(q) == heavy]
    return len(ahead) + 1


def progress_of(job: dict) -> dict:
    try:
        return loads(job.get("progress") or "{}", {}) or {}
    except ValueError:
        return {}


def describe(job: dict | None, store: Store) -> str:
    """One line: where the job is (queue position and what it waits for, progress with rate and ETA)."""
    if job is None:
        return "no job"
    st = job["status"]
    if st == "queued":
        heavy = needs_accelerator(job)
        busy = [r for r in job_rows.with_status(store, "running")
                if needs_accelerator(r) == heavy]
        wait = f", waiting for {busy[0]['kind']} {busy[0]['ref']}" if busy else ""
        return f"{job['kind']} {job['ref']}: queued (position {queue_position(job, store)}{wait})"
    p = progress_of(job)
    line = f"{job['kind']} {job['ref']}: {st}"
    if p.get("total"):
        line += f" · {p.get('done', 0)}/{p['total']} {p.get('unit', '')}".rstrip()
        if p.get("rate"):
            line += f" · {p['rate']:.2f}/s"
        if st == "running" and p.get("eta_s") is not None:
            line += f" · ETA {_fmt_s(p['eta_s'])}"
    if st == "failed" and job.get("error"):
        line += f" — {job['error']}"
    return line


def _fmt_s(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def follow_detached(job_id: str, ws: Workspace, store: Store) -> int:
    """Run the job in a background process that outlives this one (``python -m sft_core.jobs``); it
    waits for the job's turn in the queue like the CLI's foreground mode. Returns its pid."""
    ws.root.joinpath("logs").mkdir(parents=True, exist_ok=True)
    with open(ws.root / "logs" / f"{job_id}.follow.log", "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "sft_core.jobs", "--job-id", job_id, "--db-url", store.url,
                                 "--home", str(ws.root)], stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "SFT_STUDIO_HOME": str(ws.root)})
    return proc.pid


def main(argv: list[str] | None = None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m sft_core.jobs", description="run one queued job when its turn comes")
    ap.add_argument("--job-id", required=True)
    ap.add_argument("--db-url", required=True)
    ap.add_argument("--home", required=True)
    args = ap.parse_args(argv)
    ws, store = Workspace.at(args.home), open_store(args.db_url)
    status = run_in_foreground(args.job_id, ws, store)
    return 0 if status == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
