"""The one inference interface used by chat, evals and the API.

Two implementations live beside this file: the vLLM server manager (default wherever ``vllm``
imports) and a transformers + peft fallback. Adapters are addressed by *name* (a training run's
id); an engine maps names to paths inside the workspace and refuses anything else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Protocol, runtime_checkable

from sft_core import StudioError
from sft_core.config import DecodingConfig


class EngineError(StudioError):
    """The engine cannot serve a request (down, restarting, unknown adapter, ...)."""


@dataclass
class GenRequest:
    messages: list[dict]                 # OpenAI-style chat messages
    adapter: str | None = None           # a registered adapter name, or None for the base model
    decoding: DecodingConfig | None = None
    logprobs: bool = False               # also return the chosen tokens' ids and log-probs in `extra`


@dataclass
class GenResult:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    finish_reason: str | None = None
    error: str | None = None             # set instead of raising, per request, in batched calls
    extra: dict = field(default_factory=dict)  # with logprobs: {"token_ids": [...], "logprobs": [...]}


@runtime_checkable
class Engine(Protocol):
    base_model: str

    def chat(self, messages: list[dict], adapter: str | None = None,
             decoding: DecodingConfig | None = None) -> Iterator[str]:
        """Stream the answer to one conversation as text deltas."""

    def generate_batch(self, requests: list[GenRequest]) -> list[GenResult]:
        """Answer many conversations (each with its own adapter); results in request order."""

    def list_adapters(self) -> list[str]: ...

    def load_adapter(self, name: str) -> None: ...

    def unload_adapter(self, name: str) -> None: ...

    def health(self) -> dict: ...

    def close(self) -> None: ...


def resolve_decoding(decoding: DecodingConfig | None) -> DecodingConfig:
    """The request's decoding options, validated (ConfigError names the field); defaults when None."""
    cfg = decoding or DecodingConfig()
    cfg.validate()
    return cfg


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Text up to the first stop string (excluded, as vLLM and OpenAI do), and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
