"""SFT Studio web app: the entry point that assembles the page (the tabs live in ui/); all behaviour lives in
sft_core/ and evals/.

Run with ``python app.py`` (``make run``). Honours GRADIO_SERVER_NAME / GRADIO_SERVER_PORT and the
SFT_STUDIO_* settings (see sft_core/config.py StudioSettings). ``GET /healthz`` answers 200 when the
server is up. Importing this module builds nothing: ``app.demo`` builds the Gradio Blocks on first access
(the studio context too, from the environment: ui.common.studio), and tests can drive it with gradio_client.

With SFT_STUDIO_ADMIN_PASSWORD set, writes other than rating (import, index, train, cancel/resume,
delete, eval, campaign, invites, publish/close, export) need the admin login. Raters never name
themselves: an invite link, a signed open-campaign key or (on a Space) a Hugging Face sign-in says
who they are, and a campaign's results stay hidden from them until it is published or closed.
Eval per-example outputs and the report name the system behind each answer, so they are admin-only
too (raters stay blind); the aggregate score table stays public. Deleting (Data and Train tabs)
asks for a confirmation first.
"""
from __future__ import annotations

import os
import re
import threading
import types

import gradio as gr

from sft_core.config import DataConfig
from ui import chat, data, evaluate, header, knowledge, rate, results, train
from ui.common import (
    _remember, all_runs, campaign_choices, dataset_choices, eval_choices, finished_runs, kb_choices,
    preference_dataset_choices, studio, system_choices,
)
from ui.header import guide_go, guide_view, restore_selection
from ui.rate import create_campaign, rate_link
from ui.theme import APP_CSS, RATE_JS


# ------------------------------------------------------------------------------------------------
# Startup: example domain (dataset + knowledge base), prepared in the background
# ------------------------------------------------------------------------------------------------
def start_background() -> None:
    """Queue the example-domain bootstrap (a job like any other, run by a worker process) unless it is
    built, queued or running already, and start this process's job dispatcher."""
    from sft_core import example, jobs
    st = studio()
    if os.environ.get("SFT_STUDIO_SKIP_EXAMPLE", "") not in ("1", "true"):
        example.submit_bootstrap(ws=st.ws, store=st.store, base_model=st.settings.base_model)
    jobs.start_dispatcher(ws=st.ws, store=st.store)


# ------------------------------------------------------------------------------------------------
# Layout: the header and the tabs (ui/), then the wiring that crosses tabs
# ------------------------------------------------------------------------------------------------
def build_demo() -> gr.Blocks:
    """The page: the header, the seven tabs (each ui module lays out and wires its own), then what crosses
    tabs: creating a campaign, an invite link, fresh and remembered selections, the guided path."""
    with gr.Blocks(title="SFT Studio") as demo:
        is_admin = gr.State(None)  # a signed admin token after login (admin_ok), never the password
        head = header.build_header(is_admin)
        with gr.Tabs(overflow_behavior="wrap", elem_id="main-tabs") as tabs:  # wrap: every tab reachable on a phone
            d = data.build(is_admin)
            k = knowledge.build(is_admin, d.table)
            t = train.build(is_admin)
            c = chat.build(is_admin)
            e = evaluate.build(is_admin)
            r = rate.build(is_admin)
            res = results.build(is_admin, r.votes, t.run)
        page = types.SimpleNamespace(demo=demo, tabs=tabs, is_admin=is_admin, head=head, d=d, k=k, t=t, c=c, e=e,
                                     r=r, res=res)
        new = r.new  # a new campaign is picked on the Rate and the Results tab
        new.create.click(create_campaign, [new.eval, new.systems, new.open, new.guide, new.reveal, is_admin],
                         [new.msg, r.campaign, res.campaign])
        demo.load(rate_link, None, [r.invite, r.campaign, r.progress, tabs], api_visibility="private")
        _wire_selections(page)
        _wire_guide(page)
    return demo


def _wire_selections(p) -> None:
    """Every dropdown fresh on each tab switch (a second browser sees the same state); on load the same
    choices, and each selection where this browser left it (else the running or newest one); every
    user-visible pick remembered in the browser (the header's ``sel``, gr.BrowserState)."""
    t, e, c, sel = p.t, p.e, p.c, p.head.sel
    fresh = {"datasets": [t.sft.dataset, e.dataset, p.d.del_pick], "kbs": [p.k.pick, c.kb, e.kb, t.sft.fields["kb"]],
             "systems": [e.systems, *c.systems],
             "evals": [e.pick, p.r.new.eval], "campaigns": [p.r.campaign, p.res.campaign], "runs": [t.run],
             "finished": [t.pref.from_run, p.res.pref_from], "pref_datasets": [t.pref.dataset]}

    def refresh():
        choices = {"datasets": dataset_choices(), "kbs": kb_choices(), "systems": system_choices(),
                   "evals": eval_choices(), "campaigns": campaign_choices(), "runs": all_runs(),
                   "finished": finished_runs(), "pref_datasets": preference_dataset_choices()}
        return {c: gr.update(choices=choices[k]) for k, comps in fresh.items() for c in comps}

    fresh_outputs = [c for comps in fresh.values() for c in comps]
    p.tabs.select(refresh, None, fresh_outputs)  # new datasets, runs, evals, campaigns show up on every tab switch
    restore_outputs = [t.sft.dataset, e.dataset, p.d.del_pick, p.k.pick, c.kb, e.kb, e.systems, *c.systems, e.pick,
                       p.r.new.eval, p.r.campaign, p.res.campaign, t.run, p.r.invite]
    p.demo.load(restore_selection, [sel[k] for k in ("dataset", "kb", "run", "eval", "campaign", "invite")],
                restore_outputs, api_visibility="private")
    for key, comps in {"dataset": [t.sft.dataset, e.dataset], "kb": [p.k.pick, c.kb, e.kb], "run": [t.run],
                       "eval": [e.pick], "campaign": [p.r.campaign, p.res.campaign]}.items():
        for comp in comps:
            comp.change(_remember, comp, sel[key], api_visibility="private", show_progress="hidden")


def _wire_guide(p) -> None:
    """The guided path: drawn on load, kept current by its timer and on tab switches (changes only); its
    next action starts what the Train, Evaluate and Rate tabs would, on their current selections."""
    g, t, e = p.head, p.t, p.e
    guide_ins, guide_outs = [t.sft.dataset, p.is_admin, g.last], [g.box, g.steps, g.next, g.hint, g.status, g.last]
    p.demo.load(guide_view, guide_ins, guide_outs, api_visibility="private")
    g.timer.tick(guide_view, guide_ins, guide_outs, show_progress="hidden", api_visibility="private")
    p.tabs.select(guide_view, guide_ins, guide_outs, show_progress="hidden", api_visibility="private")
    g.next.click(guide_go, [t.sft.dataset, t.sft.base, e.limit, e.metrics, p.is_admin, *t.sft.inputs],
                 [g.msg, p.tabs, t.run, e.pick, e.dataset, e.kb, e.systems, p.r.campaign, p.res.campaign, p.r.invite,
                  g.sel["invite"], g.steps, g.next, g.hint, t.msg, e.msg], api_visibility="private")


# Which events may run side by side (Gradio runs every event under a limit of 1 unless told otherwise,
# so visitors were served one at a time). Chat waits on the engine, which batches concurrent requests:
# many chats at once cost about one chat's latency. Heavy handlers (parsing uploads, building an index,
# exporting) share one small group so they cannot starve the rest; everything else is a quick read or
# write of the store. Events not named here get the light limit.
HEAVY_EVENTS = {"data_check", "data_import", "kb_build", "results_export", "create_campaign", "eval_start",
                "results_train_on_votes", "pref_start", "synth_start"}
ENGINE_EVENTS = {"chat_send"}
# A synth preview generates for several chunks (the engine, or an external endpoint) and filters them with the
# embedder: seconds to minutes. Its own small queue: a second preview waits, chat and the heavy group do not.
PREVIEW_EVENTS = {"synth_preview"}
PREVIEW_CONCURRENCY = 1


def configure_concurrency(blocks: gr.Blocks) -> gr.Blocks:
    st = studio().settings
    for fn in blocks.fns.values():
        name = getattr(fn.fn, "__name__", "")
        if name in ENGINE_EVENTS:
            fn.concurrency_id, fn.concurrency_limit = "engine", max(1, st.chat_concurrency)
        elif name in HEAVY_EVENTS:
            fn.concurrency_id, fn.concurrency_limit = "heavy", max(1, st.heavy_concurrency)
        elif name in PREVIEW_EVENTS:
            fn.concurrency_id, fn.concurrency_limit = "synth_preview", PREVIEW_CONCURRENCY
        else:  # each light event keeps its own queue (a slow poll never delays a vote)
            fn.concurrency_limit = max(1, st.light_concurrency)
    blocks.queue(max_size=max(1, st.queue_size), default_concurrency_limit=max(1, st.light_concurrency))
    return blocks


_DEMO: gr.Blocks | None = None
_DEMO_LOCK = threading.Lock()


def get_demo() -> gr.Blocks:
    """The page, built (and its concurrency set) on first use; the same Blocks afterwards."""
    global _DEMO
    with _DEMO_LOCK:
        if _DEMO is None:
            _DEMO = configure_concurrency(build_demo())
    return _DEMO


def __getattr__(name: str):
    """``app.demo``: the page, built on first access (importing app builds nothing)."""
    if name == "demo":
        return get_demo()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _job_tasks() -> dict:
    """The example bootstrap's state for /healthz: running (queued or running), done or failed."""
    from sft_core import example
    st = example.bootstrap_state(ws=studio().ws, store=studio().store)
    return {"example": st} if st else {}


def make_app():
    """FastAPI app: /healthz plus the Gradio UI mounted at /."""
    from fastapi import FastAPI
    api = FastAPI(title="SFT Studio")

    @api.get("/healthz")
    def healthz():
        return {"status": "ok", "workspace": str(studio().ws.root), "engine": studio().engine_ready(),
                "tasks": {**{k: t.status for k, t in studio().tasks.items()}, **_job_tasks()}}

    @api.get("/report/{key}")
    def open_report(key: str):
        """A staged decision report as a page in its own tab (Gradio serves .html files only as downloads).

        Only copies staged by ``eval_poll`` for an admin are reachable, by their unguessable folder (a keyed
        hash, as for every staged download); the page is sandboxed and may load nothing: the report is
        self-contained, and model outputs inside it can run no script and fetch no resource."""
        from fastapi import HTTPException
        from fastapi.responses import FileResponse
        path = studio().downloads_dir / key / "report.html"
        if not re.fullmatch(r"[0-9a-f]{32}", key) or not path.is_file():
            raise HTTPException(404, "no such report")
        return FileResponse(path, media_type="text/html; charset=utf-8", headers={
            "Content-Security-Policy": "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'",
            "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})

    # gr.mount_gradio_app leaves has_launched False, and Gradio then skips its file rules altogether:
    # an API call could name any server path as an "upload" (data_check would read it) and any path
    # a function returns would be served. Marked launched, Gradio accepts uploaded files only as
    # inputs and hands out only files under allowed_paths, the CWD or the temp dir. Everything under
    # allowed_paths is served to anyone, so that is not the workspace (database, eval outputs) but
    # only the folder of staged download copies (Studio.stage_download).
    demo = get_demo()
    demo.has_launched = True
    studio().clear_downloads()
    studio().downloads_dir.mkdir(parents=True, exist_ok=True)
    # Uploads over the data limit are refused by Gradio while they stream in (413), before they reach
    # disk; /config shows the limit to the browser, which refuses them before sending. sft_core/data/readers.py
    # checks the same limit again for files given any other way.
    max_file_size = DataConfig().max_upload_bytes
    return gr.mount_gradio_app(api, demo, path="/", js=RATE_JS, css=APP_CSS, allowed_paths=[str(studio().downloads_dir)],
                               max_file_size=max_file_size)


SHUTDOWN_DRAIN_S = 3  # seconds uvicorn waits for open connections on SIGTERM before closing them


def main() -> None:
    import uvicorn
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    from sft_core.serving.supervise import close_on_signals
    from sft_core.serving.vllm_engine import close_all
    # SIGTERM/SIGINT: uvicorn shuts down gracefully, then re-raises the signal to these handlers, which
    # stop the engine (and a vLLM still starting in a background thread) before the process exits
    close_on_signals(studio().close, close_all)
    from sft_core import gpu
    print(gpu.startup_check(), flush=True)  # loud when a GPU is visible that torch cannot use
    start_background()
    print(f"SFT Studio on http://{host}:{port}  (workspace {studio().ws.root})", flush=True)

    class Server(uvicorn.Server):
        """The engine starts stopping the moment the signal arrives, while uvicorn drains its connections
        (at most SHUTDOWN_DRAIN_S: open event streams would hold it): ``docker stop`` gives 10 s in all."""

        def handle_exit(self, sig, frame):
            threading.Thread(target=lambda: (studio().close(), close_all()), daemon=True, name="close-engine").start()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(make_app(), host=host, port=port, log_level="warning",
                                   timeout_graceful_shutdown=SHUTDOWN_DRAIN_S))
    try:
        server.run()
    finally:
        studio().close()


if __name__ == "__main__":
    main()
