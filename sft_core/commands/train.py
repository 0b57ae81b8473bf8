"""`sft-studio train`, `runs list|show|cancel|resume`, `merge`, `export`."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from sft_core import StudioError, jobs
from sft_core.config import TrainConfig, add_arguments, load_config, overrides_from_args
from sft_core.db import jobs as job_rows, runs as run_rows
from sft_core.store import loads, open_store
from sft_core.workspace import Workspace, read_jsonl


def _ctx():
    ws = Workspace.from_env()
    return ws, open_store(ws.db_url)


def _run(store, run_id: str) -> dict:
    run = run_rows.get(store, run_id)
    if run is None:
        raise StudioError(f"unknown run {run_id!r} (see `sft-studio runs list`)", "run")
    return run


class Progress:
    """A one-line progress bar from events.jsonl (the same file the UI reads)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.seen = run_dir, 0

    def __call__(self):
        events = read_jsonl(self.run_dir / "events.jsonl")
        for e in events[self.seen:]:
            if e.get("step") and e.get("max_steps"):
                done = e["step"] / e["max_steps"]
                bar = "█" * int(30 * done) + "·" * (30 - int(30 * done))
                parts = [f"step {e['step']}/{e['max_steps']}"]
                if "loss" in e:
                    parts.append(f"loss {e['loss']:.4f}")
                if "eval_loss" in e:
                    parts.append(f"eval_loss {e['eval_loss']:.4f}")
                if e.get("tokens_per_s"):
                    parts.append(f"{e['tokens_per_s']:.0f} tok/s")
                if e.get("eta_s") is not None:
                    parts.append(f"ETA {int(e['eta_s'])}s")
                print(f"\r[{bar}] " + " · ".join(parts) + " " * 8, end="", file=sys.stderr, flush=True)
        self.seen = len(events)


def _hub_token() -> str | None:
    import os
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")


def check_push(repo_id: str) -> None:
    """Everything a push needs that can be checked without the network, before any training starts."""
    import os
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise StudioError(f"not a hub repo id ({e})", "push_to_hub") from None
    if "/" not in repo_id:
        raise StudioError(f"give the repo as OWNER/NAME, got {repo_id!r}", "push_to_hub")
    if not _hub_token():
        raise StudioError("set HF_TOKEN (a token with write access) to push to the hub", "push_to_hub")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise StudioError("HF_HUB_OFFLINE is set: the hub cannot be reached; unset it to push", "push_to_hub")


def push_folder(folder: Path, repo_id: str) -> None:
    """Upload a folder as a model repo (created private when missing); a failure is a message, not a traceback."""
    check_push(repo_id)
    from huggingface_hub import HfApi
    api = HfApi(token=_hub_token())
    try:
        api.create_repo(repo_id, repo_type="model", private=True, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model")
    except Exception as e:  # offline, bad token, no rights: one line for the user
        raise StudioError(f"push to {repo_id} failed ({type(e).__name__}: {e})", "push_to_hub") from None
    print(f"pushed to https://huggingface.co/{repo_id}")


def raft_length(over: dict, from_file: bool) -> tuple[dict, str]:
    """``--mode raft`` without ``--max-length`` (and no config file): room for the passages plus an answer
    (the UI's presets do the same, sft_core/guide.py), instead of refusing the default 512. Returns the
    overrides and a line saying what was chosen (empty when nothing was)."""
    if over.get("mode") != "raft" or over.get("max_length") is not None or from_file:
        return over, ""
    from sft_core.guide import RAFT_ANSWER_TOKENS
    budget = over.get("raft_context_tokens") or TrainConfig().raft_context_tokens
    return ({**over, "max_length": budget + RAFT_ANSWER_TOKENS},
            f"raft mode: max_length {budget + RAFT_ANSWER_TOKENS} (passage budget {budget} + {RAFT_ANSWER_TOKENS} "
            "for the answer)")


def cmd_train(args) -> int:
    ws, store = _ctx()
    over, note = raft_length(overrides_from_args(args, TrainConfig), bool(args.config))
    cfg = load_config(TrainConfig, args.config, over)
    if args.push_to_hub:
        check_push(args.push_to_hub)  # refused before the run is queued, not after an hour of training
    run_id = jobs.submit_train(cfg, ws, store)
    if note:
        print(note)
    print(f"run {run_id} queued ({ws.runs_dir(run_id)})")
    job = jobs.latest_job(run_id, store, kind="train")
    progress = Progress(ws.runs_dir(run_id))
    waiting = {"shown": False}

    def on_wait():
        if not waiting["shown"]:
            print("waiting for the running job to finish (one training job at a time)...", file=sys.stderr)
            waiting["shown"] = True
        progress()

    import threading
    stop = threading.Event()

    def ticker():
        while not stop.wait(1.0):
            progress()

    t = threading.Thread(target=ticker, daemon=True)
    t.start()
    try:
        status = jobs.run_in_foreground(job["id"], ws, store, on_wait)
    except KeyboardInterrupt:
        jobs.cancel(run_id, ws, store, kind="train")
        print("\ncancelling (the last checkpoint is kept; `sft-studio runs resume` continues)...", file=sys.stderr)
        status = jobs.run_in_foreground(job["id"], ws, store)
    finally:
        stop.set()
        progress()
    print(file=sys.stderr)
    row = job_rows.get(store, job["id"])
    print(f"run {run_id}: {status}" + (f" — {row['error']}" if row.get("error") else ""))
    if status != "succeeded":
        return 1
    m = json.loads((ws.runs_dir(run_id) / "metrics.json").read_text())
    print(json.dumps(m, indent=2))
    raft = json.loads((ws.runs_dir(run_id) / "manifest.json").read_text()).get("raft")
    if raft:
        print(raft_summary(run_id, raft))
    if args.push_to_hub:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:  # the adapter (loadable with PeftModel) + its manifest
            staged = Path(tmp) / "push"
            _stage_for_hub(ws.runs_dir(run_id), staged)
            try:
                push_folder(staged, args.push_to_hub)
            except StudioError as e:
                raise StudioError(f"run {run_id} succeeded, but {e.message}; retry with "
                                  f"`sft-studio export {run_id} --out DIR --push-to-hub {args.push_to_hub}`",
                                  "push_to_hub") from None
    return 0


def raft_summary(run_id: str, raft: dict) -> str:
    """One line on a RAFT run's prompts (the manifest's "raft" entry)."""
    t = raft["train"]
    return (f"RAFT prompts from knowledge base {raft['settings']['kb']}: {t['rows']} training rows, oracle from the "
            f"row's chunk {t['oracle_from_meta']} / from its answer {t['oracle_from_answer']}, oracle dropped "
            f"{t['oracle_dropped']}, cut by the token budget {t['oracle_cut_by_budget']}, "
            f"{t['mean_passages']:.1f} passages per prompt (each row: raft_plan.jsonl in the run directory); "
            f"evaluate it as raft:{run_id}")


def _stage_for_hub(run_dir: Path, out: Path) -> None:
    shutil.copytree(run_dir / "adapter", out)
    for f in ("manifest.json", "metrics.json"):
        if (run_dir / f).exists():
            shutil.copy2(run_dir / f, out / f)


def cmd_list(args) -> int:
    ws, store = _ctx()
    jobs.reconcile(store, ws=ws)
    rows = run_rows.list_runs(store)
    if not rows:
        print("no runs yet: `sft-studio train --dataset NAME`")
    for r in rows:
        m = loads(r["metrics"], {})
        loss = f"train_loss {m['train_loss']:.4f}" if m.get("train_loss") is not None else ""
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"]))
        print(f"{r['id']:40s} {r['status']:10s} {when}  {r['dataset']}@{r['dataset_version']}  {loss}")
    return 0


def cmd_show(args) -> int:
    ws, store = _ctx()
    jobs.reconcile(store, ws=ws)
    run = _run(store, args.run_id)
    job = jobs.latest_job(args.run_id, store, kind="train") or {}
    out = {"run": {k: run[k] for k in ("id", "status", "dataset", "dataset_version", "base_model", "path")},
           "config": loads(run["config"], {}), "metrics": loads(run["metrics"], {}),
           "job": {k: job.get(k) for k in ("id", "status", "error", "pid")}}
    events = read_jsonl(Path(run["path"]) / "events.jsonl")
    if events:
        out["last_event"] = events[-1]
    print(json.dumps(out, indent=2, default=str))
    return 0


def cmd_cancel(args) -> int:
    ws, store = _ctx()
    print(f"{args.run_id}: {jobs.cancel(args.run_id, ws, store, kind='train')}")
    return 0


def cmd_resume(args) -> int:
    ws, store = _ctx()
    job_id = jobs.resume(args.run_id, ws, store)
    print(f"{args.run_id}: queued to resume from its last checkpoint")
    if args.wait:
        status = jobs.run_in_foreground(job_id, ws, store, Progress(ws.runs_dir(args.run_id)))
        print(f"\n{args.run_id}: {status}")
        return 0 if status == "succeeded" else 1
    return 0


def cmd_merge(args) -> int:
    """Base + adapter merged into one full model directory (a ``merge`` job: it waits for training)."""
    from sft_core import artifacts
    from sft_core.commands.follow import run_job
    ws, store = _ctx()
    job_id = artifacts.submit("merge", args.run_id, args.out, ws, store)
    if run_job(job_id, ws, store, args.detach, f"merge of {args.run_id}") is not None:
        print(f"merged model written to {Path(args.out).resolve()}")
    return 0


def cmd_export(args) -> int:
    from sft_core import artifacts
    from sft_core.commands.follow import run_job
    ws, store = _ctx()
    job_id = artifacts.submit("export", args.run_id, args.out, ws, store, push_to_hub=args.push_to_hub)
    if run_job(job_id, ws, store, args.detach, f"export of {args.run_id}") is not None:
        print(f"adapter + manifest exported to {Path(args.out).resolve()}")
        if args.push_to_hub:
            print(f"pushed to https://huggingface.co/{args.push_to_hub}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="train a LoRA adapter (queued; one training job at a time); --mode raft --kb "
                                     "NAME trains with retrieved passages in the prompts (RAFT)")
    p.add_argument("--config", help="YAML file with training options (flags override it)")
    add_arguments(p, TrainConfig)
    p.add_argument("--push-to-hub", default=None, metavar="REPO",
                   help="when the run succeeds, upload its adapter + manifest to this hub repo (needs HF_TOKEN)")
    p.set_defaults(func=cmd_train)

    r = sub.add_parser("runs", help="list, inspect, cancel and resume training runs")
    s = r.add_subparsers(dest="runs_cmd", metavar="ACTION", required=True)
    s.add_parser("list", help="all runs").set_defaults(func=cmd_list)
    for name, fn, help_ in [("show", cmd_show, "a run's config, metrics and state"),
                            ("cancel", cmd_cancel, "stop a run (keeps its last checkpoint)"),
                            ("resume", cmd_resume, "continue a failed/cancelled run from its last checkpoint")]:
        q = s.add_parser(name, help=help_)
        q.add_argument("run_id")
        if name == "resume":
            q.add_argument("--wait", action="store_true", help="run it here and wait")
        q.set_defaults(func=fn)

    m = sub.add_parser("merge", help="merge a run's adapter into its base model")
    m.add_argument("run_id")
    m.add_argument("--out", required=True)
    m.add_argument("--detach", action="store_true", help="queue the merge job and return at once")
    m.set_defaults(func=cmd_merge)
    e = sub.add_parser("export", help="copy a run's adapter and manifest to a directory")
    e.add_argument("run_id")
    e.add_argument("--out", required=True)
    e.add_argument("--push-to-hub", default=None, metavar="REPO", help="also upload (needs HF_TOKEN)")
    e.add_argument("--detach", action="store_true", help="queue the export job and return at once")
    e.set_defaults(func=cmd_export)

