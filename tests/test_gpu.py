"""The GPU as a scheduled resource (sft_core/gpu.py and where jobs, training and the engine use it).

No GPU exists on the machines that run these tests. The GPU is simulated at the boundary only, and each
test says where: an ``Inventory`` built by hand (device count, compute capability, memory), the one
function that asks the hardware (``gpu.inventory``) monkeypatched to return it, torch.cuda's
device queries monkeypatched, or a fake ``nvidia-smi`` on PATH. Everything behind the boundary is the
real code: job queue and SQLite, training worker, TRL's trainer, a real vLLM CPU server.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sqlalchemy import insert

from sft_core import StudioError, gpu, jobs, train
from sft_core.config import ConfigError, DecodingConfig, ServeConfig, TrainConfig, load_config
from sft_core.db import jobs as jobs_db, runs as runs_db, write
from sft_core.db.schema import jobs as jobs_table
from tests.test_jobs import _wait
from tests.test_train import make_dataset, tiny_cfg

REPO = Path(__file__).resolve().parents[1]


def card(name: str, cap: tuple[int, int], n: int = 1, mib: int = 15360) -> gpu.Inventory:
    """A simulated machine: ``n`` GPUs of one kind that torch can use (the boundary: no GPU here)."""
    return gpu.Inventory(tuple(gpu.Device(i, name, cap, mib, mib, str(i)) for i in range(n)), n, (name,) * n,
                         "580.65.06", "2.14.0", "13.0")


T4, A100, H100 = ("Tesla T4", (7, 5)), ("NVIDIA A100-SXM4-80GB", (8, 0)), ("NVIDIA H100 80GB HBM3", (9, 0))


def fake_torch_cuda(monkeypatch, caps: list[tuple[int, int]]) -> None:
    """torch.cuda as a process with these GPUs would see it (simulated: torch here is a CPU build)."""
    props = [SimpleNamespace(name=f"sim{i}", major=c[0], minor=c[1], total_memory=16 << 30) for i, c in enumerate(caps)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(caps))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(caps))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props[i])


# ------------------------------------------------------------------------------------------------
# Precision per card
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cap,mixed,dtype,fp32_lora", [
    ((7, 5), "fp16", "float16", True),    # T4: no native bf16 -> fp16 with loss scaling, LoRA weights fp32
    ((7, 0), "fp16", "float16", True),    # V100
    ((8, 0), "bf16", "bfloat16", False),  # A100
    ((8, 6), "bf16", "bfloat16", False),  # A10G / RTX 30xx
    ((8, 9), "bf16", "bfloat16", False),  # L4
    ((9, 0), "bf16", "bfloat16", False),  # H100
])
def test_precision_table_per_compute_capability(cap, mixed, dtype, fp32_lora):
    p = gpu.choose_precision([cap], flash_attn=True)
    assert (p.mixed, p.dtype, p.trainable_fp32) == (mixed, dtype, fp32_lora)
    assert p.trainer_flags() == {"bf16": mixed == "bf16", "fp16": mixed == "fp16"}
    # FlashAttention-2 only from compute 8.0, and only with the package installed
    assert p.attn == ("flash_attention_2" if cap >= (8, 0) else "sdpa")
    assert gpu.choose_precision([cap], flash_attn=False).attn == "sdpa"


def test_precision_of_mixed_cards_and_cpu():
    assert gpu.choose_precision([(9, 0), (7, 5)]).mixed == "fp16"  # one run's ranks agree on the lowest card
    assert gpu.choose_precision([]) == gpu.CPU_PRECISION and gpu.CPU_PRECISION.mixed == "no"


def test_the_rule_is_torch_native_bf16_not_the_default_check(monkeypatch):
    """The table's bf16 is exactly torch.cuda.is_bf16_supported(including_emulation=False); the default
    call counts emulation and says yes on a T4, the bug being fixed. (Device properties simulated; the
    emulation probe, a bf16 tensor on the device, is simulated as succeeding, as it does on a T4.)"""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    for cap in [(7, 5), (8, 0), (9, 0)]:
        fake_torch_cuda(monkeypatch, [cap])
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        assert native == (gpu.torch_precision().mixed == "bf16") == (cap >= (8, 0))
        assert torch.cuda.is_bf16_supported() is True  # emulation counted: would pick bf16 on a T4


def test_torch_precision_looks_at_every_visible_device(monkeypatch):
    fake_torch_cuda(monkeypatch, [(8, 0), (7, 5)])  # current device is the A100; the second rank is a T4
    assert gpu.torch_precision().mixed == "fp16"
    assert train.device_info()["precision"] == gpu.torch_precision().describe()


@pytest.mark.parametrize("machine", [T4, A100, H100])
def test_launcher_precision_equals_trainer_precision(machine, monkeypatch, tmp_path):
    """Three GPUs: the engine takes one, training two (so `accelerate launch`). The launcher's
    --mixed_precision and the flags each rank's trainer sets come from the same devices."""
    monkeypatch.delenv("SFT_STUDIO_ENGINE_GPUS", raising=False)
    inv = card(*machine, n=3)
    argv = jobs.train_command(tmp_path, "j1", "sqlite:///x.db", resume=False, inv=inv)
    assert argv[1:3] == ["-m", gpu.LAUNCHER_MODULE] and argv[argv.index("--num_processes") + 1] == "2"
    launcher = argv[argv.index("--mixed_precision") + 1]

    fake_torch_cuda(monkeypatch, [machine[1]] * 2)  # what each rank sees: the two training GPUs
    prec = gpu.torch_precision()
    monkeypatch.undo()  # TrainingArguments must not believe in CUDA on this CPU build
    import transformers.training_args as ta
    monkeypatch.setattr(ta, "is_torch_bf16_gpu_available", lambda: True)  # the bf16 capability check (GPU boundary)
    args = train.build_sft_config(load_config(TrainConfig, overrides={"dataset": "d"}), tmp_path, cuda=True,
                                  has_eval=False, prec=prec)
    trainer = "bf16" if args.bf16 else "fp16" if args.fp16 else "no"
    assert launcher == trainer == ("bf16" if machine[1] >= (8, 0) else "fp16")
    assert args.ddp_find_unused_parameters is False  # LoRA: no unused-parameter search on every step


# ------------------------------------------------------------------------------------------------
# Which process gets which GPU
# ------------------------------------------------------------------------------------------------
def holder(ref="r1", kind="train"):
    return {"id": f"job-{ref}", "kind": kind, "ref": ref, "started_at": time.time()}


def test_one_gpu_is_shared_in_turn_and_the_engine_yields_only_then():
    plan = gpu.plan_devices(1)
    assert plan == gpu.DevicePlan((0,), (0,)) and plan.shared
    assert gpu.engine_should_yield(plan, [holder()]) is True
    assert gpu.engine_should_yield(plan, []) is False  # no training: the engine keeps the GPU
    assert gpu.plan_devices(0) == gpu.DevicePlan() and not gpu.plan_devices(0).shared  # CPU: nobody yields


def test_several_gpus_give_engine_and_training_disjoint_devices(monkeypatch):
    two = gpu.plan_devices(2)
    assert two == gpu.DevicePlan((1,), (0,)) and not two.shared
    assert gpu.engine_should_yield(two, [holder()]) is False  # its own GPU: the engine never yields
    assert gpu.plan_devices(4) == gpu.DevicePlan((3,), (0, 1, 2))
    assert gpu.plan_devices(4, "0,1") == gpu.DevicePlan((0, 1), (2, 3))  # configurable
    assert gpu.plan_devices(2, "0,1").shared  # the engine asked for every GPU: training shares in turn
    with pytest.raises(StudioError, match="GPU 2 does not exist") as e:
        gpu.plan_devices(2, "2")
    assert e.value.where == "gpus"
    with pytest.raises(ConfigError):
        load_config(ServeConfig, overrides={"gpus": "first"})
    # the setting comes from the environment in every process (app, job runner)
    monkeypatch.setenv("SFT_STUDIO_ENGINE_GPUS", "0")
    assert ServeConfig().gpus == "0" and gpu.engine_gpus_setting() == "0"
    plan, devices, _ = gpu.training_plan(card(*A100, n=2))
    assert plan.engine == (0,) and [d.index for d in devices] == [1]


def test_each_process_sees_only_its_devices_through_cuda_visible_devices(monkeypatch):
    # this process was itself given GPUs 4 and 6 of the machine: children are named by those ids
    inv = gpu.Inventory(tuple(gpu.Device(i, "A100", (8, 0), 81920, 81920, vid) for i, vid in enumerate(["4", "6"])),
                        8, ("A100",) * 8, "580.65.06", "2.14.0", "13.0")
    monkeypatch.delenv("SFT_STUDIO_ENGINE_GPUS", raising=False)
    plan = gpu.plan_devices(inv.count)
    assert gpu.device_env(plan.engine, inv) == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "6"}
    assert gpu.device_env(plan.train, inv)["CUDA_VISIBLE_DEVICES"] == "4"
    assert gpu.device_env((), gpu.Inventory()) == {}  # CPU: nothing to set
    # the engine's server gets its devices; the training job's worker the others
    from sft_core.serving.vllm_engine import server_env
    env = server_env(ServeConfig(), True, "k", gpu.device_env(plan.engine, inv), dev_routes=True)
    assert env["CUDA_VISIBLE_DEVICES"] == "6" and env["VLLM_SERVER_DEV_MODE"] == "1"
    assert "VLLM_SERVER_DEV_MODE" not in server_env(ServeConfig(), True, "k")


def test_multi_gpu_device_map_loads_each_rank_onto_its_own_gpu(monkeypatch):
    prec = gpu.choose_precision([(7, 5)])
    lora = load_config(TrainConfig, overrides={"dataset": "d"})
    qlora = load_config(TrainConfig, overrides={"dataset": "d", "load_in_4bit": True})
    # rank 1 of a DDP run (the launcher sets LOCAL_RANK): its whole model goes to GPU 1, 4-bit or not
    monkeypatch.setenv("LOCAL_RANK", "1")
    for cfg in (lora, qlora):
        kw = train.model_load_kwargs(cfg, cuda=True, prec=prec)
        assert kw["device_map"] == {"": 1} and kw["dtype"] == torch.float16
    assert train.model_load_kwargs(qlora, True, prec)["quantization_config"].bnb_4bit_compute_dtype == torch.float16
    assert train.model_load_kwargs(lora, True, prec, local_rank=3)["device_map"] == {"": 3}
    monkeypatch.delenv("LOCAL_RANK")
    assert train.model_load_kwargs(lora, True, prec)["device_map"] == {"": 0}  # one GPU: rank 0
    cpu = train.model_load_kwargs(lora, False, gpu.CPU_PRECISION)
    assert "device_map" not in cpu and cpu["dtype"] == torch.float32
    with pytest.raises(ConfigError) as e:
        train.model_load_kwargs(qlora, False, gpu.CPU_PRECISION)
    assert e.value.where == "load_in_4bit"
    # packing: FlashAttention-2 only where the card runs it
    packed = load_config(TrainConfig, overrides={"dataset": "d", "packing": True})
    assert train.model_load_kwargs(packed, True, gpu.choose_precision([(7, 5)], flash_attn=True))["attn_implementation"] == "sdpa"
    assert train.model_load_kwargs(packed, True, gpu.choose_precision([(8, 0)], flash_attn=True))[
        "attn_implementation"] == "flash_attention_2"


def test_lora_weights_stay_fp32_after_trls_qlora_cast(tiny_model_dir, tmp_path):
    """TRL 1.16 casts trainable weights to bf16 for any model loaded in 4 bit; on an fp16 card the
    studio casts them back to fp32. The model is marked as 4-bit-loaded (bitsandbytes' 4-bit load
    needs CUDA: the boundary); the trainer, peft and TRL's cast are real."""
    from sft_core.models import load_causal_lm, load_tokenizer
    records = [{"instruction": f"Question {i}?", "response": "Answer."} for i in range(4)]
    cfg = load_config(TrainConfig, overrides={"dataset": "d", "max_steps": 1, "lora_r": 4, "lora_alpha": 8})
    args = train.build_sft_config(cfg, tmp_path, cuda=False, has_eval=False)

    def trainable_dtypes(prec):
        model = load_causal_lm(tiny_model_dir, "cpu")
        model.is_loaded_in_4bit = True
        t = train.make_trainer(model, args, prec, train_dataset=train.to_prompt_completion(records),
                               processing_class=load_tokenizer(tiny_model_dir), peft_config=train.lora_config(cfg))
        return {p.dtype for p in t.model.parameters() if p.requires_grad}

    assert trainable_dtypes(gpu.choose_precision([(9, 0)])) == {torch.bfloat16}  # TRL's cast, kept on bf16 cards
    assert trainable_dtypes(gpu.choose_precision([(7, 5)])) == {torch.float32}  # T4: fp32 again


# ------------------------------------------------------------------------------------------------
# The environment check
# ------------------------------------------------------------------------------------------------
def fake_nvidia_smi(tmp_path, monkeypatch, rows: str) -> None:
    """An nvidia-smi on PATH that lists these GPUs (the hardware tool: simulated)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    exe.write_text(f"#!/bin/sh\ncat <<'EOF'\n{rows}\nEOF\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def torch_without_gpu(monkeypatch, cuda: str | None, reason: str | None = None) -> None:
    """torch built for ``cuda`` that cannot use the GPU (simulated: its CUDA queries say no)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", cuda)

    def init():
        raise RuntimeError(reason or "no CUDA GPUs are available")
    monkeypatch.setattr(torch.cuda, "init", init)


T4_ROW = "0, GPU-5d1c0a3e-0000-0000-0000-000000000000, Tesla T4, 550.54.15, 15360, 0, 7.5"


def test_env_check_names_the_driver_and_the_cuda_torch_needs(tmp_path, monkeypatch):
    fake_nvidia_smi(tmp_path, monkeypatch, T4_ROW)
    torch_without_gpu(monkeypatch, "13.0", "The NVIDIA driver on your system is too old (found version 12040).")
    inv = gpu.inventory()
    assert (inv.smi_count, inv.count, inv.driver, inv.smi_names) == (1, 0, "550.54.15", ("Tesla T4",))
    msg = gpu.check_environment(inv)
    assert msg is not None
    for needle in ("nvidia-smi sees 1 GPU (Tesla T4, driver 550.54.15)", "CUDA 13.0", "driver >= 580",
                   "this host has 550.54.15", "will not fall back to the CPU"):
        assert needle in msg, msg
    with pytest.raises(StudioError) as e:
        gpu.require_usable_gpu()
    assert e.value.where == "gpu" and e.value.message == msg
    assert gpu.startup_check() == f"GPU problem: {msg}"
    assert gpu.holder_text(None, None, inv).startswith("GPU unusable: nvidia-smi sees 1 GPU")


def test_env_check_other_causes_and_no_gpu(tmp_path, monkeypatch):
    # a new enough driver, and torch still cannot: its own reason, and the container hint
    assert "--gpus all" in gpu.check_environment(gpu.Inventory((), 1, ("Tesla T4",), "580.65.06", "2.14.0", "13.0",
                                                               "CUDA error: no CUDA-capable device is detected"))
    # a CPU-only torch on a GPU host
    cpu_build = gpu.check_environment(gpu.Inventory((), 2, ("L4", "L4"), "580.65.06", "2.13.0+cpu", None))
    assert "2 GPUs (L4, driver 580.65.06)" in cpu_build and "CPU-only build" in cpu_build
    # a 12.x wheel on a 535 driver is fine by the table (minor-version compatibility from 525)
    assert gpu.min_driver("12.8") == (525, 60) and gpu.min_driver("13.0") == (580, 0) and gpu.min_driver(None) is None
    # usable, or no GPU at all: nothing to say
    assert gpu.check_environment(card(*T4)) is None and gpu.check_environment(gpu.Inventory()) is None
    # an nvidia-smi that cannot talk to a driver: that is the message
    bin_dir = tmp_path / "bin2"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not "
                                        "communicate with the NVIDIA driver.' >&2\nexit 9\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert gpu.nvidia_smi().startswith("NVIDIA-SMI has failed")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    broken = gpu.check_environment(gpu.inventory())
    assert broken.startswith("nvidia-smi is installed but fails (NVIDIA-SMI has failed") and "driver" in broken


def test_old_nvidia_smi_without_compute_cap(tmp_path, monkeypatch):
    """A driver before R510 refuses the compute_cap field: the query is repeated without it, so an old
    driver is still seen (and named by the check). (Fake nvidia-smi; torch simulated as unable.)"""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(textwrap.dedent("""\
        #!/bin/sh
        case "$1" in *compute_cap*) echo 'Field "compute_cap" is not a valid field to query.'; exit 2;; esac
        echo "0, GPU-1, Tesla T4, 470.182.03, 15360, 0"
        """))
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    torch_without_gpu(monkeypatch, "13.0")
    inv = gpu.inventory()
    assert (inv.smi_count, inv.driver) == (1, "470.182.03")
    assert "needs an NVIDIA driver >= 580, and this host has 470.182.03" in gpu.check_environment(inv)


def test_parse_smi_rows_and_visible_devices(tmp_path, monkeypatch):
    rows = gpu.parse_smi(T4_ROW + "\n1, GPU-x, NVIDIA A100-SXM4-80GB, 580.65.06, 81920, 1024, 8.0\n\ngarbage\n")
    assert [(r["index"], r["capability"], r["total_mib"] - r["used_mib"]) for r in rows] == [(0, (7, 5), 15360),
                                                                                             (1, (8, 0), 80896)]
    # torch sees one GPU, the one CUDA_VISIBLE_DEVICES names: the inventory takes nvidia-smi's row for it
    fake_nvidia_smi(tmp_path, monkeypatch, T4_ROW + "\n1, GPU-x, NVIDIA A100-SXM4-80GB, 580.65.06, 81920, 1024, 8.0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    inv = gpu.inventory()
    assert [(d.index, d.name, d.capability, d.visible_id) for d in inv.devices] == [(0, "NVIDIA A100-SXM4-80GB", (8, 0), "1")]


def test_training_refuses_the_cpu_when_the_gpu_is_unusable(ws, store, tmp_path, tiny_model_dir, monkeypatch):
    """Before a job: the runner fails it with the reason and starts no worker; the worker itself (run
    directly) refuses too, instead of training on the CPU. (nvidia-smi and torch.cuda simulated.)"""
    make_dataset(ws, store, tmp_path)
    run_id = jobs.submit_train(tiny_cfg(tiny_model_dir, run_name="nogpu"), ws, store)
    fake_nvidia_smi(tmp_path, monkeypatch, T4_ROW)
    torch_without_gpu(monkeypatch, "13.0")
    job = jobs.claim(store)
    assert jobs.run_job(job, ws, store) == "failed"
    row = jobs_db.get(store, job["id"])
    assert row["pid"] is None and "driver >= 580" in row["error"], row
    assert runs_db.get(store, run_id)["status"] == "failed"

    run_dir = ws.runs_dir(run_id)
    assert train.main(["--run-dir", str(run_dir)]) == 1
    assert "driver >= 580" in (run_dir / "error.txt").read_text()
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "adapter").exists()


# ------------------------------------------------------------------------------------------------
# Taking turns between processes (state files, real SQLite)
# ------------------------------------------------------------------------------------------------
def test_runner_waits_for_the_engine_to_yield(ws, store):
    gpu.write_engine_state(ws, "serving", [0])
    assert [s["state"] for s in gpu.engines_in_the_way(gpu.engine_states(ws), [0])] == ["serving"]
    assert gpu.engines_in_the_way(gpu.engine_states(ws), [1]) == []  # another GPU: not in the way
    beats = []
    with pytest.raises(StudioError, match="did not give the GPU back within 1s") as e:
        gpu.wait_for_engines(ws, [0], timeout_s=1, poll_s=0.1, beat=lambda: beats.append(1))
    assert e.value.where == "gpu" and len(beats) >= 5  # the waiting job kept heartbeating
    assert gpu.wait_for_engines(ws, [0], timeout_s=5, poll_s=0.1, cancelled=lambda: True) is False
    threading.Timer(0.5, lambda: gpu.write_engine_state(ws, "yielded", [0], "job-1")).start()
    t = time.time()
    assert gpu.wait_for_engines(ws, [0], timeout_s=10, poll_s=0.1) is True
    assert 0.4 < time.time() - t < 5
    # a dead engine's file is ignored; clearing removes ours
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (ws.root / "run" / f"gpu-engine-{dead.pid}.json").write_text(json.dumps({"pid": dead.pid, "state": "serving",
                                                                             "devices": [0]}))
    assert [s["pid"] for s in gpu.engine_states(ws)] == [os.getpid()]
    gpu.clear_engine_state(ws)
    assert gpu.engine_states(ws) == []


def test_gpu_holders_are_running_training_jobs_only(ws, store):
    now = time.time()
    for jid, kind, status in [("a", "train", "running"), ("b", "eval", "running"), ("c", "train", "queued"),
                              ("d", "kb_build", "running")]:
        write(store, insert(jobs_table).values(id=jid, kind=kind, status=status, ref=f"r-{jid}", created_at=now,
                                               started_at=now))
    assert [h["id"] for h in gpu.gpu_holders(store)] == ["a"]  # an eval uses the engine rather than displacing it
    assert jobs.needs_gpu_alone({"kind": "train"}) and not jobs.needs_gpu_alone({"kind": "eval"})


def test_who_holds_the_gpu_one_line_per_device():
    t4 = card(*T4)
    text = gpu.describe_holders(t4, gpu.plan_devices(1), [{"state": "yielded", "devices": [0]}], [holder("run-7")])
    assert text == "GPU 0 (Tesla T4, 15 GiB): inference engine asleep, train run run-7"
    assert gpu.describe_holders(t4, gpu.plan_devices(1), [{"state": "serving", "devices": [0]}], []) \
        == "GPU 0 (Tesla T4, 15 GiB): inference engine"
    two = gpu.describe_holders(card(*A100, n=2, mib=81920), gpu.plan_devices(2),
                               [{"state": "serving", "devices": [1]}], [holder("run-8")])
    assert two.splitlines() == ["GPU 0 (NVIDIA A100-SXM4-80GB, 80 GiB): train run run-8",
                                "GPU 1 (NVIDIA A100-SXM4-80GB, 80 GiB): inference engine"]
    assert gpu.describe_holders(gpu.Inventory(), gpu.DevicePlan(), [], []).startswith("No GPU")


# ------------------------------------------------------------------------------------------------
# Cancelling a multi-GPU run: the flag and the exit record, no signal to the launcher
# ------------------------------------------------------------------------------------------------
LAUNCHER = textwrap.dedent("""
    import json, signal, sys, time
    from sft_core.db import jobs
    from sft_core.store import Store
    url, job_id, record, marker = sys.argv[2:6]
    signal.signal(signal.SIGTERM, lambda *a: open(marker, "w").write("signalled"))
    store = Store(url)
    for _ in range(600):
        if jobs.cancel_requested(store, job_id):
            break
        time.sleep(0.1)
    # rank 0 records a cancel (3) after its checkpoint; the launcher itself exits 1, as accelerate does
    json.dump({"job_id": job_id, "code": 3, "error": None}, open(record, "w"))
    sys.exit(1)
""")


def test_cancel_of_a_multi_gpu_run_goes_through_the_flag_and_exit_record(ws, store, tmp_path):
    """A stand-in launcher process (its command line names accelerate's launcher, as a real one does)
    that stops on the cancel flag the way the ranks do; the queue code is real."""
    record, marker = tmp_path / "exit.json", tmp_path / "signalled"
    build = lambda job, ws_, st: [sys.executable, "-c", LAUNCHER, gpu.LAUNCHER_MODULE, st.url, job["id"],
                                  str(record), str(marker)]
    jobs.register_job_kind("fake-launch", build, outcome=lambda job, ws_, st: jobs._exit_record(record, job),
                           accelerator=False)
    try:
        jobs.submit("fake-launch", "multi", {}, ws=ws, store=store)
        job = jobs.claim(store)
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("status", jobs.run_job(job, ws, store)))
        t.start()
        _wait(lambda: (jobs_db.get(store, job["id"]) or {}).get("pid"), 30, "pid")
        assert jobs.cancel("multi", ws, store) == "cancelling"
        t.join(60)
        assert out["status"] == "cancelled"  # from rank 0's record, though the launcher exited 1
        assert not marker.exists(), "the launcher was signalled"
    finally:
        jobs.JOB_KINDS.pop("fake-launch", None)


# ------------------------------------------------------------------------------------------------
# Serving options, merge placement, the smoke test
# ------------------------------------------------------------------------------------------------
def test_serving_quantization_option(ws, store, tiny_model_dir):
    from sft_core.serving.base import EngineError
    from sft_core.serving.vllm_engine import VLLMEngine, server_command
    cfg = load_config(ServeConfig, overrides={"quantization": "fp8", "max_lora_rank": 16})
    cmd = server_command(Path("/m"), "m", 8000, cfg, cuda=True)
    assert cmd[cmd.index("--quantization") + 1] == "fp8" and "--enable-lora" in cmd
    assert "--quantization" not in server_command(Path("/m"), "m", 8000, cfg, cuda=False)
    assert "--quantization" not in server_command(Path("/m"), "m", 8000, ServeConfig(max_lora_rank=16), cuda=True)
    with pytest.raises(ConfigError) as e:
        load_config(ServeConfig, overrides={"quantization": "bitsandbytes"})  # not in this vLLM any more
    assert e.value.where == "quantization"
    with pytest.raises(EngineError, match="needs a CUDA GPU of compute capability 7.5") as e:
        VLLMEngine(str(tiny_model_dir), ws, store, cfg=cfg, start=False)  # this machine: no GPU
    assert e.value.where == "quantization"
    assert gpu.fp8_serving_ok((7, 5)) and not gpu.fp8_serving_ok((7, 0))


def test_merge_placement_base_dtype_on_the_gpu_when_it_fits():
    seven_b = 15 * 2**30  # a 7B bf16 base
    assert gpu.merge_placement(seven_b, "bfloat16", card(*A100, mib=81920)) == ("cuda:0", "bfloat16")
    assert gpu.merge_placement(seven_b, "bfloat16", card(*T4)) == ("cpu", "bfloat16")  # does not fit: CPU, still bf16
    assert gpu.merge_placement(2**20, None, gpu.Inventory()) == ("cpu", "float32")


def test_merge_load_kwargs_read_the_base(tiny_model_dir, tmp_path):
    import transformers
    assert gpu.merge_load_kwargs(tiny_model_dir, gpu.Inventory()) == {"dtype": "float32", "device_map": "cpu"}
    base = tmp_path / "bf16-base"  # a bf16 checkpoint of 1 MiB, on a simulated A100
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"dtype": "bfloat16"}))
    (base / "model.safetensors").write_bytes(b"\0" * 2**20)
    assert gpu.merge_load_kwargs(base, card(*A100)) == {"dtype": "bfloat16", "device_map": "cuda:0"}
    # the tiny model loads with them (on the CPU here) in its own dtype
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, **gpu.merge_load_kwargs(tiny_model_dir))
    assert next(model.parameters()).dtype == torch.float32


def test_gpu_check_without_a_gpu_says_so_and_is_not_part_of_make_test():
    res = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PATH": "/usr/bin:/bin"})  # no nvidia-smi here
    assert res.returncode == 77, res.stdout + res.stderr
    assert res.stdout.startswith("gpu-check: no GPU on this machine") and "nothing checked" in res.stdout
    dry = subprocess.run(["make", "-n", "-C", str(REPO), "gpu-check"], capture_output=True, text=True, timeout=60)
    assert "bench/gpu_check.py" in dry.stdout
    test = subprocess.run(["make", "-n", "-C", str(REPO), "test"], capture_output=True, text=True, timeout=60)
    assert test.returncode == 0 and "gpu_check" not in test.stdout
    assert "gpu_check" not in (REPO / "pyproject.toml").read_text()  # not collected by pytest either


def test_gpu_check_uses_the_cpu_tests_parity_rule():
    import importlib.util as iu
    spec = iu.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    mod = iu.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from tests import test_serving_vllm as cpu
    assert (mod.LOGPROB_TOL, mod.CLEAR_MARGIN) == (cpu.LOGPROB_TOL, cpu.CLEAR_MARGIN)
    out = {"token_ids": [5, 7, 9], "logprobs": [-0.1, -0.5, -2.0]}
    for ref in ({"logprobs": [-0.1, -0.5, -2.0], "top1": [5, 7, 9], "margin": [1, 1, 1]},   # equal
                {"logprobs": [-0.1, -0.51, -2.0], "top1": [5, 7, 9], "margin": [1, 1, 1]},  # one log-prob off
                {"logprobs": [-0.1, -0.5, -2.0], "top1": [5, 8, 9], "margin": [1, 1, 1]},   # another top-1, clear
                {"logprobs": [-0.1, -0.5, -2.0], "top1": [5, 8, 9], "margin": [1, 0.01, 1]}):  # a near tie
        assert mod.parity(out, ref) == cpu.parity(out, ref)
    assert len(mod.parity(out, {"logprobs": [-0.1, -0.51, -2.0], "top1": [5, 7, 9], "margin": [1, 1, 1]})) == 1


# ------------------------------------------------------------------------------------------------
# The engine yields the GPU to a training job and comes back (real vLLM CPU server, real worker)
# ------------------------------------------------------------------------------------------------
@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_engine_yields_the_gpu_to_training_and_comes_back(ws, store, tmp_path, tiny_model_dir, monkeypatch):
    """One simulated T4, returned by the one function that asks the hardware (gpu.inventory, used by the
    engine and the job runner alike). The engine is a real vLLM CPU server (yield = stop and restart),
    the training a real worker through the queue, the turn-taking through real files and SQLite."""
    from sft_core.serving import GenRequest
    from sft_core.serving.base import EngineError
    from sft_core.serving.vllm_engine import VLLMEngine
    t4 = card(*T4)
    monkeypatch.setattr(gpu, "inventory", lambda: t4)
    monkeypatch.delenv("SFT_STUDIO_ENGINE_GPUS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the worker: faster on this shared 2-core box
    make_dataset(ws, store, tmp_path)
    greedy = DecodingConfig(temperature=0.0, max_new_tokens=8)
    hi = [{"role": "user", "content": "hi"}]
    eng = VLLMEngine(str(tiny_model_dir), ws, store, cfg=ServeConfig(engine="vllm", max_model_len=512, dtype="float32",
                                                                     startup_timeout_s=400, max_lora_rank=16))
    try:
        assert eng.plan.shared and eng.state == "ready"
        assert [s["state"] for s in gpu.engine_states(ws)] == ["serving"]
        before = "".join(eng.chat(hi, None, greedy))
        run_id = jobs.submit_train(tiny_cfg(tiny_model_dir, max_steps=20, save_steps=100, run_name="turn"), ws, store)
        job = jobs.claim(store)
        out, seen = {}, {}
        t = threading.Thread(target=lambda: out.setdefault("status", jobs.run_job(job, ws, store)))
        t.start()
        while t.is_alive():
            if "state" not in seen and jobs_db.get(store, job["id"])["pid"]:
                # the worker has started: by then the engine must have given the GPU up
                seen["state"] = (eng.state, eng.pid(), [s["state"] for s in gpu.engine_states(ws)])
                with pytest.raises(EngineError, match=f"the GPU is lent to train run {run_id}") as e:
                    list(eng.chat(hi, None, greedy))
                seen["chat"] = str(e.value)
                seen["holders"] = gpu.holder_text(ws, store)
            time.sleep(0.1)
        t.join()
        assert out["status"] == "succeeded", jobs_db.recent(store)
        assert seen["state"] == ("yielded", None, ["yielded"]), seen
        assert seen["holders"] == f"GPU 0 (Tesla T4, 15 GiB): inference engine asleep, train run {run_id}"
        assert "waiting for the inference engine" in (ws.runs_dir(run_id) / "worker.log").read_text()
        _wait(lambda: eng.state == "ready", timeout=400, what="the engine to come back")
        assert [s["state"] for s in gpu.engine_states(ws)] == ["serving"]
        assert "".join(eng.chat(hi, None, greedy)) == before  # the same model, greedy: the same answer
        res = eng.generate_batch([GenRequest(hi, run_id, greedy)])[0]
        assert res.error is None and res.completion_tokens > 0  # and the new adapter is served
    finally:
        eng.close()
    assert gpu.engine_states(ws) == []
