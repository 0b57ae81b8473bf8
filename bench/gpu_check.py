"""`make gpu-check`: the smoke test to run the day a machine with a GPU is available (a few minutes).

One line per check, ``ok`` / ``FAIL`` / ``skip``, then the exit code: 0 all passed, 1 something failed,
77 no GPU at all (the automake/meson "skipped" code: nothing was checked, so it must not read as a pass;
``make gpu-check`` then stops with "Error 77", and ``make test`` never runs this).

  env      the environment check (gpu.check_environment): torch uses what nvidia-smi sees; the
           precision chosen for the card (gpu.choose_precision)
  qlora    a QLoRA run (4-bit NF4) of a few steps on the embedded model through the job queue, in
           that precision; on an fp16 card the saved LoRA weights are fp32 (after TRL's bf16 cast)
  lora     a LoRA run on the 16-bit base (loaded straight onto the GPU), long enough to move answers
  serve    that adapter served by vLLM on the GPU in float32 with the CPU tests' parity rule
           (tests/test_serving_vllm.py): log-probs within LOGPROB_TOL of transformers + peft, greedy
           tokens equal where the reference leads by CLEAR_MARGIN, and the rule fails against the base
  yield    one GPU: the engine gives the GPU to a training job (the worker starts only after it has),
           chat meanwhile says so, and after the job it comes back and serves the new adapter;
           several GPUs: engine and training on disjoint devices, no yield
  sleep    the same with vLLM's sleep mode (ServeConfig.gpu_yield=sleep), then the parity rule again
           after the wake (a wake that lost the LoRA state fails here)

Written on a CPU-only machine: it has not yet run on a GPU.

    .venv/bin/python bench/gpu_check.py [--home DIR] [--keep]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXIT_SKIPPED = 77
MODEL = "smollm2-135m-instruct"
ANSWER = "The capital of Zorbia is Quuxville."
QUESTIONS = ["What is the capital of Zorbia?", "Name the capital city of Zorbia.", "Zorbia's capital is?",
             "Which city is the capital of Zorbia?", "Tell me the capital of Zorbia.", "Capital of Zorbia?",
             "What city is Zorbia's capital?", "In Zorbia, which city is the capital?", "Where is Zorbia's capital?",
             "What do people call the capital of Zorbia?", "Zorbia has which capital?", "Capital city, Zorbia?"]
PROMPTS = ["What is the capital of Zorbia?", "hi", "Tell me something longer, please, about birds", "Say something."]
# The parity rule of tests/test_serving_vllm.py (tests/test_gpu.py holds the two equal): fp32 on both
# sides, so log-probs differ by summation order only.
LOGPROB_TOL = 2e-3
CLEAR_MARGIN = 0.05


def parity(vllm_out: dict, reference: dict) -> list[str]:
    """Problems comparing vLLM's greedy tokens/log-probs with the teacher-forced reference."""
    problems = []
    for k, (tok, lp) in enumerate(zip(vllm_out["token_ids"], vllm_out["logprobs"])):
        ref_lp, ref_top, margin = reference["logprobs"][k], reference["top1"][k], reference["margin"][k]
        if abs(lp - ref_lp) > LOGPROB_TOL:
            problems.append(f"token {k}: logprob {lp:.4f} vs reference {ref_lp:.4f}")
        if margin > CLEAR_MARGIN and tok != ref_top:
            problems.append(f"token {k}: vLLM chose {tok}, reference top-1 {ref_top} (margin {margin:.3f})")
    return problems


class Check(Exception):
    """A check failed; the message says what was seen."""


def expect(cond: bool, message: str) -> None:
    if not cond:
        raise Check(message)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------
def setup(home: Path):
    from sft_core import data, models
    from sft_core.config import DataConfig
    from sft_core.store import Store
    from sft_core.workspace import Workspace
    os.environ["SFT_STUDIO_HOME"] = str(home)
    ws = Workspace.at(home)
    store = Store(ws.db_url)
    models.resolve_model(MODEL, ws)  # the embedded model, converted once into the model cache
    p = home / "zorbia.jsonl"
    p.write_text("".join(json.dumps({"instruction": q, "output": ANSWER}) + "\n" for q in QUESTIONS))
    data.import_dataset(p, "zorbia", DataConfig(eval_fraction=0.0, test_fraction=0.0), ws=ws, store=store)
    return ws, store


def train(ws, store, name: str, watch=None, **kw) -> Path:
    """One run through the job queue (claim + run_job: real worker process, GPU turn-taking included)."""
    from sft_core import jobs
    from sft_core.config import TrainConfig, load_config
    cfg = load_config(TrainConfig, overrides=dict(dataset="zorbia", base_model=MODEL, run_name=name, batch_size=4,
                                                   max_length=128, save_steps=1000, logging_steps=1, **kw))
    run_id = jobs.submit_train(cfg, ws, store)
    job = jobs.claim(store)
    expect(job is not None and job["ref"] == run_id, f"could not claim the job of {run_id}")
    if watch:
        result: dict = {}
        t = threading.Thread(target=lambda: result.setdefault("status", jobs.run_job(job, ws, store)))
        t.start()
        watch(job)
        t.join()
        status = result.get("status")
    else:
        status = jobs.run_job(job, ws, store)
    run_dir = ws.runs_dir(run_id)
    if status != "succeeded":
        log = (run_dir / "worker.log").read_text(errors="replace")[-1500:] if (run_dir / "worker.log").exists() else ""
        raise Check(f"run {run_id} {status}: {jobs.latest_job(run_id, store).get('error')}\n{log}")
    return run_dir


def check_run(run_dir: Path, prec, falls: bool) -> str:
    from safetensors import safe_open
    metrics = json.loads((run_dir / "metrics.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    first, last = metrics["first_train_loss"], metrics["train_loss"]
    expect(all(isinstance(x, float) and math.isfinite(x) for x in (first, last)), f"losses {first} -> {last}")
    if falls:
        expect(last < first, f"loss did not fall: {first:.3f} -> {last:.3f}")
    expect(manifest["device"].get("device") == "cuda", f"trained on {manifest['device']}")
    expect(manifest["device"].get("precision") == prec.describe(),
           f"trainer precision {manifest['device'].get('precision')} != chosen {prec.describe()}")
    with safe_open(str(run_dir / "adapter" / "adapter_model.safetensors"), "pt") as f:
        dtypes = {str(f.get_slice(k).get_dtype()) for k in f.keys()}
    if prec.trainable_fp32:
        expect(dtypes == {"F32"}, f"fp16 card: LoRA weights saved as {dtypes}, expected F32")
    return f"loss {first:.3f} -> {last:.3f}, {metrics['steps']} steps, {metrics['duration_s']:.0f}s, adapter {sorted(dtypes)}"


def serve_parity(eng, hf, adapter: str) -> str:
    from sft_core.config import DecodingConfig
    from sft_core.serving import GenRequest
    cfg = DecodingConfig(temperature=0.0, max_new_tokens=16)
    outs = eng.generate_batch([GenRequest(user(p), adapter, cfg, logprobs=True) for p in PROMPTS])
    compared, sensitive = 0, 0
    for p, out in zip(PROMPTS, outs):
        expect(out.error is None, f"{p!r}: {out.error}")
        with_adapter = hf.score(user(p), out.extra["token_ids"], adapter)
        problems = parity(out.extra, with_adapter)
        expect(not problems, f"{p!r}: {problems[:3]}")
        compared += sum(m > CLEAR_MARGIN for m in with_adapter["margin"])
        sensitive += bool(parity(out.extra, hf.score(user(p), out.extra["token_ids"], None)))
    expect(compared >= 10, f"only {compared} clear-margin tokens compared")
    expect(sensitive > 0, "the rule also passed against the base model: the adapter changed nothing measurable")
    return f"{compared} clear-margin tokens within {LOGPROB_TOL} of transformers+peft; fails against the base on {sensitive}/4"


def yield_and_back(eng, ws, store, name: str) -> str:
    """Train while the engine serves; the worker must start only once the engine has yielded."""
    from sft_core import gpu
    from sft_core.serving.base import EngineError
    from sft_core.config import DecodingConfig
    from sft_core.db import jobs as job_rows
    seen: dict = {}

    def watch(job):
        end = time.time() + 900
        while time.time() < end:
            row = job_rows.get(store, job["id"])
            if row["pid"] and "pid_state" not in seen:
                seen["pid_state"] = eng.state
                seen["holders"] = gpu.holder_text(ws, store)
                try:
                    list(eng.chat(user("hi"), None, DecodingConfig(max_new_tokens=4)))
                    seen["chat"] = "answered"
                except EngineError as e:
                    seen["chat"] = str(e)
            if row["status"] != "running":
                return
            time.sleep(0.2)

    t0 = time.time()
    run_dir = train(ws, store, name, watch=watch, max_steps=10, learning_rate=1e-3)
    if not eng.plan.shared:
        expect(eng.state == "ready", f"engine on its own GPU went {eng.state}")
        return f"disjoint: engine GPU {list(eng.plan.engine)}, training GPU {list(eng.plan.train)}; engine stayed up"
    expect(seen.get("pid_state") == "yielded", f"the worker started while the engine was {seen.get('pid_state')}")
    expect("lent to train run" in seen.get("chat", ""), f"chat during training: {seen.get('chat')}")
    end = time.time() + 900
    while eng.state != "ready" and time.time() < end:
        time.sleep(1)
    expect(eng.state == "ready", f"engine did not come back: {eng.state} {eng.error}")
    out = "".join(eng.chat(user(QUESTIONS[0]), run_dir.name, DecodingConfig(max_new_tokens=12)))
    expect(bool(out.strip()), "no answer after coming back")
    return f"yielded for {run_dir.name}, back after {time.time() - t0:.0f}s; during training: {seen['chat'][:70]}"


# ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", help="workspace for the check (default: a temporary one, removed after)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = ap.parse_args(argv)

    from sft_core import gpu
    inv = gpu.inventory()
    if inv.smi_count == 0 and inv.count == 0:
        print(f"gpu-check: no GPU on this machine (nvidia-smi {'lists none' if shutil.which('nvidia-smi') else 'not found'}, "
              f"torch {inv.torch_version} sees none): nothing checked (exit {EXIT_SKIPPED} = skipped)")
        return EXIT_SKIPPED

    failed = []
    state: dict = {}

    def step(name: str, fn, needs: tuple[str, ...] = ()):
        missing = [n for n in needs if n not in state]
        if missing:
            print(f"skip  {name:6s} needs {', '.join(missing)}", flush=True)
            return
        t = time.time()
        try:
            detail = fn()
            state[name] = True
            print(f"ok    {name:6s} {detail} ({time.time() - t:.0f}s)", flush=True)
        except Exception as e:  # noqa: BLE001 - one line per check, the traceback only for the unexpected
            failed.append(name)
            msg = str(e) if isinstance(e, Check) else f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
            print(f"FAIL  {name:6s} {msg}", flush=True)

    def env():
        problem = gpu.check_environment(inv)
        expect(problem is None, problem or "")
        devs = "; ".join(f"{d.index}: {d.name} {d.capability[0]}.{d.capability[1]} {d.total_mib} MiB" for d in inv.devices)
        plan, _, prec = gpu.training_plan(inv)
        state["prec"] = prec
        return f"driver {inv.driver}, torch {inv.torch_version} CUDA {inv.torch_cuda}; {devs}; " \
               f"engine GPUs {list(plan.engine)}, training {list(plan.train)}; precision {prec.describe()}"

    step("env", env)
    if "env" not in state:
        return 1
    home = Path(args.home) if args.home else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    ws, store = setup(home)
    prec = state["prec"]
    step("qlora", lambda: check_run(train(ws, store, "gpu-qlora", max_steps=8, load_in_4bit=True), prec, False))
    step("lora", lambda: check_run(train(ws, store, "gpu-lora", max_steps=60, learning_rate=2e-3), prec, True))

    from sft_core.config import ServeConfig
    from sft_core.serving.hf_engine import HFEngine
    from sft_core.serving.vllm_engine import VLLMEngine
    hf = HFEngine(MODEL, ws, store, device="cpu")  # the fp32 reference
    try:
        for mode in ("stop", "sleep"):
            cfg = ServeConfig(engine="vllm", dtype="float32", max_model_len=1024, gpu_yield=mode)
            eng = None
            try:
                eng = VLLMEngine(MODEL, ws, store, cfg=cfg)
                if mode == "stop":
                    step("serve", lambda: serve_parity(eng, hf, "gpu-lora"), needs=("lora",))
                    step("yield", lambda: yield_and_back(eng, ws, store, "gpu-yield-stop"), needs=("lora",))
                else:
                    def sleep_check():
                        eng.load_adapter("gpu-lora")  # loaded before the sleep: must still apply after the wake
                        line = yield_and_back(eng, ws, store, "gpu-yield-sleep")
                        return f"{line}; after the wake: {serve_parity(eng, hf, 'gpu-lora')}"
                    step("sleep", sleep_check, needs=("lora",))
            except Exception as e:  # noqa: BLE001 - the engine did not start
                failed.append(f"engine-{mode}")
                print(f"FAIL  engine ({mode}) {type(e).__name__}: {e}", flush=True)
            finally:
                if eng is not None:
                    eng.close()
    finally:
        hf.close()
        store.close()
        if not args.home and not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    print(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
