"""The adapters a vLLM server holds: which are loaded, whether one fits, loading, unloading, reloading.

Every name goes through the :class:`~sft_core.serving.adapters.AdapterRegistry` (a run id becomes a
path inside the workspace there, or is refused) on every load *and* on every (re)start of the
server: one whose run was deleted, is no longer servable, or no longer fits is dropped, not reloaded.

Ranks: vLLM allocates LoRA slots of ``--max-lora-rank`` at start-up, so an adapter of a larger rank
needs a restart. ``max_lora_rank = 0`` (auto) fits the rank to the workspace's adapters at start and
grows it (a restart, adapters reloaded) for a larger one; a fixed rank refuses it with a clear error.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

from sft_core.config import LORA_RANKS
from sft_core.serving.adapters import AdapterInfo, AdapterRegistry
from sft_core.serving.base import EngineError
from sft_core.serving.client import Endpoint

log = logging.getLogger(__name__)

AUTO_MIN_RANK = 16  # TrainConfig's default rank: the usual adapter loads without a restart


def fit_rank(rank: int) -> int:
    """The smallest --max-lora-rank vLLM accepts that holds a LoRA of this rank (auto mode: >= 16)."""
    return next(r for r in LORA_RANKS if r >= max(rank, AUTO_MIN_RANK))


class AdapterManager:
    """Loaded adapters of one engine, in load order (``loaded``: name -> AdapterInfo).

    ``managed``: the engine runs the server (ranks are checked against ``max_rank``); attached to
    an external one, an endpoint without runtime LoRA routes (an ``sft-studio serve`` front, or vLLM
    with ``--lora-modules``) is addressed by adapter name only. ``on_error`` maps a client exception
    to the engine's EngineError (a dead server also starts the engine's restart there)."""

    def __init__(self, registry: AdapterRegistry, managed: bool, max_rank: int, auto: bool,
                 on_error: Callable[[Exception], EngineError]):
        self.registry = registry
        self.managed, self.max_rank, self.auto = managed, max_rank, auto
        self.on_error = on_error
        self.served_name = ""  # the base model's name on the server; no adapter may take it
        self.loaded: collections.OrderedDict[str, AdapterInfo] = collections.OrderedDict()
        self._lock = threading.Lock()  # one load/unload at a time

    def workspace_rank(self) -> int:
        """Auto mode at start: the rank that holds every finished adapter of the workspace."""
        ranks = []
        for name in self.registry.available():
            try:
                ranks.append(self.registry.resolve(name).rank)
            except EngineError:
                pass
        return fit_rank(max(ranks, default=AUTO_MIN_RANK))

    def resolve(self, name: str) -> tuple[AdapterInfo, int | None]:
        """The adapter, and the larger ``--max-lora-rank`` the server must restart with first (None:
        it fits). EngineError for a name the registry refuses, a name clash, or a rank over a fixed limit."""
        info = self.registry.resolve(name)
        if info.name == self.served_name:
            raise EngineError(f"adapter name {info.name!r} clashes with the base model's name", "adapter")
        if not self.managed or info.rank <= self.max_rank:
            return info, None
        if not self.auto:
            raise EngineError(f"adapter {info.name!r} has rank {info.rank} > max_lora_rank {self.max_rank}; "
                              "restart the engine with a larger --max-lora-rank (or 0 = auto)", "adapter")
        return info, fit_rank(info.rank)

    def load(self, client: Endpoint, info: AdapterInfo) -> None:
        with self._lock:
            if info.name in self.loaded:
                return
            self._post_load(client, info)
            self.loaded[info.name] = info

    def _post_load(self, client: Endpoint, info: AdapterInfo) -> None:
        try:
            r = client.post("/v1/load_lora_adapter", {"lora_name": info.name, "lora_path": str(info.path)}, timeout=120)
        except Exception as e:
            raise self.on_error(e) from None
        if r.status_code in (404, 405) and not self.managed:
            # no runtime LoRA routes there (an `sft-studio serve` front, which resolves run ids with its own
            # registry and hot-loads them; or vLLM started with --lora-modules): address the adapter by name
            log.info("%s has no /v1/load_lora_adapter; using adapter %r by name", client.root, info.name)
            return
        if r.status_code != 200 and "already" not in r.text:
            raise EngineError(f"vLLM could not load adapter {info.name!r}: {r.text[:500]}", str(info.path))

    def unload(self, client: Endpoint, name: str) -> None:
        with self._lock:
            try:
                r = client.post("/v1/unload_lora_adapter", {"lora_name": name}, timeout=60)
            except Exception as e:
                raise self.on_error(e) from None
            if r.status_code != 200 and name not in self.loaded:
                raise EngineError(f"adapter {name!r} is not loaded", "adapter")
            if r.status_code != 200:
                raise EngineError(f"vLLM could not unload adapter {name!r}: {r.text[:300]}", "adapter")
            self.loaded.pop(name, None)

    def reload(self, client: Endpoint, server_alive: Callable[[], bool]) -> None:
        """After a (re)start: load what was loaded, each resolved again through the registry first. An
        adapter the registry no longer resolves (run deleted, no longer succeeded, adapter dir gone or
        now pointing out of the workspace), that no longer fits or no longer loads is dropped, not
        fatal; a failure while the server itself is gone fails the start (raised)."""
        for name in list(self.loaded):
            try:
                info = self.registry.resolve(name)
            except EngineError as e:
                log.warning("adapter %s not reloaded after restart: %s", name, e.message)
                self.loaded.pop(name, None)
                continue
            if info.name == self.served_name or info.rank > self.max_rank:
                log.warning("adapter %s not reloaded after restart: rank %d > --max-lora-rank %d or name clash",
                            name, info.rank, self.max_rank)
                self.loaded.pop(name, None)
                continue
            self.loaded[name] = info
            try:
                self._post_load(client, info)
            except EngineError as e:
                if not server_alive():
                    raise  # the server itself is gone: this restart failed
                log.warning("adapter %s not reloaded after restart: %s", info.name, e.message)
                self.loaded.pop(info.name, None)
