"""The one inference interface used by chat, evals and the API.

Two implementations live beside this file: the vLLM server manager (default wherever ``vllm``
imports) and a transformers + peft fallback. Adapters are addressed by *name* (a training run's
id); an engine maps names to paths inside the workspace and refuses anything else.
"""
from __future__ import annotations

import contextlib
import itertools
import queue
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Protocol, runtime_checkable

from sft_core import StudioError
from sft_core.config import DecodingConfig


class EngineError(StudioError):
    """The engine cannot serve a request (down, restarting, unknown adapter, ...)."""


class EngineUnavailable(EngineError):
    """The engine cannot serve anything now (starting, restarting, failed, closed, unreachable, or its
    GPU lent to training): a request may succeed later, unlike a bad one (a front answers 503, not 400)."""


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
    retryable: bool = False              # the error was EngineUnavailable: the engine was down, not the request bad
    extra: dict = field(default_factory=dict)  # with logprobs: {"token_ids": [...], "logprobs": [...]}


@runtime_checkable
class Engine(Protocol):
    base_model: str

    def chat(self, messages: list[dict], adapter: str | None = None,
             decoding: DecodingConfig | None = None, info: dict | None = None) -> Iterator[str]:
        """Stream the answer to one conversation as text deltas.

        With ``info`` (a dict the caller owns), the engine fills it once the stream ends: ``finish_reason``
        ("stop" or "length": cut at the token limit), ``prompt_tokens``, ``completion_tokens`` and
        ``latency_s`` (first request to last token), for the Chat tab's per-answer line."""

    def generate_batch(self, requests: list[GenRequest]) -> list[GenResult]:
        """Answer many conversations (each with its own adapter); results in request order.

        Optional, for continuous batching (see :func:`generate_stream`): ``capacity()`` (requests
        that keep the engine busy) and ``generate_stream(requests, window, stop)`` (yield
        ``(index, GenResult)`` as each completes, at most ``window`` in flight)."""

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


# -- continuous batching: a sliding window of requests in flight ---------------------------------
DEFAULT_CAPACITY = 16  # requests in flight for an engine that states no capacity


def engine_capacity(engine) -> int:
    """How many requests keep ``engine`` busy: its ``capacity()`` (or attribute), else 16."""
    cap = getattr(engine, "capacity", None)
    cap = cap() if callable(cap) else cap
    return max(1, int(cap or DEFAULT_CAPACITY))


def run_window(fn, items: Iterable, window: int, stop_on_error: bool = True,
               stop: threading.Event | None = None, name: str = "window") -> Iterator[tuple[int, GenResult]]:
    """Call ``fn(item)`` (-> GenResult; an exception becomes a GenResult with ``error``) on a thread
    pool with at most ``window`` calls in flight, refilled the moment one finishes; yields
    ``(index, result)`` in completion order. ``items`` may be lazy: it is drawn as calls are submitted.

    Submission stops at the first result with an ``error`` (``stop_on_error``) or once ``stop`` is
    set; the calls already in flight are still awaited and yielded (their answers are paid for), then
    the iterator ends. A consumer that stops iterating (break, an exception, ``close()``) stops
    submission too; running calls cannot be cancelled (an HTTP request is under way), so they are
    waited for: no thread outlives the iterator."""
    window = max(1, int(window))

    def call(item) -> GenResult:
        try:
            return fn(item)
        except Exception as e:  # noqa: BLE001 - per request, like generate_batch
            return GenResult(text="", error=str(e) if isinstance(e, StudioError) else f"{type(e).__name__}: {e}",
                             retryable=isinstance(e, EngineUnavailable))

    source = iter(items)
    pool = ThreadPoolExecutor(max_workers=window, thread_name_prefix=name)
    pending: dict = {}
    nxt = 0
    halted = False
    try:
        while True:
            while not halted and len(pending) < window and not (stop is not None and stop.is_set()):
                try:
                    item = next(source)
                except StopIteration:
                    halted = True
                    break
                pending[pool.submit(call, item)] = nxt
                nxt += 1
            if not pending:
                return
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                i = pending.pop(fut)
                res = fut.result()
                if res.error and stop_on_error:
                    halted = True
                yield i, res
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if hasattr(source, "close"):  # a lazy source (e.g. prefetch's thread) stops with the window
            source.close()


def stream_batches(generate_batch, requests: Iterable[GenRequest], window: int,
                   stop: threading.Event | None = None) -> Iterator[tuple[int, GenResult]]:
    """``generate_stream`` for an engine that batches (and serialises) inside: chunks of ``window``
    through ``generate_batch``; stops after a chunk with an error, or once ``stop`` is set."""
    window = max(1, int(window))
    source, start = iter(requests), 0
    with contextlib.closing(source) if hasattr(source, "close") else contextlib.nullcontext():
        while not (stop is not None and stop.is_set()):
            chunk = list(itertools.islice(source, window))
            if not chunk:
                return
            gens = generate_batch(chunk)
            yield from ((start + k, g) for k, g in enumerate(gens))
            start += len(chunk)
            if any(g.error for g in gens):
                return


def generate_stream(engine, requests: Iterable[GenRequest], window: int | None = None,
                    stop: threading.Event | None = None) -> Iterator[tuple[int, GenResult]]:
    """``engine.generate_stream`` where the engine has one (vLLM: a thread per request, window
    refilled as each answer completes), else batches of ``window`` through ``generate_batch``.
    ``window`` defaults to the engine's capacity. Yields ``(index, GenResult)`` as answers complete;
    after the first error no new request is started (the ones in flight are still yielded)."""
    window = window or engine_capacity(engine)
    own = getattr(engine, "generate_stream", None)
    if own is not None:
        return own(requests, window=window, stop=stop)
    return stream_batches(engine.generate_batch, requests, window, stop)


def prefetch(source: Iterable, n: int, name: str = "prefetch") -> Iterator:
    """Draw ``source`` in a background thread, up to ``n`` items ahead of the consumer, so preparing
    a request (retrieval, templating) overlaps with waiting for answers instead of delaying each
    refill of the window. Exceptions reach the consumer; closing the iterator stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=max(1, int(n)))
    closed = threading.Event()
    end = object()

    def put(x) -> bool:
        while not closed.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def fill():
        try:
            for item in source:
                if not put((item, None)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            put((end, e))
            return
        put((end, None))

    t = threading.Thread(target=fill, name=name, daemon=True)
    t.start()
    try:
        while True:
            item, err = q.get()
            if item is end:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        closed.set()
        t.join()


def merge_streams(streams: list, stop: threading.Event) -> Iterator[tuple[int, object]]:
    """Drive several ``(key, iterator factory)`` streams at once (each in its own thread) and yield
    ``(key, item)`` as any produces one. The consumer ending (or ``stop`` set) stops them all; their
    threads finish what they have in flight and are joined before this returns."""
    if len(streams) == 1:  # no thread needed
        key, make = streams[0]
        with contextlib.closing(make()) as it:
            for item in it:
                yield key, item
        return
    q: queue.Queue = queue.Queue()
    done = object()

    def drive(key, make):
        try:
            with contextlib.closing(make()) as it:
                for item in it:
                    q.put((key, item))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put((key, e))
        finally:
            q.put((key, done))

    threads = [threading.Thread(target=drive, args=s, name=f"stream-{s[0]}", daemon=True) for s in streams]
    for t in threads:
        t.start()
    live = len(threads)
    try:
        while live:
            key, item = q.get()
            if item is done:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield key, item
    finally:
        stop.set()
        for t in threads:
            t.join()
