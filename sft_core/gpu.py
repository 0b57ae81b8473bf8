"""The GPU as a scheduled resource: what the machine has, which process may use which device, in what
precision, and what to say when the GPU is there but unusable.

Everything here except :func:`inventory` (torch.cuda and ``nvidia-smi``) and the small state files is
a pure function of an :class:`Inventory`, so each rule is tested on a CPU machine with a simulated
one (tests/test_gpu.py).

* **Devices** (:func:`plan_devices`). One GPU: the inference engine and training share it in turn; the
  engine yields it while a job that needs the GPU to itself (training) runs and comes back after.
  Several GPUs: the engine gets its own (the last one, or ``ServeConfig.gpus``) and training the rest,
  each process seeing only its devices through ``CUDA_VISIBLE_DEVICES`` (:func:`device_env`).
* **Precision** (:func:`choose_precision`). bf16 only where the card has it natively (compute >= 8.0;
  ``torch.cuda.is_bf16_supported()`` also counts emulation and says yes on a T4); else fp16 with loss
  scaling and the trainable LoRA weights in fp32 (the GradScaler refuses fp16 gradients, and TRL casts
  them to bf16 under QLoRA); CPU: fp32. The multi-GPU launcher gets the same answer. FlashAttention-2
  only on compute >= 8.0 with the package installed.
* **Environment** (:func:`check_environment`). ``nvidia-smi`` sees a GPU but torch cannot use it: one
  message naming the driver and the CUDA that torch's wheels need, instead of training on the CPU.
* **Taking turns across processes.** Each managed vLLM engine on a shared GPU keeps a small state file
  ``run/gpu-engine-<pid>.json`` (serving, yielding, yielded, waking). A job runner marks its job
  running in the database first and then waits for every live engine on its devices to be
  ``yielded`` (:func:`wait_for_engines`); an engine writes ``waking`` first and then looks for running
  jobs (:func:`gpu_holders`) before it takes the GPU back. Each side writes before it reads what the
  other wrote, so they never both believe the GPU is theirs.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sft_core import StudioError

SMI_QUERY = "index,uuid,name,driver_version,memory.total,memory.used,compute_cap"
SMI_QUERY_OLD = SMI_QUERY.rsplit(",", 1)[0]  # drivers before R510 know no compute_cap: torch supplies it
# The lowest Linux driver each CUDA major version runs on (CUDA's minor-version compatibility:
# 13.x >= 580, 12.x >= 525.60.13, 11.x >= 450.80.02; NVIDIA's CUDA compatibility table).
MIN_DRIVER = {13: (580, 0), 12: (525, 60), 11: (450, 80)}
NATIVE_BF16 = (8, 0)      # Ampere and later: bf16 tensor cores
FLASH_ATTN_MIN = (8, 0)   # FlashAttention-2 kernels
FP8_SERVE_MIN = (7, 5)    # vLLM fp8: weight-only (Marlin) from 7.5, W8A8 from 8.9
YIELD_TIMEOUT_S = 600.0   # a runner waits this long for the engine to give the GPU back (a vLLM start can take minutes)
LAUNCHER_MODULE = "accelerate.commands.launch"


# ------------------------------------------------------------------------------------------------
# What the machine has
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    index: int                      # CUDA index inside this process
    name: str
    capability: tuple[int, int]
    total_mib: int = 0
    free_mib: int = 0
    visible_id: str = ""            # what CUDA_VISIBLE_DEVICES names it by for a child process


@dataclass(frozen=True)
class Inventory:
    devices: tuple[Device, ...] = ()   # GPUs torch can use
    smi_count: int = 0                 # GPUs nvidia-smi lists (0 without nvidia-smi)
    smi_names: tuple[str, ...] = ()
    driver: str | None = None
    torch_version: str = ""
    torch_cuda: str | None = None      # torch.version.cuda; None: a CPU-only build
    torch_error: str | None = None     # why torch cannot use the GPU nvidia-smi sees, when it says
    smi_error: str | None = None       # nvidia-smi is installed but fails (no working driver)

    @property
    def count(self) -> int:
        return len(self.devices)


def parse_smi(text: str) -> list[dict]:
    """Rows of ``nvidia-smi --query-gpu=SMI_QUERY --format=csv,noheader,nounits``."""
    rows = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 6 or not parts[0].isdigit():
            continue
        cap = parts[6] if len(parts) > 6 else ""
        major, _, minor = cap.partition(".")
        rows.append({"index": int(parts[0]), "uuid": parts[1], "name": parts[2], "driver": parts[3],
                     "total_mib": _int(parts[4]), "used_mib": _int(parts[5]),
                     "capability": (int(major), int(minor or 0)) if major.isdigit() else None})
    return rows


def _int(s: str) -> int:
    try:
        return int(float(s))
    except ValueError:
        return 0


def nvidia_smi(timeout: float = 10.0) -> list[dict] | str | None:
    """The GPUs ``nvidia-smi`` lists; None when it is absent; its error (a str) when it fails."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    err = "no output"
    for query in (SMI_QUERY, SMI_QUERY_OLD):
        try:
            out = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{type(e).__name__}: {e}"
        if out.returncode == 0:
            return parse_smi(out.stdout)
        err = " ".join((out.stdout + out.stderr).split())[:200] or f"exit code {out.returncode}"
    return err


def _visible_tokens(n_physical: int) -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return [str(i) for i in range(n_physical)]
    return [t.strip() for t in env.split(",") if t.strip() and t.strip() != "-1"]


def inventory() -> Inventory:
    """Ask the hardware: torch.cuda (device count only: no CUDA context is created in this process)
    and nvidia-smi (names, compute capability, memory, driver). The only function here that does."""
    import torch
    smi = nvidia_smi()
    smi_error = smi if isinstance(smi, str) else None
    smi = smi if isinstance(smi, list) else []
    by_index = {str(r["index"]): r for r in smi} | {r["uuid"]: r for r in smi}
    tokens = _visible_tokens(len(smi))
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices, error = [], None
    for i in range(n):
        row = by_index.get(tokens[i]) if i < len(tokens) else None
        if row and row["capability"]:
            devices.append(Device(i, row["name"], row["capability"], row["total_mib"],
                                  row["total_mib"] - row["used_mib"], tokens[i]))
        else:  # no nvidia-smi (or an old one): torch's view, free memory unknown
            props = torch.cuda.get_device_properties(i)
            devices.append(Device(i, props.name, (props.major, props.minor), props.total_memory >> 20, 0,
                                  tokens[i] if i < len(tokens) else str(i)))
    if smi and n == 0 and torch.version.cuda:
        try:  # torch.cuda.is_available() says no silently; init() says why
            torch.cuda.init()
        except Exception as e:  # noqa: BLE001 - the message is all we want
            error = " ".join(str(e).split())[:300]
    return Inventory(tuple(devices), len(smi), tuple(r["name"] for r in smi), smi[0]["driver"] if smi else None,
                     torch.__version__, torch.version.cuda, error, smi_error)


def torch_devices() -> list[Device]:
    """This process's GPUs as torch sees them (the training worker, after CUDA_VISIBLE_DEVICES)."""
    import torch
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append(Device(i, props.name, (props.major, props.minor), props.total_memory >> 20))
    return out


# ------------------------------------------------------------------------------------------------
# Environment check
# ------------------------------------------------------------------------------------------------
def _version_tuple(v: str | None) -> tuple[int, ...]:
    out = []
    for part in (v or "").split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out)


def min_driver(torch_cuda: str | None) -> tuple[int, int] | None:
    """The lowest driver that runs torch built for this CUDA version (None: unknown or CPU build)."""
    v = _version_tuple(torch_cuda)
    return MIN_DRIVER.get(v[0]) if v else None


def check_environment(inv: Inventory) -> str | None:
    """None when the GPU setup is usable (or there is no GPU at all); else one message saying why not."""
    if inv.smi_error and inv.count == 0:
        return (f"nvidia-smi is installed but fails ({inv.smi_error}): the NVIDIA driver is not working, so the "
                "GPU cannot be used; fix the driver (or give the container the GPU: docker run --gpus all), or use "
                "the CPU image (ENGINE=cpu)")
    if inv.smi_count == 0 or inv.count > 0:
        return None
    names = ", ".join(sorted(set(inv.smi_names))) or "unknown model"
    seen = f"nvidia-smi sees {inv.smi_count} GPU{'s' if inv.smi_count > 1 else ''} ({names}, driver {inv.driver})"
    if inv.torch_cuda is None:
        return (f"{seen} but torch {inv.torch_version} is a CPU-only build: install the GPU stack "
                "(make setup ENGINE_EXTRA=gpu, or the image built with ENGINE=gpu), or use the CPU image (ENGINE=cpu)")
    need = min_driver(inv.torch_cuda)
    if need and _version_tuple(inv.driver)[:2] < need:
        return (f"{seen} but torch {inv.torch_version} cannot use it: its wheels are built for CUDA {inv.torch_cuda}, "
                f"which needs an NVIDIA driver >= {need[0]}, and this host has {inv.driver}. Update the host driver, "
                "or use the CPU image (ENGINE=cpu); training will not fall back to the CPU on its own")
    why = f" ({inv.torch_error})" if inv.torch_error else ""
    return (f"{seen} but torch {inv.torch_version} (CUDA {inv.torch_cuda}) cannot use it{why}; check that the "
            "container was given the GPU (docker run --gpus all) and that CUDA_VISIBLE_DEVICES names it")


def require_usable_gpu(where: str = "gpu", inv: Inventory | None = None) -> Inventory:
    """Raise StudioError when a GPU is visible but unusable (called before a job and by the engine)."""
    inv = inventory() if inv is None else inv
    problem = check_environment(inv)
    if problem:
        raise StudioError(problem, where)
    return inv


def startup_check() -> str:
    """One line for the log at start-up: the GPUs in use, or the environment problem, loudly."""
    import logging
    inv = inventory()
    problem = check_environment(inv)
    if problem:
        logging.getLogger(__name__).error("GPU: %s", problem)
        return f"GPU problem: {problem}"
    if not inv.count:
        return "no GPU: the engine and training run on the CPU"
    prec = choose_precision([d.capability for d in inv.devices])
    return "; ".join(f"GPU {d.index}: {d.name} (compute {d.capability[0]}.{d.capability[1]})" for d in inv.devices) \
        + f"; training precision {prec.describe()}"


# ------------------------------------------------------------------------------------------------
# Precision
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    dtype: str             # weights of a 16-bit base / QLoRA compute dtype: bfloat16 | float16 | float32
    mixed: str             # Trainer and `accelerate launch --mixed_precision`: bf16 | fp16 | no
    trainable_fp32: bool   # keep trainable (LoRA) weights in fp32
    attn: str              # attention implementation when it matters (packing): flash_attention_2 | sdpa

    def trainer_flags(self) -> dict:
        return {"bf16": self.mixed == "bf16", "fp16": self.mixed == "fp16"}

    @property
    def torch_dtype(self):
        import torch
        return getattr(torch, self.dtype)

    def describe(self) -> str:
        if self.mixed == "no":
            return "fp32 (CPU)"
        extra = ", LoRA weights fp32, loss scaling" if self.trainable_fp32 else ""
        return f"{self.mixed}{extra}, attention {self.attn}"


CPU_PRECISION = Precision("float32", "no", False, "sdpa")


def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def choose_precision(capabilities: list[tuple[int, int]], flash_attn: bool | None = None) -> Precision:
    """The precision for training on these devices (all of them: one run's ranks must agree)."""
    if not capabilities:
        return CPU_PRECISION
    lowest = min(capabilities)
    if flash_attn is None:
        flash_attn = flash_attn_installed()
    attn = "flash_attention_2" if flash_attn and lowest >= FLASH_ATTN_MIN else "sdpa"
    if lowest >= NATIVE_BF16:
        return Precision("bfloat16", "bf16", False, attn)
    return Precision("float16", "fp16", True, attn)


def torch_precision() -> Precision:
    """The precision for this process's GPUs as torch reports them (the training worker). bf16 exactly
    where ``torch.cuda.is_bf16_supported(including_emulation=False)`` holds: on CUDA that is compute
    >= 8.0 (torch/cuda/__init__.py), checked here for every device, not only the current one."""
    return choose_precision([d.capability for d in torch_devices()])


def device_map(cuda: bool, local_rank: int | None = None) -> dict | None:
    """``from_pretrained(device_map=...)``: each rank loads the whole model straight onto its own GPU
    (4-bit or not), never onto GPU 0 or into CPU RAM first; None on the CPU."""
    if not cuda:
        return None
    rank = int(os.environ.get("LOCAL_RANK", "0")) if local_rank is None else local_rank
    return {"": rank}


# ------------------------------------------------------------------------------------------------
# Which process gets which GPU
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DevicePlan:
    engine: tuple[int, ...] = ()
    train: tuple[int, ...] = ()

    @property
    def shared(self) -> bool:
        """The engine and training use a common GPU, so they take turns."""
        return bool(set(self.engine) & set(self.train))


def plan_devices(count: int, engine_gpus: str = "") -> DevicePlan:
    """Devices for the inference engine and for training among ``count`` visible GPUs.

    ``engine_gpus`` (``ServeConfig.gpus``): empty = automatic (one GPU: shared in turn; several: the
    engine gets the last, training the rest); else the engine's CUDA indices, training the others
    (all of them, shared in turn, when none are left)."""
    if count <= 0:
        return DevicePlan()
    spec = engine_gpus.strip()
    if not spec:
        if count == 1:
            return DevicePlan((0,), (0,))
        return DevicePlan((count - 1,), tuple(range(count - 1)))
    try:
        engine = tuple(sorted({int(t) for t in spec.split(",") if t.strip()}))
    except ValueError:
        raise StudioError(f"expected GPU indices like 1 or 2,3, got {spec!r}", "gpus") from None
    bad = [i for i in engine if not 0 <= i < count]
    if bad or not engine:
        raise StudioError(f"GPU {bad[0] if bad else spec} does not exist: {count} visible "
                          f"(indices 0-{count - 1})", "gpus")
    train = tuple(i for i in range(count) if i not in engine) or engine
    return DevicePlan(engine, train)


def device_env(indices: tuple[int, ...] | list[int], inv: Inventory) -> dict[str, str]:
    """Environment that shows a child process only these devices (by the ids this process knows
    them by, so a parent's own CUDA_VISIBLE_DEVICES is respected), in nvidia-smi's order."""
    if not inv.devices:
        return {}
    return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": ",".join(inv.devices[i].visible_id or str(i) for i in indices)}


def engine_gpus_setting() -> str:
    """The engine's GPUs as configured for this machine (ServeConfig.gpus, env SFT_STUDIO_ENGINE_GPUS):
    job runners read it to give training the other devices."""
    from sft_core.config import ServeConfig
    return ServeConfig().gpus


def training_plan(inv: Inventory) -> tuple[DevicePlan, list[Device], Precision]:
    """The plan, the devices training may use, and their precision (the launcher and each rank agree)."""
    plan = plan_devices(inv.count, engine_gpus_setting())
    devices = [inv.devices[i] for i in plan.train]
    return plan, devices, choose_precision([d.capability for d in devices])


def fp8_serving_ok(capability: tuple[int, int] | None) -> bool:
    return capability is not None and capability >= FP8_SERVE_MIN


# ------------------------------------------------------------------------------------------------
# Taking turns: engine state files, the jobs that hold the GPU, the runner's wait
# ------------------------------------------------------------------------------------------------
ENGINE_STATES = ("serving", "yielding", "yielded", "waking")


def _state_dir(ws) -> Path:
    return ws.root / "run"


def engine_state_path(ws, pid: int | None = None) -> Path:
    return _state_dir(ws) / f"gpu-engine-{pid or os.getpid()}.json"


def write_engine_state(ws, state: str, devices, job: str | None = None) -> None:
    """This process's engine: ``state`` on ``devices`` (written atomically, read by job runners)."""
    from sft_core.job_backends import _proc_start
    from sft_core.workspace import atomic_write_json
    assert state in ENGINE_STATES, state
    atomic_write_json(engine_state_path(ws), {"pid": os.getpid(), "pid_start": _proc_start(os.getpid()),
                                              "state": state, "devices": list(devices), "job": job,
                                              "time": time.time()})


def clear_engine_state(ws) -> None:
    try:
        engine_state_path(ws).unlink()
    except FileNotFoundError:
        pass


def engine_states(ws) -> list[dict]:
    """The state of every live engine on this workspace (files of dead processes are ignored)."""
    from sft_core.job_backends import _same_process
    out = []
    for p in sorted(_state_dir(ws).glob("gpu-engine-*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and _same_process(int(rec.get("pid", 0)), rec.get("pid_start")):
            out.append(rec)
    return out


def engines_in_the_way(states: list[dict], devices) -> list[dict]:
    """Engines that still hold (or are taking back) one of ``devices``."""
    want = set(devices)
    return [s for s in states if s.get("state") != "yielded" and want & set(s.get("devices") or [])]


def gpu_holders(store) -> list[dict]:
    """Running jobs that need the GPU to themselves (training), oldest first."""
    from sft_core.job_kinds import needs_gpu_alone
    from sft_core.db import jobs as job_rows
    running = sorted(job_rows.with_status(store, "running"), key=lambda j: j["started_at"] or 0)
    return [j for j in running if needs_gpu_alone(j)]


def engine_should_yield(plan: DevicePlan, holders: list[dict]) -> bool:
    """The engine gives its GPU away while a job that needs the GPU alone runs on a device it shares."""
    return plan.shared and bool(holders)


def lent_message(job: dict) -> str:
    """What chat says while the GPU is lent to a job."""
    since = time.strftime("%H:%M", time.localtime(job["started_at"])) if job.get("started_at") else "now"
    return (f"the GPU is lent to {job['kind']} run {job['ref']} (since {since}); the inference engine comes back "
            "when it ends")


def wait_for_engines(ws, devices, timeout_s: float = YIELD_TIMEOUT_S, poll_s: float = 0.5,
                     beat: Callable[[], None] | None = None,
                     cancelled: Callable[[], bool] | None = None) -> bool:
    """Block until no live engine holds any of ``devices`` (the caller's job is already marked running,
    so an engine about to wake sees it and stays yielded). Returns False if cancelled meanwhile;
    raises StudioError after ``timeout_s``."""
    end = time.time() + timeout_s
    while True:
        blocking = engines_in_the_way(engine_states(ws), devices)
        if not blocking:
            return True
        if cancelled and cancelled():
            return False
        if time.time() > end:
            pids = ", ".join(f"pid {s['pid']} {s['state']}" for s in blocking)
            raise StudioError(f"the inference engine ({pids}) did not give the GPU back within {timeout_s:.0f}s; "
                              f"see {ws.root / 'logs' / 'vllm.log'}", "gpu")
        if beat:
            beat()
        time.sleep(poll_s)


# ------------------------------------------------------------------------------------------------
# Who holds the GPU, for the UI
# ------------------------------------------------------------------------------------------------
def describe_holders(inv: Inventory, plan: DevicePlan, engines: list[dict], holders: list[dict]) -> str:
    """One line per GPU: who uses it now (pure; :func:`holder_text` gathers the facts)."""
    problem = check_environment(inv)
    if problem:
        return f"GPU unusable: {problem}"
    if not inv.count:
        return "No GPU: the inference engine and training share the CPU."
    lines = []
    for d in inv.devices:
        users = []
        for e in engines:
            if d.index in (e.get("devices") or []):
                users.append({"serving": "inference engine", "yielding": "inference engine (giving the GPU to training)",
                              "yielded": "inference engine asleep", "waking": "inference engine (coming back)"}
                             .get(e.get("state"), "inference engine"))
        if d.index in plan.train:
            users += [f"{h['kind']} run {h['ref']}" for h in holders]
        who = ", ".join(users) if users else "free"
        lines.append(f"GPU {d.index} ({d.name}, {d.total_mib / 1024:.0f} GiB): {who}")
    return "\n".join(lines)


def holder_text(ws, store, inv: Inventory | None = None) -> str:
    """Who holds which GPU now, for the app's header (see docs/architecture.md, GPU)."""
    inv = inventory() if inv is None else inv
    problem = check_environment(inv)
    if problem:
        return f"GPU unusable: {problem}"
    try:
        plan = plan_devices(inv.count, engine_gpus_setting())
    except StudioError as e:
        return f"GPU setting: {e}"
    return describe_holders(inv, plan, engine_states(ws), gpu_holders(store))


# ------------------------------------------------------------------------------------------------
# Merging an adapter into its base
# ------------------------------------------------------------------------------------------------
def merge_load_kwargs(model_dir, inv: Inventory | None = None) -> dict:
    """``from_pretrained`` arguments for merging an adapter into the base at ``model_dir``: its own dtype
    (config.json), on the GPU when one holds it (:func:`merge_placement`)."""
    model_dir = Path(model_dir)
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        cfg = {}
    size = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) or \
        sum(p.stat().st_size for p in model_dir.glob("*.bin"))
    device, dtype = merge_placement(size, cfg.get("dtype") or cfg.get("torch_dtype"), inventory() if inv is None else inv)
    return {"dtype": dtype, "device_map": device}


def merge_placement(weights_bytes: int, config_dtype: str | None, inv: Inventory) -> tuple[str, str]:
    """(device, dtype) for merging: the base's own dtype (not fp32, twice the size), on the first GPU
    when its free memory holds the weights with room to spare, else on the CPU."""
    dtype = config_dtype if config_dtype in ("bfloat16", "float16", "float32") else "float32"
    for d in inv.devices:
        if d.free_mib and weights_bytes * 1.25 < d.free_mib * 2**20:
            return f"cuda:{d.index}", dtype
    return "cpu", dtype
