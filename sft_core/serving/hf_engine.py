"""transformers + peft engine: the fallback where vLLM is absent, and the parity reference.

One base model in memory; every loaded adapter is a named peft LoRA adapter on it. A batch may mix
adapters: peft's ``adapter_names=[...]`` routes each row through its own adapter (``__base__`` for
none) in one ``generate`` call. Prompts are left-padded so every row's next token is at the end.
Streaming runs ``generate`` in a thread and reads a ``TextIteratorStreamer``. One lock serialises
use of the model (a single CPU/GPU model gains nothing from concurrent forward passes).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

from sft_core.config import DecodingConfig
from sft_core.serving.adapters import AdapterRegistry
from sft_core.serving.base import EngineError, GenRequest, GenResult, cut_at_stop, resolve_decoding
from sft_core.store import Store, open_store
from sft_core.workspace import Workspace

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class HFEngine:
    name = "hf"

    def __init__(self, base_model: str, ws: Workspace, store: Store | None = None,
                 device: str | None = None, batch_size: int = 16, registry: AdapterRegistry | None = None):
        import torch  # noqa: F401  (fail here, not mid-request, if torch is broken)
        from sft_core import models

        self.ws = ws
        self.store = store or open_store(self.ws.db_url)
        self.registry = registry or AdapterRegistry(self.ws, self.store)
        self.base_model = base_model
        self.model_dir = models.resolve_model(base_model, self.ws)
        self.device = device or models.best_device()
        self.batch_size = batch_size
        self.tok = models.load_tokenizer(self.model_dir)
        self.tok.padding_side = "left"
        self.model = models.load_causal_lm(self.model_dir, self.device)
        self._adapters: dict[str, Path] = {}
        self._lock = threading.RLock()
        self._closed = False

    # -- adapters ------------------------------------------------------------------------------
    def list_adapters(self) -> list[str]:
        return list(self._adapters)

    def load_adapter(self, name: str) -> None:
        info = self.registry.resolve(name)
        with self._lock:
            if info.name in self._adapters:
                return
            from peft import PeftModel
            try:
                if isinstance(self.model, PeftModel):
                    self.model.load_adapter(str(info.path), adapter_name=info.name)
                else:
                    self.model = PeftModel.from_pretrained(self.model, str(info.path), adapter_name=info.name)
            except Exception as e:  # wrong base, corrupt weights, ...
                raise EngineError(f"cannot load adapter {info.name!r} on {self.base_model}: {e}", str(info.path)) from None
            self.model.eval()
            self._adapters[info.name] = info.path

    def unload_adapter(self, name: str) -> None:
        name = self.registry.check_name(name)
        with self._lock:
            if name not in self._adapters:
                raise EngineError(f"adapter {name!r} is not loaded", "adapter")
            self.model.delete_adapter(name)
            del self._adapters[name]

    def _ensure(self, adapter: str | None) -> str:
        """Peft adapter name for a request (loading a registered adapter on first use)."""
        if adapter is None:
            return BASE
        adapter = self.registry.check_name(adapter)
        if adapter not in self._adapters:
            self.load_adapter(adapter)
        return adapter

    # -- prompts -------------------------------------------------------------------------------
    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of the chat prompt, exactly as vLLM builds it (template + generation prompt)."""
        text = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _gen_kwargs(self, cfg: DecodingConfig) -> dict:
        kw = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=self.tok.pad_token_id)
        if cfg.temperature > 0:
            kw.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if cfg.stop:
            kw.update(stop_strings=list(cfg.stop), tokenizer=self.tok)
        return kw

    def _adapter_kw(self, names: list[str]) -> dict:
        from peft import PeftModel
        if not isinstance(self.model, PeftModel):
            return {}
        return {"adapter_names": names}

    # -- generation ----------------------------------------------------------------------------
    def capacity(self) -> int:
        """One generate() batch: requests are served under one lock, so a larger window only queues."""
        return self.batch_size

    def generate_batch(self, requests: list[GenRequest]) -> list[GenResult]:
        """Group requests by decoding options; each group runs in left-padded batches of mixed adapters."""
        results: list[GenResult | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            try:
                cfg = resolve_decoding(r.decoding)
                self._ensure(r.adapter)
            except Exception as e:  # per-request error: the rest of the batch still runs
                results[i] = GenResult(text="", error=str(e))
                continue
            groups.setdefault((cfg.temperature, cfg.top_p, cfg.max_new_tokens, tuple(cfg.stop), cfg.seed), []).append(i)
        for idxs in groups.values():
            for s in range(0, len(idxs), self.batch_size):
                chunk = idxs[s:s + self.batch_size]
                for i, res in zip(chunk, self._run_batch([requests[i] for i in chunk])):
                    results[i] = res
        return results  # type: ignore[return-value]

    def _run_batch(self, reqs: list[GenRequest]) -> list[GenResult]:
        import torch
        cfg = resolve_decoding(reqs[0].decoding)
        want_lp = any(r.logprobs for r in reqs)
        prompts = [self.prompt_ids(r.messages) for r in reqs]
        names = [self._ensure(r.adapter) for r in reqs]
        width = max(len(p) for p in prompts)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        t0 = time.perf_counter()
        with self._lock, torch.inference_mode():
            if cfg.temperature > 0:
                torch.manual_seed(cfg.seed)
            out = self.model.generate(input_ids=ids, attention_mask=mask, **self._gen_kwargs(cfg),
                                      **self._adapter_kw(names), output_scores=want_lp,
                                      return_dict_in_generate=True)
        latency = time.perf_counter() - t0
        new = out.sequences[:, width:].tolist()
        step_lp = None
        if want_lp:
            step_lp = torch.stack(out.scores, 1).float().log_softmax(-1)  # [batch, steps, vocab]
        results = []
        gen_eos = self.model.generation_config.eos_token_id
        eos = {self.tok.eos_token_id, pad} | set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
        for b, (p, toks) in enumerate(zip(prompts, new)):
            n = next((k for k, t in enumerate(toks) if t in eos), None)
            finish = "stop" if n is not None else "length"
            toks = toks[:n] if n is not None else toks
            text, stopped = cut_at_stop(self.tok.decode(toks, skip_special_tokens=True), cfg.stop)
            if stopped:
                finish = "stop"
            extra = {}
            if reqs[b].logprobs and step_lp is not None:
                extra = {"token_ids": toks, "logprobs": [float(step_lp[b, k, t]) for k, t in enumerate(toks)]}
            results.append(GenResult(text=text, prompt_tokens=len(p), completion_tokens=len(toks),
                                     latency_s=latency, finish_reason=finish, extra=extra))
        return results

    def chat(self, messages: list[dict], adapter: str | None = None,
             decoding: DecodingConfig | None = None, info: dict | None = None) -> Iterator[str]:
        import torch
        from transformers import TextIteratorStreamer

        t0 = time.perf_counter()
        cfg = resolve_decoding(decoding)
        name = self._ensure(adapter)
        p = self.prompt_ids(messages)
        ids = torch.tensor([p], device=self.device)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True, timeout=300)
        errors: list[BaseException] = []
        counts: dict = {}

        def work():
            try:
                with self._lock, torch.inference_mode():
                    if cfg.temperature > 0:
                        torch.manual_seed(cfg.seed)
                    out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                                              **self._gen_kwargs(cfg), **self._adapter_kw([name]))
                new = out[0, ids.shape[1]:].tolist()
                gen_eos = self.model.generation_config.eos_token_id
                eos = {self.tok.eos_token_id} | set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
                n = next((k for k, t in enumerate(new) if t in eos), None)
                counts.update(prompt_tokens=len(p), completion_tokens=len(new) if n is None else n,
                              finish_reason="length" if n is None else "stop")
            except BaseException as e:  # surfaced to the reader below
                errors.append(e)
                streamer.end()

        worker = threading.Thread(target=work, name="hf-engine-chat", daemon=True)
        worker.start()
        # hold back the tail that could be the start of a stop string, so no stop text leaks out
        hold = max((len(s) for s in cfg.stop), default=0)
        buf, stopped = "", False
        for delta in streamer:
            buf += delta
            text, stopped = cut_at_stop(buf, cfg.stop)
            if stopped:
                if text:
                    yield text
                break
            if len(buf) > hold:
                emit, buf = (buf[:-hold], buf[-hold:]) if hold else (buf, "")
                yield emit
        if stopped:
            for _ in streamer:  # drain (generate stops at the same string) so the worker finishes
                pass
        elif buf:
            yield buf
        if errors:
            raise EngineError(f"generation failed: {errors[0]}", "hf") from errors[0]
        if info is not None:
            worker.join(timeout=60)  # the streamer ended: generate is returning its ids
            info.update(counts)
            if stopped:
                info["finish_reason"] = "stop"
            info["latency_s"] = time.perf_counter() - t0

    # -- parity / scoring ----------------------------------------------------------------------
    def score(self, messages: list[dict], completion_ids: list[int], adapter: str | None = None) -> dict:
        """Teacher-forced log-probs of ``completion_ids`` after the chat prompt.

        Returns ``{"logprobs": [...], "top1": [...], "margin": [...]}``: the log-prob of each given
        token, the reference's own argmax token at that step, and its top-1 minus top-2 log-prob.
        """
        import torch
        name = self._ensure(adapter)
        p = self.prompt_ids(messages)
        ids = torch.tensor([p + list(completion_ids)], device=self.device)
        with self._lock, torch.inference_mode():
            logits = self.model(input_ids=ids, **self._adapter_kw([name])).logits[0].float()
        lp = logits[len(p) - 1:len(p) - 1 + len(completion_ids)].log_softmax(-1)
        top2 = lp.topk(2, dim=-1)
        return {"logprobs": [float(lp[k, t]) for k, t in enumerate(completion_ids)],
                "top1": top2.indices[:, 0].tolist(),
                "margin": (top2.values[:, 0] - top2.values[:, 1]).tolist()}

    # -- lifecycle -----------------------------------------------------------------------------
    def health(self) -> dict:
        return {"ok": not self._closed, "engine": self.name, "state": "closed" if self._closed else "ready",
                "base_model": self.base_model, "device": self.device, "adapters": self.list_adapters()}

    def close(self) -> None:
        self._closed = True
