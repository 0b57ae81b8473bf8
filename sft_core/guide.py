"""The guided path through the studio: data → knowledge → train → evaluate → rate.

Everything here is read from the store (tables datasets, kbs, runs, evals, campaigns, jobs) and the
runs' events.jsonl, so the app's checklist, its one next action and the selections it starts on are
the same in every browser and after a restart. app.py renders and wires; the decisions live here:

* ``guide_state`` -> each step's state (done / running / todo / failed) with a one-line detail, and
  the one next action (with the ready example domain as the default path: train, evaluate, read the
  recommendation).
* ``default_selection`` / ``choose``: which dataset, knowledge base, run, eval and campaign a page
  starts on (what the browser remembered, else the running or the latest one).
* ``run_progress``: a training run's phase (queued, loading data, loading model, tokenising, step n/N
  with ETA, evaluating, saving adapter) and the fraction done, for a progress bar.
* ``TRAIN_PRESETS`` and ``hardware_limits``: the Train form's presets and the options this machine
  cannot use (CUDA only), with the reason.
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from sft_core.db import (datasets as dataset_rows, evals as eval_rows, jobs as job_rows, kbs as kb_rows,
                         ratings as rating_rows, runs as run_rows)
from sft_core.store import Store, loads
from sft_core.workspace import Workspace, read_jsonl

EXAMPLE = "pydocs"
STEPS = (("data", "Data"), ("knowledge", "Knowledge"), ("train", "Train"), ("evaluate", "Evaluate"),
         ("rate", "Rate"))
ACTIVE = ("queued", "running")


@dataclass
class Step:
    key: str
    title: str
    state: str    # done | running | todo | failed
    detail: str   # one line for people


@dataclass
class Action:
    """The one next thing to do. ``kind``: open (just show ``tab``), train / evaluate / rate (the app
    starts that step on the current selections, then shows ``tab``), wait (nothing to click yet)."""
    kind: str
    label: str
    tab: str
    hint: str = ""


@dataclass
class Guide:
    steps: list[Step]
    next: Action
    facts: dict = field(default_factory=dict)  # ids the actions work on: dataset, kb, run, eval, campaign


# ------------------------------------------------------------------------------------------------
# Train presets and what this hardware can use
# ------------------------------------------------------------------------------------------------
# Overrides of TrainConfig's defaults; fields a preset does not name keep the dataclass default.
TRAIN_PRESETS: dict[str, dict] = {
    "quick test": {"max_steps": 30, "lora_r": 8, "lora_alpha": 16, "max_length": 256, "batch_size": 4,
                   "save_steps": 10},
    "standard": {},
    "thorough": {"epochs": 3.0, "lora_r": 32, "lora_alpha": 64, "learning_rate": 1e-4, "warmup_ratio": 0.05,
                 "early_stopping_patience": 3, "eval_steps": 50},
}
PRESET_HELP = {
    "quick test": "30 steps, rank 8: checks the whole path in a few minutes; the adapter learns little.",
    "standard": "one pass over the training split, rank 16: the defaults.",
    "thorough": "up to three passes, rank 32, lower learning rate, stops early when the eval loss stops "
                "improving (checked every 50 steps).",
}
DEFAULT_PRESET = "quick test"

# TrainConfig fields that only do something with CUDA, and why they are off elsewhere.
CUDA_ONLY = {"load_in_4bit": "4-bit loading (QLoRA) needs a CUDA GPU",
             "gradient_checkpointing": "only saves GPU memory (CUDA)"}


# RAFT prompts carry passages (TrainConfig.raft_context_tokens of them at most), and max_length must leave
# the answer room after them: a preset in raft mode raises max_length to the budget + RAFT_ANSWER_TOKENS.
RAFT_ANSWER_TOKENS = 256
RAFT_PRESETS: dict[str, dict] = {
    "quick test": {"raft_context_tokens": 384},  # a few short passages: the quick check stays quick
}


def preset_values(name: str, mode: str = "sft") -> dict:
    """Every TrainConfig field's value under a preset (defaults for the fields it does not name).

    ``mode`` "raft": the preset's RAFT prompt budget, and a max_length that leaves the answer
    ``RAFT_ANSWER_TOKENS`` after it (TrainConfig refuses a max_length at or below the budget)."""
    from dataclasses import fields

    from sft_core.config import TrainConfig
    if name not in TRAIN_PRESETS:
        raise KeyError(f"unknown preset {name!r}; choose {', '.join(TRAIN_PRESETS)}")
    base = {f.name: getattr(TrainConfig(), f.name) for f in fields(TrainConfig)}
    values = {**base, **TRAIN_PRESETS[name]}
    if mode == "raft":
        values.update(RAFT_PRESETS.get(name, {}), mode="raft")
        values["max_length"] = max(values["max_length"], values["raft_context_tokens"] + RAFT_ANSWER_TOKENS)
    return values


def hardware_limits(cuda_devices: int | None = None) -> dict:
    """{"cuda": n GPUs, "summary": one line, "disabled": {field: reason}} for the Train form.

    ``cuda_devices`` None asks torch (this process)."""
    if cuda_devices is None:
        from sft_core import gpu
        try:
            cuda_devices = len(gpu.torch_devices())
        except Exception:  # noqa: BLE001 - no usable torch CUDA: train on the CPU
            cuda_devices = 0
    disabled: dict[str, str] = {}
    if cuda_devices == 0:
        disabled.update({k: f"{why}; this machine has none" for k, why in CUDA_ONLY.items()})
        disabled["num_gpus"] = "no CUDA GPU here: training runs on the CPU"
        summary = ("Training runs on the **CPU** in fp32 (no CUDA GPU found): 4-bit loading, gradient "
                   "checkpointing and multi-GPU are off.")
    elif cuda_devices == 1:
        disabled["num_gpus"] = "one GPU here"
        summary = "Training runs on **1 CUDA GPU** (bf16 or fp16, as the card supports)."
    else:
        summary = f"Training can use up to **{cuda_devices} CUDA GPUs**."
    return {"cuda": cuda_devices, "summary": summary, "disabled": disabled}


# ------------------------------------------------------------------------------------------------
# A training run's phase
# ------------------------------------------------------------------------------------------------
def _fmt_s(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def run_progress(status: str, events: list[dict], queue_line: str = "", error: str | None = None) -> dict:
    """{"phase", "step", "total", "fraction" (0-1 or None), "eta_s", "text"} of a run, from its job's
    status and its events.jsonl (sft_core/train.py writes phase lines, train_begin and one line per log)."""
    last_step = next((e for e in reversed(events) if e.get("step") is not None and e.get("event") != "phase"), None)
    step = last_step.get("step") if last_step else None
    total = next((e.get("max_steps") for e in reversed(events) if e.get("max_steps")), None)
    out = {"phase": status, "step": step, "total": total, "fraction": None, "eta_s": None, "text": status}
    if status == "queued":
        out["text"] = queue_line or "waiting in the queue"
        out["fraction"] = 0.0
        return out
    if status in ("succeeded", "failed", "cancelled"):
        parts = [status]
        if step is not None:
            parts.append(f"step {step}" + (f"/{total}" if total else ""))
        if status == "failed" and error:
            parts.append(error)
        out["text"] = " · ".join(parts)
        out["fraction"] = 1.0 if status == "succeeded" else (step / total if step is not None and total else None)
        return out
    # running: the newest of (a phase line, a step line) says what the worker does now
    newest = None
    for e in reversed(events):
        if e.get("event") == "phase" or e.get("step") is not None:
            newest = e
            break
    if newest is None:
        out.update(phase="starting", text="starting the training worker", fraction=0.0)
    elif newest.get("event") == "phase":
        phase = newest["phase"]
        after = phase in ("evaluating", "saving adapter")
        out.update(phase=phase, text=phase + "…", fraction=1.0 if after else 0.0)
        if after and step is not None:
            out["text"] = f"{phase}… (after step {step}" + (f"/{total})" if total else ")")
    else:
        out["phase"] = "training"
        eta = newest.get("eta_s")
        if total:
            out["fraction"] = max(0.0, min(1.0, (step or 0) / total))
        text = f"step {step}" + (f"/{total}" if total else "")
        if (step or 0) == 0:
            text += " · first step running"
        if eta is not None and step:
            out["eta_s"] = eta
            text += f" · ETA {_fmt_s(eta)}"
        if newest.get("tokens_per_s"):
            text += f" · {newest['tokens_per_s']:.0f} tok/s"
        out["text"] = text
    return out


def progress_bar_html(fraction: float | None, text: str) -> str:
    """A <progress> bar with its line of text (indeterminate when the fraction is unknown)."""
    value = "" if fraction is None else f' value="{max(0.0, min(1.0, fraction)):.3f}" max="1"'
    pct = "" if fraction is None else f" {fraction:.0%}"
    return (f'<div class="studio-progress"><progress{value}></progress>'
            f'<span>{html.escape(text)}{pct if fraction not in (None, 0.0, 1.0) else ""}</span></div>')


# ------------------------------------------------------------------------------------------------
# Selections: what a page starts on
# ------------------------------------------------------------------------------------------------
SELECTION_KEYS = ("dataset", "kb", "run", "eval", "campaign")


def default_selection(ws: Workspace, store: Store) -> dict:
    """The running or newest of each kind (the example knowledge base first: it is the one the
    example dataset's questions are about)."""
    def newest(ids: list) -> str | None:
        return ids[0] if ids else None
    kbs = kb_rows.names(store, newest_first=True)
    return {
        "dataset": newest(dataset_rows.names(store, newest_first=True)),
        "kb": EXAMPLE if EXAMPLE in kbs else (kbs[0] if kbs else None),
        "run": newest(run_rows.ids(store, status=ACTIVE)) or newest(run_rows.ids(store)),
        "eval": newest(eval_rows.ids(store, status=ACTIVE)) or newest(eval_rows.ids(store)),
        "campaign": newest(rating_rows.campaign_ids(store, newest_first=True)),
        "succeeded_run": newest(run_rows.ids(store, status="succeeded")),
    }


def choose(remembered, choices: list, default=None):
    """The remembered value if it is still offered, else the default if offered, else the first choice."""
    if remembered and remembered in choices:
        return remembered
    if default and default in choices:
        return default
    return choices[0] if choices else None


# ------------------------------------------------------------------------------------------------
# The five steps and the next action
# ------------------------------------------------------------------------------------------------
def _events(path: str | None) -> list[dict]:
    if not path:
        return []
    return read_jsonl(Path(path) / "events.jsonl")


def _latest_job(store: Store, ref: str) -> dict | None:
    return job_rows.latest(store, ref)


def guide_state(ws: Workspace, store: Store, selected_dataset: str | None = None) -> Guide:
    """The checklist and the next action. ``selected_dataset``: what the Train tab has chosen (the
    guided train action uses it); else the example domain, else the newest dataset."""
    from sft_core import example, jobs
    facts: dict = {}
    steps: dict[str, Step] = {}
    boot = example.bootstrap_state(ws, store)

    names = dataset_rows.names(store, newest_first=True)
    facts["dataset"] = (selected_dataset if selected_dataset in names else
                        EXAMPLE if EXAMPLE in names else (names[0] if names else None))
    if names:
        what = ", ".join(f"{n} (example)" if n == EXAMPLE else n for n in names[:3])
        steps["data"] = Step("data", "Data", "done", what + (f" + {len(names) - 3} more" if len(names) > 3 else ""))
    elif boot == "running":
        steps["data"] = Step("data", "Data", "running", "preparing the example domain (Python docs)…")
    elif boot == "failed":
        steps["data"] = Step("data", "Data", "failed", "the example domain failed to build: upload your own data")
    else:
        steps["data"] = Step("data", "Data", "todo", "upload question/answer pairs")

    kbs = kb_rows.names(store, newest_first=True)
    facts["kb"] = EXAMPLE if EXAMPLE in kbs else (kbs[0] if kbs else None)
    building = job_rows.live(store, kind="kb_build")
    if kbs:
        steps["knowledge"] = Step("knowledge", "Knowledge", "done", ", ".join(kbs[:3]))
    elif building or boot == "running":
        steps["knowledge"] = Step("knowledge", "Knowledge", "running", "indexing documents…")
    else:
        steps["knowledge"] = Step("knowledge", "Knowledge", "todo", "add documents for retrieval (RAG)")

    runs = run_rows.list_runs(store)
    active_run = next((r for r in runs if r["status"] in ACTIVE), None)
    done_run = next((r for r in runs if r["status"] == "succeeded"), None)
    facts["run"] = done_run["id"] if done_run else None
    # how it was trained (TrainConfig.mode): a raft run is compared with retrieval as raft:RUN as well
    facts["run_mode"] = ((loads(done_run["config"], {}) or {}).get("mode") or "sft") if done_run else None
    facts["active_run"] = active_run["id"] if active_run else None
    if active_run:
        job = _latest_job(store, active_run["id"])
        status = job["status"] if job and job["status"] in ACTIVE else active_run["status"]
        p = run_progress(status, _events(active_run["path"]),
                         jobs.describe(job, store) if job and status == "queued" else "")
        steps["train"] = Step("train", "Train", "running", f"{active_run['id']}: {p['text']}")
    elif done_run:
        m = json.loads(done_run["metrics"] or "{}")
        loss = f" · train loss {m['train_loss']:.3f}" if isinstance(m.get("train_loss"), (int, float)) else ""
        steps["train"] = Step("train", "Train", "done", f"{done_run['id']} finished{loss}")
    elif runs and runs[0]["status"] == "failed":
        steps["train"] = Step("train", "Train", "failed", f"{runs[0]['id']} failed: see the Train tab")
    else:
        steps["train"] = Step("train", "Train", "todo", "fine-tune a LoRA adapter")

    evals = eval_rows.list_evals(store)
    active_eval = next((e for e in evals if e["status"] in ACTIVE), None)
    wanted = f"sft:{done_run['id']}" if done_run else None
    # done = a finished eval of the newest finished run (or of anything, before any run finished)
    done_eval = next((e for e in evals if e["status"] == "succeeded"
                      and (wanted is None or wanted in json.loads(e["systems"] or "[]"))), None)
    facts["eval"] = done_eval["id"] if done_eval else None
    facts["active_eval"] = active_eval["id"] if active_eval else None
    if active_eval:
        job = _latest_job(store, active_eval["id"])
        line = jobs.describe(job, store) if job else active_eval["status"]
        steps["evaluate"] = Step("evaluate", "Evaluate", "running", line)
    elif done_eval:
        steps["evaluate"] = Step("evaluate", "Evaluate", "done", _verdict_line(done_eval["id"], ws, store))
    elif evals and evals[0]["status"] in ("failed", "interrupted") and not done_run:
        steps["evaluate"] = Step("evaluate", "Evaluate", "failed", f"{evals[0]['id']} {evals[0]['status']}")
    else:
        steps["evaluate"] = Step("evaluate", "Evaluate", "todo",
                                 "compare prompt, RAG and fine-tuned on held-out questions")

    camps = rating_rows.list_campaigns(store)
    camp = next((c for c in camps if done_eval and c["eval_id"] == done_eval["id"]), camps[0] if camps else None)
    facts["campaign"] = camp["id"] if camp else None
    if camp and camp["n_votes"]:
        steps["rate"] = Step("rate", "Rate", "done", f"{camp['id']}: {camp['n_votes']} vote(s)")
    elif camp:
        steps["rate"] = Step("rate", "Rate", "todo", f"{camp['id']}: no votes yet")
    else:
        steps["rate"] = Step("rate", "Rate", "todo", "people compare answers blind")

    return Guide([steps[k] for k, _ in STEPS], _next_action(steps, facts, camp), facts)


def _verdict_line(eval_id: str, ws: Workspace, store: Store) -> str:
    scores = ws.evals_dir(eval_id) / "scores.json"
    try:
        stamp = scores.stat().st_mtime_ns
    except OSError:
        stamp = None
    key = (str(scores), stamp)
    if key not in _VERDICTS:
        if len(_VERDICTS) >= 64:
            _VERDICTS.clear()
        _VERDICTS[key] = _read_verdict_line(eval_id, ws, store)
    return _VERDICTS[key]


_VERDICTS: dict[tuple, str] = {}  # (scores.json, its mtime) -> line: every visitor's guide polls it


def _read_verdict_line(eval_id: str, ws: Workspace, store: Store) -> str:
    from evals import report
    try:
        v = report.verdict(report.eval_scores(eval_id, ws=ws, store=store) or {})
    except Exception:  # noqa: BLE001 - a scores file being written: say it is finished, no verdict yet
        v = None
    if not v:
        return f"{eval_id} finished"
    best = report.short_names(v["ranking"])[v["best"]]
    return f"{eval_id}: best is {best} on {v['metric']}" + ("" if v.get("clear") else " (not yet clear)")


def _next_action(steps: dict[str, Step], facts: dict, camp: dict | None) -> Action:
    s = {k: st.state for k, st in steps.items()}
    if s["data"] != "done":
        if s["data"] == "running":
            return Action("wait", "Preparing the example…", "data",
                          "The example domain (Python's standard library docs) is being built: a minute or two. "
                          "Or upload your own question/answer file on the Data tab.")
        return Action("open", "Upload a dataset", "data", "A CSV or JSONL of questions and answers.")
    if s["train"] == "running":
        return Action("open", "Watch the training run", "train", steps["train"].detail)
    if not facts.get("run"):
        ds = facts.get("dataset")
        return Action("train", f"Train on {ds} (quick test)", "train",
                      f"Fine-tunes a LoRA adapter on {ds} with the Train tab's settings (preset "
                      f"“{DEFAULT_PRESET}” unless you changed it); progress shows on the Train tab.")
    if s["evaluate"] == "running":
        return Action("open", "Watch the evaluation", "evaluate", steps["evaluate"].detail)
    if not facts.get("eval"):
        rag = " and with retrieval" if facts.get("kb") else ""
        how = " (trained with retrieved passages, RAFT)" if facts.get("run_mode") == "raft" else ""
        return Action("evaluate", "Compare the systems", "evaluate",
                      f"Scores the base model (prompted{rag}) against your fine-tuned {facts['run']}{how} on held-out "
                      "questions, with the Evaluate tab's row limit and metrics; the recommendation card shows "
                      "the answer.")
    if camp is None or camp.get("eval_id") != facts["eval"]:
        return Action("rate", "Rate answers yourself", "rate",
                      "Starts a blind rating campaign on the evaluation's answers with an invite for you; "
                      "press Next on the Rate tab and vote.")
    if not camp["n_votes"]:
        return Action("open", "Rate answers", "rate", "Press Next on the Rate tab and vote (keys 1-4).")
    return Action("open", "See the leaderboard", "results", "Votes so far, as a leaderboard with intervals.")


ICONS = {"done": "✓", "running": "…", "todo": "", "failed": "!"}


def checklist_html(g: Guide) -> str:
    """The five steps as a numbered row of chips (state by class and icon; the detail as a tooltip too)."""
    items = []
    for i, st in enumerate(g.steps, 1):
        icon = ICONS[st.state]
        items.append(f'<li class="step {st.state}" title="{html.escape(st.detail)}">'
                     f'<span class="num">{icon or i}</span><span class="name">{html.escape(st.title)}</span>'
                     f'<span class="detail">{html.escape(st.detail)}</span></li>')
    return f'<ol class="guide-steps">{"".join(items)}</ol>'


def next_html(g: Guide) -> str:
    """What the next-action button will do, in a sentence."""
    return f'<p class="guide-next">{html.escape(g.next.hint or g.next.label)}</p>'
