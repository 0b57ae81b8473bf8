"""vLLM engine: an OpenAI-compatible vLLM server with LoRA adapters hot-loaded at run time.

A thin composition: ``supervisor.py`` (the server as a process: command line, environment, start,
health wait, stop of its process group), ``client.py`` (the one OpenAI-compatible client),
``adapter_manager.py`` (loaded adapters, rank fitting, load/unload, reload on every start) and
``gpu_turns.py`` (giving a shared GPU to training). This class holds the engine's state, restarts
and requests. Two modes:

* **managed** (default): start the server on a free localhost port (or the configured one), wait
  for ``/health``. A watchdog thread notices when the process dies and restarts it (on the configured
  port when it is free again, else a fresh one), reloading the adapters the registry still resolves;
  meanwhile requests fail at once with ``EngineUnavailable("engine restarting ...")`` rather than
  hang. ``close()`` (also at exit, and :func:`close_all` for the signal handlers front ends install
  with :func:`~sft_core.serving.supervise.close_on_signals`) stops the server's whole process group.
  Each start gets a fresh random API key, sent only by this engine's own client.
* **attach**: talk to an external server given by URL; no process is managed. Its API key, if it
  needs one, comes from ``api_key=`` or ``SFT_STUDIO_ENGINE_API_KEY`` (else the ``openai`` client
  falls back to ``OPENAI_API_KEY``).

Names other modules import from here (``free_port``, ``server_env``, ``_Server``, ``fit_rank``, ...)
are re-exported from the parts.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import secrets
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

from sft_core import StudioError, gpu
from sft_core.config import ServeConfig
from sft_core.serving.adapter_manager import AUTO_MIN_RANK, AdapterManager, fit_rank  # noqa: F401  (re-exported)
from sft_core.serving.adapters import AdapterRegistry
from sft_core.serving.base import EngineError, EngineUnavailable, GenRequest, GenResult, resolve_decoding, run_window
from sft_core.serving.gpu_turns import GpuTurns
from sft_core.serving.client import API_KEY_ENV, Endpoint, describe_error, is_connection_error  # noqa: F401
from sft_core.serving.supervisor import (  # noqa: F401  (re-exported: tests, benches and the app import them here)
    AUTH_MIDDLEWARE, STOP_GRACE_S, SUPERVISOR, Server, _cpu_cores, _group_alive, _running_in_group, _Server,
    cpu_has_bf16, free_port, is_cuda_build, pick_port, port_is_free, server_command, server_env, wait_healthy)
from sft_core.store import Store, open_store
from sft_core.workspace import NameError_, Workspace, safe_name

log = logging.getLogger(__name__)
_MANAGED: weakref.WeakSet = weakref.WeakSet()  # managed engines of this process, for close_all()


def close_all() -> None:
    """Close every managed vLLM engine of this process, also one still starting up in another
    thread (for signal handlers: ``supervise.close_on_signals(close_all)``)."""
    for eng in list(_MANAGED):
        try:
            eng.close()
        except Exception as e:  # noqa: BLE001 - shutting down: go on with the others
            log.warning("closing vLLM engine failed: %s", e)


class VLLMEngine:
    name = "vllm"

    def __init__(self, base_model: str, ws: Workspace, store: Store | None = None,
                 cfg: ServeConfig | None = None, url: str | None = None,
                 registry: AdapterRegistry | None = None, start: bool = True, api_key: str | None = None):
        """``api_key``: attach mode only, the external server's key (default ``$SFT_STUDIO_ENGINE_API_KEY``);
        a managed server always gets a fresh random key of its own per start."""
        import openai  # noqa: F401  (fail early if missing)

        self.ws = ws
        self.store = store or open_store(self.ws.db_url)
        self.registry = registry or AdapterRegistry(self.ws, self.store)
        self.cfg = cfg or ServeConfig()
        self.cfg.validate()
        self.base_model = base_model
        self.url = (url or self.cfg.url or "").rstrip("/")
        self.managed = not self.url
        # never logged, never in health() or cfg: a managed server's is replaced on every (re)start
        self._api_key = None if self.managed else (api_key or os.environ.get(API_KEY_ENV) or None)
        # stopped | starting | ready | restarting | yielding | yielded | waking | failed | closed
        self.state = "stopped"
        self.error = ""
        self.restarts = 0
        self.adapters = AdapterManager(self.registry, self.managed, self.cfg.max_lora_rank,
                                       auto=self.cfg.max_lora_rank == 0, on_error=self._request_error)
        self.endpoint: Endpoint | None = None  # the client of the current server (a new one per start)
        self._server: Server | None = None
        self._lock = threading.RLock()           # state, server and client swaps
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        if self.managed:
            self._plan_managed(base_model)
        else:
            self.model_dir = None
            self.served_name = ""
            self.cuda = False
            self.gpus, self.plan = gpu.Inventory(), gpu.DevicePlan()
        self.turns = GpuTurns(self, sleep_mode=bool(self.cuda and self.plan.shared and self.cfg.gpu_yield == "sleep"))
        if start:
            self.start()

    def _plan_managed(self, base_model: str) -> None:
        """What a managed server needs before its first start: model dir, LoRA rank, name, devices."""
        from sft_core import models
        self.model_dir = models.resolve_model(base_model, self.ws)
        if self.adapters.auto:  # fit the finished adapters of this workspace now, so loading them needs no restart
            self._set_rank(self.adapters.workspace_rank())
        try:
            self.served_name = safe_name(base_model, "base_model")
        except NameError_:
            self.served_name = safe_name(self.model_dir.name, "base_model")
        self.adapters.served_name = self.served_name
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

    def _set_rank(self, rank: int) -> None:
        self.cfg = dataclasses.replace(self.cfg, max_lora_rank=rank)
        self.adapters.max_rank = rank

    @property
    def auto_rank(self) -> bool:
        return self.adapters.auto

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if not self.managed:
            return self._attach()
        _MANAGED.add(self)
        with self._lock:
            self.state = "starting"
            holders = self.turns.taken()
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
                self.turns.mark("serving")  # the file first: whoever sees "ready" finds it written
                self.state, self.error = "ready", ""
        atexit.register(self.close)
        self._watchdog = threading.Thread(target=self._watch, name="vllm-watchdog", daemon=True)
        self._watchdog.start()

    def _attach(self) -> None:
        """Attach mode: check the endpoint and learn the base model's name from /v1/models."""
        # seeds on sampled requests only where this machine's vLLM build is CUDA: an attached server is most
        # often the app's own engine (client.decoding_params says why a CPU build must not get them)
        self.endpoint = Endpoint(f"{self.url}/v1", self._api_key, timeout=self.cfg.request_timeout_s,
                                 seeded=is_cuda_build())
        try:
            models = self.endpoint.models()
        except Exception as e:
            self.state, self.error = "failed", str(e)
            raise EngineError(f"cannot reach vLLM endpoint {self.url}: {e}", "engine_url") from None
        roots = [m["id"] for m in models if not m.get("parent")]
        self.served_name = roots[0] if roots else models[0]["id"]
        self.adapters.served_name = self.served_name
        self.state = "ready"

    def _launch(self) -> None:
        """Start a server process and wait until it answers /health (caller holds the lock)."""
        port = pick_port(self.cfg.port, self.restarts)
        cmd = server_command(self.model_dir, self.served_name, port, self.cfg, self.cuda,
                             tensor_parallel=max(1, len(self.plan.engine)), sleep_mode=self.turns.sleep_mode)
        log.info("starting vLLM: %s", " ".join(cmd))
        key = secrets.token_urlsafe(32)  # fresh per start: a key seen by an old server's process is void
        env = server_env(self.cfg, self.cuda, key, gpu.device_env(self.plan.engine, self.gpus),
                         self.turns.sleep_mode)
        self._api_key = key
        server = self._server = Server(cmd, env, port, self.log_path)  # close() can stop it from now on
        wait_healthy(server, self.cfg.startup_timeout_s, self._stop)
        old, self.endpoint = self.endpoint, Endpoint(f"http://127.0.0.1:{port}/v1", key,
                                                     timeout=self.cfg.request_timeout_s, seeded=self.cuda)
        if old is not None:
            old.close()
        self.url = self.endpoint.root
        hook = getattr(self, "on_launch", None)  # the app publishes the new URL and key to its job workers
        if hook is not None:
            try:
                hook(self)
            except Exception as e:  # never fail a start over the announcement
                log.warning("engine on_launch hook failed: %s", e)

    def _server_alive(self) -> bool:
        return self._server is not None and self._server.alive()

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

    # -- one GPU shared with training (gpu_turns.py) --------------------------------------------
    def take_turns(self) -> None:
        """Yield the shared GPU while a training job runs; come back when none does (the watchdog calls this)."""
        self.turns.check()

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
                    self.adapters.reload(self.endpoint, self._server_alive)
                except EngineError as e:
                    if self._stop.is_set():
                        return
                    self.error = f"{reason}; restart {attempt} failed: {e.message}"
                    log.error("vLLM restart %d failed: %s", attempt, e.message)
                    time.sleep(min(10, 2 ** attempt))
                    continue
                self.turns.mark("serving")
                self.state, self.error = "ready", ""
                log.warning("vLLM engine back after %s (%d adapters reloaded)", reason, len(self.adapters.loaded))
                return
        with self._lock:
            self.state = "failed"
            if self.plan.shared:  # a failed engine holds no GPU: runners need not wait for it
                gpu.clear_engine_state(self.ws)

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
        if self.endpoint is not None:
            self.endpoint.close()

    def pid(self) -> int | None:
        """The managed vLLM API server's pid (its process group is led by a supervisor: ``_server.pgid``)."""
        return self._server.pid if self._server else None

    # -- requests ------------------------------------------------------------------------------
    def _ready(self) -> Endpoint:
        state = self.state
        if state == "ready" and self.endpoint is not None:
            return self.endpoint
        if state in ("yielding", "yielded"):
            raise EngineUnavailable(self.error, "gpu")  # chat during training: says so plainly
        if state in ("restarting", "starting", "waking"):
            raise EngineUnavailable(f"engine restarting ({self.error or 'starting up'}); try again in a few seconds",
                                    "vllm")
        if state == "failed":
            raise EngineUnavailable(f"engine failed: {self.error}; see {getattr(self, 'log_path', self.url)}", "vllm")
        raise EngineUnavailable(f"engine is {state}", "vllm")

    def _request_error(self, e: Exception) -> EngineError:
        """Map a client error to an EngineError; a dead process triggers the restart at once."""
        if self.state in ("yielding", "yielded"):  # stopped under a request for a training job
            return EngineUnavailable(self.error, "gpu")
        srv = self._server
        if self.managed and srv is not None and is_connection_error(e):
            end = time.time() + 1.0  # a killed server drops its socket a moment before it can be reaped
            while srv.alive() and time.time() < end:
                time.sleep(0.05)
        if self.managed and (self.state in ("restarting", "starting") or (srv is not None and not srv.alive())):
            if self.state == "ready":
                threading.Thread(target=self._restart, args=("vLLM process died",), daemon=True).start()
                time.sleep(0.05)
            return EngineUnavailable(f"engine restarting ({self.error or 'vLLM process died'}); "
                                     "try again in a few seconds", "vllm")
        if is_connection_error(e):
            return EngineUnavailable(f"cannot reach vLLM at {self.url}: {e}", "vllm")
        if isinstance(e, StudioError):
            return e if isinstance(e, EngineError) else EngineError(e.message, e.where)
        what = describe_error(e)
        return EngineError(f"vLLM {what}" if what.startswith("refused") else f"vLLM request failed: {what}", "vllm")

    def _model_for(self, adapter: str | None) -> str:
        if adapter is None:
            return self.served_name
        name = self.registry.check_name(adapter)
        if name not in self.adapters.loaded:
            self.load_adapter(name)  # hot-load a registered adapter on first use
        return name

    def chat(self, messages: list[dict], adapter: str | None = None,
             decoding=None, info: dict | None = None) -> Iterator[str]:
        cfg = resolve_decoding(decoding)
        client = self._ready()
        model = self._model_for(adapter)
        try:
            yield from client.stream_chat(model, messages, cfg, info)
        except Exception as e:
            raise self._request_error(e) from None

    def _one(self, req: GenRequest) -> GenResult:
        t0 = time.perf_counter()
        try:
            cfg = resolve_decoding(req.decoding)
            client = self._ready()
            model = self._model_for(req.adapter)
            try:
                return client.complete(model, req.messages, cfg, logprobs=req.logprobs)
            except Exception as e:
                raise self._request_error(e) from None
        except Exception as e:  # per request, so one bad request does not sink the batch
            return GenResult(text="", error=str(e), latency_s=time.perf_counter() - t0,
                             retryable=isinstance(e, EngineUnavailable))

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

    # -- adapters (adapter_manager.py) ---------------------------------------------------------
    def load_adapter(self, name: str) -> None:
        info, rank = self.adapters.resolve(name)
        if rank is not None:  # auto rank: restart with room for it (adapters reloaded)
            self._set_rank(rank)
            self._restart(f"adapter {info.name!r} has rank {info.rank}: --max-lora-rank {rank}")
        self.adapters.load(self._ready(), info)

    def unload_adapter(self, name: str) -> None:
        name = self.registry.check_name(name)
        self.adapters.unload(self._ready(), name)

    def list_adapters(self) -> list[str]:
        """Adapters the server reports in /v1/models (the live truth, not our bookkeeping)."""
        client = self._ready()
        try:
            models = client.models()
        except Exception as e:
            raise self._request_error(e) from None
        return [m["id"] for m in models if m["id"] != self.served_name and m.get("parent")]

    def health(self) -> dict:
        ok = self.state == "ready" and self.endpoint is not None and self.endpoint.healthy()
        return {"ok": ok, "engine": self.name, "state": self.state, "mode": "managed" if self.managed else "attach",
                "base_model": self.base_model, "served_name": self.served_name, "url": self.url,
                "pid": self.pid(), "restarts": self.restarts, "adapters": list(self.adapters.loaded),
                "error": self.error, "gpus": list(self.plan.engine), "gpu_shared": self.plan.shared}
