"""What several tabs share: the studio context (one accessor, built on first use), readable errors, the
admin gate, the dropdowns' choices, the poll helpers that send only what changed, and the config-form widget."""
from __future__ import annotations

import functools
import inspect
import json
import os
import threading

import gradio as gr
import pandas as pd

from sft_core import StudioError
from sft_core.db import evals as eval_rows, runs as run_rows
from sft_core.safety import AdminSessions
from sft_core.studio import Studio

# ------------------------------------------------------------------------------------------------
# The studio context: settings, workspace, store, engine (sft_core/studio.py), one per process
# ------------------------------------------------------------------------------------------------
_studio: Studio | None = None
_admin: tuple | None = None  # (the studio it belongs to, its AdminSessions)
_lock = threading.Lock()


def studio() -> Studio:
    """The process's studio context, built from the environment (SFT_STUDIO_*) on first use: importing the
    app builds nothing."""
    global _studio
    if _studio is None:
        with _lock:
            if _studio is None:
                _studio = Studio.from_env()
    return _studio


def set_studio(value: Studio | None) -> None:
    """Use this studio context from now on (None: build one from the environment on next use)."""
    global _studio
    _studio = value


def admin_sessions() -> AdminSessions:
    """The admin logins of this studio (sft_core.safety.AdminSessions: signed tokens, login back-off)."""
    global _admin
    s = studio()
    with _lock:
        if _admin is None or _admin[0] is not s:
            _admin = (s, AdminSessions(s.settings.admin_password, base_delay_s=s.settings.login_backoff_s))
        return _admin[1]


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


def admin_ok(token) -> bool:
    """Whether the session's admin state is a valid signed admin token (always true with no password).

    The session state holds only that token (sft_core.safety.AdminSessions), never the password or a
    bare boolean."""
    return not studio().settings.admin_password or admin_sessions().valid(token)


def admin_required(is_admin) -> None:
    """Writes other than rating need the admin login when an admin password is set."""
    if not admin_ok(is_admin):
        raise StudioError("this action needs the admin login (Admin panel, top of the page)", "admin")


def chat_allowed(is_admin) -> None:
    if studio().settings.admin_password and not studio().settings.demo_mode and not admin_ok(is_admin):
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
    if not studio().settings.admin_password:
        return None, "No admin password is set: everything is open.", ""
    token, msg = admin_sessions().login(password or "", client_id(request))
    return token, msg, ""


def _query_invite(request) -> str:
    """The ``invite`` query parameter of the page (the browser sends the page's query with each event)."""
    try:
        return (dict(request.query_params).get("invite") or "").strip() if request is not None else ""
    except Exception:  # noqa: BLE001 - no request (direct call)
        return ""


# ------------------------------------------------------------------------------------------------
# Choices shared by several tabs
# ------------------------------------------------------------------------------------------------
SYSTEM_CHOICES_BASE = ["prompt", "rag"]


def dataset_choices() -> list[str]:
    from sft_core import data
    return sorted({d["name"] for d in data.list_datasets(ws=studio().ws, store=studio().store)})


def preference_dataset_choices() -> list[str]:
    """Datasets whose newest version holds preference pairs (sft_core/preference.py), for the Train tab's
    preference mode."""
    import types as _types

    from sft_core import data, preference
    newest: dict[str, dict] = {}
    for d in data.list_datasets(ws=studio().ws, store=studio().store):  # newest first
        newest.setdefault(d["name"], d)
    return sorted(n for n, d in newest.items()
                  if preference.dataset_kind(_types.SimpleNamespace(path=d["path"])) == preference.KIND)


def kb_choices() -> list[str]:
    from sft_core import retrieval
    return sorted(k["name"] for k in retrieval.list_kbs(ws=studio().ws, store=studio().store))


def finished_runs() -> list[str]:
    return run_rows.ids(studio().store, status="succeeded")


def all_runs() -> list[str]:
    return run_rows.ids(studio().store)


def run_config(run_id: str | None) -> dict:
    """A run's stored config (runs.config: TrainConfig, whose ``mode`` says how it was trained); {} if none."""
    from sft_core.store import loads
    row = run_rows.get(studio().store, run_id) if run_id else None
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
    for r in run_rows.list_runs(studio().store, status="succeeded"):
        out += run_systems(r["id"], loads(r["config"], {}) or {})
    return out


def eval_choices() -> list[str]:
    return eval_rows.ids(studio().store)


def campaign_choices() -> list[str]:
    from evals import rating
    return [c["id"] for c in rating.list_campaigns(ws=studio().ws, store=studio().store)]


def _remember(value):
    """A dropdown's new value, for the browser to keep (gr.BrowserState)."""
    return value


# ------------------------------------------------------------------------------------------------
# Small shared pieces: file paths of uploads, confirmation rows, polls that send only what changed
# ------------------------------------------------------------------------------------------------
def _path(file) -> str:
    return file if isinstance(file, str) else getattr(file, "name", str(file))


def _confirm(visible: bool, text: str = ""):
    return gr.update(visible=visible), text


def _hide():
    return gr.update(visible=False)


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


def _form_component(f: dict, value=None, disabled: str | None = None, prefix: str = "train-opt",
                    labels: dict | None = None):
    """One config field as a form widget (value: the preset's, else the dataclass default); a field this
    machine cannot use is shown disabled, its reason in place of the help. A list with choices is a group
    of checkboxes; a text whose default has several lines (a template) a multi-line box."""
    label = (labels or {}).get(f["name"], f["name"].replace("_", " "))
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
