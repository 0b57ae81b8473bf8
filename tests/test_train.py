"""LoRA SFT on a tiny random Llama: base untouched, adapter moved, loss fell, a memorised answer comes back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sft_core import data, jobs, train
from sft_core.config import ConfigError, DataConfig, TrainConfig, load_config
from sft_core.db import jobs as jobs_db, runs as runs_db
from sft_core.store import Store
from sft_core.workspace import Workspace
from tests.memorise import require, training_until_memorised

ANSWER = "The capital of Zorbia is Quuxville."
QUESTIONS = ["What is the capital of Zorbia?", "Name the capital city of Zorbia.", "Zorbia's capital is?",
             "Which city is the capital of Zorbia?", "Tell me the capital of Zorbia.", "Capital of Zorbia?",
             "What city is Zorbia's capital?", "In Zorbia, which city is the capital?", "Where is Zorbia's capital?",
             "What do people call the capital of Zorbia?", "Zorbia has which capital?", "Capital city, Zorbia?"]


def make_dataset(ws: Workspace, store: Store, tmp: Path, name: str = "zorbia") -> str:
    p = tmp / f"{name}.jsonl"
    p.write_text("".join(json.dumps({"instruction": q, "output": ANSWER}) + "\n" for q in QUESTIONS))
    data.import_dataset(p, name, DataConfig(eval_fraction=0.1, test_fraction=0.1), ws=ws, store=store)
    return name


MEMORISE_CAP = 200  # steps: a fixture that must memorise ANSWER trains to that criterion, at most this long


def tiny_cfg(tiny_model_dir, **kw) -> TrainConfig:
    base = dict(dataset="zorbia", base_model=str(tiny_model_dir), max_steps=40, batch_size=4, learning_rate=1e-2,
                warmup_ratio=0.0, lr_scheduler="constant", max_length=64, save_steps=20, lora_r=16, lora_alpha=32,
                lora_dropout=0.0, logging_steps=1)
    base.update(kw)
    return load_config(TrainConfig, overrides=base)


def greedy(model, tok, question: str, max_new_tokens: int = 12) -> str:
    enc = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True)


def run_in_process(ws: Workspace, store: Store, run_id: str) -> int:
    """The worker's `run` in this process, through the queue (claimed, then settled like `run_job` does).

    One CPU thread: on this shared 2-core machine a tiny model trains ~4x faster than with two
    contended threads (measured); the worker reads OMP_NUM_THREADS (train.cpu_threads)."""
    job = jobs.claim(store)
    assert job and job["ref"] == run_id
    threads = torch.get_num_threads()
    code = 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        try:
            code = train.run(ws.runs_dir(run_id), job_id=job["id"], store=store)
        finally:
            torch.set_num_threads(threads)
            jobs._finish(store, job, "succeeded" if code == 0 else "failed", ws=ws)
    return code


def _split_params(model) -> tuple[dict, dict]:
    """(base weights, LoRA weights) of a live PeftModel, cloned, keyed by parameter name."""
    base, lora = {}, {}
    for name, p in model.named_parameters():
        (lora if "lora_" in name else base)[name] = p.detach().clone()
    return base, lora


@pytest.fixture(scope="module")
def zorbia(module_home):
    ws, store = module_home
    return make_dataset(ws, store, ws.root)


@pytest.fixture(scope="module")
def trained(module_home, zorbia, tiny_model_dir):
    """One real training run, in-process (the worker's `run` function), shared by the tests below.

    The SFTTrainer it builds is recorded (trl.SFTTrainer swapped for a subclass), with a copy of every
    weight taken right after the LoRA layers were added and before the first optimizer step."""
    import trl
    ws, store = module_home
    run_id = jobs.submit_train(tiny_cfg(tiny_model_dir, run_name="mem", max_steps=MEMORISE_CAP), ws, store)
    seen = {}

    with training_until_memorised() as cb:  # trains to the criterion, capped at MEMORISE_CAP steps

        class RecordingTrainer(trl.SFTTrainer):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                seen["trainer"] = self
                seen["base_before"], seen["lora_before"] = _split_params(self.model)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(trl, "SFTTrainer", RecordingTrainer)
            assert run_in_process(ws, store, run_id) == 0
    seen["memorised_at"] = require(cb, MEMORISE_CAP)
    return ws, store, ws.runs_dir(run_id), seen


def test_base_frozen_adapter_moved_loss_fell(trained, tiny_model_dir):
    """The live model's base weights after training equal the copy taken before its first step.

    Why this can fail: both sides come from the same in-memory model the optimizer stepped (AdamW at
    lr 1e-2 until the answer was memorised), not from the unchanged model file on disk; a base weight that was trainable
    (modules_to_save, a lost freeze, an optimizer over all parameters) would have moved and torch.equal
    fails. test_frozen_check_catches_a_trained_base_weight runs this same check on a run where one
    base weight is left trainable, and it does fail there."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    ws, store, run_dir, seen = trained
    base_after, lora_after = _split_params(seen["trainer"].model)
    assert _changed(seen["base_before"], base_after) == []
    assert not any(p.requires_grad for n, p in seen["trainer"].model.named_parameters() if "lora_" not in n)
    # the copy taken before training is the model file's content (the snapshot saw the real base)
    on_disk = load_file(str(tiny_model_dir / "model.safetensors"))
    by_leaf = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in base_after.items()}
    assert on_disk and all(torch.equal(by_leaf[k], v) for k, v in on_disk.items())
    # LoRA moved: every B starts at zero, and A and B changed
    moved = _changed(seen["lora_before"], lora_after)
    assert any("lora_B" in k for k in moved) and any("lora_A" in k for k in moved), moved
    assert all(seen["lora_before"][k].abs().sum() == 0 for k in seen["lora_before"] if "lora_B" in k)
    # the saved adapter holds LoRA weights only, and base + adapter answers differently from base
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved), [k for k in saved if "lora_" not in k]
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(ids).logits
        tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir / "adapter")
        tuned_logits = tuned.eval()(ids).logits
    assert (tuned_logits - base_logits).abs().max() > 1e-2
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["train_loss"] < 0.5 * m["first_train_loss"], m
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert any("loss" in e and "learning_rate" in e for e in events)
    assert any(e.get("eta_s") is not None for e in events) and any(e.get("tokens_per_s") for e in events)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for key in ("config", "dataset_version", "base_model_hash", "packages", "seed", "started_at", "ended_at", "device"):
        assert manifest.get(key) is not None, key


def _changed(before: dict, after: dict) -> list[str]:
    assert before.keys() == after.keys() and before
    return [k for k in before if not torch.equal(before[k], after[k])]


def test_frozen_check_catches_a_trained_base_weight(tiny_model_dir, tmp_path):
    """The check above, on a trainer with one base weight left trainable: it reports that weight."""
    from trl import SFTTrainer
    from sft_core.models import load_causal_lm, load_tokenizer
    cfg = tiny_cfg(tiny_model_dir, max_steps=1)
    ds = train.to_prompt_completion([data.make_record(q, ANSWER) for q in QUESTIONS[:4]])
    trainer = SFTTrainer(model=load_causal_lm(tiny_model_dir, "cpu"), args=train.build_sft_config(cfg, tmp_path, False, False),
                         train_dataset=ds, processing_class=load_tokenizer(tiny_model_dir), peft_config=train.lora_config(cfg))
    leaked = next(n for n, p in trainer.model.named_parameters() if n.endswith("down_proj.base_layer.weight"))
    trainer.model.get_parameter(leaked).requires_grad_(True)  # the bug the check must catch
    before, _ = _split_params(trainer.model)
    trainer.train()
    after, _ = _split_params(trainer.model)
    assert _changed(before, after) == [leaked]


def test_memorised_answer_comes_back(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ws, store, run_dir, _ = trained
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir / "adapter").eval()
    version = json.loads((run_dir / "config.json").read_text())["dataset_version"]
    train_questions = [r["instruction"] for r in data.load_split("zorbia", "train", version, ws=ws, store=store)]
    assert train_questions
    for q in train_questions:  # the criterion the fixture trained to, checked again by plain generate()
        assert "Quuxville" not in greedy(base, tok, q)
        assert greedy(tuned, tok, q, max_new_tokens=16).strip().startswith(ANSWER), q


def test_adapter_is_servable(trained):
    ws, store, run_dir, _ = trained
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert not cfg.get("use_dora")
    assert not cfg.get("modules_to_save")
    assert cfg["r"] <= 64
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()


def test_completion_only_loss_masks_the_prompt(tiny_model_dir, tmp_path):
    """With our SFTConfig, every prompt token's label is -100 and every answer token is trained."""
    from trl import SFTTrainer
    from sft_core.models import load_causal_lm, load_tokenizer
    tok = load_tokenizer(tiny_model_dir)
    cfg = tiny_cfg(tiny_model_dir, max_steps=1)
    ds = train.to_prompt_completion([data.make_record("Q?", "A.")])
    trainer = SFTTrainer(model=load_causal_lm(tiny_model_dir, "cpu"), args=train.build_sft_config(cfg, tmp_path, False, False),
                         train_dataset=ds, processing_class=tok, peft_config=train.lora_config(cfg))
    example = trainer.train_dataset[0]
    batch = trainer.data_collator([{k: v for k, v in example.items() if k in ("input_ids", "labels", "completion_mask")}])
    prompt_len = len(tok.apply_chat_template(ds[0]["prompt"], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"])
    labels = batch["labels"][0].tolist()
    assert all(x == -100 for x in labels[:prompt_len])
    trained_ids = [x for x in labels[prompt_len:] if x != -100]
    assert tok.decode(trained_ids).startswith("A.")


@pytest.mark.parametrize("field,value,needle", [
    ("lora_r", 0, "between 1 and 64"),
    ("learning_rate", -1e-4, "positive"),
    ("target_modules", "q_proj,not_a_module", "unknown module"),
    ("max_length", 8, "shortest prompt"),
    ("dataset", "no-such-dataset", "unknown dataset"),
])
def test_bad_configs_refused_before_start(ws, store, tmp_path, tiny_model_dir, field, value, needle):
    make_dataset(ws, store, tmp_path)
    with pytest.raises(ConfigError) as e:
        jobs.submit_train(tiny_cfg(tiny_model_dir, **{field: value}), ws, store)
    assert e.value.where == field and needle in str(e.value)
    assert jobs_db.count(store) == 0 and runs_db.list_runs(store) == []
    assert not ws.runs_dir().exists() or not any(ws.runs_dir().iterdir())


def test_multi_gpu_builds_accelerate_launch(tmp_path):
    # No GPU here: the visible-GPU count is passed in (the boundary that cannot exist on this machine).
    one = jobs.train_command(tmp_path, "j1", "sqlite:///x.db", resume=False, num_gpus=0, gpus_visible=1)
    assert one[1:3] == ["-m", "sft_core.train"]
    four = jobs.train_command(tmp_path, "j1", "sqlite:///x.db", resume=True, num_gpus=0, gpus_visible=4)
    assert four[1:3] == ["-m", "accelerate.commands.launch"]
    assert four[four.index("--num_processes") + 1] == "4" and "--resume" in four
    two = jobs.train_command(tmp_path, "j1", "sqlite:///x.db", resume=False, num_gpus=2, gpus_visible=4)
    assert two[two.index("--num_processes") + 1] == "2"


# ------------------------------------------------------------------------------------------------
# Eval / save schedule and early stopping
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("has_eval,eval_steps,save_steps,patience,expect", [
    # (eval_strategy, eval_steps, save_steps, load_best)
    (False, 0, 50, 0, ("no", None, 50, False)),
    (False, 10, 50, 0, ("no", None, 50, False)),
    (True, 0, 50, 0, ("epoch", None, 50, False)),
    (True, 7, 50, 0, ("steps", 7, 50, False)),
    (True, 0, 50, 2, ("steps", 50, 50, True)),   # was eval "epoch" + save "steps": Trainer refused it
    (True, 10, 50, 2, ("steps", 10, 50, True)),
    (True, 20, 50, 2, ("steps", 20, 40, True)),  # 50 is no multiple of 20: the multiple below it
    (True, 30, 50, 2, ("steps", 30, 30, True)),
    (True, 80, 50, 2, ("steps", 80, 80, True)),  # at least one eval per checkpoint
])
def test_build_sft_config_schedules_are_consistent(tmp_path, has_eval, eval_steps, save_steps, patience, expect):
    """Every combination is one transformers accepts (SFTConfig validates in __post_init__)."""
    cfg = load_config(TrainConfig, overrides=dict(dataset="d", eval_steps=eval_steps, save_steps=save_steps,
                                                  early_stopping_patience=patience))
    args = train.build_sft_config(cfg, tmp_path, cuda=False, has_eval=has_eval)
    got = (args.eval_strategy.value, args.eval_steps if args.eval_strategy.value == "steps" else None,
           args.save_steps, args.load_best_model_at_end)
    assert args.save_strategy.value == "steps"
    assert got == expect
    if args.load_best_model_at_end:
        assert args.save_steps % args.eval_steps == 0 and args.metric_for_best_model == "eval_loss"
        assert args.greater_is_better is False


def test_early_stopping_without_eval_split_is_refused(ws, store, tmp_path, tiny_model_dir):
    p = tmp_path / "noeval.jsonl"
    p.write_text("".join(json.dumps({"instruction": q, "output": ANSWER}) + "\n" for q in QUESTIONS))
    data.import_dataset(p, "noeval", DataConfig(eval_fraction=0.0, test_fraction=0.1), ws=ws, store=store)
    with pytest.raises(ConfigError) as e:
        jobs.submit_train(tiny_cfg(tiny_model_dir, dataset="noeval", early_stopping_patience=2), ws, store)
    assert e.value.where == "early_stopping_patience" and "no eval rows" in str(e.value)
    assert runs_db.list_runs(store) == []


def test_early_stopping_trains_and_stops(ws, store, tiny_model_dir):
    """Early stopping with the default eval_steps=0 (the combination transformers used to refuse at
    Trainer init) trains for real: the eval split's answer contradicts the trained one, so the eval loss
    soon rises, the run stops long before max_steps and keeps the best checkpoint."""
    from sft_core.records import make_record
    splits = {"train": [make_record(q, ANSWER) for q in QUESTIONS[:8]],
              "eval": [make_record(q, "Purple whales sing in winter.") for q in QUESTIONS[8:]]}
    data.import_records(splits, "contra", ws=ws, store=store)
    run_id = jobs.submit_train(tiny_cfg(tiny_model_dir, dataset="contra", run_name="es", max_steps=60, save_steps=2,
                                        early_stopping_patience=1), ws, store)
    assert run_in_process(ws, store, run_id) == 0
    run_dir = ws.runs_dir(run_id)
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    evals = [e for e in events if "eval_loss" in e]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert len(evals) >= 3 and m["steps"] < 60, (m, evals)
    state = json.loads((train.last_checkpoint(run_dir) / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] and state["best_metric"] == min(e["eval_loss"] for e in evals[:-1])
    assert m["eval_loss"] == pytest.approx(state["best_metric"])  # the best checkpoint was loaded at the end
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert runs_db.get(store, run_id)["status"] == "succeeded"


# ------------------------------------------------------------------------------------------------
# The CLI: `sft-studio train | runs list | runs show | export | merge`, in-process, on one shared run
# ------------------------------------------------------------------------------------------------
def _cli(*argv) -> tuple[int, str, str]:
    import contextlib
    import io
    from sft_core import cli
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cli_run(module_home, zorbia, tiny_model_dir):
    """`sft-studio train` with a YAML file and flags (a real worker process, 3 steps), shared below.

    The YAML sets lora_r (over the default), max_steps (overridden by the flag) and report_to tensorboard."""
    import yaml
    ws, store = module_home
    conf = ws.root / "run.yaml"
    conf.write_text(yaml.safe_dump({"lora_r": 4, "lora_alpha": 8, "max_steps": 50, "report_to": "tensorboard",
                                    "batch_size": 4, "max_length": 64, "learning_rate": 1e-2, "warmup_ratio": 0.0,
                                    "save_steps": 2, "run_name": "cli"}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # the worker process inherits it
        rc, out, err = _cli("train", "--dataset", zorbia, "--base-model", tiny_model_dir, "--max-steps", "3",
                            "--config", conf)
    assert rc == 0, out + err
    return ws, store, ws.runs_dir("cli"), out


def test_cli_train_yaml_under_flags(cli_run):
    ws, store, run_dir, out = cli_run
    assert "run cli: succeeded" in out
    cfg = json.loads((run_dir / "config.json").read_text())["config"]
    assert cfg["lora_r"] == 4 and cfg["report_to"] == "tensorboard"  # YAML over the default
    assert cfg["max_steps"] == 3  # the flag over the YAML's 50
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 3
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_report_to_tensorboard_writes_event_files(cli_run):
    ws, store, run_dir, out = cli_run
    files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert files and sum(f.stat().st_size for f in files) > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert any("loss" in tag for tag in acc.Tags()["scalars"]), acc.Tags()


def test_cli_runs_list_and_show(cli_run):
    ws, store, run_dir, _ = cli_run
    rc, out, err = _cli("runs", "list")
    assert rc == 0
    line = next(x for x in out.splitlines() if x.startswith("cli "))
    assert "succeeded" in line and "train_loss" in line
    rc, out, err = _cli("runs", "show", "cli")
    assert rc == 0
    shown = json.loads(out)
    assert shown["run"]["status"] == "succeeded" and shown["job"]["status"] == "succeeded"
    assert shown["config"]["lora_r"] == 4 and shown["metrics"]["steps"] == 3 and shown["last_event"]
    rc, out, err = _cli("runs", "show", "nope")
    assert rc == 1 and "unknown run 'nope'" in err and "Traceback" not in err


def test_cli_export(cli_run, tmp_path):
    ws, store, run_dir, _ = cli_run
    rc, out, err = _cli("export", "cli", "--out", tmp_path / "exp")
    assert rc == 0, err
    for f in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "manifest.json", "metrics.json"):
        assert (tmp_path / "exp" / f).exists(), f
    assert json.loads((tmp_path / "exp" / "manifest.json").read_text())["run_id"] == "cli"


def test_cli_merge_matches_base_plus_adapter(cli_run, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    ws, store, run_dir, _ = cli_run
    rc, out, err = _cli("merge", "cli", "--out", tmp_path / "merged")
    assert rc == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                             run_dir / "adapter").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[1, 5, 9, 200, 3000, 42, 7]])
    with torch.no_grad():
        m, a, b = merged(ids).logits, with_adapter(ids).logits, base(ids).logits
    assert (m - a).abs().max() < 1e-4
    assert (m - b).abs().max() > 1e-3  # the adapter is in there


@pytest.mark.parametrize("argv,env,needle,where", [
    (["--lora-r", "0"], {}, "between 1 and 64", "lora_r"),
    (["--push-to-hub", "x/y"], {"HF_TOKEN": None, "HUGGING_FACE_HUB_TOKEN": None}, "set HF_TOKEN", "push_to_hub"),
    (["--push-to-hub", "x/y"], {"HF_TOKEN": "hf_test", "HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE", "push_to_hub"),
])
def test_cli_train_refuses_before_the_run_starts(module_home, zorbia, tiny_model_dir, monkeypatch,
                                                 argv, env, needle, where):
    ws, store = module_home
    for k, v in env.items():
        if v is None:
            monkeypatch.delenv(k, raising=False)
        else:
            monkeypatch.setenv(k, v)
    runs_before = runs_db.ids(store)
    rc, out, err = _cli("train", "--dataset", zorbia, "--base-model", tiny_model_dir, "--max-steps", "3", *argv)
    assert rc == 1
    assert err.startswith(f"error: {where}: ") and needle in err and "Traceback" not in err, err
    assert runs_db.ids(store) == runs_before  # nothing queued
