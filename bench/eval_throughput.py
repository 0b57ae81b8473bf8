"""Eval throughput. Default: the eval's continuous-batching pipeline vs the engine's ceiling vs the old
batch-of-16 loop, on one vLLM server; ``--vs-hf``: the old comparison, vLLM engine vs transformers.

    python bench/eval_throughput.py [--rows 24] [--tokens 64] [--out bench/eval_throughput.json]
    python bench/eval_throughput.py --vs-hf [--rows 32] [--tokens 128] [--adapter RUN_ID]

Runs on the embedded model (SmolLM2-135M-Instruct) in a temporary workspace with the example domain
(``sft_core.example.build_example``, dataset ``pydocs``, its corpus indexed as knowledge base ``pydocs``).

Default (the pipeline comparison): the first ``--rows`` test rows x four systems (``prompt``, ``rag``,
``sft:A``, ``sft+rag:A``; A = a small random LoRA adapter, r=8, made like bench/serve_throughput.py's
``make_adapters`` and registered as a succeeded run), messages built exactly as the eval runner builds
them, greedy, ``--tokens`` new tokens. One vLLM server; one untimed pass over every request first
(kernels, adapter, the same prefix-cache state for every timed pass), then the same request list three ways:

  (a) pipeline: ``runner.generate_answers``, the eval's own generation stage: every answer through
      the sliding window (``generate_stream``, window = the engine's capacity), all systems mixed,
      each answer appended to outputs.jsonl as it completes. Its messages are built inside the timed
      run, as the eval does (templating, the RAG context budget); the KB searches are the ones made
      while building the request list (timed apart: ``build_messages_s``), so the window is measured,
      not the query embedder competing for the CPU with vLLM (``--cold-retrieval``: searched in the run);
  (b) ceiling: the same prebuilt requests all submitted at once (one thread per request, no window,
      no pipeline): what the server does when it is simply handed everything;
  (c) batch16: the old loop: per system, chunks of 16 (``runner.BATCH``) through ``generate_batch``,
      each chunk waiting for its slowest answer (messages prebuilt: the old loop built them between
      chunks too, which only made it slower).

Throughput = completion tokens generated / wall time (answers/s printed too). The last line is
``pipeline/ceiling R1 pipeline/batch16 R2`` (ratios of tokens/s).
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
from sft_core.db import evals as eval_rows, runs as run_rows  # noqa: E402
from sft_core.example import build_example  # noqa: E402
from sft_core.serving.base import GenRequest  # noqa: E402
from sft_core.store import Store, loads, open_store  # noqa: E402
from sft_core.workspace import Workspace, read_jsonl  # noqa: E402


def copy_adapter(run_id: str, ws: Workspace, store: Store) -> None:
    """Copy a finished run's adapter from the user's workspace into the bench workspace."""
    src_ws = Workspace.from_env()
    src = run_rows.get(open_store(src_ws.db_url), run_id)
    if src is None:
        raise SystemExit(f"unknown run {run_id!r} in {src_ws.root} (set SFT_STUDIO_HOME)")
    if src["status"] != "succeeded" or not (Path(src["path"]) / "adapter" / "adapter_config.json").exists():
        raise SystemExit(f"run {run_id} is {src['status']}: its adapter is not ready")
    if src["base_model"] != models.EMBEDDED_MODEL:
        raise SystemExit(f"run {run_id} was trained on {src['base_model']}, not on {models.EMBEDDED_MODEL}")
    shutil.copytree(Path(src["path"]) / "adapter", ws.runs_dir(run_id, "adapter"))
    run_rows.insert_run(store, run_id, src["dataset"], src["dataset_version"], models.EMBEDDED_MODEL,
                        str(ws.runs_dir(run_id)), {}, status="succeeded", created_at=time.time())


def eval_requests(ws: Workspace, store: Store, systems: list[str], rows: int, tokens: int):
    """(rows, {system: [messages]}, decoding, adapter of each system) exactly as the runner builds them."""
    eval_id = runner.create_eval("pydocs", systems, limit=rows, general=False, max_new_tokens=tokens,
                                 metrics=["exact_match"], base_model=models.EMBEDDED_MODEL, ws=ws, store=store)
    cfg = loads(eval_rows.get(store, eval_id)["config"])
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


def pipeline_comparison(args) -> int:
    """(a) the eval pipeline, (b) the engine's ceiling, (c) the batch-of-16 loop; see the docstring."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from sft_core import retrieval
    from sft_core.serving.base import engine_capacity
    from sft_core.serving.vllm_engine import VLLMEngine
    from serve_throughput import make_adapters  # bench/ is on sys.path when this file runs as a script

    def sample_load() -> str:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())

    results: dict = {"rows": args.rows, "max_new_tokens": args.tokens, "cpu_count": os.cpu_count(),
                     "cold_retrieval": args.cold_retrieval, "vllm_dtype": args.dtype, "kv_cache_gib": args.kv_cache_gib, "load_before": sample_load()}
    with tempfile.TemporaryDirectory(prefix="eval-bench-") as tmp:
        ws = Workspace.at(tmp)
        store = Store(ws.db_url)
        model_dir = models.resolve_model(models.EMBEDDED_MODEL, ws)
        ex = build_example(ws, store)
        t0 = time.perf_counter()
        retrieval.build_kb([ex["corpus"]], "pydocs", ws=ws, store=store)
        results["kb_build_s"] = round(time.perf_counter() - t0, 1)
        adapter = make_adapters(ws, store, model_dir, n=1)[0]
        systems = ["prompt", "rag", f"sft:{adapter}", f"sft+rag:{adapter}"]
        eval_id = runner.create_eval("pydocs", systems, kb="pydocs", limit=args.rows, general=False,
                                     max_new_tokens=args.tokens, metrics=["exact_match"],
                                     base_model=models.EMBEDDED_MODEL, ws=ws, store=store)
        cfg = loads(eval_rows.get(store, eval_id)["config"])
        decoding = DecodingConfig(**cfg["decoding"])
        parsed = [S.parse_system(n) for n in cfg["systems"]]
        sets = runner.eval_sets(cfg, ws, store)
        todo = runner.missing_answers(sets, parsed, set())
        t0 = time.perf_counter()
        ctx = runner.eval_context(cfg, ws, store, parsed)
        searched = runner._SearchCache(ctx.kb)  # each row's passages, kept for the pipeline's warm run
        ctx.kb = searched
        reqs = [GenRequest(S.build_messages(sy, r, ctx)[0], sy.adapter, decoding) for _, r, sy in todo]
        results["build_messages_s"] = round(time.perf_counter() - t0, 2)
        results["requests"] = len(reqs)
        print(f"{len(reqs)} requests ({len(sets['domain'])} rows x {len(systems)} systems), {args.tokens} tokens; "
              f"KB built in {results['kb_build_s']} s, messages in {results['build_messages_s']} s", flush=True)

        t0 = time.perf_counter()
        engine = VLLMEngine(models.EMBEDDED_MODEL, ws, store,
                            cfg=ServeConfig(dtype=args.dtype, kv_cache_gib=args.kv_cache_gib))
        results["vllm_startup_s"] = round(time.perf_counter() - t0, 1)
        results["window"] = engine_capacity(engine)
        try:
            def check(gens, what):
                bad = [g.error for g in gens if g.error]
                if bad:
                    raise SystemExit(f"{what}: {len(bad)} requests failed: {bad[:3]}")

            def ceiling(rs):  # everything at once: one thread per request, nothing around it
                with ThreadPoolExecutor(max_workers=len(rs), thread_name_prefix="ceiling") as pool:
                    return list(pool.map(engine._one, rs))

            engine.load_adapter(adapter)
            t0 = time.perf_counter()
            check(ceiling(reqs), "warm-up pass")
            results["warm_pass_s"] = round(time.perf_counter() - t0, 1)

            def run_pipeline():
                out = ws.evals_dir(eval_id) / "outputs.jsonl"
                out.unlink(missing_ok=True)
                t = time.perf_counter()
                ctx_p = runner.eval_context(cfg, ws, store, parsed)
                if not args.cold_retrieval:  # the passages found above: the window is measured, not the embedder
                    ctx_p.kb = searched
                runner.generate_answers(runner.missing_answers(sets, parsed, set()), ctx_p, decoding, engine, out,
                                        0, len(reqs))
                wall = time.perf_counter() - t
                by = {(o["row_id"], o["system"]): o for o in read_jsonl(out)}
                outs = [by[(r["id"], sy.name)] for _, r, sy in todo]
                return wall, sum(o["completion_tokens"] for o in outs), [o["output"] for o in outs]

            def run_ceiling():
                t = time.perf_counter()
                gens = ceiling(reqs)
                wall = time.perf_counter() - t
                check(gens, "ceiling")
                return wall, sum(g.completion_tokens for g in gens), [g.text for g in gens]

            def run_batch16():
                idx: dict[str, list[int]] = {}
                for k, (_, _, sy) in enumerate(todo):
                    idx.setdefault(sy.name, []).append(k)
                gens: list = [None] * len(reqs)
                t = time.perf_counter()
                for name in systems:  # as the old run_eval: per system, chunks of BATCH, each waited for
                    ks = idx[name]
                    for i in range(0, len(ks), runner.BATCH):
                        chunk = ks[i:i + runner.BATCH]
                        for k, g in zip(chunk, engine.generate_batch([reqs[k] for k in chunk])):
                            gens[k] = g
                wall = time.perf_counter() - t
                check(gens, "batch16")
                return wall, sum(g.completion_tokens for g in gens), [g.text for g in gens]

            modes = {"pipeline": run_pipeline, "ceiling": run_ceiling, "batch16": run_batch16}
            res = results["modes"] = {}
            texts = {}
            for rnd in range(args.rounds):
                order = list(modes) if rnd % 2 == 0 else list(reversed(modes))
                for name in order:
                    load = sample_load()
                    wall, toks, texts[name] = modes[name]()
                    r = res.setdefault(name, {"runs": []})
                    r["runs"].append({"wall_s": round(wall, 2), "completion_tokens": toks, "load_before": load,
                                      "answers_per_s": round(len(reqs) / wall, 3), "tokens_per_s": round(toks / wall, 1)})
                    print(f"round {rnd + 1} {name:9s} {len(reqs) / wall:6.2f} answers/s {toks / wall:7.1f} tokens/s "
                          f"({toks} tokens, {wall:.1f} s; load {load})", flush=True)
        finally:
            engine.close()
        store.close()

    for name, r in res.items():  # the median run of each mode
        runs = sorted(r["runs"], key=lambda x: x["tokens_per_s"])
        mid = runs[len(runs) // 2]
        r.update(tokens_per_s=mid["tokens_per_s"], answers_per_s=mid["answers_per_s"])
    same = {f"pipeline_vs_{m}": round(sum(a == b for a, b in zip(texts["pipeline"], texts[m])) / len(reqs), 3)
            for m in ("ceiling", "batch16")}
    results["same_text_share"] = same
    results["load_after"] = sample_load()
    r1 = res["pipeline"]["tokens_per_s"] / res["ceiling"]["tokens_per_s"]
    r2 = res["pipeline"]["tokens_per_s"] / res["batch16"]["tokens_per_s"]
    results["pipeline_over_ceiling"], results["pipeline_over_batch16"] = round(r1, 2), round(r2, 2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'mode':10s} {'answers/s':>10s} {'tokens/s':>9s}")
    for name, r in res.items():
        print(f"{name:10s} {r['answers_per_s']:10.2f} {r['tokens_per_s']:9.1f}")
    print(f"window {results['window']}; vLLM start-up {results['vllm_startup_s']} s (not timed); identical greedy "
          f"answers: pipeline vs ceiling {same['pipeline_vs_ceiling']:.0%}, vs batch16 {same['pipeline_vs_batch16']:.0%}; "
          f"load average before {results['load_before']}, after {results['load_after']}; {args.out}")
    print(f"pipeline/ceiling {r1:.2f} pipeline/batch16 {r2:.2f}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vs-hf", action="store_true", help="the old comparison: vLLM engine vs transformers generate")
    ap.add_argument("--rows", type=int, default=None, help="first N test rows of pydocs (default 24; --vs-hf: 32)")
    ap.add_argument("--tokens", type=int, default=None, help="max new tokens, greedy (default 64; --vs-hf: 128)")
    ap.add_argument("--rounds", type=int, default=1, help="timed passes per mode (alternating order; median kept)")
    ap.add_argument("--cold-retrieval", action="store_true",
                    help="(a) retrieves inside its timed run (default: with the passages found while building the "
                         "request list, timed separately as build_messages_s)")
    ap.add_argument("--kv-cache-gib", type=int, default=ServeConfig().kv_cache_gib,
                    help="vLLM CPU KV cache (the engine's default)")
    ap.add_argument("--adapter", default=None, metavar="RUN_ID", help="--vs-hf: also measure sft:RUN_ID (from $SFT_STUDIO_HOME)")
    ap.add_argument("--dtype", default=ServeConfig().dtype, help="vLLM weights dtype (the runner's default: auto)")
    ap.add_argument("--skip-vllm", action="store_true", help="--vs-hf: measure transformers only")
    ap.add_argument("--skip-hf", action="store_true", help="--vs-hf: measure the vLLM engine only")
    ap.add_argument("--out", default=None, help="results JSON (default bench/eval_throughput.json; --vs-hf: "
                                                 "bench/eval_throughput_vs_hf.json)")
    args = ap.parse_args(argv)
    if not args.vs_hf:
        args.rows, args.tokens = args.rows or 24, args.tokens or 64
        args.out = args.out or "bench/eval_throughput.json"
        return pipeline_comparison(args)
    args.rows, args.tokens = args.rows or 32, args.tokens or 128
    args.out = args.out or "bench/eval_throughput_vs_hf.json"
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
