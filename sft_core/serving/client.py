"""The one client for OpenAI-compatible endpoints: every caller that talks to one goes through here.

Callers: the vLLM engine (its managed server and attach mode, ``vllm_engine.py``), the judge and the
synth generator (``evals/judge.py``), the ``openai:*`` eval systems (:func:`external_endpoint`), and
the tests, which drive ``sft-studio serve``'s front (``front.py``) with it.

An :class:`Endpoint` is built from the endpoint's OpenAI base URL (``http://host:port/v1``, what an
``openai.OpenAI`` client takes). It holds an ``openai`` client for the API itself (chat, streamed
or not, with usage and log-probs) and an ``httpx`` client, carrying the same bearer key, for the
server's own routes beside ``/v1``'s chat (``/health``, vLLM's ``/v1/load_lora_adapter``). Errors are
left to the caller (each decides what a failure means: a restart, a per-request error, a message);
:func:`describe_error` says what went wrong in one line.
"""
from __future__ import annotations

import os
import time
from typing import Iterator

from sft_core.config import DecodingConfig
from sft_core.serving.base import GenResult

API_KEY_ENV = "SFT_STUDIO_ENGINE_API_KEY"  # attach mode: the external engine server's API key
OPENAI_BASE_ENV = "SFT_STUDIO_OPENAI_BASE_URL"  # the endpoint of the `openai:*` eval systems


def decoding_params(cfg: DecodingConfig, seeded: bool = True) -> dict:
    """A chat request's sampling options from a :class:`DecodingConfig` (OpenAI names).

    ``seeded=False`` leaves the per-request ``seed`` out of sampled requests (temperature > 0): vLLM's CPU
    build dies on them. When a seeded request's prefill is split over steps (chunked prefill: prompts
    longer than the step's token budget, or many at once), vLLM rewinds that request's generator with
    ``get_offset``, which a CPU ``torch.Generator`` does not have ("CPU Generator does not use offset"): the
    engine core exits and every request in flight fails. Greedy requests have no generator and keep it."""
    kw = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens)
    if seeded or cfg.temperature == 0:
        kw["seed"] = cfg.seed
    if cfg.stop:
        kw["stop"] = list(cfg.stop)
    return kw


def server_root(base_url: str) -> str:
    """``http://host:port/v1`` -> ``http://host:port`` (where ``/health`` lives)."""
    base = base_url.rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


class Endpoint:
    """One OpenAI-compatible endpoint (see the module docstring).

    ``api_key``: sent as ``Authorization: Bearer`` (None: none on the server's own routes; the ``openai``
    client then takes ``$OPENAI_API_KEY``). ``timeout``: per request; connecting gets ``connect_timeout_s``."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 120.0, max_retries: int = 0,
                 connect_timeout_s: float = 5.0, seeded: bool = True):
        import httpx
        import openai

        self.seeded = seeded  # per-request seeds on sampled requests (not on vLLM's CPU build: decoding_params)

        self.base_url = base_url.rstrip("/")
        self.root = server_root(self.base_url)
        self.api_key = api_key or None
        limits = httpx.Timeout(timeout, connect=connect_timeout_s)
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        self.http = httpx.Client(timeout=limits, headers=headers)
        # no key: the openai client's own default, $OPENAI_API_KEY, else a placeholder it requires
        self.openai = openai.OpenAI(base_url=self.base_url, api_key=self.api_key or os.environ.get("OPENAI_API_KEY")
                                    or "EMPTY",
                                    max_retries=max_retries, timeout=limits)

    def close(self) -> None:
        self.http.close()
        self.openai.close()

    # -- the API --------------------------------------------------------------------------------
    def models(self, timeout: float = 10.0) -> list[dict]:
        """``GET /models``: the entries as the server sends them (vLLM marks adapters with ``parent``)."""
        r = self.http.get(f"{self.base_url}/models", timeout=timeout)
        r.raise_for_status()
        return list(r.json()["data"])

    def model_ids(self) -> list[str]:
        return [str(m["id"]) for m in self.models()]

    def stream_chat(self, model: str, messages: list[dict], decoding: DecodingConfig,
                    info: dict | None = None) -> Iterator[str]:
        """The answer's text deltas; with ``info``, fills finish_reason, token counts and latency_s."""
        t0 = time.perf_counter()
        # include_usage: the server sends one last chunk with the token counts (and no choices)
        stream = self.openai.chat.completions.create(model=model, messages=messages, stream=True,
                                                     stream_options={"include_usage": True},
                                                     **decoding_params(decoding, self.seeded))
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

    def complete(self, model: str, messages: list[dict], decoding: DecodingConfig,
                 logprobs: bool = False) -> GenResult:
        """One whole answer (exceptions propagate). With ``logprobs`` (vLLM: tokens as ``token_id:N``),
        ``extra`` holds the chosen token ids and their log-probs."""
        t0 = time.perf_counter()
        extra_body = {"return_tokens_as_token_ids": True} if logprobs else None
        resp = self.openai.chat.completions.create(model=model, messages=messages, logprobs=logprobs or None,
                                                   extra_body=extra_body, **decoding_params(decoding, self.seeded))
        choice = resp.choices[0]
        extra = {}
        if logprobs and choice.logprobs and choice.logprobs.content:
            toks = choice.logprobs.content
            extra = {"token_ids": [int(t.token.split(":", 1)[1]) for t in toks], "logprobs": [t.logprob for t in toks]}
        usage = resp.usage
        return GenResult(text=choice.message.content or "", prompt_tokens=usage.prompt_tokens if usage else 0,
                         completion_tokens=usage.completion_tokens if usage else 0,
                         latency_s=time.perf_counter() - t0, finish_reason=choice.finish_reason, extra=extra)

    def answer(self, model: str, messages: list[dict], decoding: DecodingConfig, label: str) -> GenResult:
        """:meth:`complete`, a failure returned as the result's ``error`` (``label``: who asked)."""
        t0 = time.perf_counter()
        try:
            return self.complete(model, messages, decoding)
        except Exception as e:  # noqa: BLE001 - per request: one failure does not sink a batch
            return GenResult(text="", latency_s=time.perf_counter() - t0,
                             error=f"{label}: endpoint {self.base_url} failed: {describe_error(e)}")

    # -- the server's own routes ----------------------------------------------------------------
    def healthy(self, timeout: float = 5.0) -> bool:
        try:
            return self.http.get(f"{self.root}/health", timeout=timeout).status_code == 200
        except Exception:  # noqa: BLE001 - unreachable is unhealthy
            return False

    def post(self, route: str, json: dict | None = None, timeout: float = 60.0):
        """POST to a route of the server (``/v1/load_lora_adapter``, ``/sleep?level=1``); the response."""
        return self.http.post(f"{self.root}/{route.lstrip('/')}", json=json, timeout=timeout)


def describe_error(e: Exception) -> str:
    """A client error in one line: the server's own message for an HTTP error status."""
    import openai
    if isinstance(e, openai.APIStatusError):
        msg = e.message
        try:
            msg = e.response.json().get("error", {}).get("message", msg)
        except Exception:  # noqa: BLE001 - not JSON: the client's message
            pass
        return f"refused the request ({e.status_code}): {msg}"
    return f"{type(e).__name__}: {e}"


def is_connection_error(e: Exception) -> bool:
    import openai
    return isinstance(e, (openai.APIConnectionError, openai.APITimeoutError))


def external_endpoint(timeout: float = 120.0) -> Endpoint:
    """The endpoint of the ``openai:*`` eval systems: ``$SFT_STUDIO_OPENAI_BASE_URL``, key ``$OPENAI_API_KEY``
    (``evals.systems.openai_endpoint`` reads the same two variables)."""
    return Endpoint(os.environ.get(OPENAI_BASE_ENV, "").rstrip("/"), os.environ.get("OPENAI_API_KEY") or None,
                    timeout=timeout)
