"""Knowledge tab → a training set generated from the knowledge base (sft_core/synth.py): the form, a preview
that stores nothing, and the ``synth`` job followed to the dataset it stores."""
from __future__ import annotations

import types
from pathlib import Path

import gradio as gr
import pandas as pd

from sft_core import guide
from sft_core.config import fields_for_form, load_config
from sft_core.safety import safe_markdown
from ui.common import _form_component, admin_required, skip_unchanged, studio, ui_errors
from ui.data import datasets_table


def _synth_config_cls():
    from sft_core.synth import SynthConfig
    return SynthConfig


SYNTH_FORM_SKIP = ("kb",)  # the Knowledge tab's own picker says which knowledge base


SYNTH_MAIN = ("name", "n_chunks", "generator", "model")  # shown; the rest is folded under the options


SYNTH_LABELS = {
    "name": "Dataset name", "n_chunks": "Chunks to use (0 = all)", "questions_per_chunk": "Questions per chunk",
    "styles": "Question styles", "answer_length": "Answer length", "generator": "Generator",
    "model": "Endpoint model (empty: its first)", "base_model": "Local base model (empty: the studio's)",
    "adapter": "Local adapter (a finished run; empty: none)", "temperature": "Temperature",
    "max_new_tokens": "Max new tokens per chunk", "prompt_template": "Prompt template (Jinja2)",
    "min_groundedness": "Min groundedness (0-1)", "dedup_threshold": "Near-duplicate cosine (0-1]",
    "filter_closed_book": "Drop questions the model answers without the passage",
    "closed_book_threshold": "Closed-book F1 threshold", "test_docs": "Held-out documents (test)",
    "test_seen": "Seen-documents test share", "eval_fraction": "Eval share", "seed": "Seed",
}


# sft_core/synth.py FILTERS, in words, in the order they run
SYNTH_FILTER_WORDS = {
    "unparsable": "unparsable generation (no question/answer pairs, as JSON or as Question:/Answer: lines)",
    "restates_question": "answer restates its question",
    "ungrounded": "answer not supported by its passage (groundedness below the minimum)",
    "leaked": "question already in another dataset's eval or test split",
    "near_duplicate": "near-duplicate of a question kept before it",
    "answerable_closed_book": "answerable without the passage",
}


SYNTH_PAIR_COLUMNS = ["question", "answer", "source document"]


SYNTH_COUNT_COLUMNS = ["filter", "dropped"]


def synth_form_fields() -> list[dict]:
    return [f for f in fields_for_form(_synth_config_cls()) if f["name"] not in SYNTH_FORM_SKIP]


def _synth_cfg(kb, values):
    """A checked SynthConfig from the Knowledge tab's picker and the form (empty boxes: the defaults)."""
    overrides = {f["name"]: (v if v not in ("", None) else None) for f, v in zip(synth_form_fields(), values)}
    return load_config(_synth_config_cls(), overrides={**overrides, "kb": kb or None})


def synth_name(kb, name):
    """The dataset name follows the chosen knowledge base (KB-synth) until someone types another."""
    if kb and (not name or name.endswith("-synth")):
        return f"{kb}-synth"
    return gr.skip()


def _source_words(meta: dict) -> str:
    """The generated pair's source for people: the file, the document's id where it says more (a JSONL file
    holds many documents), the chunk's heading."""
    file, doc = str(meta.get("file") or ""), str(meta.get("source") or "")
    title = str(meta.get("title") or "").strip().lstrip("#").strip()
    parts = [file] if file else []
    if doc and doc not in (file, Path(file).stem):
        parts.append(doc)
    if title and title not in parts:
        parts.append(title)
    return " · ".join(parts)


def synth_counts_table(counts: dict, closed_book: bool) -> pd.DataFrame:
    """One row per filter with the pairs it dropped ("off" for the optional closed-book check when off)."""
    from sft_core.synth import FILTERS
    rows = [{"filter": SYNTH_FILTER_WORDS.get(k, k),
             "dropped": "off" if k == "answerable_closed_book" and not closed_book else str(counts.get(k, 0))}
            for k in FILTERS]
    return pd.DataFrame(rows, columns=SYNTH_COUNT_COLUMNS)


@ui_errors
def synth_preview(kb, is_admin, *values):
    """About ten pairs from the first chunks, through every filter, stored nowhere: the pairs, the filter
    counts and a line. Admin only: it runs the engine, or calls the endpoint URL given with the studio's
    judge key. Outputs: message, pairs, counts."""
    from sft_core import synth
    admin_required(is_admin)
    cfg = _synth_cfg(kb, values)
    engine = None  # an endpoint needs no local model; a local one on another base model is started by preview
    if cfg.generator == "local" and synth.resolve_local_model(cfg, store=studio().store, settings=studio().settings) == \
            studio().settings.base_model:
        engine = studio().engine()
    out = synth.preview(cfg, engine=engine, ws=studio().ws, store=studio().store, settings=studio().settings)
    pairs = pd.DataFrame([{"question": r["instruction"], "answer": r["response"],
                           "source document": _source_words(r.get("meta") or {})} for r in out["pairs"]],
                         columns=SYNTH_PAIR_COLUMNS)
    c = out["counts"]
    msg = (f"**Preview**, nothing stored: {c['chunks']} chunk(s) → {c['pairs']} pair(s) generated → "
           f"**{c['kept']} kept**; the first {len(out['pairs'])} are below. The filters dropped what the table "
           "counts. **Generate dataset** runs the same over every chunk of the sample and stores a dataset "
           "whose test split holds out whole documents.")
    if not out["pairs"]:
        msg += "\n\n⚠️ No pair survived: try another generator, a longer answer budget or looser filters."
    return msg, pairs, synth_counts_table(c, cfg.filter_closed_book)


@ui_errors
def synth_start(kb, is_admin, *values):
    """Queue the ``synth`` job (a worker process generates, filters, splits and stores) and start following
    it. Outputs: message, the job (session state), the job line, its timer."""
    from sft_core import jobs, synth
    admin_required(is_admin)
    cfg = _synth_cfg(kb, values)
    job_id = synth.submit_synth(cfg, ws=studio().ws, store=studio().store)
    return (f"Queued: dataset **{cfg.name}** from **{cfg.kb}** (job {job_id}).", job_id,
            jobs.describe(jobs.job_row(job_id, store=studio().store), store=studio().store), gr.update(active=True))


def synth_poll(job_id):
    """The synth job's line: where it waits, then a progress bar over the chunks, then the dataset it stored
    (or why not). Outputs: the line, the Data tab's versions table (once stored), the timer (stops at the end)."""
    from sft_core import jobs
    if not job_id:
        return "", gr.skip(), gr.update(active=False)
    job = jobs.job_row(job_id, store=studio().store)
    p = jobs.progress_of(job)
    if job["status"] not in jobs.FINAL:
        line = jobs.describe(job, store=studio().store)
        if job["status"] == "running":
            step = p.get("step")
            frac = max(0.0, min(1.0, p.get("done", 0) / p["total"])) if p.get("total") else None
            line = guide.progress_bar_html(frac, f"{step} · {line}" if step else line)
        return line, gr.skip(), gr.skip()
    took = ""
    if job.get("ended_at") and job.get("started_at"):
        took = f" · took {guide._fmt_s(job['ended_at'] - job['started_at'])}"
    if job["status"] == "succeeded":
        return (f"✅ Stored **{safe_markdown(str(p.get('result') or job['ref']))}**{took}. Train on it from the "
                "**Train** tab (the rows carry their source passage: RAFT mode can use them).",
                datasets_table(), gr.update(active=False))
    why = f": {job['error']}" if job.get("error") else ""
    return f"❌ synth {job['ref']} {job['status']}{why}{took}. Nothing was stored.", gr.skip(), gr.update(active=False)


def synth_tick(job_id, last):
    """The synth job's timer: synth_poll's outputs, each only when it changed (plus the fingerprints)."""
    values = synth_poll(job_id)
    shown, digests = skip_unchanged(values[:2], last)
    return (*shown, values[2], digests)


def build(k_pick, kb_tab, is_admin, d_table) -> types.SimpleNamespace:
    """The generator's accordion inside the Knowledge tab, wired: it generates from the knowledge base picked
    there (``k_pick``) and refreshes the Data tab's versions table (``d_table``) when the dataset is stored."""
    with gr.Accordion("Generate a training set from this knowledge base", open=False,
                      elem_id="synth"):
        gr.Markdown("No question/answer pairs of your own? A generator model writes questions a user "
                    "would ask about each passage of the knowledge base chosen above, with answers from "
                    "the passage; filters drop the bad ones. **Preview** shows ten pairs and what each "
                    "filter dropped, storing nothing; **Generate dataset** runs it as a background job "
                    "and stores a dataset (Data tab) whose test split holds out whole documents.",
                    elem_id="synth-intro")
        synth_fields = synth_form_fields()
        s_by_name = {f["name"]: f for f in synth_fields}
        s_fields = {}
        with gr.Row():
            for n in SYNTH_MAIN:
                s_fields[n] = _form_component(s_by_name[n], prefix="synth-opt", labels=SYNTH_LABELS)
        with gr.Accordion("Generation and filter options", open=False, elem_id="synth-advanced"):
            rest = [f["name"] for f in synth_fields if f["name"] not in SYNTH_MAIN]
            wide = [n for n in rest if s_by_name[n]["type"] == "str" and "\n" in str(s_by_name[n]["default"])]
            narrow = [n for n in rest if n not in wide]
            for i in range(0, len(narrow), 3):
                with gr.Row():
                    for n in narrow[i:i + 3]:
                        s_fields[n] = _form_component(s_by_name[n], prefix="synth-opt", labels=SYNTH_LABELS)
            for n in wide:
                s_fields[n] = _form_component(s_by_name[n], prefix="synth-opt", labels=SYNTH_LABELS)
        s_inputs = [s_fields[f["name"]] for f in synth_fields]  # synth_* take them in field order
        with gr.Row():
            s_preview_btn = gr.Button("Preview", elem_id="synth-preview")
            s_start = gr.Button("Generate dataset", variant="primary", elem_id="synth-start")
        s_msg = gr.Markdown(elem_id="synth-msg")
        s_job_line = gr.Markdown(elem_id="synth-job")
        s_pairs = gr.Dataframe(pd.DataFrame(columns=SYNTH_PAIR_COLUMNS), label="Generated pairs (preview)",
                               interactive=False, wrap=True, elem_id="synth-pairs")
        s_counts = gr.Dataframe(pd.DataFrame(columns=SYNTH_COUNT_COLUMNS), label="Dropped by each filter",
                                interactive=False, elem_id="synth-counts")
        s_job = gr.State(None)  # the synth job this page follows
        s_last = gr.State(None)  # fingerprints of what its timer last sent (synth_tick)
        s_timer = gr.Timer(2.0, active=False)
    # the page may start on the only knowledge base already (no change event then): opening the tab fills it too
    for ev in (k_pick.change, kb_tab.select):
        ev(synth_name, [k_pick, s_fields["name"]], s_fields["name"], api_visibility="private", show_progress="hidden")
    s_preview_btn.click(synth_preview, [k_pick, is_admin, *s_inputs], [s_msg, s_pairs, s_counts])
    s_start.click(synth_start, [k_pick, is_admin, *s_inputs], [s_msg, s_job, s_job_line, s_timer])
    s_timer.tick(synth_tick, [s_job, s_last], [s_job_line, d_table, s_timer, s_last], show_progress="hidden",
                 api_visibility="private")
    return types.SimpleNamespace(fields=s_fields, inputs=s_inputs)
