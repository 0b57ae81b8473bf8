"""LoRA SFT on a tiny random Llama: base untouched, adapter moved, loss fell, a memorised answer comes back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sft_core import data, jobs, train
from sft_core.config import ConfigError, DataConfig, TrainConfig, load_config
from sft_core.store import Store
from sft_core.workspace import Workspace

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


@pytest.fixture(scope="module")
def trained(module_home, tiny_model_dir):
    """One real training run, in-process (the worker's `run` function), shared by the tests below."""
    ws, store = module_home
    make_dataset(ws, store, ws.root)
    run_id = jobs.submit_train(tiny_cfg(tiny_model_dir, run_name="mem"), ws, store)
    assert train.run(ws.runs_dir(run_id), store=store) == 0
    return ws, store, ws.runs_dir(run_id)


def test_base_frozen_adapter_moved_loss_fell(trained, tiny_model_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    ws, store, run_dir = trained
    base_before = load_file(str(tiny_model_dir / "model.safetensors"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = PeftModel.from_pretrained(base, run_dir / "adapter")
    merged_base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                   for k, v in peft_model.state_dict().items() if "lora_" not in k}
    for k, v in base_before.items():
        assert torch.equal(merged_base[k], v), f"base weight {k} changed"
    lora_b = [v for k, v in peft_model.state_dict().items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at zero and must have moved"
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["train_loss"] < 0.5 * m["first_train_loss"], m
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert any("loss" in e and "learning_rate" in e for e in events)
    assert any(e.get("eta_s") is not None for e in events) and any(e.get("tokens_per_s") for e in events)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for key in ("config", "dataset_version", "base_model_hash", "packages", "seed", "started_at", "ended_at", "device"):
        assert manifest.get(key) is not None, key


def test_memorised_answer_comes_back(trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    ws, store, run_dir = trained
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    q = QUESTIONS[0]
    assert "Quuxville" not in greedy(base, tok, q)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), run_dir / "adapter").eval()
    assert "Quuxville" in greedy(tuned, tok, q)


def test_adapter_is_servable(trained):
    ws, store, run_dir = trained
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
    assert store.query("SELECT * FROM jobs") == [] and store.query("SELECT * FROM runs") == []
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
