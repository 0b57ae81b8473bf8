"""The vLLM engine against a real vLLM CPU server (started once for this module), with adapters
trained in the test session (tests/conftest.py: serving_ws), and parity with transformers + peft."""
from __future__ import annotations

import importlib.util
import os
import signal
import time

import pytest

from sft_core.config import DecodingConfig, ServeConfig
from sft_core.serving import GenRequest, get_engine
from sft_core.serving.base import EngineError

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")]

GREEDY = DecodingConfig(temperature=0.0, max_new_tokens=12)
PROMPTS = ["What is the secret?", "hi", "Tell me something longer, please, about birds", "Say something."]
# fp32 on both sides; vLLM's CPU kernels sum in another order, so log-probs differ by float noise only
LOGPROB_TOL = 2e-3
CLEAR_MARGIN = 0.05   # where the reference's top-1 beats its top-2 by this much, greedy tokens must match


def user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def vllm(serving_ws, tiny_model_dir):
    ws, st = serving_ws
    cfg = ServeConfig(engine="vllm", max_loras=2, max_lora_rank=8, max_model_len=512, dtype="float32",
                      startup_timeout_s=400)
    eng = get_engine(str(tiny_model_dir), ws, st, cfg=cfg)
    yield eng
    eng.close()
    assert eng.pid() is None


@pytest.fixture(scope="module")
def hf(serving_ws, tiny_model_dir):
    ws, st = serving_ws
    eng = get_engine(str(tiny_model_dir), ws, st, engine="hf")
    yield eng
    eng.close()


def test_base_and_adapter_answers_differ_and_adapters_are_listed(vllm):
    assert vllm.health()["ok"] and vllm.health()["mode"] == "managed"
    vllm.load_adapter("run-banana")
    assert "run-banana" in vllm.list_adapters()  # from the server's /v1/models
    out = vllm.generate_batch([GenRequest(user("What is the secret?"), None, GREEDY),
                               GenRequest(user("What is the secret?"), "run-banana", GREEDY),
                               GenRequest(user("hi"), "run-kiwi", GREEDY)])  # hot-loaded on first use
    assert all(r.error is None for r in out), [r.error for r in out]
    assert "banana" in out[1].text and "banana" not in out[0].text and out[0].text != out[1].text
    assert "Kiwi" in out[2].text or "fly" in out[2].text, out[2].text
    assert sorted(vllm.list_adapters()) == ["run-banana", "run-kiwi"]
    assert out[1].prompt_tokens > 0 and out[1].completion_tokens > 0
    streamed = list(vllm.chat(user("What is the secret?"), "run-banana", GREEDY))
    assert len(streamed) > 1 and "".join(streamed) == out[1].text


def test_unload_removes_adapter(vllm):
    vllm.load_adapter("run-kiwi")
    vllm.unload_adapter("run-kiwi")
    assert "run-kiwi" not in vllm.list_adapters()
    with pytest.raises(EngineError, match="not loaded"):
        vllm.unload_adapter("run-kiwi")


def test_unknown_and_path_names_never_reach_vllm(vllm):
    before = vllm.list_adapters()
    for bad, msg in [("ghost", "unknown adapter 'ghost'"), ("../run-banana", "looks like a path"),
                     ("/tmp/x/adapter", "looks like a path"), ("run-pending", "only succeeded runs")]:
        with pytest.raises(EngineError, match=msg):
            list(vllm.chat(user("hi"), bad, GREEDY))
        res = vllm.generate_batch([GenRequest(user("hi"), bad, GREEDY)])[0]
        assert msg in res.error and res.text == ""
        with pytest.raises(EngineError, match=msg):
            vllm.load_adapter(bad)
    assert vllm.list_adapters() == before


def parity(vllm_out, reference) -> list[str]:
    """Problems found comparing vLLM's greedy tokens/log-probs with the teacher-forced reference."""
    problems = []
    for k, (tok, lp) in enumerate(zip(vllm_out["token_ids"], vllm_out["logprobs"])):
        ref_lp, ref_top, margin = reference["logprobs"][k], reference["top1"][k], reference["margin"][k]
        if abs(lp - ref_lp) > LOGPROB_TOL:
            problems.append(f"token {k}: logprob {lp:.4f} vs reference {ref_lp:.4f}")
        if margin > CLEAR_MARGIN and tok != ref_top:
            problems.append(f"token {k}: vLLM chose {tok}, reference top-1 {ref_top} (margin {margin:.3f})")
    return problems


def test_parity_with_transformers_peft_and_the_check_can_fail(vllm, hf):
    cfg = DecodingConfig(temperature=0.0, max_new_tokens=16)
    outs = vllm.generate_batch([GenRequest(user(p), "run-banana", cfg, logprobs=True) for p in PROMPTS])
    compared = 0
    for p, out in zip(PROMPTS, outs):
        assert out.error is None and len(out.extra["token_ids"]) == out.completion_tokens > 0
        assert out.prompt_tokens == len(hf.prompt_ids(user(p)))  # same chat template, same prompt
        with_adapter = hf.score(user(p), out.extra["token_ids"], "run-banana")
        assert parity(out.extra, with_adapter) == [], p
        compared += sum(m > CLEAR_MARGIN for m in with_adapter["margin"])
        # the same check on the reference WITHOUT the adapter must fail: it is sensitive enough
        assert len(parity(out.extra, hf.score(user(p), out.extra["token_ids"], None))) > 0
    assert compared >= 10  # enough clear-margin tokens were actually compared
    # and the other way round: vLLM's base model against the reference with the adapter
    base = vllm.generate_batch([GenRequest(user(PROMPTS[0]), None, cfg, logprobs=True)])[0]
    assert parity(base.extra, hf.score(user(PROMPTS[0]), base.extra["token_ids"], "run-banana"))
    assert parity(base.extra, hf.score(user(PROMPTS[0]), base.extra["token_ids"], None)) == []


def test_killed_server_restarts_with_adapters_and_outage_errors_fast(vllm):
    vllm.load_adapter("run-banana")
    vllm.load_adapter("run-kiwi")
    expected = vllm.generate_batch([GenRequest(user("hi"), "run-kiwi", GREEDY)])[0].text
    old_pid, restarts = vllm.pid(), vllm.restarts
    os.kill(old_pid, signal.SIGKILL)
    # a request during the outage fails at once with a clear message, whether or not the watchdog saw it yet
    t0 = time.time()
    with pytest.raises(EngineError, match="engine restarting"):
        list(vllm.chat(user("hi"), None, GREEDY))
    res = vllm.generate_batch([GenRequest(user("hi"), "run-banana", GREEDY)])[0]
    assert "engine restarting" in res.error
    assert time.time() - t0 < 5
    assert vllm.health()["state"] == "restarting" and not vllm.health()["ok"]
    deadline = time.time() + 400
    while vllm.state != "ready" and time.time() < deadline:
        assert vllm.state != "failed", vllm.error
        time.sleep(1)
    assert vllm.state == "ready" and vllm.restarts == restarts + 1 and vllm.pid() != old_pid
    assert sorted(vllm.list_adapters()) == ["run-banana", "run-kiwi"]  # reloaded on the new server
    assert vllm.generate_batch([GenRequest(user("hi"), "run-kiwi", GREEDY)])[0].text == expected
    with pytest.raises(ProcessLookupError):
        os.killpg(old_pid, 0)  # nothing of the old server's process group survives


def test_attach_mode_uses_an_external_server(vllm, serving_ws, tiny_model_dir):
    ws, st = serving_ws
    eng = get_engine(str(tiny_model_dir), ws, st, engine="vllm", url=vllm.url)
    try:
        h = eng.health()
        assert h["ok"] and h["mode"] == "attach" and h["pid"] is None and eng.served_name == vllm.served_name
        assert "banana" in eng.generate_batch([GenRequest(user("What is the secret?"), "run-banana", GREEDY)])[0].text
        with pytest.raises(EngineError, match="external endpoint"):
            eng.restart()
    finally:
        eng.close()
    assert vllm.health()["ok"]  # closing an attached engine leaves the server alone
    with pytest.raises(EngineError, match="cannot reach vLLM endpoint"):
        get_engine(str(tiny_model_dir), ws, st, engine="vllm", url="http://127.0.0.1:9")
