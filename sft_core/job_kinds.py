"""The kinds of job and how each one's worker is built: the registry ``JOB_KINDS``.

A kind says how to start its worker (``build_command``), what happens to its row when it ends
(``on_finish``), how a worker that ended unwatched finished (``outcome``), whether it takes the
accelerator slot and which GPUs it needs. ``sft_core/jobs.py`` (the queue) reads the registry; a new
kind is one ``register_job_kind`` call here plus its worker entry (``sft_core/worker.py`` ``ENTRIES``).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sft_core import StudioError, gpu
from sft_core.db import evals as eval_rows, runs as run_rows
from sft_core.store import Store, loads
from sft_core.workspace import Workspace


class JobError(StudioError):
    pass


@dataclass
class JobKind:
    build_command: Callable[[dict, Workspace, Store], list[str]]
    on_finish: Callable[[dict, str, Workspace, Store], None] | None = None
    outcome: Callable[[dict, Workspace, Store], tuple[str, str | None] | None] | None = None
    accelerator: bool | Callable[[dict], bool] = True
    devices: Callable[[dict, Store, "gpu.Inventory"], list[int]] | None = None


JOB_KINDS: dict[str, JobKind] = {}


def register_job_kind(kind: str, build_command, on_finish=None, outcome=None, accelerator=True,
                      devices=None) -> None:
    """A job kind.

    ``build_command(job, ws, store) -> argv`` (the worker process); ``on_finish(job, status, ws, store)``
    after the job's final state is stored; ``outcome(job, ws, store) -> (status, error) | None`` tells how
    a worker that ended while nobody watched it finished (e.g. from a file it wrote), else it is failed.
    ``accelerator`` (a bool, or a function of the job): whether the job needs the machine's one
    accelerator slot (the GPU, or on a CPU machine the cores a model computes on); ``claim`` never runs
    two such jobs at once, in any number of processes sharing the database. ``devices(job, store, inventory)
    -> [gpu index]``: the GPUs the worker runs on (it sees only those, through CUDA_VISIBLE_DEVICES) and
    needs to itself: a managed inference engine on one of them yields it first (``gpu.wait_for_engines``)."""
    JOB_KINDS[kind] = JobKind(build_command, on_finish, outcome, accelerator, devices)


def needs_accelerator(job: dict) -> bool:
    kind = JOB_KINDS.get(job["kind"])
    if kind is None:
        return True  # unknown kinds are treated as heavy
    acc = kind.accelerator
    return bool(acc(job) if callable(acc) else acc)


def needs_gpu_alone(job: dict) -> bool:
    """Whether the job's worker takes GPUs for itself (training), so an engine sharing them yields."""
    kind = JOB_KINDS.get(job["kind"])
    return bool(kind and kind.devices)


# ------------------------------------------------------------------------------------------------
# Training jobs
# ------------------------------------------------------------------------------------------------
def train_devices(num_gpus: int, inv: gpu.Inventory) -> list[gpu.Device]:
    """The GPUs one run trains on: training's share of the machine (gpu.plan_devices), the first
    ``num_gpus`` of them when set."""
    _, devices, _ = gpu.training_plan(inv)
    return devices[:num_gpus] if num_gpus else devices


def train_command(run_dir: Path, job_id: str, db_url: str, resume: bool, num_gpus: int = 0,
                  gpus_visible: int | None = None, inv: gpu.Inventory | None = None) -> list[str]:
    """The worker command; with more than one GPU, launched through `accelerate launch` (DDP) in the
    precision each rank chooses for itself (gpu.choose_precision over the same devices)."""
    devices = train_devices(num_gpus, inv or gpu.inventory())
    gpus_visible = len(devices) if gpus_visible is None else gpus_visible
    n = min(num_gpus, gpus_visible) if num_gpus else gpus_visible
    args = ["-m", "sft_core.train", "--run-dir", str(run_dir), "--job-id", job_id, "--db-url", db_url]
    if resume:
        args.append("--resume")
    if n > 1:
        prec = gpu.choose_precision([d.capability for d in devices[:n]])
        return [sys.executable, "-m", gpu.LAUNCHER_MODULE, "--num_processes", str(n),
                "--num_machines", "1", "--mixed_precision", prec.mixed, *args]
    return [sys.executable, *args]


def _train_gpus(job: dict, store: Store, inv: gpu.Inventory) -> list[int]:
    run = run_rows.get(store, job["ref"])
    num = int(loads(run["config"], {}).get("num_gpus", 0)) if run else 0
    return [d.index for d in train_devices(num, inv)]


def _train_build(job: dict, ws: Workspace, store: Store) -> list[str]:
    payload = loads(job["payload"], {})
    run = run_rows.get(store, job["ref"])
    cfg = loads(run["config"], {})
    argv = train_command(Path(run["path"]), job["id"], store.url, bool(payload.get("resume")),
                         int(cfg.get("num_gpus", 0)))
    if cfg.get("mode") == "preference":  # a preference run (sft_core/pref_train.py): same job kind, its own worker
        argv[argv.index("sft_core.train")] = "sft_core.pref_train"
    return argv


def _train_finish(job: dict, status: str, ws: Workspace, store: Store) -> None:
    run_rows.set_status(store, job["ref"], status)


def _exit_record(path: Path, job: dict) -> tuple[str, str | None] | None:
    """(status, error) from a worker's exit record at ``path`` if this job's worker wrote it (train
    workers and generic workers both exit 0 = succeeded, 3 = cancelled, else failed)."""
    from sft_core.train import EXIT_CANCELLED
    try:
        rec = loads(path.read_text(), {}) if path.exists() else None
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("job_id") != job["id"]:
        return None  # left by an earlier attempt of the same run
    code = rec.get("code")
    if code == 0:
        return "succeeded", None
    if code == EXIT_CANCELLED:
        return "cancelled", None
    return "failed", rec.get("error") or f"worker exited with code {code}"


def _train_outcome(job: dict, ws: Workspace, store: Store) -> tuple[str, str | None] | None:
    """The worker's own exit record (``runs/<id>/exit.json``), if this job's worker wrote one."""
    from sft_core.train import EXIT_FILE
    run = run_rows.get(store, job["ref"])
    return _exit_record(Path(run["path"]) / EXIT_FILE, job) if run else None


register_job_kind("train", _train_build, _train_finish, _train_outcome, devices=_train_gpus)


# ------------------------------------------------------------------------------------------------
# Every other kind: one worker process (sft_core.worker) with a shared context
# ------------------------------------------------------------------------------------------------
def _worker_build(job: dict, ws: Workspace, store: Store) -> list[str]:
    return [sys.executable, "-m", "sft_core.worker", "--job-id", job["id"], "--db-url", store.url,
            "--home", str(ws.root)]


def _worker_outcome(job: dict, ws: Workspace, store: Store) -> tuple[str, str | None] | None:
    from sft_core.worker import exit_path
    return _exit_record(exit_path(ws, job["id"]), job)


def _eval_finish(job: dict, status: str, ws: Workspace, store: Store) -> None:
    """The eval row follows its job when the worker could not say so itself (killed, cancelled while
    queued): failed, or interrupted (resumable) when cancelled; a worker that finished set it already."""
    new = {"failed": "failed", "cancelled": "interrupted"}.get(status)
    if new:
        eval_rows.set_status(store, job["ref"], new, only_from=("queued", "running"))


register_job_kind("eval", _worker_build, _eval_finish, _worker_outcome,
                  accelerator=lambda job: bool(loads(job["payload"], {}).get("accelerator", True)))
register_job_kind("kb_build", _worker_build, None, _worker_outcome, accelerator=False)
register_job_kind("example", _worker_build, None, _worker_outcome, accelerator=False)
# merge loads the base model in full (GPU when present, else RAM and every core): it waits for training;
# export copies files (and uploads): it runs beside anything
register_job_kind("merge", _worker_build, None, _worker_outcome, accelerator=True)
register_job_kind("export", _worker_build, None, _worker_outcome, accelerator=False)
# synth generates through the local engine (the accelerator slot); with an external generator it does not
register_job_kind("synth", _worker_build, None, _worker_outcome,
                  accelerator=lambda job: bool(loads(job["payload"], {}).get("accelerator", True)))
