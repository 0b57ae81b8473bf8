"""A finished run's artifacts as jobs: ``merge`` (base + adapter into one full model directory) and
``export`` (the adapter, manifest and metrics copied to a directory, optionally pushed to the hub).

Both are job kinds (``sft_core.jobs``) so they run in a worker process like every long operation: the
merge loads the whole base model, so it declares the accelerator slot and waits for a training run
instead of competing with it for memory; the export only copies files and runs beside anything.
Everything that can be checked is checked at submit time (the run finished, the output does not exist,
the hub repo and token), so a bad request is refused before anything is queued or written.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from sft_core import StudioError
from sft_core.store import Store
from sft_core.workspace import Workspace, atomic_dir

EXPORT_FILES = ("manifest.json", "metrics.json", "events.jsonl", "config.json")


def finished_run(store: Store, run_id: str) -> dict:
    from sft_core.db import runs as run_rows
    run = run_rows.get(store, run_id)
    if run is None:
        raise StudioError(f"unknown run {run_id!r} (see `sft-studio runs list`)", "run")
    if run["status"] != "succeeded" or not (Path(run["path"]) / "adapter").exists():
        raise StudioError(f"run {run_id} is {run['status']}: only finished runs have an adapter", "run")
    return run


def _check_out(out: str | Path) -> Path:
    out = Path(out).expanduser().resolve()
    if out.exists():
        raise StudioError(f"{out} already exists and is never overwritten; choose a new directory", "out")
    import os
    try:  # the folder it goes in is made now, so a path the OS refuses is refused before anything is queued
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StudioError(f"cannot create {out.parent}: {e.strerror or e}; choose another --out", "out") from None
    if not os.access(out.parent, os.W_OK):
        raise StudioError(f"cannot create {out}: {out.parent} is not writable; choose another --out", "out")
    return out


def submit(kind: str, run_id: str, out: str | Path, ws: Workspace, store: Store,
           push_to_hub: str | None = None) -> str:
    """Queue a ``merge`` or ``export`` job for a finished run; returns the job id."""
    from sft_core import jobs
    if kind not in ("merge", "export"):
        raise StudioError(f"unknown artifact job {kind!r}", "kind")
    finished_run(store, run_id)
    dest = _check_out(out)
    if push_to_hub:
        if kind != "export":
            raise StudioError("only an export can be pushed to the hub", "push_to_hub")
        from sft_core.commands.train import check_push
        check_push(push_to_hub)
    return jobs.submit(kind, run_id, {"out": str(dest), "push_to_hub": push_to_hub}, ws=ws, store=store)


def merge(run: dict, out: Path, ws: Workspace) -> None:
    """Base + adapter merged into one full model directory (for engines without LoRA support)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from sft_core import gpu, models
    base_dir = models.resolve_model(run["base_model"], ws)
    # the base's own dtype (a bf16 base is not widened to fp32, twice its size), on a GPU that holds it
    base = AutoModelForCausalLM.from_pretrained(base_dir, **gpu.merge_load_kwargs(base_dir))
    model = PeftModel.from_pretrained(base, Path(run["path"]) / "adapter")
    with atomic_dir(out) as tmp:
        model.merge_and_unload().save_pretrained(tmp, safe_serialization=True)
        models.load_tokenizer(base_dir).save_pretrained(tmp)


def export(run: dict, out: Path) -> None:
    src = Path(run["path"])
    with atomic_dir(out) as tmp:
        shutil.copytree(src / "adapter", tmp / "adapter")
        for f in EXPORT_FILES:
            if (src / f).exists():
                shutil.copy2(src / f, tmp / f)


def job_entry(ctx, payload: dict) -> None:
    run = finished_run(ctx.store, ctx.job["ref"])  # deleted or re-trained meanwhile: a clear failure
    out = Path(payload["out"])
    steps = 2 if payload.get("push_to_hub") else 1
    ctx.progress(0, steps, force=True, unit="steps", step=f"{ctx.kind} to {out}")
    if ctx.kind == "merge":
        merge(run, out, ctx.ws)
    else:
        export(run, out)
    ctx.check_cancel()
    if payload.get("push_to_hub"):
        ctx.progress(1, steps, force=True, unit="steps", step=f"pushing to {payload['push_to_hub']}")
        from sft_core.commands.train import push_folder
        push_folder(out, payload["push_to_hub"])
    ctx.progress(steps, steps, force=True, unit="steps", result=str(out))
