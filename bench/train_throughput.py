"""Training throughput on the embedded model and the example domain: TRL defaults vs our configuration.

Both run N optimizer steps in the same process on the same data:
  (a) TRL's defaults: randomly ordered, padded batches;
  (b) the project's configuration: length-grouped batches (TrainConfig.group_by_length=True);
      on CUDA with FlashAttention the project would also enable packing (padding-free).
Prints useful (non-padding) tokens per second for each, the ratio, and peak memory.

    python bench/train_throughput.py [--steps 20] [--batch-size 8] [--max-length 256]
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time


def peak_mem_mb() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(label: str, model_dir, records, args, group_by_length: bool) -> dict:
    import torch
    from trl import SFTTrainer
    from sft_core import train
    from sft_core.config import TrainConfig
    from sft_core.models import load_causal_lm, load_tokenizer
    cfg = TrainConfig(dataset="pydocs", max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                      group_by_length=group_by_length, save_steps=10**6, logging_steps=1)
    out = tempfile.mkdtemp(prefix=f"bench-{label}-")
    from pathlib import Path
    sft_args = train.build_sft_config(cfg, Path(out), torch.cuda.is_available(), False)
    trainer = SFTTrainer(model=load_causal_lm(model_dir), args=sft_args, train_dataset=train.to_prompt_completion(records),
                         processing_class=load_tokenizer(model_dir), peft_config=train.lora_config(cfg))
    t = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - t
    tokens = next(h["num_tokens"] for h in reversed(trainer.state.log_history) if "num_tokens" in h)
    return {"label": label, "steps": args.steps, "useful_tokens": tokens, "seconds": elapsed,
            "tokens_per_s": tokens / elapsed, "peak_mem_mb": peak_mem_mb()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    home = os.environ.get("SFT_STUDIO_HOME") or tempfile.mkdtemp(prefix="train-bench-")
    os.environ["SFT_STUDIO_HOME"] = home
    from sft_core import data, models
    from sft_core.example import build_example
    from sft_core.workspace import Workspace
    ws = Workspace.at(home)
    build_example(ws)
    records = data.load_split("pydocs", "train", ws=ws)
    model_dir = models.resolve_model(models.EMBEDDED_MODEL, ws)
    base = run_one("trl-defaults(padded,random)", model_dir, records, args, group_by_length=False)
    ours = run_one("project(group_by_length)", model_dir, records, args, group_by_length=True)
    print(f"embedded model, example domain, {args.steps} steps x batch {args.batch_size}, max_length {args.max_length}")
    for r in (base, ours):
        print(f"{r['label']:32s} useful tokens {r['useful_tokens']:8.0f}  {r['seconds']:7.1f}s  "
              f"{r['tokens_per_s']:7.1f} tok/s  peak mem {r['peak_mem_mb']:.0f} MiB")
    print(f"ratio project/defaults (useful tokens/s): {ours['tokens_per_s'] / base['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
