"""End to end on the embedded model: SFT -> eval -> campaign with scripted votes -> preference dataset -> DPO ->
re-eval, with the lineage in the report and the judge calibrated on the same votes.

    python bench/pref_e2e.py [--home ./workspace-pref-e2e] [--rows 80] [--judge] [--out bench/pref_e2e.json]

Slow on a 2-core CPU (an SFT epoch, two evals through the engine, a DPO run: tens of minutes): a bench, not
part of `make test`. Every step runs as the product runs it: training and evals are queued jobs run by their
worker processes (``jobs.run_in_foreground``), the votes go through ``rating.next_task`` / ``rating.vote``.

The protocol keeps the measurement honest: votes are collected on the example dataset's ``eval`` split and the
DPO run is measured on the ``test`` split, which no pair comes from (the dataset report's leakage line says so).

The scripted rater prefers one style: the **shorter** answer (length ratio below 0.8 wins; closer lengths are
a tie). The measured change is the mean answer length (completion tokens) of the DPO run against its SFT run
on the test split, with the quality metrics beside it (does concision cost correctness?). With ``--judge`` the
first eval is judged by the local engine and the judge's agreement with the scripted rater is reported
(``evals.calibration``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
if (REPO / ".cache" / "models").is_dir():  # the machine's converted embedded model, as the tests use it
    os.environ.setdefault("SFT_STUDIO_MODEL_CACHE", str(REPO / ".cache" / "models"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from evals import calibration, rating, runner  # noqa: E402
from sft_core import jobs, pref_train, preference  # noqa: E402
from sft_core.config import PreferenceConfig, StudioSettings, TrainConfig, load_config  # noqa: E402
from sft_core.db import jobs as job_rows, runs as run_rows  # noqa: E402
from sft_core.example import build_example  # noqa: E402
from sft_core.store import Store  # noqa: E402
from sft_core.workspace import Workspace  # noqa: E402

SHORTER_WINS = 0.8  # a side wins when its answer has at most this share of the other's characters


def stamp(msg: str) -> None:
    print(f"== {time.strftime('%H:%M:%S')} {msg}", flush=True)


def run_job(job_id: str, ws: Workspace, store: Store) -> str:
    status = jobs.run_in_foreground(job_id, ws, store)
    if status != "succeeded":
        row = job_rows.get(store, job_id)
        raise SystemExit(f"job {job_id} {status}: {row['error'] if row else ''}")
    return status


def train_sft(ws: Workspace, store: Store, run_id: str) -> str:
    run = run_rows.get(store, run_id)
    if run and run["status"] == "succeeded":
        return run_id
    cfg = load_config(TrainConfig, overrides={"dataset": "pydocs", "epochs": 1, "run_name": run_id})
    jobs.submit_train(cfg, ws, store)
    run_job(jobs.latest_job(run_id, store)["id"], ws, store)
    return run_id


def evaluate(ws: Workspace, store: Store, split: str, systems: list[str], rows: int, judge: bool) -> str:
    eval_id = runner.create_eval("pydocs", systems, split=split, limit=rows, judge="local" if judge else None,
                                 max_new_tokens=96, general=False, ws=ws, store=store,
                                 settings=StudioSettings.from_env())
    run_job(runner.submit_eval(eval_id, ws, store), ws, store)
    return eval_id


def scripted_votes(ws: Workspace, store: Store, campaign: str) -> dict:
    """One rater who prefers the shorter answer; returns the vote counts."""
    counts: dict[str, int] = {}
    while (t := rating.next_task(campaign, "concise-rater", ws=ws, store=store)) is not None:
        left, right = len(t["left"]), len(t["right"])
        choice = ("left" if left <= SHORTER_WINS * right else "right" if right <= SHORTER_WINS * left else "tie")
        rating.vote(campaign, t["task_id"], "concise-rater", choice, ws=ws, store=store)
        counts[choice] = counts.get(choice, 0) + 1
    return counts


def summary(ws: Workspace, store: Store, eval_id: str) -> dict:
    scores = json.loads((ws.evals_dir(eval_id) / "scores.json").read_text())
    out = {}
    for system, metrics in scores["sets"]["domain"]["summary"]["systems"].items():
        out[system] = {m: {k: round(v[k], 4) for k in ("mean", "low", "high")} for m, v in metrics.items()
                       if m in ("completion_tokens", "token_f1", "rouge_l", "semantic_similarity", "answer_length")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", default=str(REPO / "workspace-pref-e2e"))
    ap.add_argument("--rows", type=int, default=80, help="rows of each split evaluated (and rated)")
    ap.add_argument("--sft-run", default="pydocs-epoch1")
    ap.add_argument("--judge", action="store_true", help="judge the first eval locally and calibrate it")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--out", default=str(REPO / "bench" / "pref_e2e.json"))
    args = ap.parse_args(argv)
    os.environ["SFT_STUDIO_HOME"] = args.home
    ws = Workspace.at(args.home)
    store = Store(ws.db_url)
    t0 = time.time()
    result: dict = {"rows": args.rows, "rater": f"shorter answer wins (length ratio <= {SHORTER_WINS})"}

    stamp(f"example domain -> {ws.root}")
    build_example(ws, store)
    stamp(f"SFT run {args.sft_run}")
    sft = train_sft(ws, store, args.sft_run)

    stamp("eval 1 on the eval split: prompt vs SFT (the answers the rater sees)")
    ev1 = evaluate(ws, store, "eval", ["prompt", f"sft:{sft}"], args.rows, args.judge)
    campaign = rating.create_campaign(ev1, ws=ws, store=store, name="concision")
    result["votes"] = scripted_votes(ws, store, campaign)
    stamp(f"campaign {campaign}: {result['votes']}")
    if args.judge:
        result["judge_calibration"] = calibration.judge_calibration(campaign, ws, store)

    stamp("preference dataset from the votes")
    dv = preference.build_from_campaign(campaign, "concision", eval_fraction=0.15, ws=ws, store=store)
    rep = preference.report(dv.name, dv.version, ws=ws, store=store)
    print(preference.format_report(rep))
    result["dataset"] = {k: rep[k] for k in ("pairs", "splits", "counts", "leakage")}

    stamp("DPO from the SFT run")
    cfg = load_config(PreferenceConfig, overrides={"dataset": dv.name, "dataset_version": dv.version,
                                                   "from_run": sft, "beta": args.beta, "epochs": args.epochs,
                                                   "batch_size": 4, "learning_rate": 5e-5, "max_length": 768})
    t = time.time()
    dpo = pref_train.submit_pref_run(cfg, ws, store)
    run_job(jobs.latest_job(dpo, store)["id"], ws, store)
    result["dpo"] = {"run": dpo, "wall_s": round(time.time() - t, 1),
                     "metrics": json.loads((ws.runs_dir(dpo) / "metrics.json").read_text()),
                     "lineage": pref_train.format_lineage(pref_train.lineage_of_run(dpo, ws, store))}
    stamp(result["dpo"]["lineage"])

    stamp("eval 2 on the test split (no pair comes from it): prompt vs SFT vs SFT+DPO")
    ev2 = evaluate(ws, store, "test", ["prompt", f"sft:{sft}", f"sft:{dpo}"], args.rows, False)
    result["eval"] = {"id": ev2, "report": str(ws.evals_dir(ev2, "report.md")), "domain": summary(ws, store, ev2)}
    dom = result["eval"]["domain"]
    before, after = dom[f"sft:{sft}"]["completion_tokens"]["mean"], dom[f"sft:{dpo}"]["completion_tokens"]["mean"]
    result["measured_change"] = {"completion_tokens_sft": before, "completion_tokens_dpo": after,
                                 "relative": round(after / before - 1, 4) if before else None}
    report_md = Path(result["eval"]["report"]).read_text()
    result["report_shows_lineage"] = "Lineage of preference-tuned systems" in report_md
    result["wall_s"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    stamp(f"answer length (completion tokens) SFT {before:.1f} -> DPO {after:.1f}; written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
