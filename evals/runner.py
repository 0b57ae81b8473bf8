"""Run a test split through several systems, score it, and write the decision report.

    evals/<eval_id>/manifest.json   everything needed to reproduce the eval
    evals/<eval_id>/outputs.jsonl   one line per (row, system), appended as answers arrive
    evals/<eval_id>/scores.json     per-row metric values + summary with CIs and paired tests
                                    (+ "judge": pairwise counts and mean rubric per system)
    evals/<eval_id>/judge.jsonl, judge_rubric.jsonl   the optional LLM judge (evals/judge.py)
    evals/<eval_id>/report.html|md  the decision report

Resumable: a rerun of the same eval id skips (row, system) pairs already in outputs.jsonl.
Requests go through the serving engine in batches (the engine batches them again inside).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from sft_core import StudioError
from sft_core.config import DecodingConfig
from sft_core.store import Store, dumps, loads, open_store
from sft_core.workspace import Workspace, append_jsonl, atomic_write_json, read_jsonl

from evals import metrics as M
from evals import systems as S

GENERAL_SET = Path(__file__).parent / "data" / "general.jsonl"
BATCH = 16


class EvalError(StudioError):
    pass


def create_eval(dataset: str, systems: list[str], split: str = "test", kb: str | None = None,
                limit: int | None = None, metrics: list[str] | None = None, judge: bool | str | None = None,
                few_shot: int = 0, max_new_tokens: int = 128, base_model: str | None = None,
                general: bool = True, ws: Workspace | None = None, store: Store | None = None,
                judge_model: str | None = None, judge_limit: int | None = None) -> str:
    """Check everything, then create the eval's directory, manifest and row (nothing runs yet).

    ``judge``: None/False (no judge), True or "local" (the local engine), or the URL of an
    OpenAI-compatible endpoint (model ``judge_model``; key from SFT_STUDIO_JUDGE_API_KEY or
    OPENAI_API_KEY at run time, never stored). External endpoints (``openai:*`` systems, a judge
    URL) get a pre-flight request last, right before anything is written: a dead one stores nothing."""
    from evals import judge as J
    from sft_core import data
    from sft_core.config import StudioSettings
    ws = ws or Workspace.from_env()
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
    dv = data.get_version(dataset, None, ws, store)
    rows = data.load_split(dataset, split, dv.version, ws, store)  # raises if the split is missing
    if not rows:
        raise EvalError(f"split {split!r} of {dataset} is empty", "split")
    if kb:
        from sft_core.retrieval import open_kb
        open_kb(kb, ws)
    base = base_model or StudioSettings.from_env().base_model
    for s in checked:
        if s.adapter:
            run = store.query_one("SELECT base_model FROM runs WHERE id=?", (s.adapter,))
            if run["base_model"] != base:
                raise EvalError(f"run {s.adapter} was trained on {run['base_model']}, not on {base}", "systems")
    if few_shot:
        data.load_split(dataset, "train", dv.version, ws, store)  # few-shot examples come from train
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
           "decoding": asdict(DecodingConfig(temperature=0.0, max_new_tokens=max_new_tokens)), "seed": 0}
    manifest = {"eval_id": eval_id, "created_at": time.time(), "config": cfg, "packages": _versions()}
    atomic_write_json(path / "manifest.json", manifest)
    with store.tx() as con:
        con.execute("INSERT INTO evals (id, dataset, dataset_version, split, systems, status, created_at, path, config)"
                    " VALUES (?,?,?,?,?,?,?,?,?)", (eval_id, dataset, dv.version, split, dumps(cfg["systems"]),
                                                    "queued", time.time(), str(path), dumps(cfg)))
    return eval_id


def _versions() -> dict:
    from sft_core.train import package_versions
    return package_versions()


def set_status(store: Store, eval_id: str, status: str) -> None:
    with store.tx() as con:
        con.execute("UPDATE evals SET status=? WHERE id=?", (status, eval_id))


def _openai_batch(model: str, reqs: list[list[dict]], decoding: DecodingConfig) -> list[dict]:
    from openai import OpenAI
    base, key = S.openai_endpoint()
    client = OpenAI(base_url=base, api_key=key, timeout=120)
    out = []
    for msgs in reqs:
        t = time.time()
        try:
            r = client.chat.completions.create(model=model, messages=msgs, temperature=decoding.temperature,
                                               max_tokens=decoding.max_new_tokens)
            out.append({"output": r.choices[0].message.content or "", "latency_s": time.time() - t,
                        "prompt_tokens": r.usage.prompt_tokens if r.usage else 0,
                        "completion_tokens": r.usage.completion_tokens if r.usage else 0})
        except Exception as e:
            raise EvalError(f"openai:{model}: endpoint {base} failed: {type(e).__name__}: {e}",
                            "systems") from None
    return out


def eval_sets(cfg: dict, ws: Workspace, store: Store) -> dict[str, list[dict]]:
    """The rows an eval answers: {"domain": the split (first ``limit``), "general": the general set}."""
    from sft_core import data
    rows = data.load_split(cfg["dataset"], cfg["split"], cfg["dataset_version"], ws, store)
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
    if cfg.get("few_shot"):
        ctx.few_shot = data.load_split(cfg["dataset"], "train", cfg["dataset_version"], ws, store)[: int(cfg["few_shot"])]
    return ctx


def _start_engine(cfg: dict, ws: Workspace, store: Store):
    """The engine for the eval's base model, as the app starts it (SFT_STUDIO_ENGINE, SFT_STUDIO_ENGINE_URL)."""
    from sft_core.config import StudioSettings
    from sft_core.serving import get_engine
    settings = StudioSettings.from_env()
    return get_engine(cfg["base_model"], ws, store, engine=settings.engine, url=settings.engine_url or None)


def run_eval(eval_id: str, ws: Workspace | None = None, store: Store | None = None, engine=None,
             progress=None) -> dict:
    """Generate the missing outputs, score, judge (if asked) and write the report. Returns the scores.

    An engine passed in is the caller's; one this function had to start (no ``engine`` given and a
    system, or the local judge, needs it) is closed before it returns."""
    from sft_core.serving.base import GenRequest
    from evals import judge as J
    ws = ws or Workspace.from_env()
    store = store or open_store(ws.db_url)
    row = store.query_one("SELECT * FROM evals WHERE id=?", (eval_id,))
    if row is None:
        raise EvalError(f"unknown eval {eval_id!r}", "eval")
    cfg = loads(row["config"])
    path = Path(row["path"])
    decoding = DecodingConfig(**cfg["decoding"])
    try:
        sets = eval_sets(cfg, ws, store)
        systems = [S.parse_system(n) for n in cfg["systems"]]
        judge_to = J.judge_target(cfg.get("judge"))
    except Exception as e:  # e.g. the dataset was deleted since: failed, with the reason, not stuck 'queued'
        set_status(store, eval_id, "failed")
        raise
    set_status(store, eval_id, "running")
    out_path = path / "outputs.jsonl"
    done = {(o["set"], o["row_id"], o["system"]) for o in read_jsonl(out_path)}
    total = sum(len(r) for r in sets.values()) * len(systems)
    count = len(done)
    owned = None
    try:
        ctx = eval_context(cfg, ws, store, systems)
        for set_name, set_rows in sets.items():
            for system in systems:
                todo = [r for r in set_rows if (set_name, r["id"], system.name) not in done]
                for i in range(0, len(todo), BATCH):
                    chunk = todo[i:i + BATCH]
                    built = [S.build_messages(system, r, ctx) for r in chunk]
                    if system.kind == "openai":
                        results = _openai_batch(system.model, [b[0] for b in built], decoding)
                    else:
                        if engine is None:
                            engine = owned = _start_engine(cfg, ws, store)
                        gens = engine.generate_batch([GenRequest(b[0], system.adapter, decoding) for b in built])
                        bad = next((g for g in gens if g.error), None)
                        if bad:
                            raise EvalError(f"engine error for {system.name}: {bad.error}", "engine")
                        results = [{"output": g.text, "latency_s": g.latency_s, "prompt_tokens": g.prompt_tokens,
                                    "completion_tokens": g.completion_tokens} for g in gens]
                    for r, (msgs, used), res in zip(chunk, built, results):
                        append_jsonl(out_path, {
                            "set": set_name, "row_id": r["id"], "system": system.name, "instruction": r["instruction"],
                            "context": r.get("context"), "reference": r["response"], **res,
                            "passages": [{"source": h.source, "doc_id": h.doc_id, "position": h.position,
                                          "text": h.text, "score": h.score} for h in used]})
                    count += len(chunk)
                    if progress:
                        progress(count, total)
        summary = score_eval(eval_id, ws, store)
        if judge_to == "local":
            if engine is None:  # every system was external: start the local engine for the judge
                engine = owned = _start_engine(cfg, ws, store)
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
    row = store.query_one("SELECT * FROM evals WHERE id=?", (eval_id,))
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


def eval_status(eval_id: str, ws: Workspace | None = None, store: Store | None = None) -> dict:
    """For the UI: progress, the results table and examples (read from disk: survives reloads)."""
    ws = ws or Workspace.from_env()
    store = store or open_store(ws.db_url)
    row = store.query_one("SELECT * FROM evals WHERE id=?", (eval_id,))
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evals.runner")
    ap.add_argument("--eval-id", required=True)
    args = ap.parse_args(argv)
    try:
        run_eval(args.eval_id)
    except StudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
