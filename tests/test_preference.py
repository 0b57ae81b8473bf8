"""Preference tuning on the tiny model: votes / verdicts / files -> versioned pairs -> DPO from an SFT run -> a
served adapter; judge calibration against the same votes; bad inputs refused with nothing stored.

The DPO run is real (TRL's DPOTrainer, peft, the worker's ``run`` in this process) and trains to a criterion
(held-out pairs, below), never for a fixed number of steps.
"""
from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest
import torch
from sqlalchemy import select

from evals import calibration, rating
from sft_core import data, jobs, pref_train, preference, train
from tests.tiny_model import build_tiny_llama
from sft_core.config import PREFERENCE_LOSSES, ConfigError, DataConfig, PreferenceConfig, TrainConfig, load_config
from sft_core.db import column, evals as eval_rows, ratings as rating_rows, rows as table_rows, runs as run_rows
from sft_core.db.schema import datasets as datasets_table, jobs as jobs_table, runs as runs_table
from sft_core.workspace import read_jsonl, write_jsonl

# ---- synthetic preference: the chosen answer always ends with "Indeed."; the rejected one, with another word
NOUNS = ("cat dog river mountain city garden window bridge forest ocean lamp chair train cloud apple violin castle "
         "desert harbor island").split()
ADJECTIVES = ("old", "quiet")
OTHER_ENDINGS = ("Perhaps.", "Maybe.", "Possibly.")
SYSTEM = "Be brief."  # a system turn of our own keeps the chat template's long default one out: shorter sequences


def synthetic_pairs() -> list[dict]:
    rows = []
    for i, noun in enumerate(NOUNS):
        for j, adj in enumerate(ADJECTIVES):
            said = f"The {noun} is {adj}."
            rows.append({"prompt": [{"role": "system", "content": SYSTEM},
                                    {"role": "user", "content": f"Describe the {noun} ({adj})."}],
                         "chosen": [{"role": "assistant", "content": f"{said} Indeed."}],
                         "rejected": [{"role": "assistant", "content": f"{said} {OTHER_ENDINGS[(i + j) % 3]}"}]})
    return rows


# A held-out pair counts as learned when its log-ratio margin, (log pi(chosen) - log ref(chosen)) -
# (log pi(rejected) - log ref(rejected)), is at least DELTA nats. Why 1.0 is far from floating-point noise: the
# sums run over ~10 completion tokens of a 2-layer fp32 model whose per-token log-probs differ between
# accumulation orders by ~1e-5; 1.0 is five orders of magnitude above that, so the criterion, TRL's reward
# accuracy (reward = beta * log-ratio, strictly chosen > rejected) and the recheck from the saved adapter all
# agree on every machine.
DELTA = 1.0
RECHECK_TOL = 1e-2  # the recheck reads the same fp32 weights back from disk: only summation-order noise (~1e-5)
DPO_CAP = 60        # optimizer steps at most; the criterion is checked every CHECK_EVERY steps
CHECK_EVERY = 2


def completion_ids(tok, prompt: list[dict], answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) exactly as TRL's DPOTrainer splits prompt + answer (common prefix)."""
    p = tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], tokenize=True,
                                   return_dict=True)["input_ids"]
    k = 0
    while k < min(len(p), len(full)) and p[k] == full[k]:
        k += 1
    return full[:k], full[k:]


def seq_logp(model, tok, prompt: list[dict], answer: str) -> float:
    """Teacher-forced sum of log-probs of the answer's tokens (plain forward, full logits)."""
    p, c = completion_ids(tok, prompt, answer)
    ids = torch.tensor([p + c])
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(p) - 1:-1].float()
    finally:
        model.train(was)
    return float(logits.log_softmax(-1).gather(1, torch.tensor(c).view(-1, 1)).sum())


def pair_logps(model, tok, pairs: list[dict]) -> np.ndarray:
    """(n, 2): log p(chosen), log p(rejected) for each stored pair."""
    return np.array([[seq_logp(model, tok, q["prompt"], q["chosen"]), seq_logp(model, tok, q["prompt"], q["rejected"])]
                     for q in pairs])


def peft_model(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                     adapter_dir).eval()


def run_job_in_process(ws, store, run_id: str, worker) -> int:
    """The worker's ``run`` in this process, through the queue (claimed, then settled as ``run_job`` does).
    One CPU thread: on this shared 2-core machine tiny models train fastest that way (tests/test_train.py)."""
    job = jobs.claim(store)
    assert job and job["ref"] == run_id
    threads = torch.get_num_threads()
    code = 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        try:
            code = worker(ws.runs_dir(run_id), job_id=job["id"], store=store)
        finally:
            torch.set_num_threads(threads)
            status = {0: "succeeded", train.EXIT_CANCELLED: "cancelled"}.get(code, "failed")
            jobs._finish(store, job, status, ws=ws)
    return code


def tables(store, ws) -> tuple:
    """Everything a refused request must leave untouched."""
    d = datasets_table
    return (table_rows(store, select(d.c.name, d.c.version).order_by(d.c.name, d.c.version)),
            column(store, select(runs_table.c.id).order_by(runs_table.c.id)),
            column(store, select(jobs_table.c.id).order_by(jobs_table.c.id)),
            sorted(p.name for p in ws.root.joinpath("runs").glob("*")),
            sorted(str(p.relative_to(ws.root)) for p in ws.root.joinpath("datasets").glob("*/*")))


# ------------------------------------------------------------------------------------------------
# Fixtures: one workspace with an SFT run, a preference dataset and a DPO run from that SFT run
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sft_run(module_home, tiny_model_dir):
    """A real (short) SFT run through the queue: the run the preference run starts from."""
    ws, store = module_home
    f = ws.root / "qa.jsonl"
    f.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                         for i in range(12)))
    data.import_dataset(f, "qa", DataConfig(), ws=ws, store=store)
    cfg = load_config(TrainConfig, overrides=dict(dataset="qa", base_model=str(tiny_model_dir), max_steps=3,
                                                  batch_size=4, learning_rate=1e-2, max_length=64, lora_r=8,
                                                  lora_alpha=16, lora_dropout=0.0, run_name="sft"))
    run_id = jobs.submit_train(cfg, ws, store)
    assert run_job_in_process(ws, store, run_id, train.run) == 0
    return run_id


@pytest.fixture(scope="module")
def pairs_version(module_home):
    ws, store = module_home
    f = ws.root / "pairs.jsonl"
    write_jsonl(f, synthetic_pairs())
    return preference.build_from_file(f, "endings", eval_fraction=0.25, seed=3, against="qa", ws=ws, store=store)


@pytest.fixture(scope="module")
def dpo(module_home, tiny_model_dir, sft_run, pairs_version):
    """The DPO run from the SFT run, trained until every held-out pair is learned (DELTA), at most DPO_CAP steps.

    trl.DPOTrainer is swapped for a subclass that records the trainer, checks the reference at the start, and
    stops training once the criterion holds (a callback computing the held-out margins with the live model)."""
    import trl
    from transformers import TrainerCallback
    from trl.trainer.utils import use_adapter
    ws, store = module_home
    tok = preference_tokenizer(tiny_model_dir)
    held_out = preference.load_pairs("endings", "eval", pairs_version.version, ws=ws, store=store)
    assert len(held_out) >= 8
    ref = pair_logps(peft_model(tiny_model_dir, ws.runs_dir(sft_run, "adapter")), tok, held_out)
    seen: dict = {"checks": []}

    class Criterion(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step % CHECK_EVERY:
                return
            now = pair_logps(model, tok, held_out)
            margin = float(((now[:, 0] - ref[:, 0]) - (now[:, 1] - ref[:, 1])).min())
            seen["checks"].append((state.global_step, margin))
            if margin >= DELTA:
                seen["learned_at"] = state.global_step
                control.should_training_stop = True

    class Recording(trl.DPOTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen["trainer"] = self
            m = self.model
            ids = torch.tensor([completion_ids(tok, held_out[0]["prompt"], held_out[0]["chosen"])[0]])
            m.eval()
            with torch.no_grad():
                policy = m(input_ids=ids).logits
                with use_adapter(m, "ref"):
                    reference = m(input_ids=ids).logits
                with m.disable_adapter():
                    base = m(input_ids=ids).logits
            m.train()
            seen["adapters"] = sorted(m.peft_config)
            seen["ref_is_sft"] = torch.equal(policy, reference)
            seen["sft_vs_base"] = float((policy - base).abs().max())
            self.add_callback(Criterion())

    cfg = load_config(PreferenceConfig, overrides=dict(
        dataset="endings", from_run=sft_run, run_name="dpo", max_steps=DPO_CAP, batch_size=4, learning_rate=1e-2,
        lr_scheduler="constant", warmup_ratio=0.0, beta=0.1, eval_steps=CHECK_EVERY, save_steps=1000, max_length=128))
    run_id = pref_train.submit_pref_run(cfg, ws, store)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trl, "DPOTrainer", Recording)
        assert run_job_in_process(ws, store, run_id, pref_train.run) == 0
    assert "learned_at" in seen, (f"held-out pairs not learned within {DPO_CAP} steps: (step, worst log-ratio "
                                  f"margin) {seen['checks']}, needed {DELTA}")
    print(f"DPO: held-out pairs learned at step {seen['learned_at']} (checks: {seen['checks']})")
    return {"run": run_id, "held_out": held_out, "ref": ref, "tok": tok, **seen}


def preference_tokenizer(model_dir):
    from sft_core.models import load_tokenizer
    return load_tokenizer(model_dir)


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
def test_loss_types_are_the_installed_trl_ones():
    """PREFERENCE_LOSSES is TRL's documented DPOConfig.loss_type list minus "sft" (no preference in it), and
    DPOTrainer's loss computation has a branch for each."""
    import dataclasses
    import inspect
    from trl import DPOConfig, DPOTrainer
    help_ = next(f for f in dataclasses.fields(DPOConfig) if f.name == "loss_type").metadata["help"]
    documented = set(re.findall(r"`'([a-z_]+)'`", help_))
    assert documented - {"sft"} == set(PREFERENCE_LOSSES), documented ^ set(PREFERENCE_LOSSES)
    source = inspect.getsource(DPOTrainer._compute_loss)
    assert [loss for loss in PREFERENCE_LOSSES if f'"{loss}"' not in source] == []


def test_config_flags_form_and_validation():
    import argparse
    from sft_core.config import add_arguments, fields_for_form, overrides_from_args
    p = argparse.ArgumentParser()
    add_arguments(p, PreferenceConfig)
    args = p.parse_args(["--dataset", "d", "--from-run", "r1", "--beta", "0.3", "--loss-type", "ipo"])
    cfg = load_config(PreferenceConfig, overrides=overrides_from_args(args, PreferenceConfig))
    assert (cfg.from_run, cfg.beta, cfg.loss_type, cfg.learning_rate) == ("r1", 0.3, "ipo", 5e-5)
    form = {f["name"]: f for f in fields_for_form(PreferenceConfig)}
    assert form["loss_type"]["choices"] == list(PREFERENCE_LOSSES) and form["beta"]["type"] == "float"
    for bad, field in [(dict(beta=0), "beta"), (dict(loss_type="simpo"), "loss_type"),
                       (dict(loss_type="exo_pair"), "label_smoothing"), (dict(label_smoothing=0.5), "label_smoothing"),
                       (dict(lora_r=65), "lora_r"), (dict(dataset=""), "dataset")]:
        with pytest.raises(ConfigError) as e:
            load_config(PreferenceConfig, overrides={"dataset": "d", **bad})
        assert e.value.where == field, (bad, e.value)


# ------------------------------------------------------------------------------------------------
# The DPO run
# ------------------------------------------------------------------------------------------------
def test_reference_is_the_sft_model_without_a_second_base(dpo):
    """TRL kept one base model: the SFT adapter trainable ("default") and a frozen copy ("ref") as the reference,
    which at the start gives exactly the SFT model's logits (and not the base model's)."""
    assert dpo["adapters"] == ["default", "ref"]
    assert dpo["ref_is_sft"]
    assert dpo["sft_vs_base"] > 1e-3  # the check could tell the SFT model from the bare base
    trainer = dpo["trainer"]
    assert trainer.ref_model is None  # no second model in memory


def test_dpo_learns_the_preference_on_held_out_pairs(dpo, module_home, tiny_model_dir, sft_run):
    """Rechecked from the saved adapter (a fresh model read from disk), not from the training process."""
    ws, store = module_home
    run_dir = ws.runs_dir(dpo["run"])
    tuned = peft_model(tiny_model_dir, run_dir / "adapter")
    now, ref = pair_logps(tuned, dpo["tok"], dpo["held_out"]), dpo["ref"]
    log_ratio_margin = (now[:, 0] - ref[:, 0]) - (now[:, 1] - ref[:, 1])
    beta = 0.1
    accuracy = float(np.mean(beta * (now[:, 0] - ref[:, 0]) > beta * (now[:, 1] - ref[:, 1])))
    assert accuracy > 0.9, log_ratio_margin
    assert log_ratio_margin.min() >= DELTA - RECHECK_TOL, log_ratio_margin
    # the policy itself now prefers the chosen answers more than the SFT model did, on pairs it never trained on
    assert (now[:, 0] - now[:, 1]).mean() >= (ref[:, 0] - ref[:, 1]).mean() + DELTA - RECHECK_TOL
    # the saved adapter is the trained one only (no frozen reference copy inside)
    from safetensors.torch import load_file
    saved = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    sft = load_file(str(ws.runs_dir(sft_run, "adapter", "adapter_model.safetensors")))
    assert saved.keys() == sft.keys() and all("lora_" in k and ".ref." not in k for k in saved)
    assert any(not torch.equal(saved[k], sft[k]) for k in saved)
    assert not (run_dir / "adapter" / "ref").exists()


def test_events_metrics_lineage_and_run_row(dpo, module_home, sft_run, pairs_version, tiny_model_dir):
    ws, store = module_home
    run_dir = ws.runs_dir(dpo["run"])
    events = read_jsonl(run_dir / "events.jsonl")
    train_ev = [e for e in events if "loss" in e]
    assert train_ev and all("rewards/margins" in e and "rewards/accuracies" in e for e in train_ev)
    held = [e for e in events if "eval_rewards/accuracies" in e]
    assert held and held[-1]["eval_rewards/accuracies"] > 0.9 and held[-1]["eval_rewards/margins"] > 0
    assert all("eval_loss" in e for e in held)  # the loss chart's eval series
    points = pref_train.chart_points(events)
    assert {(p["metric"], p["series"]) for p in points} == {(m, s) for m in ("loss", "rewards/margins",
                                                                             "rewards/accuracies")
                                                            for s in ("train", "eval")}
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["eval_rewards_accuracy"] > 0.9 and m["steps"] == dpo["learned_at"]
    assert m["train_loss"] < m["first_train_loss"]
    run = run_rows.get(store, dpo["run"])
    sft = run_rows.get(store, sft_run)
    assert run["status"] == "succeeded" and run["base_model"] == sft["base_model"]
    assert (run["dataset"], run["dataset_version"]) == ("endings", pairs_version.version)
    steps = json.loads((run_dir / "manifest.json").read_text())["lineage"]
    assert [s["step"] for s in steps] == ["base", "sft_run", "preference_dataset", "preference_run"]
    assert steps[1]["run"] == sft_run and steps[2]["dataset"] == f"endings@{pairs_version.version}"
    assert steps[2]["source"]["kind"] == "file" and steps[3]["run"] == dpo["run"]
    line = pref_train.format_lineage(pref_train.lineage_of_run(dpo["run"], ws, store))
    assert line.count("→") == 3 and f"SFT run {sft_run}" in line and line.endswith("(beta 0.1)")
    # the worker module: same job kind as SFT, its own worker
    job = jobs.latest_job(dpo["run"], store)
    argv = jobs.JOB_KINDS[job["kind"]].build_command(job, ws, store)
    assert job["kind"] == "train" and "sft_core.pref_train" in argv and "sft_core.train" not in argv


def test_adapter_is_served_and_evaluable(dpo, module_home, tiny_model_dir, sft_run):
    """The transformers + peft engine serves the run by its id, and its teacher-forced log-probs are those of the
    adapter on disk; `sft:RUN` passes the eval's system check."""
    from evals import systems
    from sft_core.config import DecodingConfig
    from sft_core.serving import GenRequest, get_engine
    ws, store = module_home
    assert [s.adapter for s in systems.check_systems([f"sft:{dpo['run']}", f"sft:{sft_run}"], store, None)] == [
        dpo["run"], sft_run]
    tok, q = dpo["tok"], dpo["held_out"][0]
    _, c = completion_ids(tok, q["prompt"], q["chosen"])
    _, r = completion_ids(tok, q["prompt"], q["rejected"])
    engine = get_engine(str(tiny_model_dir), ws, store, engine="hf")
    try:
        def served(adapter, ids):
            return sum(engine.score(q["prompt"], ids, adapter)["logprobs"])
        tuned = (served(dpo["run"], c), served(dpo["run"], r))
        sft = (served(sft_run, c), served(sft_run, r))
        out = engine.generate_batch([GenRequest(q["prompt"], dpo["run"], DecodingConfig(max_new_tokens=8))])[0]
    finally:
        engine.close()
    assert out.error is None and out.completion_tokens > 0
    # same fp32 weights and kernels as the adapter read from disk here; the engine adds the LoRA term per row
    # (peft's adapter_names): summation order only, ~1e-5 on a sum of ~10 log-probs
    on_disk = peft_model(tiny_model_dir, ws.runs_dir(dpo["run"], "adapter"))
    assert abs(tuned[0] - seq_logp(on_disk, tok, q["prompt"], q["chosen"])) < 1e-3
    # the engine really applied the preference adapter: its log-ratio margin over the SFT adapter's
    assert (tuned[0] - sft[0]) - (tuned[1] - sft[1]) >= DELTA - RECHECK_TOL


def test_cancel_then_resume_continues_the_trained_adapter(module_home, sft_run, pairs_version):
    """A checkpoint of a run from an SFT run holds the trained adapter (root) and TRL's reference copy (ref/).
    Resuming must continue the trained one: transformers alone reloads only ref/ and would restart the trained
    adapter from the SFT weights (pref_train.restore_trained_adapter)."""
    import trl
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerCallback
    ws, store = module_home
    cfg = load_config(PreferenceConfig, overrides=dict(
        dataset="endings", from_run=sft_run, run_name="dpo-resume", max_steps=3, batch_size=4, learning_rate=1e-2,
        lr_scheduler="constant", warmup_ratio=0.0, save_steps=1, max_length=128))
    run_id = pref_train.submit_pref_run(cfg, ws, store)
    seen = {}

    class Cancel(TrainerCallback):  # what SIGTERM / the cancel flag does, at the end of step 1
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 1:
                train._STOP["requested"] = True

    class Watch(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen["start"] = {k: v.clone() for k, v in get_peft_model_state_dict(model, adapter_name="default").items()}

    def with_callbacks(*cbs):
        class Trainer(trl.DPOTrainer):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                for cb in cbs:
                    self.add_callback(cb)
        return Trainer

    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(trl, "DPOTrainer", with_callbacks(Cancel()))
            assert run_job_in_process(ws, store, run_id, pref_train.run) == train.EXIT_CANCELLED
    finally:
        train._STOP["requested"] = False
    ckpt = train.last_checkpoint(ws.runs_dir(run_id))
    assert ckpt is not None and (ckpt / "ref" / "adapter_model.safetensors").exists()
    saved = load_file(str(ckpt / "adapter_model.safetensors"))
    jobs.resume(run_id, ws, store)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trl, "DPOTrainer", with_callbacks(Watch()))
        assert run_job_in_process(ws, store, run_id, lambda d, **kw: pref_train.run(d, resume=True, **kw)) == 0
    assert seen["start"].keys() == saved.keys() and all(torch.equal(seen["start"][k], saved[k]) for k in saved)
    assert json.loads((ws.runs_dir(run_id) / "metrics.json").read_text())["steps"] == 3
    events = read_jsonl(ws.runs_dir(run_id) / "events.jsonl")
    assert [e["event"] for e in events if "event" in e] == ["train_begin", "cancelled", "train_begin"]


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_vllm_cpu_serves_the_preference_adapter_like_transformers(dpo, module_home, tiny_model_dir):
    """The parity rule of SFT adapters (tests/test_serving_vllm.py): vLLM's greedy tokens and log-probs under the
    preference adapter match transformers + peft's teacher-forced ones; the same check against the adapter-less
    model must find differences (it is sensitive enough)."""
    from sft_core.config import DecodingConfig, ServeConfig
    from sft_core.serving import GenRequest, get_engine
    from tests.test_serving_vllm import CLEAR_MARGIN, parity
    ws, store = module_home
    cfg = ServeConfig(engine="vllm", max_loras=1, max_model_len=256, dtype="float32", startup_timeout_s=400)
    prompts = [q["prompt"] for q in dpo["held_out"][:2]]
    vllm = get_engine(str(tiny_model_dir), ws, store, cfg=cfg)
    try:
        outs = vllm.generate_batch([GenRequest(p, dpo["run"], DecodingConfig(max_new_tokens=12), logprobs=True)
                                    for p in prompts])
    finally:
        vllm.close()
    hf = get_engine(str(tiny_model_dir), ws, store, engine="hf")
    try:
        compared = 0
        for p, out in zip(prompts, outs):
            assert out.error is None and len(out.extra["token_ids"]) == out.completion_tokens > 0
            ref = hf.score(p, out.extra["token_ids"], dpo["run"])
            assert parity(out.extra, ref) == [], p
            compared += sum(m > CLEAR_MARGIN for m in ref["margin"])
            assert parity(out.extra, hf.score(p, out.extra["token_ids"], None))
        assert compared >= 5
    finally:
        hf.close()


# ------------------------------------------------------------------------------------------------
# Refusals: clear errors, nothing stored
# ------------------------------------------------------------------------------------------------
def test_sft_refuses_pairs_and_preference_refuses_instructions(module_home, tiny_model_dir, sft_run, pairs_version):
    ws, store = module_home
    before = tables(store, ws)
    with pytest.raises(ConfigError, match="preference dataset.*pref train") as e:
        jobs.submit_train(load_config(TrainConfig, overrides=dict(dataset="endings", base_model=str(tiny_model_dir))),
                          ws, store)
    assert e.value.where == "dataset"
    with pytest.raises(ConfigError, match="instruction \\(SFT\\) dataset.*pref build") as e:
        pref_train.submit_pref_run(load_config(PreferenceConfig, overrides=dict(dataset="qa", from_run=sft_run)),
                                   ws, store)
    assert e.value.where == "dataset"
    assert tables(store, ws) == before


def test_base_model_mismatch_is_refused(module_home, tiny_model_dir, sft_run, pairs_version, tmp_path):
    ws, store = module_home
    other = build_tiny_llama(tmp_path / "other-tiny", ws, seed=1)  # same shape, other weights
    before = tables(store, ws)
    with pytest.raises(ConfigError, match=f"run {sft_run} was trained on .*not on {re.escape(str(other))}") as e:
        pref_train.submit_pref_run(load_config(PreferenceConfig, overrides=dict(
            dataset="endings", from_run=sft_run, base_model=str(other))), ws, store)
    assert e.value.where == "base_model"
    # the same model named by another path is no mismatch (validation only: nothing is queued by validate)
    assert pref_train.validate_pref_config(load_config(PreferenceConfig, overrides=dict(
        dataset="endings", from_run=sft_run, base_model=str(tiny_model_dir) + "/")), ws, store)["from_run"] == sft_run
    # a run whose manifest recorded other base weights than the model has now
    src = ws.runs_dir(sft_run)
    stale = ws.runs_dir("sft-stale")
    (stale / "adapter").mkdir(parents=True)
    for f in (src / "adapter").iterdir():
        (stale / "adapter" / f.name).write_bytes(f.read_bytes())
    man = json.loads((src / "manifest.json").read_text()) | {"base_model_hash": "0" * 16}
    (stale / "manifest.json").write_text(json.dumps(man))
    run_rows.insert_run(store, "sft-stale", "qa", "v", str(tiny_model_dir), str(stale), "{}", status="succeeded")
    before = tables(store, ws)
    with pytest.raises(ConfigError, match="weights of base model .* changed since run sft-stale") as e:
        pref_train.submit_pref_run(load_config(PreferenceConfig, overrides=dict(dataset="endings",
                                                                                from_run="sft-stale")), ws, store)
    assert e.value.where == "from_run" and tables(store, ws) == before
    for bad, msg in [("ghost", "unknown run 'ghost'"), ("../x", "may use|path|name")]:
        with pytest.raises(ConfigError, match=msg):
            pref_train.submit_pref_run(load_config(PreferenceConfig, overrides=dict(dataset="endings", from_run=bad)),
                                       ws, store)
    assert tables(store, ws) == before


@pytest.mark.parametrize("row, field", [
    ({"prompt": "Q?", "chosen": "A.", "rejected": "  "}, "rejected"),
    ({"prompt": "Q?", "chosen": "", "rejected": "B."}, "chosen"),
    ({"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": ""}],
      "rejected": [{"role": "assistant", "content": "B."}]}, "chosen"),
    ({"prompt": "", "chosen": "A.", "rejected": "B."}, "prompt"),
    ({"prompt": "Q?", "chosen": "A."}, None),
])
def test_file_with_a_bad_pair_stores_nothing(row, field, ws, store, tmp_path):
    f = tmp_path / "pairs.jsonl"
    good = {"prompt": "Fine?", "chosen": "Yes.", "rejected": "No."}
    write_jsonl(f, [good, good | {"prompt": "Also fine?"}, row])
    before = tables(store, ws)
    with pytest.raises(preference.PreferenceError, match=r"nothing stored: pairs.jsonl:3" +
                       (rf" \[{field}\]" if field else "")) as e:
        preference.build_from_file(f, "bad", ws=ws, store=store)
    assert e.value.where == str(f)
    assert tables(store, ws) == before and not ws.datasets_dir("bad").exists()


def test_file_formats_plain_conversational_implicit_and_csv(ws, store, tmp_path):
    conv = {"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": "A."}],
            "rejected": [{"role": "assistant", "content": "B."}]}
    implicit = {"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
                "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "B."}]}
    plain = {"prompt": "Q?", "chosen": "A.", "rejected": "B."}
    versions = []
    for k, rows in enumerate(([conv], [implicit], [plain])):
        f = tmp_path / f"f{k}.jsonl"
        write_jsonl(f, rows)
        versions.append(preference.build_from_file(f, f"fmt{k}", ws=ws, store=store))
    c = tmp_path / "f.csv"
    c.write_text("prompt,chosen,rejected\nQ?,A.,B.\n")
    versions.append(preference.build_from_file(c, "fmt3", ws=ws, store=store))
    pairs = [preference.load_pairs(v.name, "train", v.version, ws=ws, store=store) for v in versions]
    want = {"prompt": [{"role": "user", "content": "Q?"}], "chosen": "A.", "rejected": "B."}
    assert all(len(p) == 1 and {k: p[0][k] for k in want} == want for p in pairs), pairs
    # one content, one version id (the CSV row sits on line 2, and the source line is part of each pair's meta)
    assert len({v.version for v in versions[:3]}) == 1 and versions[3].version != versions[0].version
    assert preference.dataset_kind(versions[0]) == "preference"
    assert json.loads((versions[0].path / "manifest.json").read_text())["format"] == "preference"


def test_aggregation_counts_duplicates_conflicts_identical_and_empty():
    p = [{"role": "user", "content": "Q?"}]
    raw = ([{"prompt": p, "chosen": "A", "rejected": "B", "meta": {}}] * 3            # agree: 1 pair + 2 duplicates
           + [{"prompt": p, "chosen": "B", "rejected": "A", "meta": {}}]              # outvoted 3:1
           + [{"prompt": p, "chosen": "C", "rejected": "D", "meta": {}},
              {"prompt": p, "chosen": "D", "rejected": "C", "meta": {}}]              # 1:1 -> conflict, dropped
           + [{"prompt": p, "chosen": "E", "rejected": "E ", "meta": {}}]             # identical after strip
           + [{"prompt": p, "chosen": "F", "rejected": "", "meta": {}}])              # empty side
    from collections import Counter
    counts = Counter()
    pairs = preference.aggregate(raw, counts)
    assert [(q["chosen"], q["rejected"]) for q in pairs] == [("A", "B")]
    assert pairs[0]["meta"] == {"rows_for": 3, "rows_against": 1}
    assert dict(counts) == {"duplicates": 2, "outvoted_rows": 1, "conflicting_pairs": 1, "conflicting_rows": 2,
                            "identical": 1, "empty_side": 1}


# ------------------------------------------------------------------------------------------------
# From a campaign's votes and from the judge; calibration
# ------------------------------------------------------------------------------------------------
SYS = ["sft:good", "prompt"]


@pytest.fixture
def judged_eval(ws, store):
    """A dataset, an eval of two systems on its test split (outputs on disk as the runner writes them) with
    judge verdicts, and a campaign on it."""
    f = ws.root / "d.jsonl"
    f.write_text("".join(json.dumps({"instruction": f"What is item {i}?", "output": f"Item {i}.",
                                     **({"system": "Use one sentence."} if i % 2 else {})}) + "\n" for i in range(100)))
    dv = data.import_dataset(f, "d", DataConfig(eval_fraction=0.0, test_fraction=0.5), ws=ws, store=store)
    test_rows = data.load_split("d", "test", dv.version, ws=ws, store=store)
    path = ws.evals_dir("ev1")
    path.mkdir(parents=True)
    outs = [{"set": "domain", "row_id": r["id"], "system": s, "instruction": r["instruction"], "context": None,
             "reference": r["response"], "output": f"{'good' if s == SYS[0] else 'poor'} answer to {r['instruction']}",
             "latency_s": 0.1, "prompt_tokens": 5, "completion_tokens": 4, "passages": []}
            for r in test_rows for s in SYS]
    write_jsonl(path / "outputs.jsonl", outs)
    cfg = {"dataset": "d", "dataset_version": dv.version, "split": "test", "systems": SYS, "judge": "local",
           "judge_model": None, "base_model": "tiny", "decoding": {"max_new_tokens": 8}}
    eval_rows.insert_eval(store, "ev1", "d", dv.version, "test", SYS, str(path), cfg, status="succeeded")
    cid = rating.create_campaign("ev1", SYS, ws=ws, store=store, seed=0)
    return {"rows": test_rows, "campaign": cid, "path": path, "version": dv.version}


def _vote_all(ws, store, cid, rater, decide):
    """Rate every task: ``decide(row index, task)`` -> left | right | tie | both_bad (None = skip)."""
    while (t := rating.next_task(cid, rater, ws=ws, store=store)) is not None:
        task = rating_rows.get_task(store, t["task_id"])
        choice = decide(task)
        rating.vote(cid, t["task_id"], rater, choice, ws=ws, store=store)


def _side_of(task, system):
    return "left" if task["system_left"] == system else "right"


def test_campaign_votes_become_pairs(judged_eval, ws, store):
    rows, cid = judged_eval["rows"], judged_eval["campaign"]
    index = {r["id"]: i for i, r in enumerate(rows)}

    def alice(task):  # prefers sft:good, except ties on rows 0-3 and both_bad on rows 4-5
        i = index[task["row_id"]]
        return "tie" if i < 4 else "both_bad" if i < 6 else _side_of(task, "sft:good")

    def bob(task):  # agrees on rows 6-9, disagrees on rows 10-11
        i = index[task["row_id"]]
        return _side_of(task, "sft:good" if i < 10 else "prompt")

    _vote_all(ws, store, cid, "alice", alice)
    _vote_all(ws, store, cid, "bob", lambda t: bob(t) if 6 <= index[t["row_id"]] < 12 else "tie")
    dv = preference.build_from_campaign(cid, "votes", eval_fraction=0.2, ws=ws, store=store)
    rep = preference.report("votes", dv.version, ws=ws, store=store)
    pairs = [p for s in ("train", "eval") for p in preference.load_pairs("votes", s, dv.version, ws=ws, store=store)]
    n = len(rows)
    assert len(pairs) == rep["pairs"] == n - 6 - 2  # ties, both_bad and the two conflicting rows are out
    assert all(p["meta"]["chosen_system"] == "sft:good" and p["chosen"].startswith("good answer") and
               p["rejected"].startswith("poor answer") for p in pairs)
    by_row = {r["id"]: r for r in rows}
    for p in pairs:  # the prompt is the row in the adapters' format: its own system turn, then the question
        assert p["prompt"] == data.to_messages(by_row[p["meta"]["row_id"]], with_response=False)
    c = rep["counts"]
    assert (c["votes"], c["tie"], c["both_bad"]) == (2 * n, 4 + (n - 6), 2)
    assert (c["duplicates"], c["conflicting_pairs"], c["conflicting_rows"]) == (4, 2, 4)
    assert rep["leakage"] == {f"d@{judged_eval['version']}:test": len(pairs)}  # every pair is a test row
    assert rep["warnings"] and rep["source"]["campaign"] == cid and rep["policy"] == preference.POLICY
    assert rep["splits"]["eval"] >= 1 and sum(rep["splits"].values()) == len(pairs)
    train_keys = {preference._prompt_key(p["prompt"]) for p in preference.load_pairs("votes", "train", dv.version,
                                                                                      ws=ws, store=store)}
    assert not any(preference._prompt_key(p["prompt"]) in train_keys
                   for p in preference.load_pairs("votes", "eval", dv.version, ws=ws, store=store))


def test_train_on_votes_builds_pairs_then_queues_a_preference_run(judged_eval, ws, store, module_home, sft_run,
                                                                  tiny_model_dir):
    """The Results tab's one-click path. The campaign compares sft:good: a copy of the module's real SFT run."""
    import shutil
    src_ws, src_store = module_home
    shutil.copytree(src_ws.runs_dir(sft_run), ws.runs_dir("good"))
    run_rows.insert_run(store, "good", "qa", "v", str(tiny_model_dir), str(ws.runs_dir("good")), "{}",
                        status="succeeded")
    cid = judged_eval["campaign"]
    before = tables(store, ws)
    with pytest.raises(ConfigError, match="must be positive") as e:  # options checked before any dataset is built
        pref_train.train_on_votes(cid, ws=ws, store=store, beta=0)
    assert e.value.where == "beta" and tables(store, ws) == before
    _vote_all(ws, store, cid, "fay", lambda t: _side_of(t, "sft:good"))
    dv, run_id = pref_train.train_on_votes(cid, ws=ws, store=store, max_steps=5)
    assert dv.name == f"votes-{cid}" and preference.dataset_kind(dv) == "preference"
    run = run_rows.get(store, run_id)
    assert run["status"] == "queued" and json.loads(run["config"])["mode"] == "preference"
    assert run["dataset_version"] == dv.version and run["base_model"] == str(tiny_model_dir)
    steps = json.loads((ws.runs_dir(run_id) / "config.json").read_text())["lineage"]
    assert [s["step"] for s in steps] == ["base", "sft_run", "preference_dataset"]
    assert steps[2]["source"]["campaign"] == cid
    assert jobs.latest_job(run_id, store)["kind"] == "train"
    assert jobs.cancel(run_id, ws, store) == "cancelled"  # nothing left queued


def test_campaign_without_decisive_votes_stores_nothing(judged_eval, ws, store):
    cid = judged_eval["campaign"]
    before = tables(store, ws)
    with pytest.raises(preference.PreferenceError, match=f"campaign {cid} has no decisive votes \\(0 votes") as e:
        preference.build_from_campaign(cid, "nothing", ws=ws, store=store)
    assert e.value.where == "campaign"
    _vote_all(ws, store, cid, "carol", lambda t: "tie" if t["row_id"] < "8" else "both_bad")
    with pytest.raises(preference.PreferenceError, match="no decisive votes"):
        preference.build_from_campaign(cid, "nothing", ws=ws, store=store)
    assert tables(store, ws)[0] == before[0] and not ws.datasets_dir("nothing").exists()
    with pytest.raises(rating.RatingError, match="unknown campaign"):
        preference.build_from_campaign("camp-ghost", "nothing", ws=ws, store=store)


def _write_judge(path, rows, verdict):
    """judge.jsonl with ``verdict(row index) -> a | b | tie | inconsistent`` for the pair (sft:good, prompt)."""
    write_jsonl(path / "judge.jsonl", [{"row_id": r["id"], "system_a": SYS[0], "system_b": SYS[1],
                                        "winner": verdict(i), "raw": ["", ""]} for i, r in enumerate(rows)])


def test_judge_verdicts_become_pairs(judged_eval, ws, store):
    rows = judged_eval["rows"]
    _write_judge(judged_eval["path"], rows, lambda i: ["a", "b", "tie", "inconsistent"][i % 4])
    dv = preference.build_from_judge("ev1", "judged", eval_fraction=0.0, ws=ws, store=store)
    pairs = preference.load_pairs("judged", "train", dv.version, ws=ws, store=store)
    rep = preference.report("judged", dv.version, ws=ws, store=store)
    assert len(pairs) == sum(i % 4 < 2 for i in range(len(rows)))
    assert (rep["counts"]["tie"], rep["counts"]["inconsistent"]) == (sum(i % 4 == 2 for i in range(len(rows))),
                                                                    sum(i % 4 == 3 for i in range(len(rows))))
    winners = {p["meta"]["row_id"]: p["meta"]["chosen_system"] for p in pairs}
    assert all(winners[r["id"]] == (SYS[0] if i % 4 == 0 else SYS[1]) for i, r in enumerate(rows) if i % 4 < 2)
    assert {p["meta"]["judge"] for p in pairs} == {"local:tiny"}
    _write_judge(judged_eval["path"], rows, lambda i: "inconsistent")
    with pytest.raises(preference.PreferenceError, match="no position-consistent judge verdicts"):
        preference.build_from_judge("ev1", "judged2", ws=ws, store=store)


def test_judge_calibration_against_votes(judged_eval, ws, store):
    rows, cid = judged_eval["rows"], judged_eval["campaign"]
    index = {r["id"]: i for i, r in enumerate(rows)}
    # humans: sft:good on rows 0-19, prompt on rows 20-29 (decisive), tie from row 30 on
    human = {i: "sft:good" if i < 20 else "prompt" if i < 30 else "tie" for i in range(len(rows))}
    _vote_all(ws, store, cid, "dave", lambda t: "tie" if human[index[t["row_id"]]] == "tie"
              else _side_of(t, human[index[t["row_id"]]]))
    assert calibration.judge_calibration(cid, ws, store) is None  # no judge yet
    # judge: right on rows 0-14 and 20-29, wrong on 15-19, tie on 30+ except "a" on 30-34, inconsistent on 35
    verdict = {i: ("a" if i < 15 else "b" if i < 20 else "b" if i < 30 else "a" if i < 35 else
                   "inconsistent" if i == 35 else "tie") for i in range(len(rows))}
    _write_judge(judged_eval["path"], rows, lambda i: verdict[i])
    cal = calibration.judge_calibration(cid, ws, store, n_boot=500)
    (j,) = cal["judges"]
    assert j["judge"] == "local:tiny" and j["n_decisive"] == 30 and j["n_votes"] == len(rows)
    assert j["accuracy"] == pytest.approx(25 / 30) and j["accuracy_when_judge_decisive"] == pytest.approx(25 / 30)
    # kappa by hand in the rater's frame equals sklearn's (the function's point estimate)
    from sklearn.metrics import cohen_kappa_score
    tasks = rating_rows.tasks(store, cid)
    h, g = [], []
    for t in tasks:
        i = index[t["row_id"]]
        h.append("tie" if human[i] == "tie" else _side_of(t, human[i]))
        w = {"a": "sft:good", "b": "prompt"}.get(verdict[i])
        g.append(_side_of(t, w) if w else "tie")
    assert j["kappa"] == pytest.approx(cohen_kappa_score(h, g, labels=["left", "right", "tie"]))
    conf = np.zeros((3, 3))
    for a, b in zip(h, g):
        conf[calibration.LABELS.index(a), calibration.LABELS.index(b)] += 1
    assert calibration.kappa_from_confusion(conf) == pytest.approx(j["kappa"])  # the bootstrap's formula
    lo, hi = j["accuracy_ci"]
    assert lo < j["accuracy"] < hi and 0 < hi - lo < 0.5
    klo, khi = j["kappa_ci"]
    assert klo < j["kappa"] < khi
    # a judge that always says the opposite of the humans is below chance
    _write_judge(judged_eval["path"], rows, lambda i: "b" if human[i] == "sft:good" else "a")
    (bad,) = calibration.judge_calibration(cid, ws, store, n_boot=200)["judges"]
    assert bad["accuracy"] == 0 and bad["kappa"] < 0
    # two judges in one file are kept apart
    _write_judge(judged_eval["path"], rows, lambda i: verdict[i])
    lines = read_jsonl(judged_eval["path"] / "judge.jsonl")
    write_jsonl(judged_eval["path"] / "judge.jsonl", lines + [l | {"judge": "other", "winner": "tie"} for l in lines])
    got = calibration.judge_calibration(cid, ws, store, n_boot=200)
    assert [x["judge"] for x in got["judges"]] == ["local:tiny", "other"]
    assert got["judges"][0]["accuracy"] == pytest.approx(25 / 30) and got["judges"][1]["accuracy"] == 0


def test_report_states_lineage_and_calibration(dpo, module_home, sft_run):
    """The eval report names where a preference-tuned system came from, and the judge's agreement with votes."""
    from evals import report
    ws, store = module_home
    systems = [f"sft:{sft_run}", f"sft:{dpo['run']}"]
    path = ws.evals_dir("ev-report")
    path.mkdir(parents=True)
    outs = [{"set": "domain", "row_id": f"r{i}", "system": s, "instruction": f"Q{i}?", "context": None,
             "reference": "R.", "output": f"{s} {i}", "latency_s": 0.1, "prompt_tokens": 1, "completion_tokens": 1,
             "passages": []} for i in range(6) for s in systems]
    write_jsonl(path / "outputs.jsonl", outs)
    (path / "scores.json").write_text(json.dumps({"sets": {}}))
    cfg = {"dataset": "qa", "dataset_version": "v", "split": "test", "systems": systems, "judge": "local",
           "base_model": "tiny", "decoding": {"max_new_tokens": 8}}
    eval_rows.insert_eval(store, "ev-report", "qa", "v", "test", systems, str(path), cfg, status="succeeded")
    write_jsonl(path / "judge.jsonl", [{"row_id": f"r{i}", "system_a": systems[0], "system_b": systems[1],
                                        "winner": "b", "raw": ["", ""]} for i in range(6)])
    cid = rating.create_campaign("ev-report", ws=ws, store=store, seed=1)
    _vote_all(ws, store, cid, "erin", lambda t: _side_of(t, systems[1]))
    _, md = report.write_report("ev-report", ws, store)
    text = md.read_text()
    assert f"sft:{dpo['run']}: base " in text and f"SFT run {sft_run}" in text and "preference dataset endings@" in text
    assert f"sft:{sft_run}:" not in text  # an SFT run has no preference lineage line
    assert "Judge calibration" in text and "| local:tiny |" in text and "| 6 | 1.00 [1.00, 1.00] |" in text
    assert "Judge calibration" in (path / "report.html").read_text()


def test_cli_build_show_and_lineage(module_home, dpo, pairs_version, capsys, monkeypatch):
    from sft_core import cli
    ws, _ = module_home
    monkeypatch.setenv("SFT_STUDIO_HOME", str(ws.root))
    f = ws.root / "pairs.jsonl"
    assert cli.main(["pref", "build", "--file", str(f), "--name", "endings", "--eval-fraction", "0.25",
                     "--seed", "3", "--against", "qa"]) == 0
    out = capsys.readouterr().out
    assert f"endings@{pairs_version.version} (identical to an existing version)" in out and "40 preference pairs" in out
    assert cli.main(["pref", "lineage", dpo["run"]]) == 0 and "→" in capsys.readouterr().out
    assert cli.main(["pref", "build", "--name", "x"]) == 1
    assert "exactly one source" in capsys.readouterr().err
