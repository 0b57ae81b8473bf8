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
import queue
import threading
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from sft_core import StudioError
from sft_core.config import DataConfig, DecodingConfig, fields_for_form, load_config
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


def status_text() -> str:
    from sft_core import jobs
    engine = "running" if STUDIO.engine_ready() else "starts on first chat/eval"
    active = STUDIO.store.query("SELECT * FROM jobs WHERE status IN ('running','queued') ORDER BY created_at LIMIT 4")
    lines = ["Job: " + jobs.describe(j, STUDIO.store) for j in active]
    return (f"**Workspace** `{STUDIO.ws.root}` · **base model** `{STUDIO.settings.base_model}` · "
            f"**engine** {engine}\n\n" + "  \n".join(lines + [STUDIO.status_lines()]))


# ------------------------------------------------------------------------------------------------
# Choices shared by several tabs
# ------------------------------------------------------------------------------------------------
def dataset_choices() -> list[str]:
    from sft_core import data
    return sorted({d["name"] for d in data.list_datasets(STUDIO.ws, STUDIO.store)})


def kb_choices() -> list[str]:
    from sft_core import retrieval
    return sorted(k["name"] for k in retrieval.list_kbs(STUDIO.ws, STUDIO.store))


def finished_runs() -> list[str]:
    rows = STUDIO.store.query("SELECT id FROM runs WHERE status='succeeded' ORDER BY created_at DESC")
    return [r["id"] for r in rows]


def system_choices() -> list[str]:
    out = list(SYSTEM_CHOICES_BASE)
    for run in finished_runs():
        out += [f"sft:{run}", f"sft+rag:{run}"]
    return out


def eval_choices() -> list[str]:
    return [r["id"] for r in STUDIO.store.query("SELECT id FROM evals ORDER BY created_at DESC")]


def campaign_choices() -> list[str]:
    from evals import rating
    return [c["id"] for c in rating.list_campaigns(ws=STUDIO.ws, store=STUDIO.store)]


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def _data_cfg(fmt: str, mapping: str) -> DataConfig:
    return load_config(DataConfig, overrides={"format": fmt or "auto", "mapping": mapping or {}})


@ui_errors
def data_check(file, fmt, mapping):
    from sft_core import data
    if not file:
        raise StudioError("choose a file first", "file")
    report = data.check_file(_path(file), _data_cfg(fmt, mapping))
    errors = pd.DataFrame([_issue_row(i) for i in report.errors], columns=["file", "line", "field", "problem"])
    return data.format_report(report), errors


@ui_errors
def data_import(file, fmt, mapping, name, is_admin):
    from sft_core import data
    admin_required(is_admin)
    if not file:
        raise StudioError("choose a file first", "file")
    if not name:
        raise StudioError("give the dataset a name", "name")
    v = data.import_dataset(_path(file), name, _data_cfg(fmt, mapping), ws=STUDIO.ws, store=STUDIO.store)
    what = "saved new version" if v.created else "identical data: existing version reused"
    return f"{what}: **{v.name}@{v.version}** — " + ", ".join(f"{k}: {n}" for k, n in v.splits.items()), datasets_table()


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
    rows = STUDIO.store.query("SELECT version, n_rows FROM datasets WHERE name=?", (name,))
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
    hits = retrieval.open_kb(name, STUDIO.ws).search(query, k=int(k), mode=mode)
    return _hits_markdown(hits) or "_no hits_"


def _hits_markdown(hits) -> str:
    out = []
    for i, h in enumerate(hits, 1):
        text = safe_markdown(h.text if len(h.text) < 700 else h.text[:700] + " …")  # documents load nothing
        out.append(f"**{i}.** `{Path(str(h.source)).name}` · **{safe_markdown(str(h.doc_id))}** · {h.position} · "
                   f"score {h.score:.3f}\n\n> " + text.replace("\n", "\n> "))
    return "\n\n".join(out)


# ------------------------------------------------------------------------------------------------
# Train
# ------------------------------------------------------------------------------------------------
def _train_config_cls():
    from sft_core.config import TrainConfig
    return TrainConfig


TRAIN_FORM_SKIP = ("dataset", "dataset_version", "base_model")


@ui_errors
def train_start(dataset, base_model, is_admin, *values):
    from sft_core import jobs
    admin_required(is_admin)
    if not dataset:
        raise StudioError("choose a dataset", "dataset")
    fields = [f for f in fields_for_form(_train_config_cls()) if f["name"] not in TRAIN_FORM_SKIP]
    overrides = {f["name"]: (v if v not in ("", None) else None) for f, v in zip(fields, values)}
    overrides.update(dataset=dataset, base_model=base_model or STUDIO.settings.base_model)
    cfg = load_config(_train_config_cls(), overrides=overrides)
    run_id = jobs.submit_train(cfg, ws=STUDIO.ws, store=STUDIO.store)
    return f"Queued run **{run_id}**.", gr.update(choices=all_runs(), value=run_id)


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
    run = STUDIO.store.query_one("SELECT status FROM runs WHERE id=?", (run_id,))
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
    return [r["id"] for r in STUDIO.store.query("SELECT id FROM runs ORDER BY created_at DESC")]


def jobs_table():
    rows = STUDIO.store.query("SELECT id, kind, ref, status, created_at, error FROM jobs ORDER BY created_at DESC LIMIT 50")
    for r in rows:
        r["created_at"] = time.strftime("%H:%M:%S", time.localtime(r["created_at"]))
    return pd.DataFrame(rows, columns=["id", "kind", "ref", "status", "created_at", "error"])


def runs_table():
    rows = STUDIO.store.query("SELECT id, dataset, base_model, status, metrics FROM runs ORDER BY created_at DESC")
    for r in rows:
        m = json.loads(r.pop("metrics") or "{}")
        r["train_loss"] = _fmt(m.get("train_loss"))
        r["eval_loss"] = _fmt(m.get("eval_loss"))
    return pd.DataFrame(rows, columns=["id", "dataset", "base_model", "status", "train_loss", "eval_loss"])


def _fmt(x):
    return f"{x:.4f}" if isinstance(x, (int, float)) else ""


def train_poll(run_id):
    """Progress, loss chart and tables from the store and events.jsonl (survives reloads)."""
    from sft_core.workspace import read_jsonl
    # typed even when empty: an untyped empty frame is all float64, and the chart then keeps treating
    # "series" as a number (gradient legend, NaN colour, no line drawn) once real points arrive
    empty = pd.DataFrame({"step": pd.Series(dtype="int64"), "loss": pd.Series(dtype="float64"),
                          "series": pd.Series(dtype="object")})
    if not run_id:
        return "_no run selected_", empty, jobs_table(), runs_table()
    run = STUDIO.store.query_one("SELECT * FROM runs WHERE id=?", (run_id,))
    if run is None:
        return f"unknown run {run_id}", empty, jobs_table(), runs_table()
    events = read_jsonl(Path(run["path"]) / "events.jsonl")
    points = []
    for e in events:
        if e.get("loss") is not None:
            points.append({"step": e["step"], "loss": e["loss"], "series": "train"})
        if e.get("eval_loss") is not None:
            points.append({"step": e["step"], "loss": e["eval_loss"], "series": "eval"})
    last = next((e for e in reversed(events) if e.get("step") is not None), {})
    job = STUDIO.store.query_one("SELECT status, error FROM jobs WHERE ref=? ORDER BY created_at DESC", (run_id,)) or {}
    status = job.get("status") or run["status"]
    line = f"**{run_id}** · {status}"
    if last:
        total = last.get("max_steps") or last.get("total_steps")
        line += f" · step {last.get('step')}" + (f"/{total}" if total else "")
        if last.get("eta_s") is not None:
            line += f" · ETA {int(last['eta_s'])}s"
        if last.get("tokens_per_s"):
            line += f" · {last['tokens_per_s']:.0f} tok/s"
    if job.get("error"):
        line += f"\n\n❌ {job['error']}"
    df = pd.DataFrame(points) if points else empty
    return line, df, jobs_table(), runs_table()


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
    raw = [""] * 4  # the model's text; the chat shows safe_markdown(raw): no remote image is ever fetched
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def put(item) -> None:
        loop.call_soon_threadsafe(q.put_nowait, item)

    def worker(i: int, system: str):
        try:
            req = _system_messages(system, message, kb or None)
            if req.get("passages"):
                passages[i] = _hits_markdown(req["passages"])
            for delta in engine.chat(req["messages"], adapter=req.get("adapter"), decoding=decoding):
                put((i, delta))
        except StudioError as e:
            put((i, f"\n⚠️ {e}"))
        except Exception as e:  # engine trouble: show it in that column
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
    yield (*hists, *passages)
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
            yield (*(hists[k] if k in changed else gr.skip() for k in range(4)), *(gr.skip(),) * 4)
            changed.clear()
    yield (*hists, *passages)


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
    needs_kb = any(s == "rag" or s.startswith("sft+rag:") for s in systems)
    if needs_kb and not kb:
        raise StudioError("RAG systems need a knowledge base", "knowledge base")
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


def _eval_job_line(eval_id) -> str:
    from sft_core import jobs
    job = jobs.latest_job(eval_id, STUDIO.store)
    return jobs.describe(job, STUDIO.store) if job else ""


def _progress_bar(line: str, ref: str) -> str:
    """The job line with a text progress bar (done/total) when the job reports progress."""
    from sft_core import jobs
    job = jobs.latest_job(ref, STUDIO.store)
    p = jobs.progress_of(job) if job else {}
    if job and job["status"] == "running" and p.get("total"):
        frac = max(0.0, min(1.0, p.get("done", 0) / p["total"]))
        bar = "█" * int(round(frac * 20)) + "░" * (20 - int(round(frac * 20)))
        return f"`{bar}` {frac:.0%} · {line}"
    return line


BLIND_NOTE = ("🔒 Per-example answers and the report name the system behind each answer, so they need the "
              "admin login (raters must stay blind). The aggregate scores above are public.")


@ui_errors
def eval_poll(eval_id, is_admin=False):
    """Eval progress and results. With an admin password set, only the admin sees per-example outputs
    and the report (both map answers to systems); everyone sees the aggregate table."""
    from evals import runner
    if not eval_id:
        return "_no eval selected_", pd.DataFrame(), pd.DataFrame(), None
    st = runner.eval_status(eval_id, ws=STUDIO.ws, store=STUDIO.store)
    summary = st.get("summary", "")
    line = _eval_job_line(eval_id)
    if line:
        summary += f"\n\n{_progress_bar(line, eval_id)}"
    table = pd.DataFrame(st.get("table") or [])
    if not admin_ok(is_admin):
        return summary + "\n\n" + BLIND_NOTE, table, pd.DataFrame(), None
    examples = pd.DataFrame(st.get("examples") or [])
    report = st.get("report_html")
    return summary, table, examples, (STUDIO.stage_download(report) if report and Path(report).exists() else None)


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
    """The next blind task for the caller: (task id [session state], prompt, left, right, progress, key)."""
    from evals import rating
    rater, display, key = _identify(campaign, invite, name, key, request, profile)
    task = rating.next_task(campaign, rater, ws=STUDIO.ws, store=STUDIO.store)
    who = f"Rating as **{safe_markdown(display)}**"
    if task is None:
        return None, "🎉 Nothing left for you to rate in this campaign. Thank you!", "", "", who, key
    prompt = f"### Prompt\n\n{safe_markdown(task['prompt'])}"  # dataset and model text load nothing remote
    if task.get("reference"):
        prompt += f"\n\n**Reference answer:** {safe_markdown(task['reference'])}"
    prog = task.get("progress") or {}
    progress = f"{who} · {prog.get('done', 0)} rated · {prog.get('remaining', '?')} left" if prog else who
    return task["task_id"], prompt, safe_markdown(task["left"]), safe_markdown(task["right"]), progress, key


@ui_errors
def rate_vote(campaign, invite, name, key, task_id, choice, comment, request: gr.Request = None,
              profile: gr.OAuthProfile | None = None):
    from evals import rating
    rater, _, key = _identify(campaign, invite, name, key, request, profile)
    if not task_id:
        raise StudioError("no task on screen: press Next", "task")
    rating.vote(campaign, task_id, rater, choice, comment or "", ws=STUDIO.ws, store=STUDIO.store)
    return (*rate_next(campaign, invite, name, key, request, profile), "")


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
def create_campaign(eval_id, systems, open_rating, is_admin):
    from evals import rating
    admin_required(is_admin)
    if not eval_id:
        raise StudioError("choose an eval", "eval")
    systems = [s for s in (systems or [])]
    cid = rating.create_campaign(eval_id, systems or None, ws=STUDIO.ws, store=STUDIO.store,
                                 open_rating=bool(open_rating))
    how = ("anyone may join under a name of their choice" if open_rating else
           "raters need an invite link (Results tab → Campaign admin)")
    return f"Campaign **{cid}** created: {how}.", gr.update(choices=campaign_choices(), value=cid), \
        gr.update(choices=campaign_choices(), value=cid)


@ui_errors
def eval_systems(eval_id):
    if not eval_id:
        return gr.update(choices=[], value=[])
    row = STUDIO.store.query_one("SELECT systems FROM evals WHERE id=?", (eval_id,))
    systems = json.loads(row["systems"]) if row else []
    return gr.update(choices=systems, value=systems)


RESULTS_HIDDEN = ("🔒 The results of this campaign are hidden until the admin publishes them or closes the "
                  "campaign, so raters stay blind.")


@ui_errors
def results_show(campaign, is_admin=False):
    """Leaderboard and win rates; for anyone but the admin only once published or closed (a vote
    followed by a look at the counts would name the system behind each side)."""
    from evals import rating
    if not campaign:
        return "_choose a campaign_", pd.DataFrame(), pd.DataFrame()
    if not _is_admin(is_admin) and not rating.results_visible(campaign, ws=STUDIO.ws, store=STUDIO.store):
        return RESULTS_HIDDEN, pd.DataFrame(), pd.DataFrame()
    res = rating.results(campaign, ws=STUDIO.ws, store=STUDIO.store)
    board = pd.DataFrame(res.get("leaderboard") or [])
    winrate = pd.DataFrame(res.get("win_rate") or {})
    if not winrate.empty:
        winrate = winrate.reset_index(names="system")
    lines = [f"**{res.get('n_votes', 0)} votes** from {res.get('n_raters', 0)} raters."]
    agree = res.get("agreement") or {}
    for k, v in agree.items():
        if isinstance(v, (int, float)):
            lines.append(f"{k}: {v:.3f}")
    return "  \n".join(lines), board, winrate


@ui_errors
def results_export(campaign, fmt, is_admin):
    from evals import rating
    admin_required(is_admin)
    if not campaign:
        raise StudioError("choose a campaign", "campaign")
    out = STUDIO.ws.root / "exports" / f"{campaign}-{fmt}.{'jsonl' if fmt in ('jsonl', 'dpo') else 'csv'}"
    rating.export_votes(campaign, fmt, out, ws=STUDIO.ws, store=STUDIO.store)
    return STUDIO.stage_download(out)


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
  document.addEventListener('keydown', (e) => {
    const tag = (e.target && e.target.tagName || '').toLowerCase();
    if (tag === 'input' || tag === 'textarea') return;
    const ids = {'1': 'vote-left', '2': 'vote-right', '3': 'vote-tie', '4': 'vote-bad'};
    const id = ids[e.key];
    if (!id) return;
    const btn = document.getElementById(id);
    if (btn && btn.offsetParent !== null) { btn.click(); e.preventDefault(); }
  });
}
"""


def _form_component(f: dict):
    label, info, default = f["name"].replace("_", " "), f["help"], f["default"]
    if f.get("choices"):
        return gr.Dropdown(choices=f["choices"], value=default, label=label, info=info)
    if f["type"] == "bool":
        return gr.Checkbox(value=bool(default), label=label, info=info)
    if f["type"] in ("int", "float"):
        return gr.Number(value=default, label=label, info=info, precision=0 if f["type"] == "int" else None)
    if f["type"] == "list":
        return gr.Textbox(value=",".join(map(str, default or [])), label=label, info=info)
    return gr.Textbox(value="" if default is None else str(default), label=label, info=info)


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="SFT Studio") as demo:
        is_admin = gr.State(None)  # a signed admin token after login (admin_ok), never the password
        gr.Markdown("# SFT Studio\nFine-tune, prompt, or retrieve? Answer it on your own data.")
        status = gr.Markdown(status_text, every=3, elem_id="status")
        with gr.Accordion("Admin", open=False, visible=bool(STUDIO.settings.admin_password)):
            with gr.Row():
                pw = gr.Textbox(label="Admin password", type="password", elem_id="admin-password")
                login_btn = gr.Button("Log in", elem_id="admin-login")
            login_msg = gr.Markdown()
            # the password box is cleared by the same event: no copy of the password stays in the session
            login_btn.click(login, pw, [is_admin, login_msg, pw])

        with gr.Tabs() as tabs:
            # -- Data ------------------------------------------------------------------------
            with gr.Tab("Data", id="data"):
                gr.Markdown("Upload an instruction dataset (JSONL, JSON, CSV, Parquet) — alpaca, "
                            "prompt/completion, messages, ShareGPT, or any table with a column mapping.")
                with gr.Row():
                    d_file = gr.File(label="Dataset file", file_types=[".jsonl", ".json", ".csv", ".parquet"],
                                     elem_id="data-file")
                    with gr.Column():
                        d_fmt = gr.Dropdown(["auto", "alpaca", "prompt_completion", "messages", "sharegpt", "table"],
                                            value="auto", label="Format")
                        d_map = gr.Textbox(label="Column mapping", placeholder="instruction=question,response=answer")
                        d_name = gr.Textbox(label="Dataset name", elem_id="data-name")
                with gr.Row():
                    d_check = gr.Button("Check", elem_id="data-check")
                    d_save = gr.Button("Save as dataset version", variant="primary", elem_id="data-save")
                d_msg = gr.Markdown(elem_id="data-msg")
                d_report = gr.Markdown(elem_id="data-report")
                d_errors = gr.Dataframe(pd.DataFrame(columns=["file", "line", "field", "problem"]),
                                        label="Row-level problems", interactive=False, elem_id="data-errors")
                d_table = gr.Dataframe(datasets_table, label="Dataset versions", interactive=False,
                                       elem_id="data-versions")
                with gr.Row():
                    d_del_pick = gr.Dropdown(dataset_choices(), value=None, allow_custom_value=True,
                                             label="Dataset to delete (all versions)", elem_id="data-delete-pick")
                    d_del = gr.Button("Delete dataset…", variant="stop", elem_id="data-delete")
                with gr.Row(visible=False, elem_id="data-delete-confirm") as d_del_row:
                    d_del_q = gr.Markdown(elem_id="data-delete-question")
                    d_del_yes = gr.Button("Yes, delete", variant="stop", elem_id="data-delete-yes")
                    d_del_no = gr.Button("Keep it", elem_id="data-delete-no")

            # -- Knowledge -------------------------------------------------------------------
            with gr.Tab("Knowledge", id="knowledge"):
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
                k_query = gr.Textbox(label="Search", elem_id="kb-query")
                k_hits = gr.Markdown(elem_id="kb-hits")

            # -- Train -----------------------------------------------------------------------
            with gr.Tab("Train", id="train"):
                with gr.Row():
                    t_dataset = gr.Dropdown(dataset_choices(), allow_custom_value=True, label="Dataset", elem_id="train-dataset")
                    t_base = gr.Textbox(value=STUDIO.settings.base_model, label="Base model",
                                        info="embedded name, local model directory or hub id")
                train_fields = [f for f in fields_for_form(_train_config_cls()) if f["name"] not in TRAIN_FORM_SKIP]
                t_inputs = []
                with gr.Accordion("LoRA and training options", open=False):
                    for i in range(0, len(train_fields), 3):
                        with gr.Row():
                            for f in train_fields[i:i + 3]:
                                t_inputs.append(_form_component(f))
                with gr.Row():
                    t_start = gr.Button("Start training", variant="primary", elem_id="train-start")
                    t_run = gr.Dropdown(all_runs(), allow_custom_value=True, label="Run", elem_id="train-run")
                    t_cancel = gr.Button("Cancel", elem_id="train-cancel")
                    t_resume = gr.Button("Resume", elem_id="train-resume")
                    t_delete = gr.Button("Delete run…", variant="stop", elem_id="train-delete")
                with gr.Row(visible=False, elem_id="train-delete-confirm") as t_del_row:
                    t_del_q = gr.Markdown(elem_id="train-delete-question")
                    t_del_yes = gr.Button("Yes, delete", variant="stop", elem_id="train-delete-yes")
                    t_del_no = gr.Button("Keep it", elem_id="train-delete-no")
                t_msg = gr.Markdown(elem_id="train-msg")
                t_progress = gr.Markdown(elem_id="train-progress")
                t_plot = gr.LinePlot(x="step", y="loss", color="series", title="Loss", elem_id="train-loss",
                                     height=300)
                t_jobs = gr.Dataframe(jobs_table, label="Job queue", interactive=False)
                t_runs = gr.Dataframe(runs_table, label="Runs", interactive=False)
                t_timer = gr.Timer(2.0)

            # -- Chat ------------------------------------------------------------------------
            with gr.Tab("Chat", id="chat"):
                with gr.Row():
                    c_sys = [gr.Dropdown(system_choices(), allow_custom_value=True, value=v, label=f"System {i + 1}", elem_id=f"chat-sys-{i}")
                             for i, v in enumerate(["prompt", "rag", None, None])]
                with gr.Row():
                    c_kb = gr.Dropdown(kb_choices(), allow_custom_value=True, value=EXAMPLE_NAME if EXAMPLE_NAME in kb_choices() else None,
                                       label="Knowledge base (for RAG)", elem_id="chat-kb")
                    c_temp = gr.Slider(0, 1.5, value=0.0, step=0.05, label="Temperature")
                    c_max = gr.Slider(16, 1024, value=128, step=16, label="Max new tokens")
                with gr.Row():
                    c_bots, c_pass = [], []
                    for i in range(4):
                        with gr.Column():
                            c_bots.append(gr.Chatbot(label=f"System {i + 1}", height=360, elem_id=f"chat-bot-{i}"))
                            c_pass.append(gr.Markdown(elem_id=f"chat-passages-{i}"))
                c_msg = gr.Textbox(label="Message", placeholder="Ask something about your domain…", elem_id="chat-msg")
                c_send = gr.Button("Send to all", variant="primary", elem_id="chat-send")

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
                e_table = gr.Dataframe(label="Scores (mean, 95% CI)", interactive=False, elem_id="eval-table")
                e_examples = gr.Dataframe(label="Per-example side by side", interactive=False, wrap=True,
                                          elem_id="eval-examples")
                e_report = gr.File(label="Decision report (HTML)", elem_id="eval-report")
                e_timer = gr.Timer(3.0)

            # -- Rate ------------------------------------------------------------------------
            with gr.Tab("Rate", id="rate"):
                gr.Markdown("Blind pairwise rating: which answer is better? System names stay hidden. "
                            "Keys: **1** left · **2** right · **3** tie · **4** both bad. Open the invite "
                            "link you were sent (open campaigns: pick a name; it sticks to this browser)."
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
                # the signed key of an open-campaign rater, kept in this browser's localStorage
                r_key = gr.BrowserState(None, storage_key="sft-studio-rater-key", secret="sft-studio-rater")
                r_progress = gr.Markdown(elem_id="rate-progress")
                r_prompt = gr.Markdown(elem_id="rate-prompt")
                with gr.Row():
                    r_left = gr.Markdown(label="Left", elem_id="rate-left", container=True)
                    r_right = gr.Markdown(label="Right", elem_id="rate-right", container=True)
                r_comment = gr.Textbox(label="Comment (optional)", max_lines=3)
                with gr.Row():
                    vote_btns = {c: gr.Button(lbl, elem_id=eid) for c, lbl, eid in [
                        ("left", "⬅ Left is better (1)", "vote-left"), ("right", "Right is better ➡ (2)", "vote-right"),
                        ("tie", "Tie (3)", "vote-tie"), ("both_bad", "Both bad (4)", "vote-bad")]}
                with gr.Accordion("New campaign (admin)", open=False):
                    with gr.Row():
                        rc_eval = gr.Dropdown(eval_choices(), allow_custom_value=True, label="From eval", elem_id="rate-new-eval")
                        rc_systems = gr.CheckboxGroup([], label="Systems")
                        rc_open = gr.Checkbox(False, label="Open rating: anyone joins under a name they pick "
                                              "(trusted rooms only; otherwise invite links)", elem_id="rate-new-open")
                        rc_create = gr.Button("Create campaign", elem_id="rate-create")
                    rc_msg = gr.Markdown()

            # -- Results ---------------------------------------------------------------------
            with gr.Tab("Results", id="results"):
                with gr.Row():
                    res_campaign = gr.Dropdown(campaign_choices(), allow_custom_value=True, label="Campaign", elem_id="results-campaign")
                    res_refresh = gr.Button("Refresh", elem_id="results-refresh")
                res_summary = gr.Markdown(elem_id="results-summary")
                res_board = gr.Dataframe(label="Human leaderboard (Bradley-Terry, 95% CI)", interactive=False,
                                         elem_id="results-board")
                res_winrate = gr.Dataframe(label="Win rate (row beats column)", interactive=False)
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
        d_check.click(data_check, [d_file, d_fmt, d_map], [d_report, d_errors])
        d_save.click(data_import, [d_file, d_fmt, d_map, d_name, is_admin], [d_msg, d_table])
        d_del.click(dataset_delete_ask, [d_del_pick, is_admin], [d_del_row, d_del_q])
        d_del_yes.click(dataset_delete, [d_del_pick, is_admin], [d_msg, d_table, d_del_row, d_del_pick])
        d_del_no.click(_hide, None, d_del_row, api_visibility="private")
        d_del_pick.change(_hide, None, d_del_row, api_visibility="private")  # confirm only what was asked
        k_build.click(kb_build, [k_files, k_name, is_admin], [k_msg, k_pick])
        k_query.submit(kb_search, [k_pick, k_query, k_k, k_mode], k_hits)
        t_start.click(train_start, [t_dataset, t_base, is_admin, *t_inputs], [t_msg, t_run])
        t_cancel.click(train_cancel, [t_run, is_admin], t_msg)
        t_resume.click(train_resume, [t_run, is_admin], t_msg)
        t_delete.click(run_delete_ask, [t_run, is_admin], [t_del_row, t_del_q])
        t_del_yes.click(run_delete, [t_run, is_admin], [t_msg, t_run, t_del_row])
        t_del_no.click(_hide, None, t_del_row, api_visibility="private")
        t_run.change(_hide, None, t_del_row, api_visibility="private")
        t_timer.tick(train_poll, t_run, [t_progress, t_plot, t_jobs, t_runs])
        t_run.change(train_poll, t_run, [t_progress, t_plot, t_jobs, t_runs])
        chat_inputs = [c_msg, *c_sys, c_kb, c_temp, c_max, is_admin, *c_bots]
        c_send.click(chat_send, chat_inputs, [*c_bots, *c_pass])
        c_msg.submit(chat_send, chat_inputs, [*c_bots, *c_pass])
        e_start.click(eval_start, [e_dataset, e_split, e_systems, e_kb, e_limit, e_metrics, e_judge, is_admin],
                      [e_msg, e_pick])
        e_cancel.click(eval_cancel, [e_pick, is_admin], e_msg)
        e_resume.click(eval_resume, [e_pick, is_admin], e_msg)
        e_timer.tick(eval_poll, [e_pick, is_admin], [e_summary, e_table, e_examples, e_report])
        e_pick.change(eval_poll, [e_pick, is_admin], [e_summary, e_table, e_examples, e_report])
        r_outs = [r_task, r_prompt, r_left, r_right, r_progress, r_key]
        r_who = [r_campaign, r_invite, r_rater, r_key]
        r_next.click(rate_next, r_who, r_outs)
        for choice, btn in vote_btns.items():
            btn.click(_voter(choice), [*r_who, r_task, r_comment], [*r_outs, r_comment])
        rc_eval.change(eval_systems, rc_eval, rc_systems)
        rc_create.click(create_campaign, [rc_eval, rc_systems, rc_open, is_admin], [rc_msg, r_campaign, res_campaign])
        res_outs = [res_summary, res_board, res_winrate]
        res_refresh.click(results_show, [res_campaign, is_admin], res_outs)
        res_campaign.change(results_show, [res_campaign, is_admin], res_outs)
        res_export.click(results_export, [res_campaign, res_fmt, is_admin], res_file)
        res_invite.click(campaign_invite, [res_campaign, res_inv_names, is_admin], res_admin_msg)
        res_publish.click(campaign_publish, [res_campaign, is_admin], res_admin_msg).success(
            results_show, [res_campaign, is_admin], res_outs, api_visibility="private")
        res_close.click(campaign_close, [res_campaign, is_admin], res_admin_msg).success(
            results_show, [res_campaign, is_admin], res_outs, api_visibility="private")
        demo.load(rate_link, None, [r_invite, r_campaign, r_progress, tabs], api_visibility="private")
        # keep every dropdown fresh when the page loads (a second browser sees the same state)
        fresh = {"datasets": [t_dataset, e_dataset, d_del_pick], "kbs": [k_pick, c_kb, e_kb],
                 "systems": [e_systems, *c_sys],
                 "evals": [e_pick, rc_eval], "campaigns": [r_campaign, res_campaign], "runs": [t_run]}

        def refresh():
            choices = {"datasets": dataset_choices(), "kbs": kb_choices(), "systems": system_choices(),
                       "evals": eval_choices(), "campaigns": campaign_choices(), "runs": all_runs()}
            return {c: gr.update(choices=choices[k]) for k, comps in fresh.items() for c in comps}

        fresh_outputs = [c for comps in fresh.values() for c in comps]
        demo.load(refresh, None, fresh_outputs)
        tabs.select(refresh, None, fresh_outputs)  # new datasets, runs, evals, campaigns show up on every tab switch
    return demo


def _voter(choice: str):
    def handler(campaign, invite, name, key, task_id, comment, request: gr.Request = None,
                profile: gr.OAuthProfile | None = None):
        return rate_vote(campaign, invite, name, key, task_id, choice, comment, request, profile)
    handler.__name__ = f"vote_{choice}"
    return handler


# Which events may run side by side (Gradio runs every event under a limit of 1 unless told otherwise,
# so visitors were served one at a time). Chat waits on the engine, which batches concurrent requests:
# many chats at once cost about one chat's latency. Heavy handlers (parsing uploads, building an index,
# exporting) share one small group so they cannot starve the rest; everything else is a quick read or
# write of the store. Events not named here get the light limit.
HEAVY_EVENTS = {"data_check", "data_import", "kb_build", "results_export", "create_campaign", "eval_start"}
ENGINE_EVENTS = {"chat_send"}


def configure_concurrency(blocks: gr.Blocks) -> gr.Blocks:
    st = STUDIO.settings
    for fn in blocks.fns.values():
        name = getattr(fn.fn, "__name__", "")
        if name in ENGINE_EVENTS:
            fn.concurrency_id, fn.concurrency_limit = "engine", max(1, st.chat_concurrency)
        elif name in HEAVY_EVENTS:
            fn.concurrency_id, fn.concurrency_limit = "heavy", max(1, st.heavy_concurrency)
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
    # disk; /config shows the limit to the browser, which refuses them before sending. data.py checks
    # the same limit again for files given any other way.
    max_file_size = DataConfig().max_upload_bytes
    return gr.mount_gradio_app(api, demo, path="/", js=RATE_JS, allowed_paths=[str(STUDIO.downloads_dir)],
                               max_file_size=max_file_size)


def main() -> None:
    import uvicorn
    host = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    port = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    from sft_core.serving.supervise import close_on_signals
    from sft_core.serving.vllm_engine import close_all
    # SIGTERM/SIGINT: uvicorn shuts down gracefully, then re-raises the signal to these handlers, which
    # stop the engine (and a vLLM still starting in a background thread) before the process exits
    close_on_signals(STUDIO.close, close_all)
    start_background()
    print(f"SFT Studio on http://{host}:{port}  (workspace {STUDIO.ws.root})", flush=True)
    try:
        uvicorn.run(make_app(), host=host, port=port, log_level="warning")
    finally:
        STUDIO.close()


if __name__ == "__main__":
    main()
