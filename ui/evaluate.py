"""The Evaluate tab: queue an eval of systems on a dataset split, follow it, and read its summary, score
table, recommendation card, per-example answers and decision report (the last two admin-only)."""
from __future__ import annotations

import types
from pathlib import Path

import gradio as gr
import pandas as pd

from sft_core import StudioError, guide
from ui.common import (
    admin_ok, admin_required, dataset_choices, eval_choices, kb_choices, skip_unchanged, studio, system_choices,
    ui_errors,
)


@ui_errors
def eval_start(dataset, split, systems, kb, limit, metrics, judge, is_admin):
    from evals import runner
    admin_required(is_admin)
    if not dataset:
        raise StudioError("choose a dataset", "dataset")
    if not systems:
        raise StudioError("choose at least one system", "systems")
    from evals import systems as evsys
    needs_kb = [s for s in systems if evsys.parse_system(s).uses_kb]
    if needs_kb and not kb:
        raise StudioError(f"choose a knowledge base: {', '.join(needs_kb)} answer with passages retrieved from it",
                          "knowledge base")
    eval_id = runner.create_eval(dataset, list(systems), split=split or "test", kb=kb or None,
                                 limit=int(limit) if limit else None, metrics=list(metrics or []) or None,
                                 judge=bool(judge), base_model=studio().settings.base_model, ws=studio().ws,
                                 store=studio().store)
    runner.submit_eval(eval_id, ws=studio().ws, store=studio().store)  # a worker process runs it; it survives this app
    return f"Queued eval **{eval_id}**.", gr.update(choices=eval_choices(), value=eval_id)


@ui_errors
def eval_cancel(eval_id, is_admin):
    from sft_core import jobs
    admin_required(is_admin)
    if not eval_id:
        raise StudioError("choose an eval", "eval")
    state = jobs.cancel(eval_id, ws=studio().ws, store=studio().store)
    return f"Eval **{eval_id}**: {'cancelled' if state == 'cancelled' else 'cancel requested'} (answers so far are kept)."


@ui_errors
def eval_resume(eval_id, is_admin):
    from evals import runner
    admin_required(is_admin)
    if not eval_id:
        raise StudioError("choose an eval", "eval")
    runner.submit_eval(eval_id, ws=studio().ws, store=studio().store)
    return f"Eval **{eval_id}** queued again: it continues with the answers still missing."


def _eval_job_line(eval_id, eval_status: str | None = None) -> str:
    """The eval job's line: while it runs, a progress bar with done/total, rate and ETA; once the job or
    the eval has finished, how long it took (an ETA of 0 s says nothing after the fact). Nothing in it
    changes between polls unless the job moved, so the timer has nothing to redraw."""
    from sft_core import jobs
    job = jobs.latest_job(eval_id, store=studio().store)
    if not job:
        return ""
    if job["status"] in jobs.FINAL or eval_status in jobs.FINAL:
        if job["status"] not in jobs.FINAL:  # the answers are scored; the worker writes the report
            return f"{job['kind']} {eval_id}: {eval_status} · writing the report…"
        took = (job.get("ended_at") or 0) - (job.get("started_at") or job["created_at"])
        line = f"{job['kind']} {eval_id}: {job['status']}"
        if job.get("ended_at") and took >= 0:
            line += f" · took {guide._fmt_s(took)}"
        return line + (f" — {job['error']}" if job["status"] == "failed" and job.get("error") else "")
    line = jobs.describe(job, store=studio().store)
    p = jobs.progress_of(job)
    if job["status"] == "running" and p.get("total"):
        return guide.progress_bar_html(max(0.0, min(1.0, p.get("done", 0) / p["total"])), line)
    return line


BLIND_NOTE = ("🔒 Per-example answers and the report name the system behind each answer, so they need the "
              "admin login (raters must stay blind). The aggregate scores above are public.")


@ui_errors
def eval_poll(eval_id, is_admin=False):
    """Eval progress and results: summary, score table (main metric first, winner ★, short names),
    examples, report, recommendation card. With an admin password set, only the admin sees
    per-example outputs and the report (both map answers to systems); the table and the card, made
    from aggregates only, are public."""
    from evals import report, runner
    no_examples = pd.DataFrame(columns=["system", "question", "answer", "reference"])
    if not eval_id:
        cols, _ = report.score_table(None)
        return "_no eval selected_", pd.DataFrame(columns=cols), no_examples, None, report.card_markdown(None)
    st = runner.eval_status(eval_id, ws=studio().ws, store=studio().store)
    summary = st.get("summary", "")
    line = _eval_job_line(eval_id, st.get("status"))
    if line:
        summary += f"\n\n{line}"
    scores = report.eval_scores(eval_id, ws=studio().ws, store=studio().store)
    cols, rows = report.score_table(scores)
    table, card = pd.DataFrame(rows, columns=cols), report.card_markdown(scores)
    if not admin_ok(is_admin):
        return summary + "\n\n" + BLIND_NOTE, table, no_examples, None, card
    short = report.short_names(sorted({e["system"] for e in st.get("examples") or []}))
    examples = pd.DataFrame([{**e, "system": short[e["system"]]} for e in st.get("examples") or []],
                            columns=no_examples.columns)
    rep = st.get("report_html")
    staged = studio().stage_download(rep) if rep and Path(rep).exists() else None
    if staged:  # the staged copy's unguessable folder is the link's key (make_app serves it as a page)
        summary += (f'\n\n<a href="report/{Path(staged).parent.name}" target="_blank" rel="noopener" '
                    f'id="eval-open-report">Open the decision report ↗</a>')
    return summary, table, examples, staged, card


def eval_tick(eval_id, is_admin, last):
    """The Evaluate tab's timer: eval_poll's outputs, each only when it changed (plus the fingerprints),
    so a finished eval's card, table and report are not redrawn every 3 s."""
    values, digests = skip_unchanged(eval_poll(eval_id, is_admin), last)
    return (*values, digests)


def build(is_admin) -> types.SimpleNamespace:
    """The Evaluate tab, wired. Returns what the guide and the page load set: dataset, knowledge base, limit,
    metrics, systems, the eval picker and the message line."""
    from evals.report import card_markdown
    with gr.Tab("Evaluate", id="evaluate"):
        with gr.Row():
            e_dataset = gr.Dropdown(dataset_choices(), allow_custom_value=True, label="Dataset", elem_id="eval-dataset")
            e_split = gr.Dropdown(["test", "test_seen", "eval"], value="test", label="Split")
            e_kb = gr.Dropdown(kb_choices(), allow_custom_value=True, label="Knowledge base", elem_id="eval-kb")
            e_limit = gr.Number(value=20, precision=0, label="Rows (limit)")
        e_systems = gr.CheckboxGroup(system_choices(), value=["prompt", "rag"], label="Systems",
                                     elem_id="eval-systems")
        e_metrics = gr.CheckboxGroup(["rouge_l", "bleu", "chrf", "token_f1", "exact_match",
                                      "semantic_similarity", "answer_length", "groundedness"],
                                     value=["rouge_l", "token_f1", "exact_match"], label="Metrics")
        e_judge = gr.Checkbox(False, label="LLM-as-judge (pairwise, position-swapped)")
        with gr.Row():
            e_start = gr.Button("Run evaluation", variant="primary", elem_id="eval-start")
            e_pick = gr.Dropdown(eval_choices(), allow_custom_value=True, label="Eval", elem_id="eval-pick")
            e_cancel = gr.Button("Cancel", elem_id="eval-cancel")
            e_resume = gr.Button("Resume", elem_id="eval-resume")
        e_msg = gr.Markdown(elem_id="eval-msg")
        e_summary = gr.Markdown(elem_id="eval-summary")
        e_card = gr.Markdown(card_markdown(None), elem_id="eval-card", container=True)
        e_table = gr.Dataframe(label="Scores (mean, 95% CI): main metric first, ★ = recommended",
                               interactive=False, elem_id="eval-table")
        e_examples = gr.Dataframe(label="Per-example side by side", interactive=False, wrap=True,
                                  elem_id="eval-examples")
        e_report = gr.File(label="Decision report (HTML)", elem_id="eval-report")
        e_timer = gr.Timer(3.0)
        e_last = gr.State(None)  # fingerprints of what the timer last sent (eval_tick)
    e_start.click(eval_start, [e_dataset, e_split, e_systems, e_kb, e_limit, e_metrics, e_judge, is_admin],
                  [e_msg, e_pick])
    e_cancel.click(eval_cancel, [e_pick, is_admin], e_msg)
    e_resume.click(eval_resume, [e_pick, is_admin], e_msg)
    # like the Train tab's timer: only what changed, without the loading overlay (no flicker)
    e_timer.tick(eval_tick, [e_pick, is_admin, e_last], [e_summary, e_table, e_examples, e_report, e_card, e_last],
                 show_progress="hidden", api_visibility="private")
    e_pick.change(eval_poll, [e_pick, is_admin], [e_summary, e_table, e_examples, e_report, e_card])
    return types.SimpleNamespace(dataset=e_dataset, kb=e_kb, limit=e_limit, metrics=e_metrics, systems=e_systems,
                                 pick=e_pick, msg=e_msg)
