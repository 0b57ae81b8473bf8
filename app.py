"""SFT Studio web app: layout and wiring only; all behaviour lives in sft_core/ and evals/.

Run with ``python app.py`` (``make run``). Honours GRADIO_SERVER_NAME / GRADIO_SERVER_PORT and the
SFT_STUDIO_* settings (see sft_core/config.py StudioSettings). ``GET /healthz`` answers 200 when the
server is up. The module-level ``demo`` can be imported by tests and driven with gradio_client.

With SFT_STUDIO_ADMIN_PASSWORD set, writes other than rating (import, index, train, cancel/resume,
delete, eval, campaign, invites, publish/close, export) need the admin login. Raters never name
themselves: an invite link, a signed open-campaign key or (on a Space) a Hugging Face sign-in says
who they are, and a campaign's results stay hidden from them until it is published or closed.
Eval per-example outputs and the report name the system behind each answer, so they are admin-only
too (raters stay blind); the aggregate score table stays public. Deleting (Data and Train tabs)
asks for a confirmation first.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import json
import os
import re
import threading
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from sft_core import StudioError, guide
from sft_core.config import DataConfig, DecodingConfig, fields_for_form, load_config
from sft_core.curves import LOSS_COLORS
from sft_core.db import datasets as dataset_rows, evals as eval_rows, jobs as job_rows, runs as run_rows
from sft_core.safety import AdminSessions, safe_markdown
from sft_core.studio import EXAMPLE_NAME, Studio, delete_dataset, delete_run

STUDIO = Studio.from_env()
SYSTEM_CHOICES_BASE = ["prompt", "rag"]


# ------------------------------------------------------------------------------------------------
# Plumbing: readable errors, admin gate
# ------------------------------------------------------------------------------------------------
def ui_errors(fn):
    """Turn StudioError (bad input, bad state) into a readable UI message instead of a traceback."""
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        async def agen_wrapper(*a, **k):
            try:
                async for item in fn(*a, **k):
                    yield item
            except StudioError as e:
                raise gr.Error(str(e), print_exception=False) from None
        return agen_wrapper
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*a, **k):
            try:
                yield from fn(*a, **k)
            except StudioError as e:
                raise gr.Error(str(e), print_exception=False) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*a, **k):
        try:
            return fn(*a, **k)
        except StudioError as e:
            raise gr.Error(str(e), print_exception=False) from None
    return wrapper


ADMIN = AdminSessions(STUDIO.settings.admin_password, base_delay_s=STUDIO.settings.login_backoff_s)


def admin_ok(token) -> bool:
    """Whether the session's admin state is a valid signed admin token (always true with no password).

    The session state holds only that token (sft_core.safety.AdminSessions), never the password or a
    bare boolean."""
    return not STUDIO.settings.admin_password or ADMIN.valid(token)


def admin_required(is_admin) -> None:
    """Writes other than rating need the admin login when an admin password is set."""
    if not admin_ok(is_admin):
        raise StudioError("this action needs the admin login (Admin panel, top of the page)", "admin")


def chat_allowed(is_admin) -> None:
    if STUDIO.settings.admin_password and not STUDIO.settings.demo_mode and not admin_ok(is_admin):
        raise StudioError("chat needs the admin login unless the app runs in demo mode", "admin")


def client_id(request) -> str:
    """Who is calling, for rate limiting: the peer address; on a Hugging Face Space the first
    X-Forwarded-For hop (the Space's proxy is the peer there and sets that header)."""
    if request is None:
        return "local"
    try:
        if os.environ.get("SPACE_ID"):
            fwd = request.headers.get("x-forwarded-for", "")
            if fwd:
                return fwd.split(",")[0].strip()
        return request.client.host if request.client else "unknown"
    except Exception:  # noqa: BLE001 - a request without headers/client (direct call)
        return "unknown"


def login(password: str, request: gr.Request = None):
    """(admin token for the session state, message, "" to clear the password box)."""
    if not STUDIO.settings.admin_password:
        return None, "No admin password is set: everything is open.", ""
    token, msg = ADMIN.login(password or "", client_id(request))
    return token, msg, ""


# ------------------------------------------------------------------------------------------------
# Startup: example domain (dataset + knowledge base), prepared in the background
# ------------------------------------------------------------------------------------------------
def start_background() -> None:
    """Queue the example-domain bootstrap (a job like any other, run by a worker process) unless it is
    built, queued or running already, and start this process's job dispatcher."""
    from sft_core import example, jobs
    if os.environ.get("SFT_STUDIO_SKIP_EXAMPLE", "") not in ("1", "true"):
        example.submit_bootstrap(STUDIO.ws, STUDIO.store, base_model=STUDIO.settings.base_model)
    jobs.start_dispatcher(STUDIO.ws, STUDIO.store)


@functools.lru_cache(maxsize=1)
def _gpu_inventory():
    """The machine's GPUs, asked once (nvidia-smi is a subprocess; the header polls)."""
    from sft_core import gpu
    return gpu.inventory()


def status_text() -> str:
    from sft_core import jobs
    engine = "running" if STUDIO.engine_ready() else "starts on first chat/eval"
    active = job_rows.live(STUDIO.store)[:4]
    lines = ["Job: " + jobs.describe(j, STUDIO.store) for j in active]
    inv = _gpu_inventory()
    if inv.count or inv.smi_count or inv.smi_error:  # who holds each GPU (engine, asleep, a training run); nothing on a CPU machine
        from sft_core import gpu
        lines.append(gpu.holder_text(STUDIO.ws, STUDIO.store, inv))
    return (f"**Workspace** `{STUDIO.ws.root}` · **base model** `{STUDIO.settings.base_model}` · "
            f"**engine** {engine}\n\n" + "  \n".join(lines + [STUDIO.status_lines()]))


# ------------------------------------------------------------------------------------------------
# Choices shared by several tabs
# ------------------------------------------------------------------------------------------------
def dataset_choices() -> list[str]:
    from sft_core import data
    return sorted({d["name"] for d in data.list_datasets(STUDIO.ws, STUDIO.store)})


def preference_dataset_choices() -> list[str]:
    """Datasets whose newest version holds preference pairs (sft_core/preference.py), for the Train tab's
    preference mode."""
    import types as _types

    from sft_core import data, preference
    newest: dict[str, dict] = {}
    for d in data.list_datasets(STUDIO.ws, STUDIO.store):  # newest first
        newest.setdefault(d["name"], d)
    return sorted(n for n, d in newest.items()
                  if preference.dataset_kind(_types.SimpleNamespace(path=d["path"])) == preference.KIND)


def kb_choices() -> list[str]:
    from sft_core import retrieval
    return sorted(k["name"] for k in retrieval.list_kbs(STUDIO.ws, STUDIO.store))


def finished_runs() -> list[str]:
    return run_rows.ids(STUDIO.store, status="succeeded")


def run_config(run_id: str | None) -> dict:
    """A run's stored config (runs.config: TrainConfig, whose ``mode`` says how it was trained); {} if none."""
    from sft_core.store import loads
    row = run_rows.get(STUDIO.store, run_id) if run_id else None
    return (loads(row["config"], {}) or {}) if row else {}


def run_systems(run_id: str, config: dict, with_kb: bool = True) -> list[str]:
    """The systems a finished run is compared as (evals.systems.adapter_systems: sft, sft+rag, and raft for a
    run trained in raft mode); ``with_kb`` False leaves out those that retrieve."""
    from evals import systems as evsys
    names = evsys.adapter_systems(run_id, config)
    return names if with_kb else [n for n in names if not evsys.parse_system(n).uses_kb]


def system_choices() -> list[str]:
    from sft_core.store import loads
    out = list(SYSTEM_CHOICES_BASE)
    for r in run_rows.list_runs(STUDIO.store, status="succeeded"):
        out += run_systems(r["id"], loads(r["config"], {}) or {})
    return out


def eval_choices() -> list[str]:
    return eval_rows.ids(STUDIO.store)


def campaign_choices() -> list[str]:
    from evals import rating
    return [c["id"] for c in rating.list_campaigns(ws=STUDIO.ws, store=STUDIO.store)]


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
        g = guide.guide_state(STUDIO.ws, STUDIO.store, dataset)
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
    g = guide.guide_state(STUDIO.ws, STUDIO.store, dataset)
    a, f = g.next, g.facts
    keep = gr.skip()
    run = ev = ev_ds = ev_kb = ev_sys = r_camp = res_camp = invite = invite_state = keep
    msg, t_line, e_line = (a.hint if a.kind == "wait" else ""), keep, keep
    if a.kind == "train":
        msg, run = train_start(f["dataset"], base_model, is_admin, *train_values)
        t_line = msg
        msg += " Follow it on the Train tab; the guide above moves on when it has finished."
    elif a.kind == "evaluate":
        row = run_rows.get(STUDIO.store, f["run"])
        systems = ["prompt", *(["rag"] if f["kb"] else []), *run_systems(f["run"], run_config(f["run"]), bool(f["kb"]))]
        msg, ev = eval_start(row["dataset"], "test", systems, f["kb"], limit, metrics, False, is_admin)
        ev_ds, ev_kb = gr.update(value=row["dataset"]), gr.update(value=f["kb"])
        ev_sys = gr.update(choices=system_choices(), value=systems)
        e_line = msg
        msg += " The recommendation card on the Evaluate tab fills in when it has finished."
    elif a.kind == "rate":
        admin_required(is_admin)
        cid = rating.create_campaign(f["eval"], None, ws=STUDIO.ws, store=STUDIO.store, open_rating=False)
        token = rating.create_invites(cid, ["you"], ws=STUDIO.ws, store=STUDIO.store)[0]["token"]
        r_camp = res_camp = gr.update(choices=campaign_choices(), value=cid)
        invite, invite_state = token, {"campaign": cid, "token": token}
        msg = (f"Campaign **{cid}** created with an invite for you (kept in this browser): press **Next** and vote "
               "with the buttons or the keys 1-4. More raters: Results tab → Campaign admin.")
    elif a.kind == "open" and a.tab == "results" and f.get("campaign"):
        res_camp = gr.update(value=f["campaign"])
    g = guide.guide_state(STUDIO.ws, STUDIO.store, dataset)
    tab = keep if a.kind == "wait" else gr.Tabs(selected=a.tab)
    return (msg, tab, run, ev, ev_ds, ev_kb, ev_sys, r_camp, res_camp, invite, invite_state,
            guide.checklist_html(g), gr.update(value=g.next.label, interactive=g.next.kind != "wait"),
            guide.next_html(g), t_line, e_line)


def restore_selection(dataset, kb, run, eval_id, campaign, invite, request: gr.Request = None):
    """Page load: every dropdown's choices, and its value: what this browser chose last if it still
    exists, else the running or the newest (the example knowledge base first). The chat panes start on
    prompt, rag and the newest finished run with and without retrieval. An ``?invite=`` link keeps its
    own campaign (rate_link). Outputs: see build_demo's ``restore_outputs``."""
    d = guide.default_selection(STUDIO.ws, STUDIO.store)
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


def _remember(value):
    """A dropdown's new value, for the browser to keep (gr.BrowserState)."""
    return value


CHAT_KINDS = {"prompt": "base model, prompted", "rag": "base model + retrieved passages", "sft": "fine-tuned",
              "sft+rag": "fine-tuned + retrieved passages",
              "raft": "fine-tuned with retrieved passages (RAFT) + retrieved passages", "openai": "remote model"}


def chat_heads(s1, s2, s3, s4):
    """Each chat pane's heading: the system's short name and what it is."""
    from evals import report
    chosen = [s for s in (s1, s2, s3, s4) if s]
    short = report.short_names(chosen)
    out = []
    for i, sys_ in enumerate((s1, s2, s3, s4)):
        if not sys_:
            out.append(f"**Pane {i + 1}** · _choose a system_")
            continue
        kind = sys_.partition(":")[0]
        out.append(f"**{safe_markdown(short[sys_])}** · {CHAT_KINDS.get(kind, '')}")
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def _data_cfg(fmt: str, mapping: str) -> DataConfig:
    return load_config(DataConfig, overrides={"format": fmt or "auto", "mapping": mapping or {}})


# The Data tab's mapping dropdowns, one per canonical field (sft_core/mapping.py guesses their columns).
MAPPING_ROLES = (("instruction", "Question column"), ("response", "Answer column"),
                 ("context", "Context column (optional)"), ("system", "System prompt column (optional)"))
NOT_MAPPED = "(not used)"
ERROR_COLUMNS = ["file", "line", "field", "problem"]


def _in_ui_words(e: StudioError, file) -> str:
    """An error for the Data tab: the upload's temporary path becomes the file's own name."""
    text = str(e)
    path = _path(file) if file else ""
    return text.replace(path, Path(path).name) if path else text


def _name_from_file(path: str) -> str:
    """A dataset name from a file name: support-tickets.csv -> support-tickets."""
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "-", Path(path).stem).strip("-._+")
    return stem[:60] or "dataset"


@ui_errors
def data_inspect(file, name):
    """After an upload: the first rows, the mapping dropdowns filled from the file's headers with
    guesses, the dataset name from the file name; Save waits for a passing Check. Outputs: message,
    preview, the four column dropdowns, mapping text, name, Save, report, problems."""
    from sft_core import mapping
    no_save, clear = gr.update(interactive=False), ("", pd.DataFrame(columns=ERROR_COLUMNS))
    if not file:
        empty = gr.update(choices=[NOT_MAPPED], value=NOT_MAPPED)
        return ("", gr.update(visible=False), *(empty,) * 4, "", gr.update(), no_save, *clear)
    try:
        info = mapping.inspect_file(_path(file), DataConfig())
    except StudioError as e:
        empty = gr.update(choices=[NOT_MAPPED], value=NOT_MAPPED)
        return ("❌ " + _in_ui_words(e, file), gr.update(visible=False), *(empty,) * 4, "", gr.update(), no_save,
                *clear)
    choices = [NOT_MAPPED, *info.columns]
    cols = [gr.update(choices=choices, value=info.guess.get(role, NOT_MAPPED)) for role, _ in MAPPING_ROLES]
    preview = pd.DataFrame([{c: mapping.preview_cell(r.get(c, "")) for c in info.columns} for r in info.rows],
                           columns=info.columns)
    if info.problems and not info.rows:
        msg = f"❌ **{info.name}** could not be read: " + "; ".join(info.problems)
    elif not info.needs_mapping:
        msg = (f"**{info.name}**: recognised as **{info.detected}** (columns {', '.join(info.columns)}). "
               "Press **Check**.")
    elif mapping.is_complete(info.guess):
        msg = (f"**{info.name}**: a table; columns matched by their names: {mapping.describe(info.guess)}. "
               "Change the columns below if that is wrong, then press **Check**.")
    else:
        msg = (f"**{info.name}**: a table with columns {', '.join(info.columns) or '(none)'}. Choose which column "
               "holds the question and which the answer, then press **Check**.")
    return (msg, gr.update(value=preview, visible=bool(info.rows)), *cols, mapping.to_text(info.guess),
            name or _name_from_file(info.name), no_save, *clear)


def data_mapping_text(instruction, response, context, system) -> tuple:
    """The dropdowns as mapping text (DataConfig.mapping); a new mapping needs a new Check before Save."""
    from sft_core import mapping
    chosen = {r: c for (r, _), c in zip(MAPPING_ROLES, (instruction, response, context, system))
              if c and c != NOT_MAPPED}
    return mapping.to_text(chosen), gr.update(interactive=False)


@ui_errors
def data_check(file, fmt, mapping):
    """Check a file without storing it: report, row-level problems, and Save enabled only when it passed."""
    from sft_core import data
    if not file:
        return "Choose a file first.", pd.DataFrame(columns=ERROR_COLUMNS), gr.update(interactive=False)
    try:
        report = data.check_file(_path(file), _data_cfg(fmt, mapping))
    except StudioError as e:  # a bad mapping or format choice, an unreadable file: in words, with its name
        return "❌ " + _in_ui_words(e, file), pd.DataFrame(columns=ERROR_COLUMNS), gr.update(interactive=False)
    errors = pd.DataFrame([_issue_row(i) for i in report.errors], columns=ERROR_COLUMNS)
    from sft_core.render import format_report
    text = format_report(report)
    if report.ok:
        text += "\n\n✅ Ready: name the dataset and press **Save as dataset version**."
    return text, errors, gr.update(interactive=report.ok)


@ui_errors
def data_import(file, fmt, mapping, name, is_admin):
    """Store the file as a dataset version. A data problem is answered in the message line (the file's
    own name, nothing stored) and the versions table stays as it was."""
    from sft_core import data
    admin_required(is_admin)
    if not file:
        return "❌ Choose a file first.", gr.skip()
    if not name:
        return "❌ Give the dataset a name.", gr.skip()
    try:
        v = data.import_dataset(_path(file), name, _data_cfg(fmt, mapping), ws=STUDIO.ws, store=STUDIO.store)
    except StudioError as e:
        return "❌ Not saved: " + _in_ui_words(e, file), gr.skip()
    what = "saved new version" if v.created else "identical data: existing version reused"
    return f"✅ {what}: **{v.name}@{v.version}** — " + ", ".join(f"{k}: {n}" for k, n in v.splits.items()), datasets_table()


def datasets_table():
    from sft_core import data
    rows = data.list_datasets(STUDIO.ws, STUDIO.store)
    out = []
    for r in rows:
        splits = ", ".join(f"{k} {v}" for k, v in (r.get("splits") or {}).items())
        out.append({"name": r["name"], "version": r["version"], "rows": r["n_rows"], "splits": splits,
                    "source": r.get("source")})
    return pd.DataFrame(out, columns=["name", "version", "rows", "splits", "source"])


def _confirm(visible: bool, text: str = ""):
    return gr.update(visible=visible), text


def _hide():
    return gr.update(visible=False)


@ui_errors
def dataset_delete_ask(name, is_admin):
    """First step of deleting a dataset: say what goes and show the confirmation buttons."""
    admin_required(is_admin)
    if not name:
        raise StudioError("choose a dataset to delete", "dataset")
    rows = dataset_rows.list_versions(STUDIO.store, name)
    if not rows:
        raise StudioError(f"unknown dataset {name!r}", "dataset")
    return _confirm(True, f"Delete dataset **{name}** and all its {len(rows)} version(s) "
                          f"({sum(r['n_rows'] for r in rows)} rows)? Finished runs and evals keep their results. "
                          "This cannot be undone.")


@ui_errors
def dataset_delete(name, is_admin):
    admin_required(is_admin)
    if not name:
        raise StudioError("choose a dataset to delete", "dataset")
    n = delete_dataset(name, STUDIO.ws, STUDIO.store)
    return (f"Deleted dataset **{name}** ({n} version(s)).", datasets_table(), gr.update(visible=False),
            gr.update(choices=dataset_choices(), value=None))


def _path(file) -> str:
    return file if isinstance(file, str) else getattr(file, "name", str(file))


def _issue_row(i) -> dict:
    d = i if isinstance(i, dict) else getattr(i, "__dict__", {"message": str(i)})
    return {"file": Path(str(d.get("file") or "")).name, "line": d.get("line") or d.get("row"),
            "field": d.get("field"), "problem": d.get("message")}


# ------------------------------------------------------------------------------------------------
# Knowledge
# ------------------------------------------------------------------------------------------------
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
    job_id = retrieval.submit_build([_path(f) for f in files], name, ws=STUDIO.ws, store=STUDIO.store)
    while True:
        job = jobs.job_row(job_id, STUDIO.store)
        if job["status"] in jobs.FINAL:
            break
        yield jobs.describe(job, STUDIO.store), gr.update()
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
    kb = retrieval.open_kb(name, STUDIO.ws)
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
            for k in retrieval.list_kbs(STUDIO.ws, STUDIO.store)]
    return pd.DataFrame(rows, columns=["name", "documents", "chunks", "embedder", "built at"])


# ------------------------------------------------------------------------------------------------
# Knowledge → a training set generated from the knowledge base (sft_core/synth.py)
# ------------------------------------------------------------------------------------------------
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
    if cfg.generator == "local" and synth.resolve_local_model(cfg, STUDIO.store) == STUDIO.settings.base_model:
        engine = STUDIO.engine()
    out = synth.preview(cfg, engine=engine, ws=STUDIO.ws, store=STUDIO.store)
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
    job_id = synth.submit_synth(cfg, STUDIO.ws, STUDIO.store)
    return (f"Queued: dataset **{cfg.name}** from **{cfg.kb}** (job {job_id}).", job_id,
            jobs.describe(jobs.job_row(job_id, STUDIO.store), STUDIO.store), gr.update(active=True))


def synth_poll(job_id):
    """The synth job's line: where it waits, then a progress bar over the chunks, then the dataset it stored
    (or why not). Outputs: the line, the Data tab's versions table (once stored), the timer (stops at the end)."""
    from sft_core import jobs
    if not job_id:
        return "", gr.skip(), gr.update(active=False)
    job = jobs.job_row(job_id, STUDIO.store)
    p = jobs.progress_of(job)
    if job["status"] not in jobs.FINAL:
        line = jobs.describe(job, STUDIO.store)
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


# What a passage's score is, per retriever (sft_core/retrieval.py KnowledgeBase.search): (short name, what it means).
SCORE_WORDS = {
    "hybrid": ("fused rank score", "hybrid score: reciprocal-rank fusion, 1/(k + rank) summed over the keyword (BM25) "
               "and the meaning (embedding) rankings; higher is better, the most is 2/(k + 1) for a passage both "
               "rank first"),
    "bm25": ("BM25 score", "BM25 score: keyword match, weighted by how rare each word is; higher is better, "
             "no fixed top"),
    "dense": ("cosine similarity", "cosine similarity of the question's and the passage's embeddings: -1 to 1, "
              "higher is better"),
    "rerank": ("reranker score", "the cross-encoder reranker's score for the question and passage together; "
               "higher is better"),
}


def _score_text(score: float, mode: str, rrf_k: int) -> str:
    """The score in words: for hybrid search against its most (both rankings put the passage first)."""
    name = SCORE_WORDS.get(mode, SCORE_WORDS["hybrid"])[0]
    if mode == "hybrid":
        return f"{name} {score:.3f} (most {2 / (rrf_k + 1):.3f})"
    return f"{name} {score:.3f}" if mode != "bm25" else f"{name} {score:.2f}"


HIGHLIGHT_SKIP = {"the", "and", "for", "with", "that", "this", "from", "what", "which", "when", "where", "who", "why",
                  "how", "does", "are", "was", "were", "you", "your", "can", "into", "about", "not", "any", "all"}


def _highlight(text: str, query: str | None) -> str:
    """HTML-escaped text with the query's words (3+ letters) marked."""
    import html
    words = sorted({w for w in re.findall(r"\w{3,}", query or "") if w.lower() not in HIGHLIGHT_SKIP},
                   key=len, reverse=True)
    out = html.escape(text)
    if words:
        pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(html.escape(w)) for w in words) + r")(?!\w)", re.I)
        out = pattern.sub(r"<mark>\1</mark>", out)
    return out.replace("\n", "<br>")


def _hits_markdown(hits, query: str | None = None, open_first: bool = False, mode: str = "hybrid",
                   rrf_k: int = 60) -> str:
    """Retrieved passages as collapsible chips (HTML <details>, one line each, so Markdown leaves it
    alone): the source file once (the document id only when it says more), the chunk's heading in small
    type, relevance and the score in words (``mode``: which retriever scored it), the position, then the
    passage as plain text with the query's words highlighted. Document text is escaped: it can neither
    format the page nor load anything."""
    import html
    hits = list(hits or [])
    if not hits:
        return ""
    get = (lambda h, k: h.get(k) if isinstance(h, dict) else getattr(h, k, None))
    top = max((float(get(h, "score") or 0.0) for h in hits), default=0.0)
    out = ['<div class="passages">']
    for i, h in enumerate(hits, 1):
        src = Path(str(get(h, "source") or "")).name
        doc = str(get(h, "doc_id") or "")
        label = src if doc in ("", src, Path(src).stem) else f"{src} · {doc}"
        score = float(get(h, "score") or 0.0)
        rel = f"relevance {score / top:.0%}" if top > 0 else "relevance n/a"
        title = str(get(h, "title") or "").strip().lstrip("#").strip()
        head = f' <span class="passage-title">{html.escape(title[:120])}</span>' if title and title != label else ""
        help_ = f"relevance: this passage's score as a share of the best passage's. {SCORE_WORDS.get(mode, SCORE_WORDS['hybrid'])[1]}"
        text = str(get(h, "text") or "")
        text = text if len(text) < 700 else text[:700] + " …"
        out.append(f'<details class="passage"{" open" if open_first and i == 1 else ""}><summary>'
                   f'<span class="passage-n">{i}</span> <span class="passage-src">{html.escape(label)}</span>{head} '
                   f'<span class="passage-rel" title="{html.escape(help_)}">{rel} · '
                   f'{html.escape(_score_text(score, mode, rrf_k))}</span>'
                   f'</summary><div class="passage-pos">{html.escape(str(get(h, "position") or ""))}</div>'
                   f'<div class="passage-text">{_highlight(text, query)}</div></details>')
    out.append("</div>")
    return "".join(out)


# ------------------------------------------------------------------------------------------------
# Train
# ------------------------------------------------------------------------------------------------
def _train_config_cls():
    from sft_core.config import TrainConfig
    return TrainConfig


TRAIN_FORM_SKIP = ("dataset", "dataset_version", "base_model")
# TrainConfig fields shown only in raft mode (the Train tab's RAFT box); in sft mode they are not sent
RAFT_FIELDS = ("kb", "raft_distractors", "raft_oracle_drop", "raft_cite", "raft_context_tokens")
# what a preset leaves alone: the run's name, how it is trained and the RAFT choices (raft_context_tokens, paired
# with max_length, follows the preset)
PRESET_KEEPS = ("run_name", "mode", "kb", "raft_distractors", "raft_oracle_drop", "raft_cite")


def train_form_fields() -> list[dict]:
    return [f for f in fields_for_form(_train_config_cls()) if f["name"] not in TRAIN_FORM_SKIP]


@ui_errors
def train_start(dataset, base_model, is_admin, *values):
    from sft_core import jobs
    admin_required(is_admin)
    if not dataset:
        raise StudioError("choose a dataset", "dataset")
    overrides = {f["name"]: (v if v not in ("", None) else None) for f, v in zip(train_form_fields(), values)}
    if overrides.get("mode") != "raft":  # the RAFT box is hidden: what it still holds is not this run's
        overrides.update(dict.fromkeys(RAFT_FIELDS))
    overrides.update(dataset=dataset, base_model=base_model or STUDIO.settings.base_model)
    cfg = load_config(_train_config_cls(), overrides=overrides)
    run_id = jobs.submit_train(cfg, ws=STUDIO.ws, store=STUDIO.store)
    return f"Queued run **{run_id}**.", gr.update(choices=all_runs(), value=run_id)


def _pref_config_cls():
    from sft_core.config import PreferenceConfig
    return PreferenceConfig


# PreferenceConfig fields the preference form takes from its own dropdowns (dataset, starting run), or leaves to
# them (the base model is the starting run's own; the latest dataset version)
PREF_FORM_SKIP = ("dataset", "dataset_version", "from_run", "base_model")


def pref_form_fields() -> list[dict]:
    return [f for f in fields_for_form(_pref_config_cls()) if f["name"] not in PREF_FORM_SKIP]


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
    run_id = pref_train.submit_pref_run(cfg, STUDIO.ws, STUDIO.store)
    start = f"SFT run **{from_run}**" if from_run else "the base model"
    return (f"Queued preference run **{run_id}** on **{dataset}**, starting from {start}. "
            f"When it has finished, evaluate it as system `sft:{run_id}`."), gr.update(choices=all_runs(), value=run_id)


def train_mode(mode):
    """The Train tab's mode: the SFT form and its Start button, or the preference form."""
    pref = mode == PREF_MODE
    return gr.update(visible=not pref), gr.update(visible=pref), gr.update(visible=not pref)


def run_lineage(run_id: str, config: dict) -> str:
    """A preference run's lineage in one line (base → SFT run → preference dataset (its campaign or eval) →
    this run); empty for an SFT run."""
    from sft_core import pref_train
    if config.get("mode") != pref_train.MODE:
        return ""
    steps = pref_train.lineage_of_run(run_id, STUDIO.ws, STUDIO.store)
    return "**Lineage:** " + safe_markdown(pref_train.format_lineage(steps))


@ui_errors
def train_cancel(run_id, is_admin):
    from sft_core import jobs
    admin_required(is_admin)
    if not run_id:
        raise StudioError("choose a run", "run")
    jobs.cancel(run_id, ws=STUDIO.ws, store=STUDIO.store)
    return f"Cancel requested for **{run_id}**."


@ui_errors
def train_resume(run_id, is_admin):
    from sft_core import jobs
    admin_required(is_admin)
    if not run_id:
        raise StudioError("choose a run", "run")
    jobs.resume(run_id, ws=STUDIO.ws, store=STUDIO.store)
    return f"Resume queued for **{run_id}**."


@ui_errors
def run_delete_ask(run_id, is_admin):
    admin_required(is_admin)
    if not run_id:
        raise StudioError("choose a run", "run")
    run = run_rows.get(STUDIO.store, run_id)
    if run is None:
        raise StudioError(f"unknown run {run_id!r}", "run")
    return _confirm(True, f"Delete run **{run_id}** ({run['status']}) with its checkpoints and adapter? "
                          "Evals keep their outputs; chat and new evals can no longer use it. This cannot be undone.")


@ui_errors
def run_delete(run_id, is_admin):
    admin_required(is_admin)
    if not run_id:
        raise StudioError("choose a run", "run")
    delete_run(run_id, STUDIO.ws, STUDIO.store)
    if STUDIO.engine_ready():  # a loaded adapter must not outlive its run
        try:
            if run_id in STUDIO.engine().list_adapters():
                STUDIO.engine().unload_adapter(run_id)
        except Exception:  # the engine refuses unknown names; nothing is loaded then
            pass
    return f"Deleted run **{run_id}**.", gr.update(choices=all_runs(), value=None), gr.update(visible=False)


def all_runs() -> list[str]:
    return run_rows.ids(STUDIO.store)


def jobs_table():
    rows = job_rows.recent(STUDIO.store, 50)
    for r in rows:
        r["created_at"] = time.strftime("%H:%M:%S", time.localtime(r["created_at"]))
    return pd.DataFrame(rows, columns=["id", "kind", "ref", "status", "created_at", "error"])


def runs_table():
    rows = run_rows.list_runs(STUDIO.store)
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
    p = guide.run_progress(status, events, jobs.describe(job, STUDIO.store) if job and status == "queued" else "")
    text = p["text"] if p["text"].startswith(status) else f"{status} · {p['text']}"
    line = f"**{run_id}** · {text}"
    if status in jobs.FINAL and job and job.get("ended_at") and job.get("started_at"):
        line += f" · took {guide._fmt_s(job['ended_at'] - job['started_at'])}"
    if status in ("queued", "running"):
        line += "\n\n" + guide.progress_bar_html(p["fraction"], p["phase"])
    return line


def _digest(value) -> str:
    """A fingerprint of an output value, to send a poll's outputs only when they changed."""
    import hashlib
    if isinstance(value, pd.DataFrame):
        raw = value.to_json(orient="split", date_format="iso")
    else:
        raw = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha1(raw.encode()).hexdigest()


def skip_unchanged(values: tuple, last: list | None) -> tuple:
    """(values with gr.skip() where the fingerprint equals ``last``'s, the new fingerprints). A poll
    that sends nothing new makes the browser redraw nothing (no flicker, no chart re-render)."""
    digests = [_digest(v) for v in values]
    last = last or [None] * len(values)
    return tuple(gr.skip() if d == o else v for v, d, o in zip(values, digests, last)), digests


def train_tick(run_id, last):
    """The Train tab's timer: train_poll's outputs, each only when it changed (plus the fingerprints)."""
    values, digests = skip_unchanged(train_poll(run_id), last)
    return (*values, digests)


def train_preset(name, mode="sft"):
    """The form's values under a preset in the chosen mode (the run name, the mode and the RAFT choices are
    kept; sft_core/guide.preset_values), and what the preset does."""
    values = guide.preset_values(name, mode or "sft")
    ups = [gr.skip() if f["name"] in PRESET_KEEPS else
           gr.update(value=",".join(map(str, values[f["name"]] or [])) if f["type"] == "list"
                     and not isinstance(values[f["name"]], str) else values[f["name"]]) for f in train_form_fields()]
    return (guide.PRESET_HELP.get(name, ""), *ups)


def train_raft_mode(mode, preset, kb):
    """TrainConfig.mode chosen: the RAFT box shows in raft mode only (with a knowledge base picked: the one the
    page works with, unless one is chosen), and max length and the RAFT prompt budget take the preset's values
    for that mode (a RAFT prompt needs room for its passages). Outputs: RAFT box, kb, max_length,
    raft_context_tokens."""
    raft = mode == "raft"
    values = guide.preset_values(preset if preset in guide.TRAIN_PRESETS else guide.DEFAULT_PRESET, mode or "sft")
    kbs = kb_choices()
    pick_kb = guide.choose(kb, kbs, guide.default_selection(STUDIO.ws, STUDIO.store)["kb"]) if raft else kb
    return (gr.update(visible=raft), gr.update(choices=kbs, value=pick_kb), gr.update(value=values["max_length"]),
            gr.update(value=values["raft_context_tokens"]))


def train_poll(run_id):
    """Progress, the loss / learning-rate / throughput charts and the tables, from the store and
    events.jsonl (survives reloads). Outputs: progress, loss, jobs, runs, learning rate, tokens/s."""
    from sft_core.curves import training_curves
    from sft_core.workspace import read_jsonl
    empty = training_curves([])
    if not run_id:
        return "_no run selected_", empty["loss"], jobs_table(), runs_table(), empty["lr"], empty["speed"]
    run = run_rows.get(STUDIO.store, run_id)
    if run is None:
        return f"unknown run {run_id}", empty["loss"], jobs_table(), runs_table(), empty["lr"], empty["speed"]
    events = read_jsonl(Path(run["path"]) / "events.jsonl")
    curves = training_curves(events)
    job = job_rows.latest(STUDIO.store, run_id) or {}
    status = job.get("status") or run["status"]
    line = _run_line(run_id, status, events, job)
    if job.get("error"):
        line += f"\n\n❌ {job['error']}"
    lineage = run_lineage(run_id, json.loads(run.get("config") or "{}") if isinstance(run.get("config"), str) else {})
    if lineage:
        line += "\n\n" + lineage
    return line, curves["loss"], jobs_table(), runs_table(), curves["lr"], curves["speed"]


# ------------------------------------------------------------------------------------------------
# Chat
# ------------------------------------------------------------------------------------------------
def _system_messages(system: str, message: str, kb: str | None):
    """Messages + adapter + passages for one chat system."""
    from evals import systems as evsys
    return evsys.chat_request(system, message, kb=kb, ws=STUDIO.ws, store=STUDIO.store, tokenizer=_gen_tokenizer())


@functools.lru_cache(maxsize=1)
def _gen_tokenizer():
    """The generator's tokenizer (the RAG context budget is counted in its tokens)."""
    from sft_core import models
    return models.load_tokenizer(models.resolve_model(STUDIO.settings.base_model, STUDIO.ws))


# How often a streaming chat pushes its text to the browser: 4 updates a second reads as live, and
# with many visitors each update (four chat histories, serialised and diffed by Gradio) costs server
# CPU that the engine on a small machine needs.
CHAT_UPDATE_S = 0.25


@ui_errors
async def chat_send(message, s1, s2, s3, s4, kb, temperature, max_new_tokens, is_admin, h1, h2, h3, h4):
    """Stream up to four systems' answers side by side.

    An async generator on purpose: Gradio runs a sync generator's every step in a worker thread, and with
    many visitors those thread hops (each waiting for the GIL and a core the engine is using) were most of
    the latency the app added on top of the engine. The engine's blocking streams run in threads of their
    own and hand their text to the event loop through an asyncio queue."""
    chat_allowed(is_admin)
    if not (message or "").strip():
        raise StudioError("type a message", "message")
    decoding = load_config(DecodingConfig, overrides={"temperature": temperature, "max_new_tokens": max_new_tokens})
    engine = STUDIO.engine()
    chosen = [s1, s2, s3, s4]
    hists = [list(h or []) for h in (h1, h2, h3, h4)]
    passages = [""] * 4
    infos: list[dict] = [{} for _ in range(4)]  # each engine fills its pane's at the stream's end
    failed = [False] * 4
    raw = [""] * 4  # the model's text; the chat shows safe_markdown(raw): no remote image is ever fetched
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def put(item) -> None:
        loop.call_soon_threadsafe(q.put_nowait, item)

    def worker(i: int, system: str):
        try:
            req = _system_messages(system, message, kb or None)
            if req.get("passages"):
                passages[i] = _hits_markdown(req["passages"], message)
            for delta in engine.chat(req["messages"], adapter=req.get("adapter"), decoding=decoding, info=infos[i]):
                put((i, delta))
        except StudioError as e:
            failed[i] = True
            put((i, f"\n⚠️ {e}"))
        except Exception as e:  # engine trouble: show it in that column
            failed[i] = True
            put((i, f"\n⚠️ {type(e).__name__}: {e}"))
        finally:
            put((i, None))

    live = []
    for i, system in enumerate(chosen):
        if system:
            hists[i] = hists[i] + [{"role": "user", "content": safe_markdown(message)},
                                   {"role": "assistant", "content": ""}]
            threading.Thread(target=worker, args=(i, system), daemon=True).start()
            live.append(i)
    pending = set(live)
    # the previous answers' lines go; a pane without a system keeps nothing
    yield (*hists, *passages, *("_answering…_" if i in live else "" for i in range(4)))
    last = time.monotonic()
    changed: set[int] = set()
    while pending:
        i, delta = await q.get()
        if delta is None:
            pending.discard(i)
        else:
            raw[i] += delta
            hists[i][-1]["content"] = safe_markdown(raw[i])
            changed.add(i)
        if pending and changed and time.monotonic() - last > CHAT_UPDATE_S:
            last = time.monotonic()
            # only the panes that changed: Gradio postprocesses and diffs every output it is given, and on a
            # small CPU that server work competes with the engine for the cores
            yield (*(hists[k] if k in changed else gr.skip() for k in range(4)), *(gr.skip(),) * 8)
            changed.clear()
    yield (*hists, *passages, *(answer_info(infos[i], decoding.max_new_tokens) if i in live and not failed[i] else ""
                                for i in range(4)))


def answer_info(info: dict, max_new_tokens: int) -> str:
    """The line under an answer: how long it took and how many tokens it has, and a badge when the
    engine cut it at the token limit (finish_reason "length"). Empty when the engine reported nothing."""
    if not info:
        return ""
    parts = []
    if info.get("latency_s") is not None:
        parts.append(f"{info['latency_s']:.1f} s")
    n = info.get("completion_tokens")
    if n is not None:
        parts.append(f"{n} token{'s' if n != 1 else ''}")
    line = " · ".join(parts)
    if info.get("finish_reason") == "length":
        badge = (f'<span class="chat-truncated" title="the answer reached Max new tokens ({max_new_tokens}) and was '
                 f'cut there: raise the limit for the rest">⚠ truncated at {n if n is not None else max_new_tokens} '
                 'tokens</span>')
        line = f"{line} · {badge}" if line else badge
    return f'<span class="chat-info">{line}</span>' if line else ""


# ------------------------------------------------------------------------------------------------
# Evaluate
# ------------------------------------------------------------------------------------------------
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
                                 judge=bool(judge), base_model=STUDIO.settings.base_model, ws=STUDIO.ws,
                                 store=STUDIO.store)
    runner.submit_eval(eval_id, STUDIO.ws, STUDIO.store)  # a worker process runs it; it survives this app
    return f"Queued eval **{eval_id}**.", gr.update(choices=eval_choices(), value=eval_id)


@ui_errors
def eval_cancel(eval_id, is_admin):
    from sft_core import jobs
    admin_required(is_admin)
    if not eval_id:
        raise StudioError("choose an eval", "eval")
    state = jobs.cancel(eval_id, STUDIO.ws, STUDIO.store)
    return f"Eval **{eval_id}**: {'cancelled' if state == 'cancelled' else 'cancel requested'} (answers so far are kept)."


@ui_errors
def eval_resume(eval_id, is_admin):
    from evals import runner
    admin_required(is_admin)
    if not eval_id:
        raise StudioError("choose an eval", "eval")
    runner.submit_eval(eval_id, STUDIO.ws, STUDIO.store)
    return f"Eval **{eval_id}** queued again: it continues with the answers still missing."


def _eval_job_line(eval_id, eval_status: str | None = None) -> str:
    """The eval job's line: while it runs, a progress bar with done/total, rate and ETA; once the job or
    the eval has finished, how long it took (an ETA of 0 s says nothing after the fact). Nothing in it
    changes between polls unless the job moved, so the timer has nothing to redraw."""
    from sft_core import jobs
    job = jobs.latest_job(eval_id, STUDIO.store)
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
    line = jobs.describe(job, STUDIO.store)
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
    st = runner.eval_status(eval_id, ws=STUDIO.ws, store=STUDIO.store)
    summary = st.get("summary", "")
    line = _eval_job_line(eval_id, st.get("status"))
    if line:
        summary += f"\n\n{line}"
    scores = report.eval_scores(eval_id, ws=STUDIO.ws, store=STUDIO.store)
    cols, rows = report.score_table(scores)
    table, card = pd.DataFrame(rows, columns=cols), report.card_markdown(scores)
    if not admin_ok(is_admin):
        return summary + "\n\n" + BLIND_NOTE, table, no_examples, None, card
    short = report.short_names(sorted({e["system"] for e in st.get("examples") or []}))
    examples = pd.DataFrame([{**e, "system": short[e["system"]]} for e in st.get("examples") or []],
                            columns=no_examples.columns)
    rep = st.get("report_html")
    staged = STUDIO.stage_download(rep) if rep and Path(rep).exists() else None
    if staged:  # the staged copy's unguessable folder is the link's key (make_app serves it as a page)
        summary += (f'\n\n<a href="report/{Path(staged).parent.name}" target="_blank" rel="noopener" '
                    f'id="eval-open-report">Open the decision report ↗</a>')
    return summary, table, examples, staged, card


def eval_tick(eval_id, is_admin, last):
    """The Evaluate tab's timer: eval_poll's outputs, each only when it changed (plus the fingerprints),
    so a finished eval's card, table and report are not redrawn every 3 s."""
    values, digests = skip_unchanged(eval_poll(eval_id, is_admin), last)
    return (*values, digests)


# ------------------------------------------------------------------------------------------------
# Rate and Results
# ------------------------------------------------------------------------------------------------
def _hf_oauth_available() -> bool:
    """Hugging Face sign-in is an identity only on a real Space with OAuth configured. Elsewhere
    Gradio mocks the login with the server owner's account, so the app then shows no LoginButton
    (no OAuth routes, no session) and ignores any profile."""
    from gradio.utils import get_space
    if get_space() is None or not os.environ.get("OAUTH_CLIENT_ID"):
        return False
    try:
        import authlib  # noqa: F401  (gradio[oauth])
        import itsdangerous  # noqa: F401
    except ImportError:
        print("warning: OAuth is configured but gradio[oauth] is not installed: rating uses invites only", flush=True)
        return False
    return True


HF_OAUTH = _hf_oauth_available()
MOCK_OAUTH_SUB = "11111111111111111111111"  # gradio.oauth's mocked local profile


def _is_admin(is_admin) -> bool:
    return admin_ok(is_admin)


def _query_invite(request) -> str:
    """The ``invite`` query parameter of the page (the browser sends the page's query with each event)."""
    try:
        return (dict(request.query_params).get("invite") or "").strip() if request is not None else ""
    except Exception:  # noqa: BLE001 - no request (direct call)
        return ""


def _identify(campaign, invite, name, key, request=None, profile=None) -> tuple[str, str, str | None]:
    """(rater id, display name, open-rating key) for this caller; the id is always server-issued:
    an invite token, a Hugging Face account (on a Space), or a signed open-rating key. A typed name
    only names a new rater on an open campaign when the browser holds no valid key yet."""
    from evals import rating
    if not campaign:
        raise StudioError("choose a campaign", "campaign")
    camp = rating.get_campaign(campaign, ws=STUDIO.ws, store=STUDIO.store)
    token = (invite or "").strip() or _query_invite(request)
    if token:
        r = rating.invite_rater(token, ws=STUDIO.ws, store=STUDIO.store)
        if r is None:
            raise StudioError("this invite is not valid (mistyped or revoked): ask the organiser for a new link", "invite")
        if r["campaign_id"] != campaign:
            raise StudioError(f"your invite is for campaign {r['campaign_id']}, not {campaign}", "invite")
        return r["id"], r["name"], key
    if HF_OAUTH and profile is not None and profile.get("sub") != MOCK_OAUTH_SUB and getattr(profile, "username", ""):
        return rating.hf_rater(profile.username, profile.name, ws=STUDIO.ws, store=STUDIO.store), profile.name, key
    if camp["open_rating"]:
        r = rating.open_key_rater(key, ws=STUDIO.ws, store=STUDIO.store) if key else None
        if r is not None:
            return r["id"], r["name"], key
        if not (name or "").strip():
            raise StudioError("enter your name to rate", "rater")
        rid, key = rating.open_rater(name, ws=STUDIO.ws, store=STUDIO.store)
        return rid, name.strip(), key
    raise StudioError("this campaign is by invitation only: open the invite link the organiser sent you"
                      + (", or sign in with Hugging Face" if HF_OAUTH else ""), "invite")


@ui_errors
def rate_next(campaign, invite, name, key, request: gr.Request = None, profile: gr.OAuthProfile | None = None):
    """The next blind task for the caller: (task id [session state], prompt, A, B, progress, key)."""
    from evals import rating
    rater, display, key = _identify(campaign, invite, name, key, request, profile)
    return _show_task(rating.next_task(campaign, rater, ws=STUDIO.ws, store=STUDIO.store), display, key)


VOTE_WORDS = {"left": "A is better", "right": "B is better", "tie": "a tie", "both_bad": "both bad"}


def _show_task(task: dict | None, display: str, key, note: str = ""):
    """(task id, prompt, A, B, progress, key) for a task payload of evals.rating (None: all done)."""
    who = f"Rating as **{safe_markdown(display)}**"
    if task is None:
        return None, "🎉 Nothing left for you to rate in this campaign. Thank you!", "", "", who, key
    prompt = f"### Prompt\n\n{safe_markdown(task['prompt'])}"  # dataset and model text load nothing remote
    if task.get("reference"):
        prompt += f"\n\n**Reference answer:** {safe_markdown(task['reference'])}"
    prog = task.get("progress") or {}
    position = prog.get("done", 0) + (0 if note else 1)  # a vote being changed is one of those done
    progress = (f"{who} · task {position} of {prog.get('total', '?')} · {prog.get('done', 0)} rated · "
                f"{prog.get('remaining', '?')} left" + note)
    return task["task_id"], prompt, safe_markdown(task["left"]), safe_markdown(task["right"]), progress, key


@ui_errors
def rate_vote(campaign, invite, name, key, task_id, choice, comment, revise=None, request: gr.Request = None,
              profile: gr.OAuthProfile | None = None):
    """Record the vote (or, after Undo, replace the rater's last one) and show the next task, with a
    confirmation and the Undo button. Outputs: the task outputs, comment, confirmation, Undo, revise."""
    from evals import rating
    rater, display, key = _identify(campaign, invite, name, key, request, profile)
    if not task_id:
        raise StudioError("no task on screen: press Next", "task")
    changed = bool(revise) and revise == task_id
    if changed:
        rating.change_vote(campaign, task_id, rater, choice, comment or "", ws=STUDIO.ws, store=STUDIO.store)
    else:
        rating.vote(campaign, task_id, rater, choice, comment or "", ws=STUDIO.ws, store=STUDIO.store)
    saved = f"✓ {'Vote changed' if changed else 'Saved'}: **{VOTE_WORDS[choice]}**."
    # only where the campaign allows it, and only for the task this rater has just voted on (evals.rating)
    shown = rating.reveal(campaign, task_id, rater, ws=STUDIO.ws, store=STUDIO.store)
    if shown:
        saved += (f" A was **{safe_markdown(shown['left'])}**, B was **{safe_markdown(shown['right'])}** "
                  "(this campaign shows the systems after each vote).")
    task = rating.next_task(campaign, rater, ws=STUDIO.ws, store=STUDIO.store)
    # a revealed vote stays as cast (rating.change_vote refuses it): no Undo then
    return (*_show_task(task, display, key), "", saved, gr.update(visible=not shown), None)


@ui_errors
def rate_undo(campaign, invite, name, key, request: gr.Request = None, profile: gr.OAuthProfile | None = None):
    """Bring the caller's own last vote back on screen; their next choice replaces it (the old vote
    stays in the vote history). Same outputs as rate_vote."""
    from evals import rating
    rater, display, key = _identify(campaign, invite, name, key, request, profile)
    if rating.get_campaign(campaign, ws=STUDIO.ws, store=STUDIO.store)["reveal_after_vote"]:
        raise StudioError("this campaign shows the systems after each vote, so votes cannot be changed", "vote")
    last = rating.last_vote(campaign, rater, ws=STUDIO.ws, store=STUDIO.store)
    if last is None:
        raise StudioError("you have no vote in this campaign to undo", "vote")
    shown = _show_task(last, display, key, note=" · changing your last vote")
    saved = (f"↩ Your vote was **{VOTE_WORDS[last['choice']]}**: choose again (buttons or keys 1–4) to replace it, "
             "or press Next to keep it.")
    return (*shown, last["comment"], saved, gr.update(visible=False), last["task_id"])


@ui_errors
def rate_guidelines(campaign):
    """What the campaign's raters should read before voting (Markdown; empty when it has none)."""
    from evals import rating
    if not campaign:
        return ""
    text = rating.get_campaign(campaign, ws=STUDIO.ws, store=STUDIO.store)["guidelines"]
    return f"**Guidelines for raters**\n\n{safe_markdown(text)}" if text else ""


@ui_errors
def rate_link(request: gr.Request):
    """Page load: an ``?invite=`` link fills the invite box, picks its campaign and opens the Rate tab."""
    from evals import rating
    token = _query_invite(request)
    if not token:
        return gr.update(), gr.update(), gr.update(), gr.update()
    r = rating.invite_rater(token, ws=STUDIO.ws, store=STUDIO.store)
    if r is None:
        return token, gr.update(), "⚠️ This invite link is not valid: ask the organiser for a new one.", \
            gr.Tabs(selected="rate")
    return token, gr.update(value=r["campaign_id"]), f"Invited as **{safe_markdown(r['name'])}**: press **Next** to start.", \
        gr.Tabs(selected="rate")


@ui_errors
def create_campaign(eval_id, systems, open_rating, guidelines, reveal_after_vote, is_admin):
    from evals import rating
    admin_required(is_admin)
    if not eval_id:
        raise StudioError("choose an eval", "eval")
    systems = [s for s in (systems or [])]
    cid = rating.create_campaign(eval_id, systems or None, ws=STUDIO.ws, store=STUDIO.store,
                                 open_rating=bool(open_rating), guidelines=guidelines or "",
                                 reveal_after_vote=bool(reveal_after_vote))
    how = ("anyone may join under a name of their choice" if open_rating else
           "raters need an invite link (Results tab → Campaign admin)")
    if reveal_after_vote:
        how += "; each rater sees which systems answered once they have voted on a task"
    return f"Campaign **{cid}** created: {how}.", gr.update(choices=campaign_choices(), value=cid), \
        gr.update(choices=campaign_choices(), value=cid)


@ui_errors
def eval_systems(eval_id):
    if not eval_id:
        return gr.update(choices=[], value=[])
    row = eval_rows.get(STUDIO.store, eval_id)
    systems = json.loads(row["systems"]) if row else []
    return gr.update(choices=systems, value=systems)


RESULTS_HIDDEN = ("🔒 The results of this campaign are hidden until the admin publishes them or closes the "
                  "campaign, so raters stay blind.")


@ui_errors
def results_show(campaign, is_admin=False):
    """Summary (votes, agreement in words), leaderboard and win rates (row beats column); for anyone
    but the admin only once published or closed (a vote followed by a look at the counts would name
    the system behind each side). Runs on campaign change, Refresh, tab select and after each vote."""
    from evals import leaderboard, rating
    if not campaign:
        return ("_choose a campaign_", pd.DataFrame(columns=leaderboard.board_table({})[0]),
                pd.DataFrame(columns=leaderboard.win_rate_table({})[0]))
    if not _is_admin(is_admin) and not rating.results_visible(campaign, ws=STUDIO.ws, store=STUDIO.store):
        hidden = pd.DataFrame(columns=["hidden until the results are published"])
        return RESULTS_HIDDEN, hidden, hidden
    res = rating.results(campaign, ws=STUDIO.ws, store=STUDIO.store)
    board, winrate = leaderboard.board_table(res), leaderboard.win_rate_table(res)
    return (leaderboard.summary_markdown(res), pd.DataFrame(board[1], columns=board[0]),
            pd.DataFrame(winrate[1], columns=winrate[0]))


@ui_errors
def results_export(campaign, fmt, is_admin):
    from evals import rating
    admin_required(is_admin)
    if not campaign:
        raise StudioError("choose a campaign", "campaign")
    out = STUDIO.ws.root / "exports" / f"{campaign}-{fmt}.{'jsonl' if fmt in ('jsonl', 'dpo') else 'csv'}"
    rating.export_votes(campaign, fmt, out, ws=STUDIO.ws, store=STUDIO.store)
    return STUDIO.stage_download(out)


@ui_errors
def results_train_on_votes(campaign, from_run, is_admin):
    """Results tab → "Train on these votes": the campaign's decisive votes become a preference dataset
    version, and a preference run is queued from the campaign's SFT run (or the run chosen). A campaign
    with nothing to learn from (no decisive votes), or a run that cannot be started from, is answered in
    the message line; nothing is stored then. Outputs: message, the Train tab's run, its mode."""
    from sft_core import pref_train, preference
    admin_required(is_admin)
    if not campaign:
        raise StudioError("choose a campaign", "campaign")
    try:
        dv, run_id = pref_train.train_on_votes(campaign, from_run or None, ws=STUDIO.ws, store=STUDIO.store)
    except StudioError as e:
        return f"❌ Not started: {safe_markdown(str(e))}", gr.skip()
    rep = preference.report(dv.name, dv.version, STUDIO.ws, STUDIO.store)
    counts = rep.get("splits") or {}
    pairs = " · ".join(f"{k} {v}" for k, v in counts.items()) if isinstance(counts, dict) else ""
    lineage = pref_train.format_lineage(pref_train.lineage_of_run(run_id, STUDIO.ws, STUDIO.store))
    return (f"✅ Preference dataset **{dv.name}@{dv.version}**" + (f" ({pairs} pairs)" if pairs else "")
            + f" built from the votes; preference run **{run_id}** queued. Follow it on the **Train** tab.\n\n"
            + f"**Lineage:** {safe_markdown(lineage)}"), gr.update(choices=all_runs(), value=run_id)


def _base_url(request) -> str:
    """Where the caller reached the app (for invite links): the page's address without its query
    (the Referer of the browser's call, so a path prefix behind a proxy stays); '' makes them relative."""
    from urllib.parse import urlsplit
    try:
        h = {k.lower(): v for k, v in dict(request.headers).items()}
    except Exception:  # noqa: BLE001 - no request
        return ""
    page = urlsplit(h.get("referer", ""))
    if page.scheme in ("http", "https") and page.netloc:
        return f"{page.scheme}://{page.netloc}{page.path}".rstrip("/")
    if h.get("origin", "").startswith(("http://", "https://")):
        return h["origin"].rstrip("/")
    host = h.get("x-forwarded-host") or h.get("host")
    return f"{h.get('x-forwarded-proto', 'http')}://{host}" if host else ""


@ui_errors
def campaign_invite(campaign, names, is_admin, request: gr.Request = None):
    """Admin: one secret invite link per name (shown once; the database keeps only their sha256)."""
    from evals import rating
    admin_required(is_admin)
    if not campaign:
        raise StudioError("choose a campaign", "campaign")
    names = [n.strip() for n in (names or "").replace(",", "\n").splitlines() if n.strip()]
    invites = rating.create_invites(campaign, names, ws=STUDIO.ws, store=STUDIO.store)
    base = _base_url(request)
    lines = [f"Invite links for **{campaign}** (shown once; send each rater their own):", ""]
    lines += [f"- {safe_markdown(i['name'])}: `{base}/?invite={i['token']}`" for i in invites]
    return "\n".join(lines)


@ui_errors
def campaign_publish(campaign, is_admin):
    from evals import rating
    admin_required(is_admin)
    if not campaign:
        raise StudioError("choose a campaign", "campaign")
    rating.publish(campaign, ws=STUDIO.ws, store=STUDIO.store)
    return f"Results of **{campaign}** published: everyone sees them now, and the rating is over."


@ui_errors
def campaign_close(campaign, is_admin):
    from evals import rating
    admin_required(is_admin)
    if not campaign:
        raise StudioError("choose a campaign", "campaign")
    rating.close(campaign, ws=STUDIO.ws, store=STUDIO.store)
    return f"Campaign **{campaign}** closed: no more votes; raters now see the results."


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------
RATE_JS = """
() => {
  // Rate tab shortcuts, wherever the focus is except where the rater is typing: 1 = A, 2 = B,
  // 3 = tie, 4 = both bad. Listening on window in the capture phase, before any component can
  // swallow the key; a closed dropdown counts as not typing (picking a campaign leaves the focus
  // there). A held key (auto-repeat) and a key pressed while the last vote is still on its way
  // (the progress line has not changed yet) do nothing, so no vote lands on an unseen task.
  const ids = {'1': 'vote-left', '2': 'vote-right', '3': 'vote-tie', '4': 'vote-bad'};
  const TEXT = ['text', 'search', 'password', 'email', 'number', 'url', 'tel'];
  const typing = (el) => {
    if (!el) return false;
    if (el.isContentEditable) return true;
    const tag = (el.tagName || '').toLowerCase();
    if (tag === 'textarea') return true;
    if (tag !== 'input') return false;
    if (el.getAttribute('role') === 'combobox') return el.getAttribute('aria-expanded') === 'true';
    return TEXT.includes((el.getAttribute('type') || 'text').toLowerCase());
  };
  let pending = null, since = 0;
  window.addEventListener('keydown', (e) => {
    const id = ids[e.key];
    if (!id || e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
    const target = (e.composedPath && e.composedPath()[0]) || e.target;
    if (typing(target) || typing(document.activeElement)) return;
    const btn = document.getElementById(id);
    if (!btn || btn.offsetParent === null || btn.disabled) return;
    e.preventDefault();
    e.stopPropagation();
    if (e.repeat) return;
    const progress = (document.getElementById('rate-progress') || {}).innerText || '';
    if (pending === progress && Date.now() - since < 4000) return;
    pending = progress;
    since = Date.now();
    btn.click();
  }, true);
}
"""


# The Train tab's Advanced fields: people's words for the TrainConfig names, and their sections.
TRAIN_LABELS = {
    "run_name": "Run name", "lora_r": "LoRA rank (r)", "lora_alpha": "LoRA alpha", "lora_dropout": "LoRA dropout",
    "target_modules": "Target modules", "use_rslora": "Rank-stabilised scaling (rsLoRA)",
    "learning_rate": "Learning rate", "lr_scheduler": "Learning-rate schedule", "warmup_ratio": "Warm-up share",
    "epochs": "Epochs", "max_steps": "Max steps (0 = epochs)", "batch_size": "Batch size",
    "grad_accum": "Gradient accumulation", "max_length": "Max length (tokens)", "packing": "Packing",
    "group_by_length": "Group by length", "completion_only_loss": "Loss on the answer only", "seed": "Seed",
    "eval_steps": "Evaluate every N steps", "save_steps": "Save steps (checkpoint interval)",
    "early_stopping_patience": "Early-stopping patience", "logging_steps": "Log every N steps",
    "load_in_4bit": "4-bit base model (QLoRA)", "gradient_checkpointing": "Gradient checkpointing",
    "num_gpus": "GPUs", "report_to": "Extra logger",
    # retrieval-aware fine-tuning (RAFT), shown in raft mode
    "mode": "Training prompts", "kb": "Knowledge base (the passages)", "raft_distractors": "Distractor passages",
    "raft_oracle_drop": "Share without the right passage", "raft_cite": "Answers cite their passage",
    "raft_context_tokens": "Passage budget (tokens)",
    # preference tuning (PreferenceConfig)
    "loss_type": "Preference loss", "beta": "Beta (distance from the reference)", "label_smoothing": "Label smoothing",
}
SFT_MODE, PREF_MODE = "SFT (instruction data)", "Preference (from votes)"
TRAIN_MODE_WORDS = {"sft": "Plain: each question as it is", "raft": "RAFT: each question with retrieved passages"}
RAFT_NOTE = ("**RAFT** (retrieval-aware fine-tuning): each training question comes with passages from the knowledge "
             "base — the one its answer is in plus distractors, and for a share of rows only distractors — built "
             "exactly as the `raft:RUN` system prompts at inference, so the adapter learns to use retrieved passages "
             "and to ignore the wrong ones. Best on a dataset generated from the same knowledge base (Knowledge tab).")
TRAIN_GROUPS = [
    ("Run", ["run_name", "seed"]),
    ("Length of training", ["epochs", "max_steps", "early_stopping_patience", "eval_steps"]),
    ("LoRA", ["lora_r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora"]),
    ("Optimiser", ["learning_rate", "lr_scheduler", "warmup_ratio"]),
    ("Batches", ["batch_size", "grad_accum", "max_length", "packing", "group_by_length", "completion_only_loss"]),
    ("Checkpoints and logs", ["save_steps", "logging_steps", "report_to"]),
    ("Hardware", ["load_in_4bit", "gradient_checkpointing", "num_gpus"]),
]


APP_CSS = """
/* the guided path: five numbered chips and the next action */
#guide { padding: 10px 12px; border: 1px solid var(--border-color-primary); border-radius: 10px; gap: 6px;
  background: var(--background-fill-secondary); }
#guide .guide-steps { display: flex; flex-wrap: wrap; gap: 6px; list-style: none; margin: 0; padding: 0; }
#guide .step { display: flex; align-items: center; gap: 6px; padding: 3px 10px 3px 3px; border-radius: 999px;
  border: 1px solid var(--border-color-primary); background: var(--background-fill-primary); max-width: 100%; }
#guide .step .num { display: inline-flex; align-items: center; justify-content: center; min-width: 22px; height: 22px;
  border-radius: 999px; font-weight: 600; font-size: 12px; background: var(--border-color-primary); }
#guide .step.done .num { background: #16a34a; color: #fff; }
#guide .step.running .num { background: #f59e0b; color: #fff; }
#guide .step.failed .num { background: #dc2626; color: #fff; }
#guide .step .name { font-weight: 600; }
#guide .step .detail { color: var(--body-text-color-subdued); font-size: 0.85em; max-width: 26em; overflow: hidden;
  text-overflow: ellipsis; white-space: nowrap; }
#guide .guide-next { margin: 0; font-size: 0.92em; }
#guide-actions { align-items: center; }
/* progress bars for background work */
.studio-progress { display: flex; align-items: center; gap: 10px; }
.studio-progress progress { flex: 1; max-width: 420px; height: 10px; accent-color: var(--color-accent); }
/* retrieved passages: collapsible chips */
.passages { display: flex; flex-direction: column; gap: 4px; }
.passages details { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 2px 8px; }
.passages summary { cursor: pointer; font-size: 0.88em; overflow-wrap: anywhere; }
.passages .passage-n { display: inline-block; min-width: 1.4em; font-weight: 600; }
.passages .passage-rel { color: var(--body-text-color-subdued); }
.passages .passage-title { font-size: 0.9em; font-weight: 600; }
.passages .passage-pos { color: var(--body-text-color-subdued); font-size: 0.8em; }
.passages .passage-text { font-size: 0.88em; max-height: 14em; overflow: auto; overflow-wrap: anywhere; }
.passages mark { padding: 0 1px; border-radius: 2px; }
/* chat: the composer stays in view; each pane is headed by its system */
#chat-composer { position: sticky; top: 0; z-index: 20; background: var(--background-fill-primary); }
/* Gradio's container clips with overflow: hidden, which makes it a scroll container and stops sticky;
   clip cuts the same overflow without being one */
.gradio-container { overflow: clip !important; }
.chat-pane-head { align-items: center; }
.chat-info { color: var(--body-text-color-subdued); font-size: 0.85em; }
.chat-truncated { color: #b45309; font-weight: 600; }
/* phone width: nothing wider than the screen; shorter chat panes */
@media (max-width: 640px) {
  #guide .step .detail { display: none; }
  #guide-actions { flex-direction: column; align-items: stretch; }
  #guide-actions > * { min-width: 0 !important; width: 100%; }
  #chat-bot-0, #chat-bot-1, #chat-bot-2, #chat-bot-3 { height: 240px !important; }
}
"""


def _form_component(f: dict, value=None, disabled: str | None = None, prefix: str = "train-opt",
                    labels: dict | None = None):
    """One config field as a form widget (value: the preset's, else the dataclass default); a field this
    machine cannot use is shown disabled, its reason in place of the help. A list with choices is a group
    of checkboxes; a text whose default has several lines (a template) a multi-line box."""
    label = (labels or TRAIN_LABELS).get(f["name"], f["name"].replace("_", " "))
    info = f"⛔ {disabled}" if disabled else f["help"]
    default = f["default"] if value is None else value
    kw = {"label": label, "info": info, "interactive": False if disabled else None,
          "elem_id": f"{prefix}-{f['name'].replace('_', '-')}"}
    if f.get("choices") and f["type"] == "list":
        return gr.CheckboxGroup(choices=f["choices"], value=list(default or []), **kw)
    if f.get("choices"):
        return gr.Dropdown(choices=f["choices"], value=default, **kw)
    if f["type"] == "bool":
        return gr.Checkbox(value=bool(default), **kw)
    if f["type"] in ("int", "float"):
        return gr.Number(value=default, precision=0 if f["type"] == "int" else None, **kw)
    if f["type"] == "list":
        return gr.Textbox(value=",".join(map(str, default or [])), **kw)
    text = "" if default is None else str(default)
    lines = min(14, text.count("\n") + 1)
    return gr.Textbox(value=text, lines=lines, max_lines=40 if lines > 1 else None, **kw)


def build_demo() -> gr.Blocks:
    from evals.leaderboard import METHOD_HELP
    from evals.report import card_markdown
    with gr.Blocks(title="SFT Studio") as demo:
        is_admin = gr.State(None)  # a signed admin token after login (admin_ok), never the password
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
        with gr.Accordion("Admin", open=False, visible=bool(STUDIO.settings.admin_password)):
            with gr.Row():
                pw = gr.Textbox(label="Admin password", type="password", elem_id="admin-password")
                login_btn = gr.Button("Log in", elem_id="admin-login")
            login_msg = gr.Markdown()
            # the password box is cleared by the same event: no copy of the password stays in the session
            login_btn.click(login, pw, [is_admin, login_msg, pw])

        with gr.Tabs(overflow_behavior="wrap", elem_id="main-tabs") as tabs:  # wrap: every tab reachable on a phone
            # -- Data ------------------------------------------------------------------------
            with gr.Tab("Data", id="data"):
                gr.Markdown("Your own question/answer pairs: a CSV or JSONL (also JSON, Parquet) in any common shape "
                            "(question/answer, prompt/completion, alpaca, chat messages, ShareGPT). Upload, check the "
                            "columns, **Check**, then **Save**. The example dataset **pydocs** is ready already.")
                with gr.Row():
                    d_file = gr.File(label="Dataset file", file_types=[".jsonl", ".json", ".csv", ".parquet"],
                                     elem_id="data-file")
                    with gr.Column():
                        d_fmt = gr.Dropdown(["auto", "alpaca", "prompt_completion", "messages", "sharegpt", "table"],
                                            value="auto", label="Format", elem_id="data-format",
                                            info="auto recognises the record formats; any other table uses the "
                                                 "columns chosen below")
                        d_cols = []
                        for i in range(0, len(MAPPING_ROLES), 2):
                            with gr.Row():
                                d_cols += [gr.Dropdown([NOT_MAPPED], value=NOT_MAPPED, label=label, min_width=160,
                                                       elem_id=f"data-col-{role}")
                                           for role, label in MAPPING_ROLES[i:i + 2]]
                        # the dropdowns as text: what data_check / data_import take (also over the API)
                        d_map = gr.Textbox(visible=False, elem_id="data-mapping")
                        d_name = gr.Textbox(label="Dataset name", elem_id="data-name")
                d_msg = gr.Markdown(elem_id="data-msg")
                d_preview = gr.Dataframe(label="First rows of the file", interactive=False, visible=False,
                                         wrap=True, max_height=260, elem_id="data-preview")
                with gr.Row():
                    d_check = gr.Button("Check", variant="primary", elem_id="data-check")
                    d_save = gr.Button("Save as dataset version", variant="primary", interactive=False,
                                       elem_id="data-save")
                d_report = gr.Markdown(elem_id="data-report")
                d_errors = gr.Dataframe(pd.DataFrame(columns=ERROR_COLUMNS),
                                        label="Row-level problems", interactive=False, elem_id="data-errors")
                d_table = gr.Dataframe(datasets_table, label="Dataset versions", interactive=False,
                                       elem_id="data-versions")
                with gr.Row(elem_id="data-delete-row"):
                    d_del_pick = gr.Dropdown(dataset_choices(), value=None, allow_custom_value=True, scale=3,
                                             label="Dataset to delete (all versions)", elem_id="data-delete-pick")
                    d_del = gr.Button("Delete dataset…", size="sm", scale=0, min_width=140, elem_id="data-delete")
                with gr.Row(visible=False, elem_id="data-delete-confirm") as d_del_row:
                    d_del_q = gr.Markdown(elem_id="data-delete-question")
                    d_del_yes = gr.Button("Yes, delete", variant="stop", elem_id="data-delete-yes")
                    d_del_no = gr.Button("Keep it", elem_id="data-delete-no")

            # -- Knowledge -------------------------------------------------------------------
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

            # -- Train -----------------------------------------------------------------------
            with gr.Tab("Train", id="train"):
                t_mode = gr.Radio([SFT_MODE, PREF_MODE], value=SFT_MODE, label="What to train", elem_id="train-mode",
                                  info="SFT: imitate a dataset's answers. Preference: learn from pairs of a better and "
                                       "a worse answer (votes of a campaign), starting from a finished SFT run")
                with gr.Column(elem_id="train-sft") as t_sft_box:
                    with gr.Row():
                        t_dataset = gr.Dropdown(dataset_choices(), allow_custom_value=True, label="Dataset", elem_id="train-dataset")
                        t_base = gr.Textbox(value=STUDIO.settings.base_model, label="Base model",
                                            info="embedded name, local model directory or hub id")
                    train_fields = train_form_fields()
                    by_name = {f["name"]: f for f in train_fields}
                    hw = guide.hardware_limits()
                    preset = guide.preset_values(guide.DEFAULT_PRESET)
                    t_fields = {}
                    mode_f = by_name["mode"]  # TrainConfig.mode: its choices, in people's words
                    t_fields["mode"] = gr.Radio([(TRAIN_MODE_WORDS.get(c, c), c) for c in mode_f["choices"]],
                                                value=mode_f["default"], label=TRAIN_LABELS["mode"],
                                                info=mode_f["help"], elem_id="train-opt-mode")
                    with gr.Column(visible=mode_f["default"] == "raft", elem_id="train-raft") as t_raft_box:
                        gr.Markdown(RAFT_NOTE, elem_id="train-raft-note")
                        with gr.Row():
                            kb_f = by_name["kb"]
                            t_fields["kb"] = gr.Dropdown(kb_choices(), value=None, allow_custom_value=True,
                                                         label=TRAIN_LABELS["kb"], info=kb_f["help"],
                                                         elem_id="train-opt-kb")
                            for n in ("raft_distractors", "raft_oracle_drop"):
                                t_fields[n] = _form_component(by_name[n], preset.get(n))
                        with gr.Row():
                            for n in ("raft_cite", "raft_context_tokens"):
                                t_fields[n] = _form_component(by_name[n], preset.get(n))
                    with gr.Row():
                        t_preset = gr.Radio(list(guide.TRAIN_PRESETS), value=guide.DEFAULT_PRESET, label="Preset",
                                            elem_id="train-preset", scale=2)
                        t_preset_help = gr.Markdown(guide.PRESET_HELP[guide.DEFAULT_PRESET], elem_id="train-preset-help")
                    gr.Markdown(hw["summary"], elem_id="train-hardware")
                    with gr.Accordion("Advanced: LoRA and training options", open=False, elem_id="train-advanced"):
                        groups = [names for _, names in TRAIN_GROUPS]
                        rest = [f["name"] for f in train_fields if f["name"] not in t_fields
                                and not any(f["name"] in g for g in groups)]
                        for title, names in [*TRAIN_GROUPS, ("Other", rest)]:
                            names = [n for n in names if n in by_name]
                            if not names:
                                continue
                            gr.Markdown(f"**{title}**")
                            for i in range(0, len(names), 3):
                                with gr.Row():
                                    for n in names[i:i + 3]:
                                        t_fields[n] = _form_component(by_name[n], preset.get(n, by_name[n]["default"]),
                                                                      hw["disabled"].get(n))
                    t_inputs = [t_fields[f["name"]] for f in train_fields]  # train_start takes them in field order
                with gr.Column(visible=False, elem_id="train-pref") as t_pref_box:
                    with gr.Row():
                        tp_dataset = gr.Dropdown(preference_dataset_choices(), value=None, allow_custom_value=True,
                                                 label="Preference dataset", elem_id="pref-dataset",
                                                 info="pairs built from a campaign's votes (Results tab → Train on "
                                                      "these votes) or with `sft-studio pref build`")
                        tp_from = gr.Dropdown(finished_runs(), value=None, allow_custom_value=True,
                                              label="Start from SFT run (empty: the base model)", elem_id="pref-from-run")
                    pref_fields = pref_form_fields()
                    tp_fields = {}
                    with gr.Accordion("Preference options (DPO by default)", open=False, elem_id="pref-advanced"):
                        for i in range(0, len(pref_fields), 3):
                            with gr.Row():
                                for f in pref_fields[i:i + 3]:
                                    tp_fields[f["name"]] = _form_component(f, prefix="pref-opt")
                    tp_inputs = [tp_fields[f["name"]] for f in pref_fields]  # pref_start takes them in field order
                    tp_start = gr.Button("Start preference run", variant="primary", elem_id="pref-start")
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

            # -- Chat ------------------------------------------------------------------------
            with gr.Tab("Chat", id="chat"):
                # the composer first (and sticky): it stays in view however long the answers grow
                with gr.Row(elem_id="chat-composer", equal_height=True):
                    c_msg = gr.Textbox(label="Message", placeholder="Ask something about your domain…", scale=5,
                                       max_lines=4, elem_id="chat-msg")
                    c_send = gr.Button("Send to all", variant="primary", scale=1, min_width=110, elem_id="chat-send")
                with gr.Row():
                    c_kb = gr.Dropdown(kb_choices(), allow_custom_value=True, value=EXAMPLE_NAME if EXAMPLE_NAME in kb_choices() else None,
                                       label="Knowledge base (for RAG)", elem_id="chat-kb")
                    c_temp = gr.Slider(0, 1.5, value=0.0, step=0.05, label="Temperature")
                    c_max = gr.Slider(16, 1024, value=128, step=16, label="Max new tokens", elem_id="chat-max")
                c_sys, c_heads, c_bots, c_pass, c_info = [], [], [], [], []
                first = ["prompt", "rag", None, None]
                for row in range(2):  # a 2 x 2 grid (one column on a phone)
                    with gr.Row(elem_classes=["chat-grid"]):
                        for i in (2 * row, 2 * row + 1):
                            with gr.Column(min_width=300, elem_classes=["chat-pane"]):
                                with gr.Row(elem_classes=["chat-pane-head"], equal_height=True):
                                    c_heads.append(gr.Markdown(chat_heads(*first)[i], elem_id=f"chat-head-{i}"))
                                    c_sys.append(gr.Dropdown(system_choices(), allow_custom_value=True, value=first[i],
                                                             label=f"System {i + 1}", show_label=False, container=False,
                                                             min_width=140, elem_id=f"chat-sys-{i}"))
                                c_bots.append(gr.Chatbot(label=f"System {i + 1}", show_label=False, height=320,
                                                         elem_id=f"chat-bot-{i}"))
                                c_info.append(gr.Markdown(elem_id=f"chat-info-{i}", elem_classes=["chat-info-line"]))
                                c_pass.append(gr.Markdown(elem_id=f"chat-passages-{i}"))

            # -- Evaluate --------------------------------------------------------------------
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

            # -- Rate ------------------------------------------------------------------------
            with gr.Tab("Rate", id="rate") as rate_tab:
                gr.Markdown("Blind pairwise rating: which answer is better, **A** or **B**? System names stay "
                            "hidden. Keys: **1** A is better · **2** B is better · **3** tie · **4** both bad "
                            "(anywhere on the page except while typing in a text box). Open the invite link you "
                            "were sent (open campaigns: pick a name; it sticks to this browser)."
                            + (" Or sign in with Hugging Face." if HF_OAUTH else ""))
                if HF_OAUTH:
                    gr.LoginButton()
                with gr.Row():
                    r_campaign = gr.Dropdown(campaign_choices(), allow_custom_value=True, label="Campaign", elem_id="rate-campaign")
                    r_invite = gr.Textbox(label="Invite code (filled in by your invite link)", type="password",
                                          elem_id="rate-invite")
                    r_rater = gr.Textbox(label="Your name (open campaigns)", elem_id="rate-rater")
                    r_next = gr.Button("Next", elem_id="rate-next")
                r_task = gr.State(None)
                r_revise = gr.State(None)  # after Undo: the task whose vote the next choice replaces
                # the signed key of an open-campaign rater, kept in this browser's localStorage
                r_key = gr.BrowserState(None, storage_key="sft-studio-rater-key", secret="sft-studio-rater")
                r_guide = gr.Markdown(elem_id="rate-guidelines")
                r_progress = gr.Markdown(elem_id="rate-progress")
                r_prompt = gr.Markdown(elem_id="rate-prompt")
                with gr.Row(equal_height=True):
                    with gr.Column():
                        gr.Markdown("### A", elem_id="rate-a-title")
                        r_left = gr.Markdown(elem_id="rate-left", container=True)
                    with gr.Column():
                        gr.Markdown("### B", elem_id="rate-b-title")
                        r_right = gr.Markdown(elem_id="rate-right", container=True)
                r_comment = gr.Textbox(label="Comment (optional)", max_lines=3, elem_id="rate-comment")
                with gr.Row():
                    vote_btns = {c: gr.Button(lbl, elem_id=eid) for c, lbl, eid in [
                        ("left", "A is better (1)", "vote-left"), ("right", "B is better (2)", "vote-right"),
                        ("tie", "Tie (3)", "vote-tie"), ("both_bad", "Both bad (4)", "vote-bad")]}
                with gr.Row():
                    r_saved = gr.Markdown(elem_id="rate-saved")
                    r_undo = gr.Button("Undo my last vote", visible=False, size="sm", elem_id="rate-undo")
                with gr.Accordion("New campaign (admin)", open=False):
                    with gr.Row():
                        rc_eval = gr.Dropdown(eval_choices(), allow_custom_value=True, label="From eval", elem_id="rate-new-eval")
                        rc_systems = gr.CheckboxGroup([], label="Systems")
                        rc_open = gr.Checkbox(False, label="Open rating: anyone joins under a name they pick "
                                              "(trusted rooms only; otherwise invite links)", elem_id="rate-new-open")
                        rc_create = gr.Button("Create campaign", elem_id="rate-create")
                    rc_reveal = gr.Checkbox(False, label="Show raters which systems were A and B after they "
                                            "vote (their vote can then not be changed)", elem_id="rate-new-reveal")
                    rc_guide = gr.Textbox(label="Guidelines for raters (optional, shown above every task)", lines=3,
                                          placeholder="e.g. Prefer the answer that is correct; length does not matter.",
                                          elem_id="rate-new-guidelines")
                    rc_msg = gr.Markdown()

            # -- Results ---------------------------------------------------------------------
            with gr.Tab("Results", id="results") as res_tab:
                with gr.Row():
                    res_campaign = gr.Dropdown(campaign_choices(), allow_custom_value=True, label="Campaign", elem_id="results-campaign")
                    res_refresh = gr.Button("Refresh", elem_id="results-refresh")
                res_summary = gr.Markdown(elem_id="results-summary")
                res_board = gr.Dataframe(label="Human leaderboard: rating (1000 = average; +400 = 10:1 odds) with 95% "
                                         "interval", interactive=False, elem_id="results-board")
                res_winrate = gr.Dataframe(label="Win rate (row beats column)", interactive=False,
                                           elem_id="results-winrate")
                with gr.Accordion("How the ratings are computed", open=False, elem_id="results-method"):
                    gr.Markdown(METHOD_HELP)
                with gr.Accordion("Close the loop: train on these votes (admin)", open=False, elem_id="results-loop"):
                    gr.Markdown("The campaign's decisive votes (A or B better; ties and \"both bad\" say nothing "
                                "about which answer to prefer, so they are left out) become a preference dataset, and "
                                "a preference run (DPO) starts from the campaign's fine-tuned run: the model learns to "
                                "answer the way the raters preferred. Evaluate it afterwards as `sft:RUN`.")
                    with gr.Row(equal_height=True):
                        res_pref_from = gr.Dropdown(finished_runs(), value=None, allow_custom_value=True,
                                                    label="Start from run (empty: the campaign's fine-tuned run)",
                                                    elem_id="results-pref-from")
                        res_train = gr.Button("Train on these votes", variant="primary", elem_id="results-train")
                    res_train_msg = gr.Markdown(elem_id="results-train-msg")
                with gr.Row():
                    res_fmt = gr.Radio(["csv", "jsonl", "dpo"], value="csv", label="Export votes as")
                    res_export = gr.Button("Export", elem_id="results-export")
                res_file = gr.File(label="Export", elem_id="results-file")
                with gr.Accordion("Campaign admin: invites, publish, close", open=False, elem_id="results-admin"):
                    with gr.Row():
                        res_inv_names = gr.Textbox(label="Invite raters (names, one per line or comma-separated)",
                                                   lines=2, elem_id="results-invite-names")
                        res_invite = gr.Button("Create invite links", elem_id="results-invite")
                        res_publish = gr.Button("Publish results", elem_id="results-publish")
                        res_close = gr.Button("Close campaign", elem_id="results-close")
                    res_admin_msg = gr.Markdown(elem_id="results-admin-msg")

        # -- wiring ----------------------------------------------------------------------------
        d_check.click(data_check, [d_file, d_fmt, d_map], [d_report, d_errors, d_save])
        d_save.click(data_import, [d_file, d_fmt, d_map, d_name, is_admin], [d_msg, d_table])
        d_file.change(data_inspect, [d_file, d_name], [d_msg, d_preview, *d_cols, d_map, d_name, d_save, d_report,
                                                       d_errors], api_visibility="private")
        for col in d_cols:  # a new mapping needs a new Check before Save
            col.input(data_mapping_text, d_cols, [d_map, d_save], api_visibility="private", show_progress="hidden")
        d_fmt.input(lambda: gr.update(interactive=False), None, d_save, api_visibility="private",
                    show_progress="hidden")
        d_del.click(dataset_delete_ask, [d_del_pick, is_admin], [d_del_row, d_del_q])
        d_del_yes.click(dataset_delete, [d_del_pick, is_admin], [d_msg, d_table, d_del_row, d_del_pick])
        d_del_no.click(_hide, None, d_del_row, api_visibility="private")
        d_del_pick.change(_hide, None, d_del_row, api_visibility="private")  # confirm only what was asked
        k_build.click(kb_build, [k_files, k_name, is_admin], [k_msg, k_pick]).then(
            kb_table, None, k_table, api_visibility="private")
        k_query.submit(kb_search, [k_pick, k_query, k_k, k_mode], k_hits)
        # the page may start on the only knowledge base already (no change event then): opening the tab fills it too
        for ev in (k_pick.change, kb_tab.select):
            ev(synth_name, [k_pick, s_fields["name"]], s_fields["name"], api_visibility="private", show_progress="hidden")
        s_preview_btn.click(synth_preview, [k_pick, is_admin, *s_inputs], [s_msg, s_pairs, s_counts])
        s_start.click(synth_start, [k_pick, is_admin, *s_inputs], [s_msg, s_job, s_job_line, s_timer])
        s_timer.tick(synth_tick, [s_job, s_last], [s_job_line, d_table, s_timer, s_last], show_progress="hidden",
                     api_visibility="private")
        k_search.click(kb_search, [k_pick, k_query, k_k, k_mode], k_hits, api_visibility="private")
        t_start.click(train_start, [t_dataset, t_base, is_admin, *t_inputs], [t_msg, t_run])
        t_mode.input(train_mode, t_mode, [t_sft_box, t_pref_box, t_start], api_visibility="private",
                     show_progress="hidden")
        tp_start.click(pref_start, [tp_dataset, tp_from, is_admin, *tp_inputs], [t_msg, t_run])
        t_preset.input(train_preset, [t_preset, t_fields["mode"]], [t_preset_help, *t_inputs], api_visibility="private")
        t_fields["mode"].input(train_raft_mode, [t_fields["mode"], t_preset, t_fields["kb"]],
                               [t_raft_box, t_fields["kb"], t_fields["max_length"], t_fields["raft_context_tokens"]],
                               api_visibility="private", show_progress="hidden")
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
        chat_inputs = [c_msg, *c_sys, c_kb, c_temp, c_max, is_admin, *c_bots]
        c_send.click(chat_send, chat_inputs, [*c_bots, *c_pass, *c_info])
        c_msg.submit(chat_send, chat_inputs, [*c_bots, *c_pass, *c_info])
        for c in c_sys:
            c.change(chat_heads, c_sys, c_heads, api_visibility="private", show_progress="hidden")
        e_start.click(eval_start, [e_dataset, e_split, e_systems, e_kb, e_limit, e_metrics, e_judge, is_admin],
                      [e_msg, e_pick])
        e_cancel.click(eval_cancel, [e_pick, is_admin], e_msg)
        e_resume.click(eval_resume, [e_pick, is_admin], e_msg)
        # like the Train tab's timer: only what changed, without the loading overlay (no flicker)
        e_timer.tick(eval_tick, [e_pick, is_admin, e_last], [e_summary, e_table, e_examples, e_report, e_card, e_last],
                     show_progress="hidden", api_visibility="private")
        e_pick.change(eval_poll, [e_pick, is_admin], [e_summary, e_table, e_examples, e_report, e_card])
        r_outs = [r_task, r_prompt, r_left, r_right, r_progress, r_key]
        r_who = [r_campaign, r_invite, r_rater, r_key]
        r_next.click(rate_next, r_who, r_outs)
        res_outs = [res_summary, res_board, res_winrate]
        # the public endpoint /results_show is this first registration (the later ones are private)
        res_refresh.click(results_show, [res_campaign, is_admin], res_outs)
        vote_outs = [*r_outs, r_comment, r_saved, r_undo, r_revise]
        for choice, btn in vote_btns.items():  # after each vote the Results tab is current too
            btn.click(_voter(choice), [*r_who, r_task, r_comment, r_revise], vote_outs).success(
                results_show, [res_campaign, is_admin], res_outs, api_visibility="private")
        r_undo.click(rate_undo, r_who, vote_outs)
        r_campaign.change(rate_guidelines, r_campaign, r_guide)
        rate_tab.select(rate_guidelines, r_campaign, r_guide, api_visibility="private")
        rc_eval.change(eval_systems, rc_eval, rc_systems)
        rc_create.click(create_campaign, [rc_eval, rc_systems, rc_open, rc_guide, rc_reveal, is_admin],
                        [rc_msg, r_campaign, res_campaign])
        res_campaign.change(results_show, [res_campaign, is_admin], res_outs)
        # the campaign dropdown starts on the newest campaign without a change event: show it when the
        # tab opens (and again on every visit, so votes cast meanwhile are counted)
        res_tab.select(results_show, [res_campaign, is_admin], res_outs, api_visibility="private")
        res_export.click(results_export, [res_campaign, res_fmt, is_admin], res_file)
        res_train.click(results_train_on_votes, [res_campaign, res_pref_from, is_admin], [res_train_msg, t_run])
        res_invite.click(campaign_invite, [res_campaign, res_inv_names, is_admin], res_admin_msg)
        res_publish.click(campaign_publish, [res_campaign, is_admin], res_admin_msg).success(
            results_show, [res_campaign, is_admin], res_outs, api_visibility="private")
        res_close.click(campaign_close, [res_campaign, is_admin], res_admin_msg).success(
            results_show, [res_campaign, is_admin], res_outs, api_visibility="private")
        demo.load(rate_link, None, [r_invite, r_campaign, r_progress, tabs], api_visibility="private")
        # keep every dropdown fresh when the page loads (a second browser sees the same state)
        fresh = {"datasets": [t_dataset, e_dataset, d_del_pick], "kbs": [k_pick, c_kb, e_kb, t_fields["kb"]],
                 "systems": [e_systems, *c_sys],
                 "evals": [e_pick, rc_eval], "campaigns": [r_campaign, res_campaign], "runs": [t_run],
                 "finished": [tp_from, res_pref_from], "pref_datasets": [tp_dataset]}

        def refresh():
            choices = {"datasets": dataset_choices(), "kbs": kb_choices(), "systems": system_choices(),
                       "evals": eval_choices(), "campaigns": campaign_choices(), "runs": all_runs(),
                       "finished": finished_runs(), "pref_datasets": preference_dataset_choices()}
            return {c: gr.update(choices=choices[k]) for k, comps in fresh.items() for c in comps}

        fresh_outputs = [c for comps in fresh.values() for c in comps]
        tabs.select(refresh, None, fresh_outputs)
        kb_tab.select(kb_table, None, k_table, api_visibility="private", show_progress="hidden")  # new datasets, runs, evals, campaigns show up on every tab switch
        # on load: the same choices, and each selection where this browser left it (else the running or
        # newest one); every user-visible pick is remembered in the browser (sel, gr.BrowserState)
        restore_outputs = [t_dataset, e_dataset, d_del_pick, k_pick, c_kb, e_kb, e_systems, *c_sys, e_pick, rc_eval,
                           r_campaign, res_campaign, t_run, r_invite]
        demo.load(restore_selection, [sel[k] for k in ("dataset", "kb", "run", "eval", "campaign", "invite")],
                  restore_outputs, api_visibility="private")
        for key, comps in {"dataset": [t_dataset, e_dataset], "kb": [k_pick, c_kb, e_kb], "run": [t_run],
                           "eval": [e_pick], "campaign": [r_campaign, res_campaign]}.items():
            for c in comps:
                c.change(_remember, c, sel[key], api_visibility="private", show_progress="hidden")
        # the guided path: drawn on load, kept current by its timer and on tab switches (changes only)
        guide_ins, guide_outs = [t_dataset, is_admin, g_last], [g_box, g_steps, g_next, g_hint, status, g_last]
        demo.load(guide_view, guide_ins, guide_outs, api_visibility="private")
        g_timer.tick(guide_view, guide_ins, guide_outs, show_progress="hidden", api_visibility="private")
        tabs.select(guide_view, guide_ins, guide_outs, show_progress="hidden", api_visibility="private")
        g_next.click(guide_go, [t_dataset, t_base, e_limit, e_metrics, is_admin, *t_inputs],
                     [g_msg, tabs, t_run, e_pick, e_dataset, e_kb, e_systems, r_campaign, res_campaign, r_invite,
                      sel["invite"], g_steps, g_next, g_hint, t_msg, e_msg], api_visibility="private")
    return demo


def _voter(choice: str):
    def handler(campaign, invite, name, key, task_id, comment, revise=None, request: gr.Request = None,
                profile: gr.OAuthProfile | None = None):
        return rate_vote(campaign, invite, name, key, task_id, choice, comment, revise, request, profile)
    handler.__name__ = f"vote_{choice}"
    return handler


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
    st = STUDIO.settings
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


demo = configure_concurrency(build_demo())


def _job_tasks() -> dict:
    """The example bootstrap's state for /healthz: running (queued or running), done or failed."""
    from sft_core import example
    st = example.bootstrap_state(STUDIO.ws, STUDIO.store)
    return {"example": st} if st else {}


def make_app():
    """FastAPI app: /healthz plus the Gradio UI mounted at /."""
    from fastapi import FastAPI
    api = FastAPI(title="SFT Studio")

    @api.get("/healthz")
    def healthz():
        return {"status": "ok", "workspace": str(STUDIO.ws.root), "engine": STUDIO.engine_ready(),
                "tasks": {**{k: t.status for k, t in STUDIO.tasks.items()}, **_job_tasks()}}

    @api.get("/report/{key}")
    def open_report(key: str):
        """A staged decision report as a page in its own tab (Gradio serves .html files only as downloads).

        Only copies staged by ``eval_poll`` for an admin are reachable, by their unguessable folder (a keyed
        hash, as for every staged download); the page is sandboxed and may load nothing: the report is
        self-contained, and model outputs inside it can run no script and fetch no resource."""
        from fastapi import HTTPException
        from fastapi.responses import FileResponse
        path = STUDIO.downloads_dir / key / "report.html"
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
    demo.has_launched = True
    STUDIO.clear_downloads()
    STUDIO.downloads_dir.mkdir(parents=True, exist_ok=True)
    # Uploads over the data limit are refused by Gradio while they stream in (413), before they reach
    # disk; /config shows the limit to the browser, which refuses them before sending. sft_core/data/readers.py
    # checks the same limit again for files given any other way.
    max_file_size = DataConfig().max_upload_bytes
    return gr.mount_gradio_app(api, demo, path="/", js=RATE_JS, css=APP_CSS, allowed_paths=[str(STUDIO.downloads_dir)],
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
    close_on_signals(STUDIO.close, close_all)
    from sft_core import gpu
    print(gpu.startup_check(), flush=True)  # loud when a GPU is visible that torch cannot use
    start_background()
    print(f"SFT Studio on http://{host}:{port}  (workspace {STUDIO.ws.root})", flush=True)

    class Server(uvicorn.Server):
        """The engine starts stopping the moment the signal arrives, while uvicorn drains its connections
        (at most SHUTDOWN_DRAIN_S: open event streams would hold it): ``docker stop`` gives 10 s in all."""

        def handle_exit(self, sig, frame):
            threading.Thread(target=lambda: (STUDIO.close(), close_all()), daemon=True, name="close-engine").start()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(make_app(), host=host, port=port, log_level="warning",
                                   timeout_graceful_shutdown=SHUTDOWN_DRAIN_S))
    try:
        server.run()
    finally:
        STUDIO.close()


if __name__ == "__main__":
    main()
