"""The top of the page: the intro, the guided path (five steps and the next action; sft_core/guide.py decides),
the workspace and jobs line, the admin login; and the selections a page starts on."""
from __future__ import annotations

import functools
import types

import gradio as gr

from sft_core import guide
from sft_core.db import jobs as job_rows, runs as run_rows
from ui.common import (
    _query_invite, admin_ok, admin_required, all_runs, campaign_choices, dataset_choices, eval_choices, kb_choices,
    login, run_config, run_systems, skip_unchanged, studio, system_choices, ui_errors,
)
from ui.evaluate import eval_start
from ui.train import train_start


@functools.lru_cache(maxsize=1)
def _gpu_inventory():
    """The machine's GPUs, asked once (nvidia-smi is a subprocess; the header polls)."""
    from sft_core import gpu
    return gpu.inventory()


def status_text() -> str:
    from sft_core import jobs
    engine = "running" if studio().engine_ready() else "starts on first chat/eval"
    active = job_rows.live(studio().store)[:4]
    lines = ["Job: " + jobs.describe(j, store=studio().store) for j in active]
    inv = _gpu_inventory()
    if inv.count or inv.smi_count or inv.smi_error:  # who holds each GPU (engine, asleep, a training run); nothing on a CPU machine
        from sft_core import gpu
        lines.append(gpu.holder_text(ws=studio().ws, store=studio().store, inv=inv))
    return (f"**Workspace** `{studio().ws.root}` · **base model** `{studio().settings.base_model}` · "
            f"**engine** {engine}\n\n" + "  \n".join(lines + [studio().status_lines()]))


# ------------------------------------------------------------------------------------------------
# The guided path (top of the page) and the selections a page starts on (sft_core/guide.py decides)
# ------------------------------------------------------------------------------------------------
def guide_view(dataset, is_admin, last):
    """Timer and tab switch: the guide's visibility, the five steps, the next-action button, its hint and
    the background-work line, each sent only when it changed (no flicker). Last output: the fingerprints.
    With an admin password set, only the admin sees the guide (its actions are admin writes; raters
    coming in by invite need none of it), and nobody else pays for computing it."""
    if not admin_ok(is_admin):
        values = (gr.update(visible=False), "", gr.update(), "", "")
    else:
        g = guide.guide_state(ws=studio().ws, store=studio().store, selected_dataset=dataset)
        values = (gr.update(visible=True), guide.checklist_html(g),
                  gr.update(value=g.next.label, interactive=g.next.kind != "wait"), guide.next_html(g), status_text())
    values, digests = skip_unchanged(values, last)
    return (*values, digests)


@ui_errors
def guide_go(dataset, base_model, limit, metrics, is_admin, *train_values):
    """The next action of the guided path, on the current selections: start the training run, the
    evaluation or the rating campaign (with an invite for the caller), or just open the tab to watch.
    Outputs: message, tabs, run, eval, eval dataset, eval knowledge base, eval systems, rate campaign,
    results campaign, invite box, remembered invite, steps, next button, its hint, Train and Evaluate
    message lines."""
    from evals import rating
    g = guide.guide_state(ws=studio().ws, store=studio().store, selected_dataset=dataset)
    a, f = g.next, g.facts
    keep = gr.skip()
    run = ev = ev_ds = ev_kb = ev_sys = r_camp = res_camp = invite = invite_state = keep
    msg, t_line, e_line = (a.hint if a.kind == "wait" else ""), keep, keep
    if a.kind == "train":
        msg, run = train_start(f["dataset"], base_model, is_admin, *train_values)
        t_line = msg
        msg += " Follow it on the Train tab; the guide above moves on when it has finished."
    elif a.kind == "evaluate":
        row = run_rows.get(studio().store, f["run"])
        systems = ["prompt", *(["rag"] if f["kb"] else []), *run_systems(f["run"], run_config(f["run"]), bool(f["kb"]))]
        msg, ev = eval_start(row["dataset"], "test", systems, f["kb"], limit, metrics, False, is_admin)
        ev_ds, ev_kb = gr.update(value=row["dataset"]), gr.update(value=f["kb"])
        ev_sys = gr.update(choices=system_choices(), value=systems)
        e_line = msg
        msg += " The recommendation card on the Evaluate tab fills in when it has finished."
    elif a.kind == "rate":
        admin_required(is_admin)
        cid = rating.create_campaign(f["eval"], None, ws=studio().ws, store=studio().store, open_rating=False)
        token = rating.create_invites(cid, ["you"], ws=studio().ws, store=studio().store)[0]["token"]
        r_camp = res_camp = gr.update(choices=campaign_choices(), value=cid)
        invite, invite_state = token, {"campaign": cid, "token": token}
        msg = (f"Campaign **{cid}** created with an invite for you (kept in this browser): press **Next** and vote "
               "with the buttons or the keys 1-4. More raters: Results tab → Campaign admin.")
    elif a.kind == "open" and a.tab == "results" and f.get("campaign"):
        res_camp = gr.update(value=f["campaign"])
    g = guide.guide_state(ws=studio().ws, store=studio().store, selected_dataset=dataset)
    tab = keep if a.kind == "wait" else gr.Tabs(selected=a.tab)
    return (msg, tab, run, ev, ev_ds, ev_kb, ev_sys, r_camp, res_camp, invite, invite_state,
            guide.checklist_html(g), gr.update(value=g.next.label, interactive=g.next.kind != "wait"),
            guide.next_html(g), t_line, e_line)


def restore_selection(dataset, kb, run, eval_id, campaign, invite, request: gr.Request = None):
    """Page load: every dropdown's choices, and its value: what this browser chose last if it still
    exists, else the running or the newest (the example knowledge base first). The chat panes start on
    prompt, rag and the newest finished run with and without retrieval. An ``?invite=`` link keeps its
    own campaign (rate_link). Outputs: see build_demo's ``restore_outputs``."""
    d = guide.default_selection(ws=studio().ws, store=studio().store)
    ds_c, kb_c, run_c, ev_c, camp_c = dataset_choices(), kb_choices(), all_runs(), eval_choices(), campaign_choices()
    sys_c = system_choices()
    ds = guide.choose(dataset, ds_c, d["dataset"])
    k = guide.choose(kb, kb_c, d["kb"])
    r = d["succeeded_run"]
    r_systems = run_systems(r, run_config(r), bool(k)) if r else []
    eval_systems_ = ["prompt", *(["rag"] if k else []), *r_systems]
    # the fourth pane: the run with retrieval, as it was trained to use it (raft:RUN for a RAFT run)
    with_kb = ([s for s in r_systems if s.startswith("raft:")] + [s for s in r_systems if s.startswith("sft+rag:")])
    panes = ["prompt", "rag" if k else None, f"sft:{r}" if r else None, with_kb[0] if with_kb else None]
    ev = guide.choose(eval_id, ev_c, d["eval"])
    linked = bool(_query_invite(request))
    camp = guide.choose(campaign, camp_c, d["campaign"])
    token = (invite or {}).get("token") if isinstance(invite, dict) and invite.get("campaign") == camp else None
    return (gr.update(choices=ds_c, value=ds), gr.update(choices=ds_c, value=ds), gr.update(choices=ds_c),
            gr.update(choices=kb_c, value=k), gr.update(choices=kb_c, value=k), gr.update(choices=kb_c, value=k),
            gr.update(choices=sys_c, value=eval_systems_), *(gr.update(choices=sys_c, value=v) for v in panes),
            gr.update(choices=ev_c, value=ev), gr.update(choices=ev_c, value=ev),
            gr.update(choices=camp_c) if linked else gr.update(choices=camp_c, value=camp),
            gr.update(choices=camp_c, value=camp), gr.update(choices=run_c, value=guide.choose(run, run_c, d["run"])),
            token if token and not linked else gr.skip())


def build_header(is_admin) -> types.SimpleNamespace:
    """The intro, the guide box, the status accordion, the browser-kept selections and the admin login (wired
    here: it fills ``is_admin``). The guide's events are wired by app.build_demo (they reach into every tab)."""
    gr.Markdown("# SFT Studio\nFine-tune, prompt, or retrieve? Answer it on your own data. "
                "**New here?** The example domain (Python's standard library docs) comes ready: press the "
                "button below to train, then again to compare, and read the recommendation.",
                elem_id="intro")
    with gr.Column(elem_id="guide", elem_classes=["guide"]) as g_box:
        g_steps = gr.HTML(elem_id="guide-steps")
        with gr.Row(elem_id="guide-actions", equal_height=True):
            g_next = gr.Button("…", variant="primary", size="md", elem_id="guide-next", scale=0, min_width=280)
            g_hint = gr.HTML(elem_id="guide-hint")
        g_msg = gr.Markdown(elem_id="guide-msg")
    g_last = gr.State(None)  # fingerprints of what the guide shows (guide_view sends only changes)
    g_timer = gr.Timer(3.0)
    with gr.Accordion("Workspace and background jobs", open=False, elem_id="status-box"):
        status = gr.Markdown(elem_id="status")
    # what this browser chose last (localStorage), so a reload starts where it left off
    sel = {k: gr.BrowserState(None, storage_key=f"sft-studio-sel-{k}", secret="sft-studio-selection")
           for k in ("dataset", "kb", "run", "eval", "campaign", "invite")}
    with gr.Accordion("Admin", open=False, visible=bool(studio().settings.admin_password)):
        with gr.Row():
            pw = gr.Textbox(label="Admin password", type="password", elem_id="admin-password")
            login_btn = gr.Button("Log in", elem_id="admin-login")
        login_msg = gr.Markdown()
        # the password box is cleared by the same event: no copy of the password stays in the session
        login_btn.click(login, pw, [is_admin, login_msg, pw])
    return types.SimpleNamespace(box=g_box, steps=g_steps, next=g_next, hint=g_hint, msg=g_msg, last=g_last,
                                 timer=g_timer, status=status, sel=sel)
