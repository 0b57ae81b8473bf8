"""Eval throughput: the eval runner's generation path (the vLLM engine's ``generate_batch``, chunks of
``runner.BATCH`` concurrent requests) vs transformers ``generate`` one row at a time.

    python bench/eval_throughput.py [--rows 32] [--tokens 128] [--adapter RUN_ID] [--out bench/eval_throughput.json]

Runs on the embedded model (SmolLM2-135M-Instruct) in a temporary workspace with the example domain
(``sft_core.example.build_example``, dataset ``pydocs``). The rows are the first ``--rows`` of its test
split; the messages are built exactly as the eval runner builds them (``runner.create_eval`` in the
temporary workspace, then ``runner.eval_sets`` / ``runner.eval_context`` / ``systems.build_messages``)
for the ``prompt`` system, and with ``--adapter RUN_ID`` also for ``sft:RUN_ID`` (the run's adapter,
copied from the workspace in ``$SFT_STUDIO_HOME``; peft on the transformers side). Decoding is greedy
with the same ``max_new_tokens`` on both sides. rows/s = rows / wall time; tokens/s = completion
tokens actually generated / wall time (one warm-up request on each side first, not timed).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# reuse the machine's converted embedded model (as the tests do) instead of converting it again
if (REPO / ".cache" / "models").is_dir():
    os.environ.setdefault("SFT_STUDIO_MODEL_CACHE", str(REPO / ".cache" / "models"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from evals import runner  # noqa: E402
from evals import systems as S  # noqa: E402
from sft_core import models  # noqa: E402
from sft_core.config import DecodingConfig, ServeConfig  # noqa: E402
from sft_core.example import build_example  # noqa: E402
from sft_core.serving.base import GenRequest  # noqa: E402
from sft_core.store import Store, loads, open_store  # noqa: E402
from sft_core.workspace import Workspace  # noqa: E402


def copy_adapter(run_id: str, ws: Workspace, store: Store) -> None:
    """Copy a finished run's adapter from the user's workspace into the bench workspace."""
    src_ws = Workspace.from_env()
    src = open_store(src_ws.db_url).query_one("SELECT * FROM runs WHERE id=?", (run_id,))
    if src is None:
        raise SystemExit(f"unknown run {run_id!r} in {src_ws.root} (set SFT_STUDIO_HOME)")
    if src["status"] != "succeeded" or not (Path(src["path"]) / "adapter" / "adapter_config.json").exists():
        raise SystemExit(f"run {run_id} is {src['status']}: its adapter is not ready")
    if src["base_model"] != models.EMBEDDED_MODEL:
        raise SystemExit(f"run {run_id} was trained on {src['base_model']}, not on {models.EMBEDDED_MODEL}")
    shutil.copytree(Path(src["path"]) / "adapter", ws.runs_dir(run_id, "adapter"))
    store.execute("INSERT INTO runs (id, dataset, dataset_version, base_model, status, created_at, path) "
                  "VALUES (?, ?, ?, ?, 'succeeded', ?, ?)", (run_id, src["dataset"], src["dataset_version"],
                                                             models.EMBEDDED_MODEL, time.time(), str(ws.runs_dir(run_id))))


def eval_requests(ws: Workspace, store: Store, systems: list[str], rows: int, tokens: int):
    """(rows, {system: [messages]}, decoding, adapter of each system) exactly as the runner builds them."""
    eval_id = runner.create_eval("pydocs", systems, limit=rows, general=False, max_new_tokens=tokens,
                                 metrics=["exact_match"], base_model=models.EMBEDDED_MODEL, ws=ws, store=store)
    cfg = loads(store.query_one("SELECT config FROM evals WHERE id=?", (eval_id,))["config"])
    test_rows = runner.eval_sets(cfg, ws, store)["domain"]
    parsed = [S.parse_system(n) for n in cfg["systems"]]
    ctx = runner.eval_context(cfg, ws, store, parsed)
    msgs = {s.name: [S.build_messages(s, r, ctx)[0] for r in test_rows] for s in parsed}
    return test_rows, msgs, DecodingConfig(**cfg["decoding"]), {s.name: s.adapter for s in parsed}


def result(n_rows: int, tokens: int, wall: float, texts: list[str]) -> dict:
    return {"rows": n_rows, "completion_tokens": tokens, "wall_s": round(wall, 2),
            "rows_per_s": round(n_rows / wall, 3), "tokens_per_s": round(tokens / wall, 1), "texts": texts}


def measure_engine(engine, msgs: list[list[dict]], adapter: str | None, decoding: DecodingConfig) -> dict:
    engine.generate_batch([GenRequest(msgs[0], adapter, decoding)])  # warm-up (and adapter hot-load)
    t0 = time.perf_counter()
    out = []
    for i in range(0, len(msgs), runner.BATCH):  # as run_eval: BATCH concurrent requests at a time
        gens = engine.generate_batch([GenRequest(m, adapter, decoding) for m in msgs[i:i + runner.BATCH]])
        bad = [g.error for g in gens if g.error]
        if bad:
            raise SystemExit(f"engine requests failed: {bad[:3]}")
        out += gens
    wall = time.perf_counter() - t0
    return result(len(msgs), sum(g.completion_tokens for g in out), wall, [g.text for g in out])


def measure_hf(model, tok, msgs: list[list[dict]], decoding: DecodingConfig, device: str) -> dict:
    import torch

    def one(m):
        enc = tok.apply_chat_template(m, add_generation_prompt=True, return_tensors="pt", return_dict=True).to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=decoding.max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        new = out[0][enc["input_ids"].shape[1]:]
        return len(new), tok.decode(new, skip_special_tokens=True)

    one(msgs[0])  # warm-up
    t0 = time.perf_counter()
    done = [one(m) for m in msgs]
    wall = time.perf_counter() - t0
    return result(len(msgs), sum(n for n, _ in done), wall, [t for _, t in done])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=32, help="first N test rows of pydocs")
    ap.add_argument("--tokens", type=int, default=128, help="max new tokens (greedy) on both sides")
    ap.add_argument("--adapter", default=None, metavar="RUN_ID", help="also measure sft:RUN_ID (from $SFT_STUDIO_HOME)")
    ap.add_argument("--dtype", default=ServeConfig().dtype, help="vLLM weights dtype (the runner's default: auto)")
    ap.add_argument("--skip-vllm", action="store_true", help="measure transformers only")
    ap.add_argument("--skip-hf", action="store_true", help="measure the vLLM engine only")
    ap.add_argument("--out", default="bench/eval_throughput.json")
    args = ap.parse_args(argv)
    import torch

    device = models.best_device()
    results: dict = {"rows": args.rows, "max_new_tokens": args.tokens, "cpu_count": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(), "device": device, "vllm_dtype": args.dtype,
                     "hf_dtype": "float32" if device == "cpu" else "bf16/fp16", "systems": {}}
    with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
        ws = Workspace.at(tmp)
        store = Store(ws.db_url)
        model_dir = models.resolve_model(models.EMBEDDED_MODEL, ws)
        build_example(ws, store)
        systems = ["prompt"]
        if args.adapter:
            copy_adapter(args.adapter, ws, store)
            systems.append(f"sft:{args.adapter}")
        rows, msgs, decoding, adapters = eval_requests(ws, store, systems, args.rows, args.tokens)
        results["rows"] = len(rows)
        res = results["systems"] = {s: {} for s in systems}

        if not args.skip_hf:
            tok = models.load_tokenizer(model_dir)
            base = models.load_causal_lm(model_dir, device)
            res["prompt"]["hf"] = measure_hf(base, tok, msgs["prompt"], decoding, device)
            print("hf prompt", {k: v for k, v in res["prompt"]["hf"].items() if k != "texts"}, flush=True)
            if args.adapter:
                from peft import PeftModel
                pm = PeftModel.from_pretrained(base, str(ws.runs_dir(args.adapter, "adapter"))).eval()
                name = f"sft:{args.adapter}"
                res[name]["hf"] = measure_hf(pm, tok, msgs[name], decoding, device)
                print("hf", name, {k: v for k, v in res[name]["hf"].items() if k != "texts"}, flush=True)
                del pm
            del base

        if not args.skip_vllm:
            from sft_core.serving.vllm_engine import VLLMEngine
            t0 = time.perf_counter()
            engine = VLLMEngine(models.EMBEDDED_MODEL, ws, store, cfg=ServeConfig(dtype=args.dtype))
            results["vllm_startup_s"] = round(time.perf_counter() - t0, 1)
            try:
                for name in systems:
                    res[name]["vllm"] = measure_engine(engine, msgs[name], adapters[name], decoding)
                    print("vllm", name, {k: v for k, v in res[name]["vllm"].items() if k != "texts"}, flush=True)
            finally:
                engine.close()
        store.close()

    print(f"\n{'system':24s} {'path':6s} {'rows/s':>8s} {'tokens/s':>9s} {'tokens':>7s} {'wall s':>7s}")
    for name, sides in res.items():
        for side, v in sides.items():
            print(f"{name:24s} {side:6s} {v['rows_per_s']:8.2f} {v['tokens_per_s']:9.1f} "
                  f"{v['completion_tokens']:7d} {v['wall_s']:7.1f}")
        if "hf" in sides and "vllm" in sides:
            h, v = sides["hf"], sides["vllm"]
            sides["ratio_vllm_over_hf"] = {"rows_per_s": round(v["rows_per_s"] / h["rows_per_s"], 2),
                                           "tokens_per_s": round(v["tokens_per_s"] / h["tokens_per_s"], 2)}
            sides["same_text_share"] = round(sum(a == b for a, b in zip(h["texts"], v["texts"])) / len(h["texts"]), 3)
            print(f"{name:24s} vLLM / transformers: rows/s {sides['ratio_vllm_over_hf']['rows_per_s']:.2f}x, "
                  f"tokens/s {sides['ratio_vllm_over_hf']['tokens_per_s']:.2f}x; identical greedy answers "
                  f"{sides['same_text_share']:.0%}")
    if "vllm_startup_s" in results:
        print(f"vLLM start-up {results['vllm_startup_s']} s (not in the timings)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
