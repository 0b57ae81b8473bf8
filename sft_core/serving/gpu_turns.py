"""A managed vLLM engine's turns on one GPU shared with training (``sft_core/gpu.py`` has the policy).

While a job that needs the GPU to itself runs (training), the engine gives the GPU up
(``ServeConfig.gpu_yield``: stop the server, or vLLM's sleep mode, ``/sleep`` and ``/wake_up``
behind the engine's key) and requests fail at once saying so; when the job ends the engine comes
back (woken, or restarted with its adapters). The engine's state file (``gpu.write_engine_state``)
tells job runners whether to wait. With several GPUs the engine has its own and never yields.

:class:`GpuTurns` works on the engine it belongs to (its state, lock, server and restart); the
engine's watchdog calls :meth:`GpuTurns.check` once a second.
"""
from __future__ import annotations

import logging

from sft_core import gpu

log = logging.getLogger("sft_core.serving.vllm_engine")


class GpuTurns:
    def __init__(self, engine, sleep_mode: bool):
        self.eng = engine
        self.sleep_mode = sleep_mode  # vLLM started with --enable-sleep-mode: yield by sleeping
        self.slept = False  # put to sleep (not stopped) for the current training job

    def mark(self, state: str, job: str | None = None) -> None:
        """Write the engine's state file (only where the GPU is shared)."""
        if self.eng.plan.shared:
            gpu.write_engine_state(self.eng.ws, state, self.eng.plan.engine, job)

    def taken(self) -> list[dict]:
        """Jobs that hold the shared GPU now; ``waking`` is written first, so a job runner that marks
        its job running after this check waits for the engine instead of starting beside it."""
        if not self.eng.plan.shared:
            return []
        gpu.write_engine_state(self.eng.ws, "waking", self.eng.plan.engine)
        return gpu.gpu_holders(self.eng.store)

    def check(self) -> None:
        """Yield the shared GPU while a training job runs; come back when none does."""
        eng = self.eng
        holders = gpu.gpu_holders(eng.store)
        if eng.state == "ready" and gpu.engine_should_yield(eng.plan, holders):
            self._yield(holders[0])
        elif eng.state == "yielded":
            if holders:
                eng.error = gpu.lent_message(holders[0])
            else:
                self._come_back()

    def _yield(self, job: dict) -> None:
        eng, msg = self.eng, gpu.lent_message(job)
        with eng._lock:
            if eng.state != "ready":
                return
            eng.state, eng.error = "yielding", msg
            self.mark("yielding", job["id"])
            self.slept = self.sleep_mode and self._dev_call("sleep?level=1")
            if not self.slept:  # stop: frees everything the process held on the GPU
                server, eng._server = eng._server, None
                if server is not None:
                    server.stop()
            eng.state = "yielded"
            self.mark("yielded", job["id"])
        log.warning("vLLM engine %s: %s", "asleep" if self.slept else "stopped", msg)

    def _come_back(self) -> None:
        eng = self.eng
        holders = self.taken()
        if holders:
            eng.error = gpu.lent_message(holders[0])
            self.mark("yielded", holders[0]["id"])
            return
        with eng._lock:
            if eng.state != "yielded":
                return
            eng.state = "waking"
            if self.slept and self._dev_call("wake_up"):
                self.slept = False
                self.mark("serving")
                eng.state, eng.error = "ready", ""
                log.warning("vLLM engine awake: the GPU is back")
                return
            if self.slept:  # a failed wake: start afresh
                server, eng._server = eng._server, None
                if server is not None:
                    server.stop(grace_s=5)
            self.slept = False
        eng._restart("the GPU is back after training")

    def _dev_call(self, route: str) -> bool:
        """POST one of vLLM's sleep-mode routes (dev mode, behind the engine's key); True on success."""
        srv, client = self.eng._server, self.eng.endpoint
        if srv is None or not srv.alive() or client is None:
            return False
        try:
            r = client.post(route, timeout=300)
        except Exception as e:  # noqa: BLE001 - the caller falls back to stop/start
            log.warning("vLLM /%s failed: %s", route, e)
            return False
        if r.status_code != 200:
            log.warning("vLLM /%s answered %d: %s", route, r.status_code, r.text[:200])
        return r.status_code == 200
