"""Training throughput on the embedded model and the example domain: TRL defaults vs our configuration.

Both run N optimizer steps in the same process on the same data:
  (a) TRL's defaults: randomly ordered, padded batches;
  (b) the project's default configuration: length-grouped batches (TrainConfig.group_by_length=True);
  (c) the project's packing option (TrainConfig.packing=True: best-fit-decreasing packing, padding-free;
      transformers builds a block-diagonal mask from position_ids, so examples never attend to each other).
Prints useful (non-padding) tokens per second for each (steady state: after the first step; and
overall), the ratios to (a), and peak memory (process
peak RSS on CPU, so later rows can only show >= earlier ones; CUDA: per-run peak allocated).

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


def run_one(label: str, model_dir, records, args, **options) -> dict:
    import torch
    from trl import SFTTrainer
    from sft_core import train
    from sft_core.config import TrainConfig
    from sft_core.models import load_causal_lm, load_tokenizer
    cfg = TrainConfig(dataset="pydocs", max_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length,
                      save_steps=10**6, logging_steps=1, **options)
    out = tempfile.mkdtemp(prefix="bench-train-")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    from pathlib import Path
    sft_args = train.build_sft_config(cfg, Path(out), torch.cuda.is_available(), False)
    from transformers import TrainerCallback

    marks: list[tuple[float, float]] = []  # (time, cumulative non-padding tokens) after each step

    class Mark(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                marks.append((time.perf_counter(), float(logs["num_tokens"])))

    trainer = SFTTrainer(model=load_causal_lm(model_dir), args=sft_args, train_dataset=train.to_prompt_completion(records),
                         processing_class=load_tokenizer(model_dir), peft_config=train.lora_config(cfg),
                         callbacks=[Mark()])
    t = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - t
    tokens = marks[-1][1]
    # steady state: from the end of step 1 to the last step (leaves out warm-up and first-step allocation)
    (t1, k1), (tn, kn) = marks[0], marks[-1]
    steady = (kn - k1) / (tn - t1) if tn > t1 else tokens / elapsed
    return {"label": label, "steps": args.steps, "useful_tokens": tokens, "seconds": elapsed,
            "tokens_per_s": steady, "tokens_per_s_overall": tokens / elapsed, "peak_mem_mb": peak_mem_mb()}


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


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
    import torch
    from sft_core.train import cpu_threads
    if not torch.cuda.is_available():
        torch.set_num_threads(cpu_threads())  # as the worker does
    ws = Workspace.at(home)
    build_example(ws)
    records = data.load_split("pydocs", "train", ws=ws)
    model_dir = models.resolve_model(models.EMBEDDED_MODEL, ws)
    base = run_one("trl-defaults(padded,random)", model_dir, records, args, group_by_length=False)
    grouped = run_one("project(group_by_length)", model_dir, records, args, group_by_length=True)
    packed = run_one("project(packing,padding-free)", model_dir, records, args, packing=True)
    print(f"embedded model, example domain ({len(records)} train rows), {args.steps} steps x batch "
          f"{args.batch_size}, max_length {args.max_length}, torch threads {torch_threads()}")
    for r in (base, grouped, packed):
        print(f"{r['label']:32s} useful tokens {r['useful_tokens']:8.0f}  {r['seconds']:7.1f}s  "
              f"{r['tokens_per_s']:7.1f} tok/s steady ({r['tokens_per_s_overall']:.1f} overall)  "
              f"peak mem {r['peak_mem_mb']:.0f} MiB  x{r['tokens_per_s'] / base['tokens_per_s']:.2f} vs defaults")


if __name__ == "__main__":
    main()
