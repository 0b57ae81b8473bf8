"""End to end on the embedded model, from documents alone: synthetic Q&A from the example knowledge base ->
an SFT run and a RAFT run on it -> the five-system eval on the split held out by document.

    python bench/raft_e2e.py [--home ./workspace-raft-e2e] [--n-chunks 60] [--max-steps 40] [--limit 40]
                             [--min-rows 40] [--out bench/raft_e2e.json]

Slow on a 2-core CPU (generation by the 135M model, two training runs, five systems through the engine):
a bench, not part of `make test`. Every step runs as the product runs it, as queued jobs run by their worker
processes (``jobs.run_in_foreground``): ``synth`` (generator: the studio's own engine, the embedded base
model), ``train`` twice (mode sft, mode raft with the same knowledge base), ``eval``.

What it answers: on the ``test`` split (questions about documents no training row came from) and on
``test_seen`` (new questions about training documents), does RAFT beat SFT+RAG? The JSON gives the synth
filter counts, both runs' wall times, and every system's main metrics with their 95% CIs; the eval's own
report gives the paired, Holm-corrected tests. With a 135M generator many generations are unparsable or
ungrounded: the counts say how many. When fewer than ``--min-rows`` training rows survive, the runs train on
the example dataset instead (its Q&A rows are drawn from the same documents by a rule, each row carrying its
source document; its ``test`` split is held out by document too) and the JSON says so: the synth counts are
then the answer to "can this generator write training data", the runs to "does RAFT beat SFT+RAG".

Both runs get the same budget (``--max-steps`` optimizer steps of the same batch size), so RAFT's longer
prompts cost time, not data.
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

from evals import runner  # noqa: E402
from sft_core import jobs, retrieval, synth  # noqa: E402
from sft_core.config import StudioSettings, TrainConfig, load_config  # noqa: E402
from sft_core.db import datasets as dataset_rows, jobs as job_rows, runs as run_rows  # noqa: E402
from sft_core.example import build_example  # noqa: E402
from sft_core.store import Store  # noqa: E402
from sft_core.workspace import Workspace  # noqa: E402

KB = "pydocs"
METRICS = ("token_f1", "rouge_l", "semantic_similarity", "groundedness", "completion_tokens", "latency_s")


def stamp(msg: str) -> None:
    print(f"== {time.strftime('%H:%M:%S')} {msg}", flush=True)


def run_job(job_id: str, ws: Workspace, store: Store) -> float:
    t = time.time()
    status = jobs.run_in_foreground(job_id, ws, store)
    if status != "succeeded":
        row = job_rows.get(store, job_id)
        raise SystemExit(f"job {job_id} {status}: {row['error'] if row else ''}")
    return round(time.time() - t, 1)


def make_dataset(ws: Workspace, store: Store, name: str, n_chunks: int) -> dict:
    """The synth job on the example knowledge base, the base model as the generator; its counts (or the
    reason nothing was stored: the job's error names the counts)."""
    done = dataset_rows.get(store, name)
    if done:
        rep = json.loads((ws.datasets_dir(name, done["version"]) / "report.json").read_text())
        return {"version": done["version"], "reused": True, **rep.get("synth", {}), "splits": rep.get("splits")}
    cfg = load_config(synth.SynthConfig, overrides={"kb": KB, "name": name, "n_chunks": n_chunks,
                                                    "questions_per_chunk": 2, "answer_length": "short"})
    t = time.time()
    job = synth.submit_synth(cfg, ws, store)
    status = jobs.run_in_foreground(job, ws, store)
    wall = round(time.time() - t, 1)
    if status != "succeeded":
        row = job_rows.get(store, job)
        return {"stored": False, "wall_s": wall, "error": row["error"] if row else status}
    version = dataset_rows.get(store, name)["version"]
    rep = json.loads((ws.datasets_dir(name, version) / "report.json").read_text())
    return {"stored": True, "version": version, "wall_s": wall, **rep.get("synth", {}), "splits": rep.get("splits")}


def train(ws: Workspace, store: Store, run_id: str, dataset: str, max_steps: int, raft: bool) -> dict:
    row = run_rows.get(store, run_id)
    if row and row["status"] == "succeeded":
        return {"run": run_id, "reused": True}
    over = {"dataset": dataset, "max_steps": max_steps, "batch_size": 8, "run_name": run_id}
    if raft:  # the oracle + 2 distractors within 384 tokens, and room for the answer after them
        over.update(mode="raft", kb=KB, raft_distractors=2, raft_context_tokens=384, max_length=640)
    cfg = load_config(TrainConfig, overrides=over)
    jobs.submit_train(cfg, ws, store)
    wall = run_job(jobs.latest_job(run_id, store, kind="train")["id"], ws, store)
    metrics = json.loads((ws.runs_dir(run_id) / "metrics.json").read_text())
    return {"run": run_id, "wall_s": wall, "train_loss": metrics.get("train_loss"),
            "eval_loss": metrics.get("eval_loss")}


def evaluate(ws: Workspace, store: Store, dataset: str, split: str, systems: list[str], limit: int) -> dict:
    eval_id = runner.create_eval(dataset, systems, split=split, kb=KB, limit=limit, max_new_tokens=96,
                                 general=False, ws=ws, store=store, settings=StudioSettings.from_env())
    wall = run_job(runner.submit_eval(eval_id, ws, store), ws, store)
    scores = json.loads((ws.evals_dir(eval_id) / "scores.json").read_text())
    dom = scores["sets"]["domain"]["summary"]
    table = {s: {m: {k: round(v[k], 4) for k in ("mean", "low", "high")} for m, v in ms.items() if m in METRICS}
             for s, ms in dom["systems"].items()}
    return {"eval": eval_id, "split": split, "rows": len(scores["sets"]["domain"].get("row_ids") or []),
            "wall_s": wall, "systems": table,
            "report": str(ws.evals_dir(eval_id) / "report.md")}


def verdict(ev: dict, sft_rag: str, raft: str, metric: str = "token_f1") -> str:
    a, b = ev["systems"][raft][metric], ev["systems"][sft_rag][metric]
    if a["low"] > b["high"]:
        return f"RAFT beat SFT+RAG on {metric}: {a['mean']:.3f} vs {b['mean']:.3f} (CIs apart)"
    if b["low"] > a["high"]:
        return f"SFT+RAG beat RAFT on {metric}: {b['mean']:.3f} vs {a['mean']:.3f} (CIs apart)"
    return (f"no clear winner on {metric}: RAFT {a['mean']:.3f} [{a['low']:.3f}, {a['high']:.3f}] vs SFT+RAG "
            f"{b['mean']:.3f} [{b['low']:.3f}, {b['high']:.3f}] (CIs overlap; see the report's paired test)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", default=str(REPO / "workspace-raft-e2e"))
    ap.add_argument("--n-chunks", type=int, default=60, help="knowledge-base chunks the generator writes from")
    ap.add_argument("--min-rows", type=int, default=40, help="synth training rows needed to train on them")
    ap.add_argument("--max-steps", type=int, default=40, help="optimizer steps of each run (batch 8)")
    ap.add_argument("--limit", type=int, default=40, help="rows of each test split evaluated")
    ap.add_argument("--out", default=str(REPO / "bench" / "raft_e2e.json"))
    args = ap.parse_args(argv)
    os.environ["SFT_STUDIO_HOME"] = args.home
    ws = Workspace.at(args.home)
    store = Store(ws.db_url)
    t0 = time.time()
    result: dict = {"n_chunks": args.n_chunks, "max_steps": args.max_steps, "cpus": os.cpu_count()}

    stamp(f"example domain (knowledge base {KB}) -> {ws.root}")
    ex = build_example(ws, store)
    if not (ws.root / "kbs" / KB).exists() and not any(k["name"] == KB for k in retrieval.list_kbs(ws, store)):
        retrieval.build_kb([ex["corpus"]], KB, ws=ws, store=store)
    name = f"{KB}-synth"
    stamp(f"synthetic Q&A from {args.n_chunks} chunks -> dataset {name}")
    result["synth"] = make_dataset(ws, store, name, args.n_chunks)
    stamp(f"synth: {json.dumps({k: v for k, v in result['synth'].items() if k != 'dropped'})[:600]}")
    train_rows = (result["synth"].get("splits") or {}).get("train", 0)
    dataset = name if result["synth"].get("stored", True) and train_rows >= args.min_rows else KB
    result["dataset"] = dataset
    if dataset != name:
        stamp(f"only {train_rows} synthetic training rows (< {args.min_rows}): the runs train on the example "
              f"dataset {KB} (rule-made Q&A from the same documents, test split held out by document)")

    stamp("SFT run")
    result["sft"] = train(ws, store, "e2e-sft", dataset, args.max_steps, raft=False)
    stamp(f"SFT: {result['sft']}")
    stamp("RAFT run")
    result["raft"] = train(ws, store, "e2e-raft", dataset, args.max_steps, raft=True)
    stamp(f"RAFT: {result['raft']}")

    systems = ["prompt", "rag", "sft:e2e-sft", "sft+rag:e2e-sft", "raft:e2e-raft"]
    result["evals"] = {}
    for split in ("test", "test_seen"):
        stamp(f"five-system eval on {split}")
        ev = result["evals"][split] = evaluate(ws, store, dataset, split, systems, args.limit)
        ev["verdict"] = verdict(ev, "sft+rag:e2e-sft", "raft:e2e-raft")
        stamp(f"{split}: {ev['verdict']}")
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    result["wall_s"] = round(time.time() - t0, 1)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    stamp(f"done in {result['wall_s']} s; written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
