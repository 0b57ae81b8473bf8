"""LoRA supervised fine-tuning with TRL's SFTTrainer and peft, run as its own process.

    python -m sft_core.train --run-dir WORKSPACE/runs/RUN_ID [--resume]

The run directory holds ``config.json`` (the resolved TrainConfig, written by ``jobs.submit_train``).
The worker writes ``manifest.json``, ``events.jsonl`` (live), ``checkpoints/``, ``adapter/`` (PEFT,
servable by vLLM) and ``metrics.json``. Exit codes: 0 finished, 3 cancelled (checkpoint kept),
other = failed (``error.txt`` says why).

Story: load config -> validate -> data (prompt/completion chat format, so the prompt is masked;
in raft mode each prompt carries passages from the knowledge base, sft_core/raft.py) -> model (+ LoRA)
-> SFTTrainer with an events/cancel callback -> train (or resume) -> save.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from sft_core import StudioError, gpu
from sft_core.config import ConfigError, TrainConfig, load_config, to_dict
from sft_core.workspace import Workspace, append_jsonl, atomic_dir, atomic_write_json, atomic_write_text

EXIT_CANCELLED = 3
CHECKPOINTS = "checkpoints"


# ------------------------------------------------------------------------------------------------
# Validation before any process starts
# ------------------------------------------------------------------------------------------------
def _linear_module_names(model_dir: Path) -> set[str]:
    """Names of the base model's Linear layers (leaf names), built on the meta device: no weights loaded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {name.rsplit(".", 1)[-1] for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)}


def validate_train_config(cfg: TrainConfig, ws: Workspace, store=None) -> dict:
    """Every check that can fail before training starts; returns resolved facts (model dir, dataset version).

    Raises ConfigError naming the field."""
    from sft_core import data, models
    from sft_core.records import prompt_messages
    cfg.validate()
    try:
        dv = data.get_version(cfg.dataset, cfg.dataset_version or None, ws=ws, store=store)
    except StudioError as e:
        raise ConfigError(e.message, "dataset") from None
    from sft_core.preference import refuse_for_sft
    refuse_for_sft(dv)  # pairs have no single answer to imitate: they go to `sft-studio pref train`
    if dv.splits.get("train", 0) == 0:
        raise ConfigError(f"dataset {dv.name}@{dv.version} has no training rows", "dataset")
    if cfg.early_stopping_patience > 0 and dv.splits.get("eval", 0) == 0:
        raise ConfigError(f"early stopping watches the eval loss, but dataset {dv.name}@{dv.version} has no eval "
                          "rows (import it with eval_fraction > 0, or set early_stopping_patience 0)",
                          "early_stopping_patience")
    if cfg.report_to == "tensorboard":
        import importlib.util
        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("the tensorboard package is not installed (pip install tensorboard)", "report_to")
    try:
        model_dir = models.resolve_model(cfg.base_model, ws)
    except StudioError as e:
        raise ConfigError(e.message, "base_model") from None
    if cfg.target_modules.strip() != "all-linear":
        names = _linear_module_names(model_dir)
        unknown = [m for m in _target_modules(cfg) if m not in names]
        if unknown:
            raise ConfigError(f"unknown module(s) {', '.join(unknown)}; this model's linear layers are "
                              f"{', '.join(sorted(names))}", "target_modules")
    facts = {"model_dir": str(model_dir), "dataset_version": dv.version, "dataset_path": str(dv.path)}
    if cfg.mode == "raft":
        facts["kb_sha256"] = _validate_raft_kb(cfg, ws)
    tok = models.load_tokenizer(model_dir)
    train = data.load_split(dv.name, "train", dv.version, ws=ws, store=store)
    shortest = min(len(tok.apply_chat_template(prompt_messages(r), tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"]) for r in train[:2000])
    if cfg.max_length <= shortest:
        raise ConfigError(f"{cfg.max_length} tokens is not more than the shortest prompt ({shortest} tokens): "
                          "no answer token would be trained", "max_length")
    return facts


def _validate_raft_kb(cfg: TrainConfig, ws: Workspace) -> str:
    """The knowledge base of a RAFT run exists and has the oracle plus ``raft_distractors`` chunks; returns
    the hash of its chunks (the run's manifest records the one it trained on)."""
    from sft_core.retrieval import open_kb
    from sft_core.workspace import sha256_file
    try:
        kb = open_kb(cfg.kb, ws)
    except StudioError as e:
        raise ConfigError(e.message, "kb") from None
    need = cfg.raft_distractors + 1
    if len(kb.chunks) < need:
        raise ConfigError(f"knowledge base {cfg.kb} has {len(kb.chunks)} chunk(s); RAFT prompts take the oracle and "
                          f"{cfg.raft_distractors} distractor(s): at least {need} (lower raft_distractors, or add "
                          "documents)", "kb")
    return sha256_file(kb.path / "chunks.jsonl")


def _target_modules(cfg: TrainConfig):
    t = cfg.target_modules.strip()
    return "all-linear" if t == "all-linear" else [m.strip() for m in t.split(",") if m.strip()]


# ------------------------------------------------------------------------------------------------
# Data: canonical records -> conversational prompt/completion (TRL masks the prompt)
# ------------------------------------------------------------------------------------------------
def to_prompt_completion(records: list[dict]):
    from datasets import Dataset
    from sft_core.records import to_messages
    rows = []
    for r in records:
        msgs = to_messages(r)
        rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
    return Dataset.from_list(rows)


def raft_prompt_completion(records: list[dict], kb, tokenizer, settings) -> tuple[object, list[dict], dict]:
    """RAFT rows (sft_core/raft.py: the oracle chunk + distractors, the oracle dropped for a share of rows,
    shuffled; the prompt built by ``raft.prompt_messages``, as the raft:RUN system builds it) as a
    conversational prompt/completion Dataset; returns (dataset, per-row plans, counts)."""
    from datasets import Dataset
    from sft_core import raft
    rows, plans, stats = raft.build_rows(records, kb, tokenizer, settings)
    return Dataset.from_list(rows), plans, stats


# ------------------------------------------------------------------------------------------------
# Live events, heartbeat and cancel
# ------------------------------------------------------------------------------------------------
_STOP = {"requested": False}


def _on_sigterm(signum, frame):  # cancel: finish the current step, save a checkpoint, exit 3
    _STOP["requested"] = True


HEARTBEAT_EVERY_S = 5.0
EXIT_FILE = "exit.json"


def start_heartbeat(store, job_id: str, every_s: float = HEARTBEAT_EVERY_S) -> threading.Event:
    """A thread that stamps ``jobs.heartbeat_at`` and picks up the cancel flag, independent of step length
    (model loading, a long evaluation or a checkpoint write never look like a hung worker)."""
    stop = threading.Event()

    def beat():
        while True:
            try:
                from sft_core.db import jobs as job_rows
                if job_rows.beat(store, job_id):
                    _STOP["requested"] = True
            except Exception as e:  # a busy or briefly missing database must not kill training
                print(f"heartbeat: {type(e).__name__}: {e}", file=sys.stderr)
            if stop.wait(every_s):
                return

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    return stop


def _stop_everywhere(args) -> bool:
    """The stop decision, made the same on every rank (multi-GPU), so no rank waits for the others forever."""
    stop = _STOP["requested"]
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        import torch
        flag = torch.tensor([1.0 if stop else 0.0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
        _STOP["requested"] = stop
    return stop


def make_callback(run_dir: Path, job_id: str | None, store):
    from transformers import TrainerCallback

    class EventsCallback(TrainerCallback):
        """Appends one JSON line per log to events.jsonl (main process only); stops cleanly on cancel."""

        def __init__(self):
            self.t0 = time.time()
            self.last_tokens = None
            self.last_t = None

        def on_step_end(self, args, state, control, **kw):
            if _stop_everywhere(args):
                control.should_training_stop = True
                control.should_save = True
            return control

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero:
                return
            logs = logs or {}
            now = time.time()
            ev = {"time": now, "step": state.global_step, "max_steps": state.max_steps,
                  "epoch": round(state.epoch or 0.0, 4)}
            if "loss" in logs:
                ev["loss"] = logs["loss"]
            if "eval_loss" in logs:
                ev["eval_loss"] = logs["eval_loss"]
            if "learning_rate" in logs:
                ev["learning_rate"] = logs["learning_rate"]
            if "num_tokens" in logs:
                tokens = float(logs["num_tokens"])
                ev["tokens"] = tokens
                if self.last_tokens is not None and now > self.last_t:
                    ev["tokens_per_s"] = (tokens - self.last_tokens) / (now - self.last_t)
                self.last_tokens, self.last_t = tokens, now
            if "train_runtime" in logs:
                ev["train_runtime"] = logs["train_runtime"]
            elapsed = now - self.t0
            done = state.global_step - getattr(self, "start_step", 0)
            if done > 0 and state.max_steps:
                ev["eta_s"] = elapsed / done * (state.max_steps - state.global_step)
            append_jsonl(run_dir / "events.jsonl", ev)

        def on_train_begin(self, args, state, control, **kw):
            self.start_step = state.global_step
            if not state.is_world_process_zero:
                return
            append_jsonl(run_dir / "events.jsonl", {"time": time.time(), "event": "train_begin",
                                                    "step": state.global_step, "max_steps": state.max_steps})

    return EventsCallback()


# ------------------------------------------------------------------------------------------------
# The worker
# ------------------------------------------------------------------------------------------------
def last_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / CHECKPOINTS).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    done = [c for c in ckpts if (c / "trainer_state.json").exists()]
    return done[-1] if done else None


def cpu_threads() -> int:
    """CPU training threads: OMP_NUM_THREADS when set, else the cores this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def device_info(prec: gpu.Precision | None = None) -> dict:
    import torch
    devices = gpu.torch_devices()
    if devices:
        prec = prec or gpu.torch_precision()
        return {"device": "cuda", "name": devices[0].name, "count": len(devices),
                "capability": ".".join(map(str, min(d.capability for d in devices))),
                "precision": prec.describe(), "bf16": prec.mixed == "bf16", "fp16": prec.mixed == "fp16",
                "trainable_fp32": prec.trainable_fp32}
    return {"device": "cpu", "threads": torch.get_num_threads()}


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for p in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "sft-studio"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            pass
    return out


def schedule(cfg: TrainConfig, has_eval: bool) -> dict:
    """When to evaluate and save, consistent in every combination (transformers refuses
    ``load_best_model_at_end`` unless eval and save run on the same schedule, saves a multiple of evals).

    * no eval split: no evaluation, a checkpoint every ``save_steps``;
    * eval split, no early stopping: eval every ``eval_steps`` (0 = each epoch), save every ``save_steps``;
    * early stopping: eval every ``eval_steps``, or at every checkpoint when 0 (so the patience counts
      evaluations that exist even in a one-epoch run, and checkpoints stay as frequent for resume);
      ``save_steps`` moves down to a multiple of ``eval_steps`` (at least ``eval_steps``), so each
      checkpoint has its eval loss, and the best one is loaded at the end."""
    if not has_eval:
        return {"eval_strategy": "no", "eval_steps": None, "save_strategy": "steps", "save_steps": cfg.save_steps,
                "load_best_model_at_end": False}
    if cfg.early_stopping_patience <= 0:
        return {"eval_strategy": "steps" if cfg.eval_steps else "epoch", "eval_steps": cfg.eval_steps or None,
                "save_strategy": "steps", "save_steps": cfg.save_steps, "load_best_model_at_end": False}
    every = cfg.eval_steps or cfg.save_steps
    save_steps = cfg.save_steps
    if save_steps % every:  # the largest multiple not above it: never fewer checkpoints than asked for
        save_steps = max(1, save_steps // every) * every
    return {"eval_strategy": "steps", "eval_steps": every, "save_strategy": "steps", "save_steps": save_steps,
            "load_best_model_at_end": True}


def build_sft_config(cfg: TrainConfig, run_dir: Path, cuda: bool, has_eval: bool,
                     prec: gpu.Precision | None = None):
    """``prec``: the card's precision (gpu.choose_precision); default: this process's GPUs, or fp32 on the CPU."""
    from trl import SFTConfig
    plan = schedule(cfg, has_eval)
    prec = prec or (gpu.torch_precision() if cuda else gpu.CPU_PRECISION)
    early = plan["load_best_model_at_end"]
    kwargs = dict(
        output_dir=str(run_dir / CHECKPOINTS),
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        logging_steps=cfg.logging_steps, logging_first_step=True,
        **plan, save_total_limit=2,
        seed=cfg.seed, data_seed=cfg.seed, max_length=cfg.max_length, packing=cfg.packing,
        completion_only_loss=cfg.completion_only_loss,
        train_sampling_strategy="group_by_length" if cfg.group_by_length and not cfg.packing else "random",
        report_to=[],  # tensorboard: run() adds the callback with its directory under the run dir
        **prec.trainer_flags(), use_cpu=not cuda,  # fp16 = AMP with loss scaling (a T4); bf16 only where native
        ddp_find_unused_parameters=False,  # LoRA uses every trainable weight each step: no search per step under DDP
        gradient_checkpointing=bool(cuda and cfg.gradient_checkpointing),
        dataloader_num_workers=0, disable_tqdm=True, save_only_model=False,
        metric_for_best_model="eval_loss" if early else None, greater_is_better=False,
    )
    return SFTConfig(**kwargs)


def tensorboard_callback(run_dir: Path):
    """transformers' TensorBoard logger writing to ``<run>/tensorboard`` (rank 0 only, created on train begin)."""
    from transformers.integrations import TensorBoardCallback
    cb = TensorBoardCallback()
    cb.logging_dir = str(run_dir / "tensorboard")
    return cb


def _bf16_ok() -> bool:
    """Native bf16 on this process's GPUs (pref_train.py uses it; new code: gpu.torch_precision())."""
    return gpu.torch_precision().mixed == "bf16"


def model_load_kwargs(cfg: TrainConfig, cuda: bool, prec: gpu.Precision, local_rank: int | None = None) -> dict:
    """``from_pretrained`` arguments: the card's dtype; on CUDA each rank loads straight onto its own GPU
    (``device_map={"": local_rank}``: 4-bit or not, never all ranks on GPU 0, never through CPU RAM)."""
    kwargs: dict = {"dtype": prec.torch_dtype}
    if cfg.load_in_4bit:
        if not cuda:
            raise ConfigError("4-bit QLoRA needs a CUDA GPU", "load_in_4bit")
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=prec.torch_dtype)
    if cuda:
        kwargs["device_map"] = gpu.device_map(cuda, local_rank)
        if cfg.packing:  # FlashAttention-2 only on compute >= 8.0 with the package; else sdpa
            kwargs["attn_implementation"] = prec.attn
    return kwargs


def load_base_model(model_dir: str, cfg: TrainConfig, cuda: bool, prec: gpu.Precision | None = None):
    from transformers import AutoModelForCausalLM
    prec = prec or (gpu.torch_precision() if cuda else gpu.CPU_PRECISION)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **model_load_kwargs(cfg, cuda, prec))
    if cfg.load_in_4bit:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    return model


def make_trainer(model, args, prec: gpu.Precision, **kw):
    """SFTTrainer, then the trainable (LoRA) weights in fp32 where the card trains in fp16: the
    GradScaler refuses fp16 gradients, and TRL 1.16 casts trainable weights to bf16 under QLoRA
    (SFTTrainer.__init__), which a card without native bf16 would emulate."""
    from trl import SFTTrainer
    trainer = SFTTrainer(model=model, args=args, **kw)
    if prec.trainable_fp32:
        cast_trainable(trainer.model)
    return trainer


def cast_trainable(model, dtype=None) -> int:
    """Cast every trainable parameter to ``dtype`` (fp32); the frozen base keeps its own. Returns how many."""
    import torch
    dtype = dtype or torch.float32
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig
    # no DoRA, no modules_to_save: vLLM's LoRA loader refuses both
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=_target_modules(cfg), use_rslora=cfg.use_rslora, bias="none",
                      task_type="CAUSAL_LM")


def run(run_dir: Path, resume: bool = False, job_id: str | None = None, store=None) -> int:
    """Train one run; returns the process exit code."""
    import torch
    from sft_core import data, models

    signal.signal(signal.SIGTERM, _on_sigterm)
    spec = json.loads((run_dir / "config.json").read_text())
    cfg = load_config(TrainConfig, overrides=spec["config"])
    ws = Workspace.at(spec["workspace"])
    cuda = torch.cuda.is_available()
    if not cuda:  # nvidia-smi sees a GPU torch cannot use: say why rather than train on the CPU for hours
        gpu.require_usable_gpu("gpu")
        torch.set_num_threads(cpu_threads())
    prec = gpu.torch_precision() if cuda else gpu.CPU_PRECISION
    torch.manual_seed(cfg.seed)

    _phase(run_dir, "loading data")
    train_rows = data.load_split(cfg.dataset, "train", spec["dataset_version"], ws=ws, store=store)
    try:
        eval_rows = data.load_split(cfg.dataset, "eval", spec["dataset_version"], ws=ws, store=store)
    except StudioError:
        eval_rows = []
    model_dir = spec["model_dir"]
    tok = models.load_tokenizer(model_dir)
    raft_info = None
    if cfg.mode == "raft":  # the passages come from the KB now (its embedder runs on the CPU), before tokenising
        _phase(run_dir, "building RAFT prompts")
        train_ds, eval_ds, raft_info = _raft_datasets(cfg, ws, tok, train_rows, eval_rows, run_dir)
    else:
        train_ds = to_prompt_completion(train_rows)
        eval_ds = to_prompt_completion(eval_rows) if eval_rows else None

    _phase(run_dir, "loading model")
    model = load_base_model(model_dir, cfg, cuda, prec)
    started = time.time()
    manifest = {
        "run_id": run_dir.name, "config": to_dict(cfg), "dataset": cfg.dataset,
        "dataset_version": spec["dataset_version"], "base_model": cfg.base_model, "base_model_dir": model_dir,
        "base_model_hash": models.model_hash(model_dir), "packages": package_versions(), "seed": cfg.seed,
        "device": device_info(prec), "started_at": started, "ended_at": None, "resumed": resume,
        "train_rows": len(train_rows), "eval_rows": len(eval_rows), "command": sys.argv,
    }
    if raft_info is not None:
        manifest["raft"] = raft_info
    if resume and (run_dir / "manifest.json").exists():
        before = json.loads((run_dir / "manifest.json").read_text())
        manifest["first_started_at"] = before.get("first_started_at") or before.get("started_at")
    main_process = _is_main_process()  # multi-GPU: rank 0 writes the run's files
    if main_process:
        atomic_write_json(run_dir / "manifest.json", manifest)

    callbacks = [make_callback(run_dir, job_id, store)]
    if cfg.report_to == "tensorboard":
        callbacks.append(tensorboard_callback(run_dir))
    if cfg.early_stopping_patience and eval_ds is not None:
        from transformers import EarlyStoppingCallback
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    _phase(run_dir, "tokenising")
    trainer = make_trainer(model, build_sft_config(cfg, run_dir, cuda, eval_ds is not None, prec), prec,
                           train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
                           peft_config=lora_config(cfg), callbacks=callbacks)
    ckpt = last_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise StudioError("no checkpoint to resume from; start the run again", "resume")
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)

    if _STOP["requested"]:
        # the callback set should_save with should_training_stop: the Trainer saved a full checkpoint
        if main_process:
            append_jsonl(run_dir / "events.jsonl", {"time": time.time(), "event": "cancelled",
                                                    "step": trainer.state.global_step})
        return EXIT_CANCELLED

    eval_loss = None
    if eval_ds is not None:
        _phase(run_dir, "evaluating")
        eval_loss = trainer.evaluate().get("eval_loss")
    if not main_process:
        return 0
    _phase(run_dir, "saving adapter")
    if eval_ds is not None:
        append_jsonl(run_dir / "events.jsonl", {"time": time.time(), "step": trainer.state.global_step,
                                                "eval_loss": eval_loss, "max_steps": trainer.state.max_steps})
    with atomic_dir(run_dir / "adapter", exist_ok=False) as tmp:
        trainer.model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens = next((h["num_tokens"] for h in reversed(trainer.state.log_history) if "num_tokens" in h), None)
    metrics = {"train_loss": losses[-1] if losses else None, "first_train_loss": losses[0] if losses else None,
               "mean_train_loss": result.training_loss, "eval_loss": eval_loss, "steps": trainer.state.global_step,
               "train_tokens": tokens, "duration_s": time.time() - started,
               "tokens_per_s": (tokens / (time.time() - started)) if tokens else None}
    atomic_write_json(run_dir / "metrics.json", metrics)
    manifest["ended_at"] = time.time()
    atomic_write_json(run_dir / "manifest.json", manifest)
    if store is not None:
        from sft_core.db import runs as run_rows
        run_rows.set_metrics(store, run_dir.name, metrics)
    return 0


def _raft_datasets(cfg: TrainConfig, ws: Workspace, tok, train_rows: list[dict], eval_rows: list[dict],
                   run_dir: Path):
    """(train dataset, eval dataset or None, manifest entry) of a RAFT run; each row's draw goes to
    ``raft_plan.jsonl`` (split, row id, oracle chunk, passages in prompt order, dropped)."""
    from sft_core import raft
    from sft_core.retrieval import open_kb
    from sft_core.workspace import sha256_file, write_jsonl
    settings = raft.RaftSettings.from_config(cfg)
    kb = open_kb(cfg.kb, ws)
    train_ds, plans, stats = raft_prompt_completion(train_rows, kb, tok, settings)
    eval_ds, eval_plans, eval_stats = (raft_prompt_completion(eval_rows, kb, tok, settings) if eval_rows
                                       else (None, [], None))
    if _is_main_process():
        write_jsonl(run_dir / raft.PLAN_FILE, [{"split": "train", **p} for p in plans] +
                    [{"split": "eval", **p} for p in eval_plans])
    info = {"settings": settings.to_dict(), "kb_sha256": sha256_file(kb.path / "chunks.jsonl"),
            "kb_chunks": len(kb.chunks), "train": stats, "eval": eval_stats}
    return train_ds, eval_ds, info


def _phase(run_dir: Path, phase: str) -> None:
    """A phase line in events.jsonl (loading data, loading model, tokenising, evaluating, saving adapter):
    what the UI shows between the steps (sft_core/guide.run_progress)."""
    if _is_main_process():
        append_jsonl(run_dir / "events.jsonl", {"time": time.time(), "event": "phase", "phase": phase})


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _record_exit(run_dir: Path, job_id: str | None, code: int, error: str | None) -> None:
    """``exit.json``: how this worker ended, for a queue that was not watching (its parent died or restarted)."""
    if not _is_main_process():
        return
    try:
        atomic_write_json(run_dir / EXIT_FILE, {"job_id": job_id, "code": code, "error": error, "time": time.time()})
    except OSError as e:
        print(f"could not write {EXIT_FILE}: {e}", file=sys.stderr)


def main(argv: list[str] | None = None, run_fn=None, prog: str = "python -m sft_core.train") -> int:
    """A training worker's process: heartbeat, the run, its exit record. ``run_fn`` (default: SFT's
    ``run``) is what trains; preference runs (sft_core/pref_train.py) come through here with theirs."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--job-id", default=None)
    parser.add_argument("--db-url", default=None)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    store = heartbeat = None
    if args.db_url:
        from sft_core.store import Store
        store = Store(args.db_url)
        if args.job_id:
            heartbeat = start_heartbeat(store, args.job_id)
    code, error = 1, None
    try:
        code = (run_fn or run)(run_dir, resume=args.resume, job_id=args.job_id, store=store)
    except StudioError as e:
        error = str(e)
        print(f"error: {e}", file=sys.stderr)
    except Exception as e:  # the reason is kept for the UI; the traceback goes to the log
        import traceback
        error = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    finally:
        if heartbeat is not None:
            heartbeat.set()
    if error is not None:
        atomic_write_text(run_dir / "error.txt", error)
    _record_exit(run_dir, args.job_id, code, error)
    return code


if __name__ == "__main__":
    sys.exit(main())
