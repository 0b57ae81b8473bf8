"""The Knowledge tab: build a knowledge base (index) from documents, search it, list them; and generate a
training set from one (ui.synth)."""
from __future__ import annotations

import time
import types

import gradio as gr
import pandas as pd

from sft_core import StudioError
from ui import synth
from ui.common import _path, admin_required, kb_choices, studio, ui_errors
from ui.passages import SCORE_WORDS, _hits_markdown


@ui_errors
def kb_build(files, name, is_admin):
    """Queue the index build as a job (a worker process does the work) and follow it here; closing the
    page does not stop it."""
    from sft_core import jobs, retrieval
    admin_required(is_admin)
    if not files:
        raise StudioError("upload at least one document", "files")
    if not name:
        raise StudioError("give the knowledge base a name", "name")
    job_id = retrieval.submit_build([_path(f) for f in files], name, ws=studio().ws, store=studio().store)
    while True:
        job = jobs.job_row(job_id, store=studio().store)
        if job["status"] in jobs.FINAL:
            break
        yield jobs.describe(job, store=studio().store), gr.update()
        time.sleep(1.0)
    if job["status"] != "succeeded":
        raise StudioError(f"index build {job['status']}: {job.get('error') or 'see the job log'}", "knowledge base")
    info = jobs.progress_of(job).get("result", "")
    yield f"Knowledge base **{name}** updated: {info}", gr.update(choices=kb_choices(), value=name)


@ui_errors
def kb_search(name, query, k, mode):
    from sft_core import retrieval
    if not name:
        raise StudioError("choose a knowledge base", "knowledge base")
    if not (query or "").strip():
        raise StudioError("type a query", "query")
    kb = retrieval.open_kb(name, ws=studio().ws)
    hits = kb.search(query, k=int(k), mode=mode)
    if not hits:
        return "_no hits_"
    reranked = bool(kb.cfg.reranker) and mode == "hybrid"
    return (f"{len(hits)} passages, best first · {SCORE_WORDS['rerank' if reranked else mode][1]}\n\n"
            + _hits_markdown(hits, query, open_first=True, mode="rerank" if reranked else mode, rrf_k=kb.cfg.rrf_k))


def kb_table():
    """The Knowledge tab's list of knowledge bases: name, documents, chunks, embedder, when built."""
    from sft_core import retrieval
    rows = [{"name": k["name"], "documents": k["n_docs"], "chunks": k["n_chunks"], "embedder": k["embedder"],
             "built at": time.strftime("%Y-%m-%d %H:%M", time.localtime(k["updated_at"]))}
            for k in retrieval.list_kbs(ws=studio().ws, store=studio().store)]
    return pd.DataFrame(rows, columns=["name", "documents", "chunks", "embedder", "built at"])


def build(is_admin, d_table) -> types.SimpleNamespace:
    """The Knowledge tab, wired (``d_table``: the Data tab's versions table, where a generated dataset shows).
    Returns its knowledge-base picker and the generator's fields (the picker is kept fresh by app.build_demo)."""
    with gr.Tab("Knowledge", id="knowledge") as kb_tab:
        with gr.Row():
            k_files = gr.File(label="Documents (.txt .md .html .pdf .jsonl)", file_count="multiple",
                              elem_id="kb-files")
            with gr.Column():
                k_name = gr.Textbox(label="Knowledge base name", elem_id="kb-name")
                k_build = gr.Button("Build / update index", variant="primary", elem_id="kb-build")
        k_msg = gr.Markdown(elem_id="kb-msg")
        with gr.Row():
            k_pick = gr.Dropdown(kb_choices(), allow_custom_value=True, label="Knowledge base", elem_id="kb-pick")
            k_mode = gr.Radio(["hybrid", "bm25", "dense"], value="hybrid", label="Retriever")
            k_k = gr.Slider(1, 20, value=5, step=1, label="Top k")
        with gr.Row(equal_height=True):
            k_query = gr.Textbox(label="Search", placeholder="a question; Enter or the button searches",
                                 scale=5, elem_id="kb-query")
            k_search = gr.Button("Search", variant="primary", scale=0, min_width=110, elem_id="kb-search")
        k_hits = gr.Markdown(elem_id="kb-hits")
        k_table = gr.Dataframe(kb_table, label="Knowledge bases", interactive=False, elem_id="kb-list")
        s = synth.build(k_pick, kb_tab, is_admin, d_table)
    k_build.click(kb_build, [k_files, k_name, is_admin], [k_msg, k_pick]).then(
        kb_table, None, k_table, api_visibility="private")
    k_query.submit(kb_search, [k_pick, k_query, k_k, k_mode], k_hits)
    k_search.click(kb_search, [k_pick, k_query, k_k, k_mode], k_hits, api_visibility="private")
    kb_tab.select(kb_table, None, k_table, api_visibility="private", show_progress="hidden")
    return types.SimpleNamespace(pick=k_pick, synth=s)
