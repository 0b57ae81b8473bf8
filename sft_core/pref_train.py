"""Preference tuning with TRL's DPOTrainer and peft, run as a training job of its own worker module.

    python -m sft_core.pref_train --run-dir WORKSPACE/runs/RUN_ID [--resume]

A preference run is a training run like any other: a ``runs`` row, a job of kind ``train`` (so the queue,
cancel, resume, ``worker.log``, ``exit.json``, deleting and serving treat it as one), and ``runs/<id>/`` with
``events.jsonl``, ``checkpoints/``, ``adapter/`` and ``metrics.json``. Only the worker differs: the run's
config says ``"mode": "preference"`` and ``jobs._train_build`` starts this module instead of ``sft_core.train``.

Where it starts (``PreferenceConfig.from_run``):

* a finished SFT run: its adapter is loaded trainable and trained further; TRL adds a frozen copy of it
  (adapter ``ref``) and computes the reference log-probs through that copy, so the reference is the SFT
  model (base + SFT adapter) and no second copy of the base model is ever loaded;
* the base model: a new LoRA; the reference is the base model itself (TRL disables the adapter).

Story: load config -> pairs (TRL's conversational format) -> base model (+ the SFT adapter) -> DPOTrainer
with the events/cancel callback -> train (or resume) -> held-out evaluation -> save the trained adapter only.
``events.jsonl`` carries ``loss`` / ``eval_loss`` (the existing loss chart) and TRL's ``rewards/margins``,
``rewards/accuracies`` (and ``eval_`` twins on the held-out pairs); ``chart_points`` shapes them for a chart.
The manifest records the lineage: base -> SFT run -> preference dataset version (and the campaign or eval it
came from) -> this run.
"""
from __future__ import annotations

import json
import signal
import sys
import time
import uuid
from pathlib import Path

from sft_core import StudioError, preference, train
from sft_core.config import ConfigError, PreferenceConfig, StudioSettings, load_config, to_dict
from sft_core.db import runs as run_rows
from sft_core.store import Store, loads, open_store
from sft_core.workspace import Workspace, append_jsonl, atomic_dir, atomic_write_json, safe_name

MODE = "preference"
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")
EVENT_KEYS = ("loss", "eval_loss", "learning_rate", "train_runtime", *REWARD_KEYS,
              *(f"eval_{k}" for k in REWARD_KEYS))


# ------------------------------------------------------------------------------------------------
# Validation and submission (before any process starts)
# ------------------------------------------------------------------------------------------------
def _same_model(a: Path, b: Path) -> bool:
    from sft_core.models import model_hash
    return a.resolve() == b.resolve() or model_hash(a) == model_hash(b)


def _from_run(cfg: PreferenceConfig, ws: Workspace, store: Store) -> dict:
    """The SFT run to start from: finished, with an adapter, on an unchanged base model."""
    from sft_core import models
    try:
        safe_name(cfg.from_run, "from_run")
    except StudioError as e:
        raise ConfigError(e.message, "from_run") from None
    run = run_rows.get(store, cfg.from_run)
    if run is None:
        raise ConfigError(f"unknown run {cfg.from_run!r} (see `sft-studio runs list`)", "from_run")
    adapter = Path(run["path"]) / "adapter"
    if run["status"] != "succeeded" or not (adapter / "adapter_config.json").exists():
        raise ConfigError(f"run {cfg.from_run} is {run['status']}: only a finished run has an adapter to start from",
                          "from_run")
    try:
        run_base_dir = models.resolve_model(run["base_model"], ws)
    except StudioError as e:
        raise ConfigError(f"the base model of run {cfg.from_run} ({run['base_model']}): {e.message}",
                          "from_run") from None
    if cfg.base_model and cfg.base_model != run["base_model"]:
        try:
            asked = models.resolve_model(cfg.base_model, ws)
        except StudioError as e:
            raise ConfigError(e.message, "base_model") from None
        if not _same_model(asked, run_base_dir):
            raise ConfigError(f"run {cfg.from_run} was trained on {run['base_model']}, not on {cfg.base_model}: its "
                              "adapter only fits its own base model (leave base_model empty to use it)", "base_model")
    manifest_path = Path(run["path"]) / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    recorded = manifest.get("base_model_hash")
    now = models.model_hash(run_base_dir)
    if recorded and recorded != now:
        raise ConfigError(f"the weights of base model {run['base_model']} changed since run {cfg.from_run} was trained "
                          f"(hash {recorded} then, {now} now): its adapter no longer fits", "from_run")
    return {"run": run, "adapter": adapter, "base_dir": run_base_dir, "base_hash": now, "manifest": manifest}


def validate_pref_config(cfg: PreferenceConfig, ws: Workspace, store: Store | None = None, *,
                         settings: StudioSettings | None = None) -> dict:
    """Every check that can fail before training starts; returns the resolved facts written to config.json.

    Without ``from_run`` or ``base_model`` the run trains on the studio's default base model: ``settings``'s."""
    from sft_core import models
    cfg.validate()
    store = store or open_store(ws.db_url)
    dv = preference.require_preference(cfg.dataset, cfg.dataset_version or None, ws=ws, store=store)
    train_pairs = preference.load_pairs(dv.name, "train", dv.version, ws=ws, store=store)
    if not train_pairs:
        raise ConfigError(f"dataset {dv.name}@{dv.version} has no training pairs", "dataset")
    start = _from_run(cfg, ws, store) if cfg.from_run else None
    if start:
        base_name, model_dir, base_hash = start["run"]["base_model"], start["base_dir"], start["base_hash"]
    else:
        base_name = cfg.base_model or _default_base(settings)
        try:
            model_dir = models.resolve_model(base_name, ws)
        except StudioError as e:
            raise ConfigError(e.message, "base_model") from None
        base_hash = models.model_hash(model_dir)
        if cfg.target_modules.strip() != "all-linear":
            names = train._linear_module_names(model_dir)
            unknown = [m for m in train._target_modules(cfg) if m not in names]
            if unknown:
                raise ConfigError(f"unknown module(s) {', '.join(unknown)}; this model's linear layers are "
                                  f"{', '.join(sorted(names))}", "target_modules")
    tok = models.load_tokenizer(model_dir)
    lengths = [len(tok.apply_chat_template(p["prompt"], tokenize=True, add_generation_prompt=True,
                                           return_dict=True)["input_ids"]) for p in train_pairs[:2000]]
    too_long = sum(n >= cfg.max_length for n in lengths)
    if too_long == len(lengths):
        raise ConfigError(f"{cfg.max_length} tokens is not more than the shortest prompt ({min(lengths)} tokens): "
                          "every pair would be dropped", "max_length")
    rep = json.loads((dv.path / "report.json").read_text())
    steps = lineage_of_run(start["run"]["id"], ws, store) if start else [
        {"step": "base", "model": base_name, "hash": base_hash}]
    steps += [{"step": "preference_dataset", "dataset": f"{dv.name}@{dv.version}", "source": rep.get("source", {})}]
    return {"model_dir": str(model_dir), "base_model": base_name, "base_model_hash": base_hash,
            "dataset_version": dv.version, "dataset_path": str(dv.path),
            "from_run": cfg.from_run or None, "from_run_adapter": str(start["adapter"]) if start else None,
            "prompts_over_max_length": too_long, "lineage": steps}


def _default_base(settings: StudioSettings | None) -> str:
    if settings is None:
        raise ConfigError("no base model: set base_model or from_run (or give the studio settings, whose default "
                          "base model the run then trains on)", "base_model")
    return settings.base_model


def new_run_id(cfg: PreferenceConfig) -> str:
    if cfg.run_name:
        return safe_name(cfg.run_name, "run_name")
    loss = "dpo" if cfg.loss_type == "sigmoid" else cfg.loss_type.replace("_", "")
    return f"{cfg.dataset[:36]}-{loss}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def submit_pref_run(cfg: PreferenceConfig, ws: Workspace, store: Store | None = None, *,
                    settings: StudioSettings | None = None) -> str:
    """Validate (before any process starts), create the run directory, insert the run and its queued job."""
    from sft_core import jobs
    jobs.check_backend(cfg.num_gpus)
    store = store or open_store(ws.db_url)
    facts = validate_pref_config(cfg, ws, store, settings=settings)
    run_id = new_run_id(cfg)
    run_dir = ws.runs_dir(run_id)
    if run_dir.exists() or run_rows.exists(store, run_id):
        raise jobs.JobError(f"run {run_id!r} exists already; pick another run_name", "run_name")
    resolved = to_dict(cfg) | {"dataset_version": facts["dataset_version"]}
    run_dir.mkdir(parents=True)
    try:
        atomic_write_json(run_dir / "config.json",
                          {"mode": MODE, "config": resolved, "workspace": str(ws.root), **facts})
        with store.tx() as con:  # the run and its job, together ("mode" picks this worker in jobs._train_build)
            run_rows.insert_run(con, run_id, cfg.dataset, facts["dataset_version"], facts["base_model"],
                                str(run_dir), resolved | {"mode": MODE})
            jobs._insert_job(con, "train", run_id, {})
    except BaseException:
        import shutil
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return run_id


def train_on_votes(campaign_id: str, from_run: str | None = None, name: str | None = None, *,
                   ws: Workspace, store: Store | None = None, **overrides):
    """The Results tab's "train on these votes": the campaign's pairs as a dataset version, then a queued
    preference run from ``from_run`` (default: the campaign's one adapter system). Returns (version, run id).

    The run's options are checked before the dataset is built; a dataset built from valid votes stays stored
    even if the run is then refused (it is a complete version of its own)."""
    from evals import rating
    store = store or open_store(ws.db_url)
    camp = rating.get_campaign(campaign_id, ws=ws, store=store)
    if not from_run:
        from evals.systems import parse_system
        runs = [parse_system(s).adapter for s in loads(camp["systems"], []) if parse_system(s).adapter]
        if len(set(runs)) != 1:
            raise ConfigError(f"campaign {campaign_id} compares {len(set(runs))} adapters; choose the run to start "
                              "from", "from_run")
        from_run = runs[0]
    name = name or f"votes-{campaign_id}"
    probe = load_config(PreferenceConfig, overrides={"dataset": name, "from_run": from_run, **overrides})
    _from_run(probe, ws, store)
    dv = preference.build_from_campaign(campaign_id, name, ws=ws, store=store)
    cfg = load_config(PreferenceConfig, overrides={**to_dict(probe), "dataset_version": dv.version})
    return dv, submit_pref_run(cfg, ws, store)


# ------------------------------------------------------------------------------------------------
# Lineage (run manifests; config.json while a run has not started)
# ------------------------------------------------------------------------------------------------
def _run_record(run_id: str, ws: Workspace, store: Store) -> tuple[dict | None, dict]:
    run = run_rows.get(store, run_id)
    if run is None:
        return None, {}
    for name in ("manifest.json", "config.json"):
        p = Path(run["path"]) / name
        if p.exists():
            try:
                return run, json.loads(p.read_text())
            except ValueError:
                continue
    return run, {}


def lineage_of_run(run_id: str, ws: Workspace, store: Store | None = None) -> list[dict]:
    """base -> SFT run -> preference dataset (its campaign or eval) -> preference run, as a list of steps."""
    store = store or open_store(ws.db_url)
    run, rec = _run_record(run_id, ws, store)
    if run is None:
        return [{"step": "unknown_run", "run": run_id}]
    if loads(run["config"], {}).get("mode") == MODE:  # the manifest's lineage ends with this run, config.json's before
        steps = [s for s in rec.get("lineage") or [] if not (s["step"] == "preference_run" and s.get("run") == run_id)]
        cfg = rec.get("config", {})
        return steps + [{"step": "preference_run", "run": run_id, "loss_type": cfg.get("loss_type"),
                         "beta": cfg.get("beta"), "status": run["status"]}]
    return [{"step": "base", "model": run["base_model"], "hash": rec.get("base_model_hash")},
            {"step": "sft_run", "run": run_id, "dataset": f"{run['dataset']}@{run['dataset_version']}",
             "status": run["status"]}]


def format_lineage(steps: list[dict]) -> str:
    """One line: ``base M -> SFT run S (on d@v) -> preference dataset p@v (campaign C of eval E) -> DPO run R``."""
    out = []
    for s in steps:
        if s["step"] == "base":
            out.append(f"base {s['model']}")
        elif s["step"] == "sft_run":
            out.append(f"SFT run {s['run']} (on {s['dataset']})")
        elif s["step"] == "preference_dataset":
            src = s.get("source") or {}
            origin = {"campaign": f"votes of campaign {src.get('campaign')} on eval {src.get('eval')}",
                      "judge": f"judge {src.get('judge')} on eval {src.get('eval')}",
                      "file": f"file {src.get('file')}"}.get(src.get("kind"), "unknown source")
            out.append(f"preference dataset {s['dataset']} ({origin})")
        elif s["step"] == "preference_run":
            what = "DPO" if s.get("loss_type") == "sigmoid" else f"{s.get('loss_type')}"
            out.append(f"{what} run {s['run']} (beta {s.get('beta')})")
        else:
            out.append(f"unknown run {s.get('run')}")
    return " → ".join(out)


def chart_points(events: list[dict]) -> list[dict]:
    """Long-form points ``{step, value, metric, series}`` for a chart of loss, reward margin and reward accuracy
    (series ``train`` / ``eval``: the held-out pairs); the UI can plot one metric per chart."""
    out = []
    for e in events:
        for key in ("loss", "rewards/margins", "rewards/accuracies"):
            for series, k in (("train", key), ("eval", f"eval_{key}")):
                if e.get(k) is not None and e.get("step") is not None:
                    out.append({"step": e["step"], "value": e[k], "metric": key, "series": series})
    return out


# ------------------------------------------------------------------------------------------------
# The worker
# ------------------------------------------------------------------------------------------------
def make_callback(run_dir: Path, job_id: str | None, store):
    """train's events/cancel callback (cancel on step end, train_begin line), logging the preference metrics too."""
    base = train.make_callback(run_dir, job_id, store)

    class PreferenceEvents(type(base)):
        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero:
                return
            logs = logs or {}
            now = time.time()
            ev = {"time": now, "step": state.global_step, "max_steps": state.max_steps,
                  "epoch": round(state.epoch or 0.0, 4)}
            ev |= {k: logs[k] for k in EVENT_KEYS if k in logs}
            if "num_tokens" in logs:
                tokens = float(logs["num_tokens"])
                ev["tokens"] = tokens
                if self.last_tokens is not None and now > self.last_t:
                    ev["tokens_per_s"] = (tokens - self.last_tokens) / (now - self.last_t)
                self.last_tokens, self.last_t = tokens, now
            done = state.global_step - getattr(self, "start_step", 0)
            if done > 0 and state.max_steps:
                ev["eta_s"] = (now - self.t0) / done * (state.max_steps - state.global_step)
            append_jsonl(run_dir / "events.jsonl", ev)

    return PreferenceEvents()


def build_dpo_config(cfg: PreferenceConfig, run_dir: Path, cuda: bool, has_eval: bool):
    from trl import DPOConfig
    if has_eval:
        plan = {"eval_strategy": "steps" if cfg.eval_steps else "epoch", "eval_steps": cfg.eval_steps or None}
    else:
        plan = {"eval_strategy": "no"}
    return DPOConfig(
        output_dir=str(run_dir / train.CHECKPOINTS),
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        logging_steps=cfg.logging_steps, logging_first_step=True, **plan,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=2, save_only_model=False,
        seed=cfg.seed, data_seed=cfg.seed, max_length=cfg.max_length,
        beta=cfg.beta, loss_type=[cfg.loss_type], label_smoothing=cfg.label_smoothing,
        # the card's precision (gpu.choose_precision, as SFT and the launcher): bf16 only where native, else
        # fp16 AMP with loss scaling; explicit on the CPU too, where TRL's bf16 default would be True
        report_to=[], **_precision(cuda).trainer_flags(), use_cpu=not cuda,
        gradient_checkpointing=bool(cuda and cfg.gradient_checkpointing),   # TRL's default is True
        dataloader_num_workers=0, disable_tqdm=True,
    )


def _precision(cuda: bool):
    from sft_core import gpu
    return gpu.torch_precision() if cuda else gpu.CPU_PRECISION


def load_policy(spec: dict, cfg: PreferenceConfig, cuda: bool):
    """(model, peft_config): the base with the SFT run's adapter loaded trainable (TRL then copies it as the frozen
    reference adapter ``ref``), or the bare base and a new LoRA config (the reference is the adapter-less base)."""
    import torch
    from transformers import AutoModelForCausalLM
    from sft_core import gpu
    prec = _precision(cuda)
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=prec.torch_dtype if cuda else torch.float32,
                                                 device_map=gpu.device_map(cuda))
    if spec.get("from_run_adapter"):
        from peft import PeftModel
        return PeftModel.from_pretrained(model, spec["from_run_adapter"], is_trainable=True), None
    return model, train.lora_config(cfg)


def restore_trained_adapter(trainer, ckpt: Path) -> None:
    """Load the trained adapter ("default") from a checkpoint before resuming.

    A checkpoint of a run that started from an SFT run holds two adapters: the trained one at its root and
    TRL's frozen reference copy in ``ref/``. transformers' resume (Trainer._load_from_checkpoint, 5.19) then
    loads only the adapters in sub-folders, so the trained one would silently restart from the SFT weights
    (policy == reference again: the loss jumps back to log 2). The reference copy it loads is the SFT adapter,
    as TRL made it."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    model = trainer.accelerator.unwrap_model(trainer.model)
    weights = load_file(str(ckpt / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights, adapter_name="default")
    missing = [k for k in result.missing_keys if "lora_" in k and ".default." in k]
    if result.unexpected_keys or missing:
        raise StudioError(f"checkpoint {ckpt.name} does not fit this run's adapter "
                          f"({len(result.unexpected_keys)} unexpected, {len(missing)} missing weights)", "resume")


def run(run_dir: Path, resume: bool = False, job_id: str | None = None, store=None) -> int:
    """Train one preference run; returns the process exit code."""
    import torch
    import trl
    from sft_core import models

    signal.signal(signal.SIGTERM, train._on_sigterm)
    spec = json.loads((run_dir / "config.json").read_text())
    cfg = load_config(PreferenceConfig, overrides=spec["config"])
    ws = Workspace.at(spec["workspace"])
    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(train.cpu_threads())
    torch.manual_seed(cfg.seed)

    train_pairs = preference.load_pairs(cfg.dataset, "train", spec["dataset_version"], ws=ws, store=store)
    eval_pairs = preference.load_pairs(cfg.dataset, "eval", spec["dataset_version"], ws=ws, store=store)
    train_ds = preference.to_trl(train_pairs)
    eval_ds = preference.to_trl(eval_pairs) if eval_pairs else None
    tok = models.load_tokenizer(spec["model_dir"])
    model, peft_config = load_policy(spec, cfg, cuda)
    started = time.time()
    manifest = {
        "run_id": run_dir.name, "mode": MODE, "config": to_dict(cfg), "dataset": cfg.dataset,
        "dataset_version": spec["dataset_version"], "base_model": spec["base_model"],
        "base_model_dir": spec["model_dir"], "base_model_hash": spec["base_model_hash"], "from_run": spec["from_run"],
        "reference": (f"run {spec['from_run']}'s adapter (a frozen copy)" if spec["from_run"]
                      else "the base model (adapter disabled)"),
        "lineage": spec["lineage"] + [{"step": "preference_run", "run": run_dir.name, "loss_type": cfg.loss_type,
                                       "beta": cfg.beta}],
        "packages": train.package_versions(), "seed": cfg.seed, "device": train.device_info(), "started_at": started,
        "ended_at": None, "resumed": resume, "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
        "prompts_over_max_length": spec.get("prompts_over_max_length", 0), "command": sys.argv,
    }
    if resume and (run_dir / "manifest.json").exists():
        before = json.loads((run_dir / "manifest.json").read_text())
        manifest["first_started_at"] = before.get("first_started_at") or before.get("started_at")
    main_process = train._is_main_process()
    if main_process:
        atomic_write_json(run_dir / "manifest.json", manifest)

    trainer = trl.DPOTrainer(model=model, ref_model=None,
                             args=build_dpo_config(cfg, run_dir, cuda, eval_ds is not None),
                             train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
                             peft_config=peft_config, callbacks=[make_callback(run_dir, job_id, store)])
    if _precision(cuda).trainable_fp32:  # fp16 cards: the GradScaler needs fp32 trainable (LoRA) weights
        train.cast_trainable(trainer.model)
    ckpt = train.last_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        raise StudioError("no checkpoint to resume from; start the run again", "resume")
    if ckpt is not None and spec.get("from_run_adapter"):
        restore_trained_adapter(trainer, ckpt)
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)

    if train._STOP["requested"]:  # the callback asked for a checkpoint with the stop: resumable
        if main_process:
            append_jsonl(run_dir / "events.jsonl", {"time": time.time(), "event": "cancelled",
                                                    "step": trainer.state.global_step})
        return train.EXIT_CANCELLED

    held_out = {}
    if eval_ds is not None:  # the held-out pairs at the final step (evaluated already when the schedule ended there)
        last = next((h for h in reversed(trainer.state.log_history) if "eval_loss" in h), None)
        held_out = last if last and last.get("step") == trainer.state.global_step else trainer.evaluate()
    if not main_process:
        return 0
    with atomic_dir(run_dir / "adapter", exist_ok=False) as tmp:
        # the trained adapter only: the frozen reference copy (``ref``) stays out of the served adapter
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(tmp, selected_adapters=["default"])
        tok.save_pretrained(tmp)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    last = logged[-1] if logged else {}
    metrics = {"train_loss": last.get("loss"), "first_train_loss": logged[0]["loss"] if logged else None,
               "mean_train_loss": result.training_loss, "steps": trainer.state.global_step,
               "train_rewards_accuracy": last.get("rewards/accuracies"),
               "train_rewards_margin": last.get("rewards/margins"),
               "eval_loss": held_out.get("eval_loss"), "eval_rewards_accuracy": held_out.get("eval_rewards/accuracies"),
               "eval_rewards_margin": held_out.get("eval_rewards/margins"), "train_pairs": len(train_pairs),
               "eval_pairs": len(eval_pairs), "duration_s": time.time() - started}
    atomic_write_json(run_dir / "metrics.json", metrics)
    manifest["ended_at"] = time.time()
    atomic_write_json(run_dir / "manifest.json", manifest)
    if store is not None:
        run_rows.set_metrics(store, run_dir.name, metrics)
    return 0


def main(argv: list[str] | None = None) -> int:
    """The worker process: the SFT worker's wrapper (heartbeat, exit record) around this module's ``run``."""
    return train.main(argv, run_fn=run, prog="python -m sft_core.pref_train")


if __name__ == "__main__":
    sys.exit(main())
