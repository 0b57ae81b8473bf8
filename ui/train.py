"""The Train tab: start an SFT or a preference run (the forms are ui.train_form), follow it (progress, loss,
learning-rate and throughput charts, the job queue and the runs), cancel, resume or delete it."""
from __future__ import annotations

import json
import time
import types
from pathlib import Path

import gradio as gr
import pandas as pd

from sft_core import StudioError, guide
from sft_core.config import load_config
from sft_core.curves import LOSS_COLORS
from sft_core.db import jobs as job_rows, runs as run_rows
from sft_core.safety import safe_markdown
from sft_core.studio import delete_run
from ui import train_form
from ui.common import _confirm, _hide, admin_required, all_runs, skip_unchanged, studio, ui_errors
from ui.train_form import (
    PREF_MODE, RAFT_FIELDS, SFT_MODE, _pref_config_cls, _train_config_cls, pref_form_fields, train_form_fields,
    train_mode,
)


@ui_errors
def train_start(dataset, base_model, is_admin, *values):
    from sft_core import jobs
    admin_required(is_admin)
    if not dataset:
        raise StudioError("choose a dataset", "dataset")
    overrides = {f["name"]: (v if v not in ("", None) else None) for f, v in zip(train_form_fields(), values)}
    if overrides.get("mode") != "raft":  # the RAFT box is hidden: what it still holds is not this run's
        overrides.update(dict.fromkeys(RAFT_FIELDS))
    overrides.update(dataset=dataset, base_model=base_model or studio().settings.base_model)
    cfg = load_config(_train_config_cls(), overrides=overrides)
    run_id = jobs.submit_train(cfg, ws=studio().ws, store=studio().store)
    return f"Queued run **{run_id}**.", gr.update(choices=all_runs(), value=run_id)


@ui_errors
def pref_start(dataset, from_run, is_admin, *values):
    """Queue a preference run (sft_core/pref_train.py) on a preference dataset, from a finished SFT run
    (its adapter trained further, the reference being that SFT model) or, with none, from the base model."""
    from sft_core import pref_train
    admin_required(is_admin)
    if not dataset:
        raise StudioError("choose a preference dataset (Results tab → Train on these votes builds one)", "dataset")
    overrides = {f["name"]: (v if v not in ("", None) else None) for f, v in zip(pref_form_fields(), values)}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    overrides.update(dataset=dataset, from_run=from_run or "")
    cfg = load_config(_pref_config_cls(), overrides=overrides)
    run_id = pref_train.submit_pref_run(cfg, ws=studio().ws, store=studio().store, settings=studio().settings)
    start = f"SFT run **{from_run}**" if from_run else "the base model"
    return (f"Queued preference run **{run_id}** on **{dataset}**, starting from {start}. "
            f"When it has finished, evaluate it as system `sft:{run_id}`."), gr.update(choices=all_runs(), value=run_id)


def run_lineage(run_id: str, config: dict) -> str:
    """A preference run's lineage in one line (base → SFT run → preference dataset (its campaign or eval) →
    this run); empty for an SFT run."""
    from sft_core import pref_train
    if config.get("mode") != pref_train.MODE:
        return ""
    steps = pref_train.lineage_of_run(run_id, ws=studio().ws, store=studio().store)
    return "**Lineage:** " + safe_markdown(pref_train.format_lineage(steps))


@ui_errors
def train_cancel(run_id, is_admin):
    from sft_core import jobs
    admin_required(is_admin)
    if not run_id:
        raise StudioError("choose a run", "run")
    jobs.cancel(run_id, ws=studio().ws, store=studio().store)
    return f"Cancel requested for **{run_id}**."


@ui_errors
def train_resume(run_id, is_admin):
    from sft_core import jobs
    admin_required(is_admin)
    if not run_id:
        raise StudioError("choose a run", "run")
    jobs.resume(run_id, ws=studio().ws, store=studio().store)
    return f"Resume queued for **{run_id}**."


@ui_errors
def run_delete_ask(run_id, is_admin):
    admin_required(is_admin)
    if not run_id:
        raise StudioError("choose a run", "run")
    run = run_rows.get(studio().store, run_id)
    if run is None:
        raise StudioError(f"unknown run {run_id!r}", "run")
    return _confirm(True, f"Delete run **{run_id}** ({run['status']}) with its checkpoints and adapter? "
                          "Evals keep their outputs; chat and new evals can no longer use it. This cannot be undone.")


@ui_errors
def run_delete(run_id, is_admin):
    admin_required(is_admin)
    if not run_id:
        raise StudioError("choose a run", "run")
    delete_run(run_id, ws=studio().ws, store=studio().store)
    if studio().engine_ready():  # a loaded adapter must not outlive its run
        try:
            if run_id in studio().engine().list_adapters():
                studio().engine().unload_adapter(run_id)
        except Exception:  # the engine refuses unknown names; nothing is loaded then
            pass
    return f"Deleted run **{run_id}**.", gr.update(choices=all_runs(), value=None), gr.update(visible=False)


def jobs_table():
    rows = job_rows.recent(studio().store, 50)
    for r in rows:
        r["created_at"] = time.strftime("%H:%M:%S", time.localtime(r["created_at"]))
    return pd.DataFrame(rows, columns=["id", "kind", "ref", "status", "created_at", "error"])


def runs_table():
    rows = run_rows.list_runs(studio().store)
    for r in rows:
        m = json.loads(r.pop("metrics") or "{}")
        r["train_loss"] = _fmt(m.get("train_loss"))
        r["eval_loss"] = _fmt(m.get("eval_loss"))
    return pd.DataFrame(rows, columns=["id", "dataset", "base_model", "status", "train_loss", "eval_loss"])


def _fmt(x):
    return f"{x:.4f}" if isinstance(x, (int, float)) else ""


def _run_line(run_id: str, status: str, events: list[dict], job: dict) -> str:
    """The run's state and phase (sft_core/guide.run_progress) with a progress bar while it is live."""
    from sft_core import jobs
    p = guide.run_progress(status, events, jobs.describe(job, store=studio().store) if job and status == "queued" else "")
    text = p["text"] if p["text"].startswith(status) else f"{status} · {p['text']}"
    line = f"**{run_id}** · {text}"
    if status in jobs.FINAL and job and job.get("ended_at") and job.get("started_at"):
        line += f" · took {guide._fmt_s(job['ended_at'] - job['started_at'])}"
    if status in ("queued", "running"):
        line += "\n\n" + guide.progress_bar_html(p["fraction"], p["phase"])
    return line


def train_tick(run_id, last):
    """The Train tab's timer: train_poll's outputs, each only when it changed (plus the fingerprints)."""
    values, digests = skip_unchanged(train_poll(run_id), last)
    return (*values, digests)


def train_poll(run_id):
    """Progress, the loss / learning-rate / throughput charts and the tables, from the store and
    events.jsonl (survives reloads). Outputs: progress, loss, jobs, runs, learning rate, tokens/s."""
    from sft_core.curves import training_curves
    from sft_core.workspace import read_jsonl
    empty = training_curves([])
    if not run_id:
        return "_no run selected_", empty["loss"], jobs_table(), runs_table(), empty["lr"], empty["speed"]
    run = run_rows.get(studio().store, run_id)
    if run is None:
        return f"unknown run {run_id}", empty["loss"], jobs_table(), runs_table(), empty["lr"], empty["speed"]
    events = read_jsonl(Path(run["path"]) / "events.jsonl")
    curves = training_curves(events)
    job = job_rows.latest(studio().store, run_id) or {}
    status = job.get("status") or run["status"]
    line = _run_line(run_id, status, events, job)
    if job.get("error"):
        line += f"\n\n❌ {job['error']}"
    lineage = run_lineage(run_id, json.loads(run.get("config") or "{}") if isinstance(run.get("config"), str) else {})
    if lineage:
        line += "\n\n" + lineage
    return line, curves["loss"], jobs_table(), runs_table(), curves["lr"], curves["speed"]


def build(is_admin) -> types.SimpleNamespace:
    """The Train tab, wired. Returns what the guide, the Results tab and the page-load refresh reach: the SFT
    form, the preference form, the run picker and the message line."""
    with gr.Tab("Train", id="train"):
        t_mode = gr.Radio([SFT_MODE, PREF_MODE], value=SFT_MODE, label="What to train", elem_id="train-mode",
                          info="SFT: imitate a dataset's answers. Preference: learn from pairs of a better and "
                               "a worse answer (votes of a campaign), starting from a finished SFT run")
        sft = train_form.build_sft_form()
        pref = train_form.build_pref_form()
        with gr.Row():
            t_start = gr.Button("Start training", variant="primary", elem_id="train-start")
            t_run = gr.Dropdown(all_runs(), allow_custom_value=True, label="Run", elem_id="train-run")
            t_cancel = gr.Button("Cancel", elem_id="train-cancel")
            t_resume = gr.Button("Resume", elem_id="train-resume")
            t_delete = gr.Button("Delete run…", size="sm", elem_id="train-delete")
        with gr.Row(visible=False, elem_id="train-delete-confirm") as t_del_row:
            t_del_q = gr.Markdown(elem_id="train-delete-question")
            t_del_yes = gr.Button("Yes, delete", variant="stop", elem_id="train-delete-yes")
            t_del_no = gr.Button("Keep it", elem_id="train-delete-no")
        t_msg = gr.Markdown(elem_id="train-msg")
        t_progress = gr.Markdown(elem_id="train-progress")
        t_plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss", elem_id="train-loss",
                             height=320, color_map=LOSS_COLORS)
        with gr.Row():
            t_lr = gr.LinePlot(x="step", y="learning_rate", title="Learning rate", y_title="learning rate",
                               y_axis_format=".1e", elem_id="train-lr", height=220)
            t_speed = gr.LinePlot(x="step", y="tokens_per_s", title="Throughput", y_title="tokens / s",
                                  elem_id="train-speed", height=220)
        t_jobs = gr.Dataframe(jobs_table, label="Job queue", interactive=False)
        t_runs = gr.Dataframe(runs_table, label="Runs", interactive=False)
        t_timer = gr.Timer(2.0)
        t_last = gr.State(None)  # fingerprints of what the timer last sent (train_tick)
    t_start.click(train_start, [sft.dataset, sft.base, is_admin, *sft.inputs], [t_msg, t_run])
    t_mode.input(train_mode, t_mode, [sft.box, pref.box, t_start], api_visibility="private",
                 show_progress="hidden")
    pref.start.click(pref_start, [pref.dataset, pref.from_run, is_admin, *pref.inputs], [t_msg, t_run])
    t_cancel.click(train_cancel, [t_run, is_admin], t_msg)
    t_resume.click(train_resume, [t_run, is_admin], t_msg)
    t_delete.click(run_delete_ask, [t_run, is_admin], [t_del_row, t_del_q])
    t_del_yes.click(run_delete, [t_run, is_admin], [t_msg, t_run, t_del_row])
    t_del_no.click(_hide, None, t_del_row, api_visibility="private")
    t_run.change(_hide, None, t_del_row, api_visibility="private")
    # the timer sends only what changed, without the loading overlay: no flicker between polls
    t_timer.tick(train_tick, [t_run, t_last], [t_progress, t_plot, t_jobs, t_runs, t_lr, t_speed, t_last],
                 show_progress="hidden", api_visibility="private")
    t_run.change(train_poll, t_run, [t_progress, t_plot, t_jobs, t_runs, t_lr, t_speed])
    return types.SimpleNamespace(sft=sft, pref=pref, run=t_run, msg=t_msg)
