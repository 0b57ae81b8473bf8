"""Run a test split through several systems, score it, and write the decision report.

    evals/<eval_id>/manifest.json   everything needed to reproduce the eval
    evals/<eval_id>/outputs.jsonl   one line per (row, system), appended as answers arrive
    evals/<eval_id>/scores.json     per-row metric values + summary with CIs and paired tests
                                    (+ "judge": pairwise counts and mean rubric per system)
    evals/<eval_id>/judge.jsonl, judge_rubric.jsonl   the optional LLM judge (evals/judge.py)
    evals/<eval_id>/report.html|md  the decision report

Resumable: a rerun of the same eval id skips (row, system) pairs already in outputs.jsonl.
Generation is continuous: every missing answer (all systems, both sets, interleaved) goes through a
sliding window that keeps the engine full (``generate_answers``; ``sft_core.serving.base.generate_stream``),
and each answer is appended the moment it completes.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from sft_core import StudioError
from sft_core.config import DecodingConfig, StudioSettings
from sft_core.db import evals as eval_rows, jobs as job_rows, runs as run_rows
from sft_core.store import Store, loads, open_store
from sft_core.workspace import Workspace, append_jsonl, atomic_write_json, read_jsonl

from evals import metrics as M
from evals import systems as S

GENERAL_SET = Path(__file__).parent / "data" / "general.jsonl"
BATCH = 16          # the old batch loop's chunk (bench/eval_throughput.py's baseline)
OPENAI_WINDOW = 16  # requests in flight to an external openai: endpoint


class EvalError(StudioError):
    pass


def create_eval(dataset: str, systems: list[str], split: str = "test", kb: str | None = None,
                limit: int | None = None, metrics: list[str] | None = None, judge: bool | str | None = None,
                few_shot: int = 0, max_new_tokens: int = 128, base_model: str | None = None,
                general: bool = True, *, ws: Workspace, store: Store | None = None,
                judge_model: str | None = None, judge_limit: int | None = None,
                settings: StudioSettings | None = None) -> str:
    """Check everything, then create the eval's directory, manifest and row (nothing runs yet).

    ``judge``: None/False (no judge), True or "local" (the local engine), or the URL of an
    OpenAI-compatible endpoint (model ``judge_model``; key from SFT_STUDIO_JUDGE_API_KEY or
    OPENAI_API_KEY at run time, never stored). External endpoints (``openai:*`` systems, a judge
    URL) get a pre-flight request last, right before anything is written: a dead one stores nothing.
    ``base_model``: the systems' base model; without it, the studio's default (``settings.base_model``)."""
    from evals import judge as J
    from sft_core import data, jobs
    jobs.check_backend()  # a job backend that cannot take the eval: refused before anything is written
    store = store or open_store(ws.db_url)
    checked = S.check_systems(systems, store, kb, check_endpoints=False)
    judge_to = J.judge_target(judge)
    if judge_model and not judge_to:
        raise EvalError("--judge-model needs --judge", "judge")
    if few_shot < 0:
        raise EvalError("few-shot must be 0 or more", "few_shot")
    if judge_limit is not None and (not judge_to or int(judge_limit) < 1):
        raise EvalError("--judge-limit needs --judge and a positive number of rows", "judge_limit")
    bad = [m for m in (metrics or []) if m not in M.METRICS]
    if bad:
        raise EvalError(f"unknown metric(s) {', '.join(bad)}; choose from {', '.join(M.METRICS)}", "metrics")
    dv = data.get_version(dataset, None, ws=ws, store=store)
    from sft_core.preference import KIND as PREFERENCE, dataset_kind
    if dataset_kind(dv) == PREFERENCE:  # pairs have no reference answer to score against
        raise EvalError(f"{dv.name}@{dv.version} is a preference dataset (prompt/chosen/rejected pairs), not rows with "
                        "a reference answer: evaluate on the instruction dataset the pairs came from", "dataset")
    rows = data.load_split(dataset, split, dv.version, ws=ws, store=store)  # raises if the split is missing
    if not rows:
        raise EvalError(f"split {split!r} of {dataset} is empty", "split")
    if kb:
        from sft_core.retrieval import open_kb
        open_kb(kb, ws)
    base = _base_model(base_model, settings)
    for s in checked:
        if s.adapter:
            run = run_rows.get(store, s.adapter)
            if run["base_model"] != base:
                raise EvalError(f"run {s.adapter} was trained on {run['base_model']}, not on {base}", "systems")
    if few_shot:
        data.load_split(dataset, "train", dv.version, ws=ws, store=store)  # few-shot examples come from train
    S.preflight(checked)  # network last: every local check has passed
    if judge_to and judge_to != "local":
        J.check_endpoint_for_judge(judge_to)
    eval_id = f"eval-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    path = ws.evals_dir(eval_id)
    path.mkdir(parents=True)
    cfg = {"dataset": dataset, "dataset_version": dv.version, "split": split, "systems": [s.name for s in checked],
           "kb": kb, "limit": limit, "metrics": list(metrics or M.DEFAULT_METRICS), "judge": judge_to,
           "judge_model": judge_model, "judge_limit": int(judge_limit) if judge_limit else None,
           "few_shot": few_shot, "base_model": base, "general": general,
           # each raft:RUN system's passages and budget, as its run was trained (reproducible from the manifest)
           "raft": {s.run: S.raft_settings(s.run, store).to_dict() for s in checked if s.kind == "raft"},
           "decoding": asdict(DecodingConfig(temperature=0.0, max_new_tokens=max_new_tokens)), "seed": 0}
    manifest = {"eval_id": eval_id, "created_at": time.time(), "config": cfg, "packages": _versions()}
    atomic_write_json(path / "manifest.json", manifest)
    eval_rows.insert_eval(store, eval_id, dataset, dv.version, split, cfg["systems"], str(path), cfg)
    return eval_id


def _base_model(base_model: str | None, settings: StudioSettings | None) -> str:
    """The base model asked for, else the studio's default (the caller's settings)."""
    if base_model:
        return base_model
    if settings is None:
        raise EvalError("no base model: give base_model or the studio settings (their default base model)",
                        "base_model")
    return settings.base_model


def _versions() -> dict:
    from sft_core.train import package_versions
    return package_versions()


def set_status(store: Store, eval_id: str, status: str) -> None:
    eval_rows.set_status(store, eval_id, status)


def _openai_client():
    """The ``openai:*`` systems' endpoint (the project's one client, sft_core/serving/client.py) and its URL."""
    from sft_core.serving.client import external_endpoint
    endpoint = external_endpoint(timeout=120)
    return endpoint, endpoint.base_url


def _openai_one(endpoint, base: str, model: str, msgs: list[dict], decoding: DecodingConfig):
    """One answer from an external ``openai:`` system as a GenResult (``error`` set on failure)."""
    return endpoint.answer(model, msgs, decoding, f"openai:{model}")


def _openai_batch(model: str, reqs: list[list[dict]], decoding: DecodingConfig) -> list[dict]:
    """Today's batch path for external systems (kept for the batch-of-16 baseline of the bench)."""
    client, base = _openai_client()
    out = []
    for msgs in reqs:
        g = _openai_one(client, base, model, msgs, decoding)
        if g.error:
            raise EvalError(g.error, "systems")
        out.append({"output": g.text, "latency_s": g.latency_s, "prompt_tokens": g.prompt_tokens,
                    "completion_tokens": g.completion_tokens})
    return out


def missing_answers(sets: dict[str, list[dict]], systems: list[S.System], done: set) -> list[tuple]:
    """(set, row, system) for every answer not in ``done``, interleaved: row by row across the sets,
    every system of a row together, so base-model and adapter requests mix in the engine's batch."""
    out = []
    for i in range(max((len(r) for r in sets.values()), default=0)):
        for set_name, rows in sets.items():
            if i < len(rows):
                out += [(set_name, rows[i], s) for s in systems if (set_name, rows[i]["id"], s.name) not in done]
    return out


class _SearchCache:
    """A knowledge base whose ``search`` remembers its answers (one eval asks each question per RAG system)."""

    def __init__(self, kb):
        self._kb, self._hits, self._lock = kb, {}, threading.Lock()

    def search(self, query: str, *args, **kw):
        key = (query, args, tuple(sorted(kw.items())))
        with self._lock:
            if key in self._hits:
                return self._hits[key]
        hits = self._kb.search(query, *args, **kw)
        with self._lock:
            self._hits[key] = hits
        return hits

    def __getattr__(self, name):
        return getattr(self._kb, name)


def _progress_caller(progress):
    """``progress(done, total)`` as before, or ``progress(done, total, info)`` when it takes a third
    argument; ``info``: answers_per_s and eta_s (this run's rate), generated (this run), elapsed_s."""
    if progress is None:
        return None
    import inspect
    try:
        params = list(inspect.signature(progress).parameters.values())
        takes_info = any(p.kind == p.VAR_POSITIONAL for p in params) or sum(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3
    except (TypeError, ValueError):
        takes_info = False
    return (lambda d, t, info: progress(d, t, info)) if takes_info else (lambda d, t, info: progress(d, t))


def generate_answers(todo: list[tuple], ctx: S.Context, decoding: DecodingConfig, engine, out_path: Path,
                     done_before: int, total: int, progress=None, window: int | None = None,
                     openai_window: int | None = None) -> int:
    """Generate ``todo`` ((set, row, system) from :func:`missing_answers`) through a sliding window:
    local systems through ``generate_stream`` (at most ``window`` = the engine's capacity in flight,
    refilled as each answer completes), ``openai:`` systems through their own window at the same time.
    Each answer is appended to ``outputs.jsonl`` the moment it completes (one line per (set, row,
    system), in completion order). The first error stops submission everywhere; the answers in
    flight are still written, then EvalError is raised. Returns the number of answers written."""
    from sft_core.serving.base import GenRequest, engine_capacity, generate_stream, merge_streams, prefetch, run_window
    lanes = {"engine": [j for j in todo if j[2].kind != "openai"], "openai": [j for j in todo if j[2].kind == "openai"]}
    used: dict[tuple[str, int], list] = {}   # passages of each request, by (lane, index)
    stop = threading.Event()
    if ctx.kb is not None:  # rag and sft+rag ask the same question: retrieve it once
        ctx = dataclasses.replace(ctx, kb=_SearchCache(ctx.kb))

    def built(lane: str, ahead: int):
        def build():
            for k, (set_name, r, system) in enumerate(lanes[lane]):
                msgs, passages = S.build_messages(system, r, ctx)
                used[(lane, k)] = passages
                yield system, msgs
        return prefetch(build(), ahead, name=f"build-{lane}")  # built while the window waits on answers

    streams = []
    if lanes["engine"]:
        window = window or engine_capacity(engine)
        streams.append(("engine", lambda: generate_stream(
            engine, (GenRequest(m, s.adapter, decoding) for s, m in built("engine", window)), window=window, stop=stop)))
    if lanes["openai"]:
        client, base = _openai_client()
        ow = openai_window or OPENAI_WINDOW
        streams.append(("openai", lambda: run_window(
            lambda sm: _openai_one(client, base, sm[0].model, sm[1], decoding), built("openai", ow), ow,
            stop=stop, name="openai")))
    call = _progress_caller(progress)
    lock = threading.Lock()
    count, written, error, t0 = done_before, 0, None, time.time()
    with contextlib.closing(merge_streams(streams, stop)) as results:
        for lane, (k, g) in results:
            set_name, r, system = lanes[lane][k]
            if g.error:
                if error is None:  # the first error: nothing new starts; what is in flight still lands
                    error = (g.error if system.kind == "openai" else f"engine error for {system.name}: {g.error}",
                             "systems" if system.kind == "openai" else "engine")
                    stop.set()
                continue
            with lock:
                append_jsonl(out_path, {
                    "set": set_name, "row_id": r["id"], "system": system.name, "instruction": r["instruction"],
                    "context": r.get("context"), "reference": r["response"], "output": g.text,
                    "latency_s": g.latency_s, "prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens,
                    "passages": [{"source": h.source, "doc_id": h.doc_id, "position": h.position,
                                  "text": h.text, "score": h.score} for h in used.pop((lane, k), [])]})
                count += 1
                written += 1
            if call:
                elapsed = time.time() - t0
                rate = written / elapsed if elapsed > 0 else 0.0
                call(count, total, {"generated": written, "elapsed_s": elapsed, "answers_per_s": rate,
                                    "eta_s": (total - count) / rate if rate > 0 else None})
    if error:
        raise EvalError(*error)
    return written


def eval_sets(cfg: dict, ws: Workspace, store: Store) -> dict[str, list[dict]]:
    """The rows an eval answers: {"domain": the split (first ``limit``), "general": the general set}."""
    from sft_core import data
    rows = data.load_split(cfg["dataset"], cfg["split"], cfg["dataset_version"], ws=ws, store=store)
    if cfg.get("limit"):
        rows = rows[: int(cfg["limit"])]
    sets = {"domain": rows}
    if cfg.get("general") and GENERAL_SET.exists():
        gen = read_jsonl(GENERAL_SET)
        sets["general"] = gen[: int(cfg["limit"])] if cfg.get("limit") else gen
    return sets


def eval_context(cfg: dict, ws: Workspace, store: Store, systems: list[S.System] | None = None) -> S.Context:
    """What ``S.build_messages`` needs for this eval: the KB and the base model's tokenizer (only
    when a system retrieves), and the few-shot rows: the first ``few_shot`` rows of the train split
    of the same dataset version (deterministic: the same examples, in the same order, every time)."""
    from sft_core import data, models
    from sft_core.retrieval import open_kb
    systems = systems if systems is not None else [S.parse_system(n) for n in cfg["systems"]]
    ctx = S.Context()
    if any(s.uses_kb for s in systems):
        ctx.kb = open_kb(cfg["kb"], ws) if cfg.get("kb") else None
        ctx.tokenizer = models.load_tokenizer(models.resolve_model(cfg["base_model"], ws))
    from sft_core.raft import RaftSettings
    stored = cfg.get("raft") or {}
    ctx.raft = {s.run: RaftSettings(**stored[s.run]) if s.run in stored else S.raft_settings(s.run, store)
                for s in systems if s.kind == "raft"}
    if cfg.get("few_shot"):
        ctx.few_shot = data.load_split(cfg["dataset"], "train", cfg["dataset_version"],
                                       ws=ws, store=store)[: int(cfg["few_shot"])]
    return ctx


def _start_engine(cfg: dict, ws: Workspace, store: Store, settings: StudioSettings | None):
    """The engine for the eval's base model, as the app starts it (``settings.engine``, ``settings.engine_url``:
    SFT_STUDIO_ENGINE, SFT_STUDIO_ENGINE_URL where the entry point read them)."""
    from sft_core.serving import get_engine
    if settings is None:
        raise EvalError("no engine given and no studio settings to start one with (engine, engine_url)", "engine")
    return get_engine(cfg["base_model"], ws, store, engine=settings.engine, url=settings.engine_url or None)


def run_eval(eval_id: str, ws: Workspace, store: Store | None = None, engine=None,
             progress=None, *, settings: StudioSettings | None = None) -> dict:
    """Generate the missing outputs, score, judge (if asked) and write the report. Returns the scores.

    An engine passed in is the caller's; one this function had to start (no ``engine`` given and a
    system, or the local judge, needs it) is started from ``settings`` (engine, engine_url) and closed
    before it returns."""
    from evals import judge as J
    store = store or open_store(ws.db_url)
    row = eval_rows.get(store, eval_id)
    if row is None:
        raise EvalError(f"unknown eval {eval_id!r}", "eval")
    cfg = loads(row["config"])
    path = Path(row["path"])
    decoding = DecodingConfig(**cfg["decoding"])
    try:
        sets = eval_sets(cfg, ws, store)
        systems = [S.parse_system(n) for n in cfg["systems"]]
        judge_to = J.judge_target(cfg.get("judge"))
    except Exception:  # e.g. the dataset was deleted since: failed, with the reason, not stuck 'queued'
        set_status(store, eval_id, "failed")
        raise
    set_status(store, eval_id, "running")
    out_path = path / "outputs.jsonl"
    done = {(o["set"], o["row_id"], o["system"]) for o in read_jsonl(out_path)}
    total = sum(len(r) for r in sets.values()) * len(systems)
    owned = None
    try:
        ctx = eval_context(cfg, ws, store, systems)
        todo = missing_answers(sets, systems, done)
        local = {j[2].name: j[2] for j in todo if j[2].kind != "openai"}
        if local and engine is None:
            engine = owned = _start_engine(cfg, ws, store, settings)
        for system in local.values():
            if system.adapter:  # load each adapter once, before the first request that needs it
                try:
                    engine.load_adapter(system.adapter)
                except StudioError as e:
                    raise EvalError(f"engine error for {system.name}: {e}", "engine") from None
        if out_path.exists() and out_path.stat().st_size:  # a torn last line (crash mid-append) stays alone
            with open(out_path, "rb+") as f:
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")
        generate_answers(todo, ctx, decoding, engine, out_path, len(done), total, progress)
        summary = score_eval(eval_id, ws, store)
        if judge_to == "local":
            if engine is None:  # every system was external: start the local engine for the judge
                engine = owned = _start_engine(cfg, ws, store, settings)
            J.judge_eval(eval_id, engine=engine, ws=ws, store=store, limit=cfg.get("judge_limit"))
        elif judge_to:
            J.judge_eval(eval_id, url=judge_to, model=cfg.get("judge_model"), api_key=J.judge_api_key(),
                         limit=cfg.get("judge_limit"),
                         ws=ws, store=store)
        if judge_to:
            summary["judge"] = J.summarize_judge(path, cfg["systems"])
            atomic_write_json(path / "scores.json", summary)
        from evals import report
        report.write_report(eval_id, ws, store)
    except BaseException as e:
        set_status(store, eval_id, "failed" if not isinstance(e, KeyboardInterrupt) else "interrupted")
        raise
    finally:
        if owned is not None:
            owned.close()
    set_status(store, eval_id, "succeeded")
    return summary


def score_eval(eval_id: str, ws: Workspace, store: Store) -> dict:
    from evals import stats
    row = eval_rows.get(store, eval_id)
    cfg, path = loads(row["config"]), Path(row["path"])
    outputs = read_jsonl(path / "outputs.jsonl")
    result = {"sets": {}}
    for set_name in sorted({o["set"] for o in outputs}):
        per_sys: dict[str, dict[str, list[float]]] = {}
        for system in cfg["systems"]:
            outs = sorted((o for o in outputs if o["set"] == set_name and o["system"] == system), key=lambda o: o["row_id"])
            if not outs:
                continue
            preds, refs = [o["output"] for o in outs], [o["reference"] for o in outs]
            sc = {}
            for m in cfg["metrics"]:
                if m in M.RAG_ONLY:
                    if not S.parse_system(system).uses_kb:
                        continue
                    sc[m] = M.compute(m, preds, passages=["\n".join(p["text"] for p in o["passages"]) for o in outs])
                else:
                    sc[m] = M.compute(m, preds, references=refs)
            sc["latency_s"] = [o["latency_s"] for o in outs]
            sc["completion_tokens"] = [float(o["completion_tokens"]) for o in outs]
            per_sys[system] = sc
        result["sets"][set_name] = {"summary": stats.summarize(per_sys), "rows": per_sys,
                                    "row_ids": sorted({o["row_id"] for o in outputs if o["set"] == set_name})}
    from evals import judge as J
    judged = J.summarize_judge(path, cfg["systems"])
    if judged:
        result["judge"] = judged
    atomic_write_json(path / "scores.json", result)
    return result


def eval_status(eval_id: str, ws: Workspace, store: Store | None = None) -> dict:
    """For the UI: progress, the results table and examples (read from disk: survives reloads)."""
    store = store or open_store(ws.db_url)
    row = eval_rows.get(store, eval_id)
    if row is None:
        raise EvalError(f"unknown eval {eval_id!r}", "eval")
    path = Path(row["path"])
    outputs = read_jsonl(path / "outputs.jsonl")
    out = {"status": row["status"], "n_outputs": len(outputs), "table": [], "examples": []}
    scores = json.loads((path / "scores.json").read_text()) if (path / "scores.json").exists() else None
    out["summary"] = f"**{eval_id}** · {row['status']} · {len(outputs)} answers"
    if scores:
        for set_name, s in scores["sets"].items():
            for system, ms in s["summary"]["systems"].items():
                entry = {"set": set_name, "system": system}
                for m, v in ms.items():
                    entry[m] = f"{v['mean']:.3f} [{v['low']:.3f}, {v['high']:.3f}]"
                rub = (scores.get("judge") or {}).get("rubric", {}).get(system) if set_name == "domain" else None
                if rub and rub["mean"] is not None:
                    entry["judge_rubric"] = f"{rub['mean']:.2f} [{rub['low']:.2f}, {rub['high']:.2f}]"
                out["table"].append(entry)
    for o in outputs[:200]:
        out["examples"].append({"system": o["system"], "question": o["instruction"], "answer": o["output"],
                                "reference": o["reference"]})
    rep = path / "report.html"
    out["report_html"] = str(rep) if rep.exists() else None
    return out


# ------------------------------------------------------------------------------------------------
# The eval as a job: submitted by the app and the CLI, run by the worker process (sft_core.worker)
# ------------------------------------------------------------------------------------------------
ENGINE_WAIT_S = 120.0  # how long a worker waits for the app's engine to come back before starting its own


def needs_local_engine(cfg: dict) -> bool:
    """Whether the eval computes on this machine (a local system, or the local judge): the job then takes
    the accelerator slot, so it waits for a training run instead of fighting it for the cores or GPU."""
    from evals import judge as J
    return any(S.parse_system(n).kind != "openai" for n in cfg["systems"]) or J.judge_target(cfg.get("judge")) == "local"


def submit_eval(eval_id: str, ws: Workspace, store: Store | None = None) -> str:
    """Queue the (created or interrupted) eval as a job; returns the job id.

    The state is checked in the transaction that queues: an eval that is queued or running already, or
    has a live job, is refused, so two clicks never queue it twice."""
    from sft_core import jobs
    jobs.check_backend()
    store = store or open_store(ws.db_url)
    jobs.reconcile(store, ws=ws)
    with store.tx() as con:
        row = eval_rows.get(con, eval_id)
        if row is None:
            raise EvalError(f"unknown eval {eval_id!r}", "eval")
        live = job_rows.live(con, ref=eval_id, kind="eval")
        if live:
            raise EvalError(f"eval {eval_id} already has a {('queued or running')} job", "eval")
        if row["status"] == "succeeded":
            raise EvalError(f"eval {eval_id} has finished; nothing to resume", "eval")
        eval_rows.set_status(con, eval_id, "queued")
        return jobs._insert_job(con, "eval", eval_id, {"accelerator": needs_local_engine(loads(row["config"]))})


def _attach_app_engine(cfg: dict, ws: Workspace, store: Store):
    """The app's running vLLM engine (URL + per-start key from ``run/engine.json``) when it serves the
    eval's base model, else None."""
    from sft_core.serving import get_engine
    from sft_core.serving.base import EngineError
    from sft_core.studio import read_engine_link
    link = read_engine_link(ws)
    if not link or cfg["base_model"] not in (link.get("base_model"), link.get("base_name")):
        return None
    import os
    os.environ["SFT_STUDIO_ENGINE_API_KEY"] = link.get("api_key") or ""
    try:
        return get_engine(cfg["base_model"], ws, store, engine="vllm", url=link["url"])
    except EngineError as e:
        print(f"could not attach to the app's engine at {link['url']}: {e}", file=sys.stderr, flush=True)
        return None


def _wait_for_engine_change(ws: Workspace, old: dict | None, timeout: float) -> dict | None:
    """A newer announcement of the app's engine (restarted: new URL or key) within ``timeout``, else None."""
    from sft_core.studio import read_engine_link
    end = time.time() + timeout
    while time.time() < end:
        link = read_engine_link(ws)
        if link and (not old or link.get("time") != old.get("time")):
            return link
        if link is None and old is not None and time.time() > end - timeout / 2:
            return None  # the app is gone for good: no point waiting the full time
        time.sleep(1.0)
    return None


def job_entry(ctx, payload: dict) -> None:
    """The eval job: generate what is missing, score, judge, report — in the worker process.

    The eval attaches to the app's engine when the app runs one for the same base model, else starts
    its own (closed at the end). If the attached engine fails mid-eval (restart: new port or key), the
    worker waits up to ENGINE_WAIT_S for it to come back and continues; if the app is gone, it goes on
    with an engine of its own. Every answer already written is kept (the eval resumes, never redoes)."""
    from sft_core.serving.base import EngineError
    from sft_core.studio import read_engine_link
    eval_id = ctx.job["ref"]
    row = eval_rows.get(ctx.store, eval_id)
    if row is None:
        raise EvalError(f"unknown eval {eval_id!r} (deleted?)", "eval")
    cfg = loads(row["config"])

    def progress(done, total, *a, **kw):
        ctx.check_cancel()
        ctx.progress(done, total, unit="answers")

    for attempt in range(3):
        link = read_engine_link(ctx.ws)
        engine = _attach_app_engine(cfg, ctx.ws, ctx.store) if needs_local_engine(cfg) else None
        print(f"eval {eval_id}: attempt {attempt + 1}, engine: "
              f"{'the app' + chr(39) + 's at ' + link['url'] if engine is not None else 'own (started on demand)'}",
              flush=True)
        try:
            run_eval(eval_id, ctx.ws, ctx.store, engine=engine, progress=progress, settings=ctx.settings)
            return
        except (EngineError, EvalError) as e:
            if engine is None or getattr(e, "where", None) not in ("engine", "vllm", "engine_url"):
                raise
            print(f"the app's engine failed mid-eval ({e}); waiting up to {ENGINE_WAIT_S:.0f}s for it", flush=True)
            _wait_for_engine_change(ctx.ws, link, ENGINE_WAIT_S)
        finally:
            if engine is not None:
                engine.close()  # an attached engine: closes only the client, never the app's server
    raise EvalError("the engine kept failing; the eval can be resumed", "engine")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.runner")
    ap.add_argument("--eval-id", required=True)
    args = ap.parse_args(argv)
    ws = Workspace.from_env()
    try:
        run_eval(args.eval_id, ws, open_store(ws.db_url), settings=StudioSettings.from_env())
    except StudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
