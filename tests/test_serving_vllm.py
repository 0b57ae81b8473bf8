"""The vLLM engine against a real vLLM CPU server (started once for this module), with adapters
trained in the test session (tests/conftest.py: serving_ws), and parity with transformers + peft."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sft_core.config import DecodingConfig, ServeConfig
from sft_core.serving import GenRequest, get_engine, load_all_adapters
from sft_core.serving.base import EngineError
from sft_core.serving.vllm_engine import VLLMEngine, free_port

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
    # a fixed port: the restart test checks the server comes back on it
    # max_lora_rank=0: auto, fitted to the workspace's adapters (rank 8 here -> 16, the auto minimum)
    cfg = ServeConfig(engine="vllm", max_loras=2, max_lora_rank=0, max_model_len=512, dtype="float32",
                      startup_timeout_s=400, port=free_port())
    eng = get_engine(str(tiny_model_dir), ws, st, cfg=cfg)
    args = eng._server.proc.args
    assert eng.cfg.max_lora_rank == 16 and args[args.index("--max-lora-rank") + 1] == "16"
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
    info: dict = {}
    streamed = list(vllm.chat(user("What is the secret?"), "run-banana", GREEDY, info=info))
    assert len(streamed) > 1 and "".join(streamed) == out[1].text
    # the Chat tab's per-answer line: the stream's own counts agree with the batched request's
    assert (info["prompt_tokens"], info["completion_tokens"], info["finish_reason"]) == \
        (out[1].prompt_tokens, out[1].completion_tokens, out[1].finish_reason)
    cut: dict = {}
    list(vllm.chat(user("What is the secret?"), "run-banana", DecodingConfig(temperature=0.0, max_new_tokens=2),
                   info=cut))
    assert cut["finish_reason"] == "length" and cut["completion_tokens"] == 2 and cut["latency_s"] > 0


def test_sampled_requests_split_over_prefill_steps_do_not_kill_the_cpu_engine(vllm):
    """vLLM's CPU build dies ("CPU Generator does not use offset") when a request with its own seed is
    sampled while its prefill is split over steps. Six ~400-token prompts at once (over 2,048 tokens together) overflow the
    CPU server's 2,048-token step budget, so some prefills are split; at temperature > 0 every request would
    carry the decoding seed. The engine leaves the seed out of sampled requests on a CPU build
    (serving/client.decoding_params); with it in, this test fails (checked by hand: every request errors)."""
    assert not vllm.cuda and vllm.endpoint.seeded is False
    long_q = "Tell me about " + " ".join(["apple"] * 380)
    sampled = DecodingConfig(temperature=0.8, max_new_tokens=4, seed=7)
    out = vllm.generate_batch([GenRequest(user(f"{k} {long_q}"), None, sampled) for k in range(6)])
    assert [r.error for r in out] == [None] * 6 and sum(r.prompt_tokens for r in out) > 2048, \
        [(r.error, r.prompt_tokens) for r in out]
    assert vllm.health()["ok"]


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


def _http(url, body=None, auth=None):
    """(status, parsed JSON or text) of a GET, or a POST when ``body`` is given."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": auth} if auth else {})}
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            code, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        code, text = e.code, e.read().decode()
    try:
        return code, json.loads(text)
    except ValueError:
        return code, text


def test_managed_server_refuses_requests_without_its_key(vllm, serving_ws):
    """The managed vLLM answers only the engine's own per-start random key: on /v1 (vLLM's check) and on
    the routes vLLM leaves open (RequireKey), e.g. SageMaker's POST /adapters, which loads any path."""
    ws, _ = serving_ws
    key, base = vllm._api_key, vllm.url
    assert key and len(key) >= 40
    path = str(ws.runs_dir("run-banana", "adapter"))
    q = user("What is the secret?")
    for auth in (None, "Bearer wrong-key", f"Basic {key}"):
        for route, body in [("/v1/models", None), ("/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": path}),
                            ("/v1/unload_lora_adapter", {"lora_name": "run-banana"}),
                            ("/v1/chat/completions", {"model": vllm.served_name, "messages": q, "max_tokens": 2}),
                            ("/adapters", {"name": "evil", "src": path}), ("/tokenize", {"prompt": "hi"}),
                            ("/invocations", {"model": vllm.served_name, "messages": q, "max_tokens": 2})]:
            code, _ = _http(f"{base}{route}", body, auth)
            assert code == 401, (route, auth, code)
    assert _http(f"{base}/health")[0] == 200  # only the health check is open
    code, models = _http(f"{base}/v1/models", auth=f"Bearer {key}")
    assert code == 200 and "evil" not in [m["id"] for m in models["data"]]
    code, body = _http(f"{base}/v1/load_lora_adapter", {"lora_name": "nope", "lora_path": "/nonexistent/adapter"},
                       f"Bearer {key}")
    assert code != 401 and "nope" not in vllm.list_adapters(), (code, body)  # past the key: vLLM's own answer
    # the engine's own calls carry the key
    vllm.load_adapter("run-banana")
    assert "banana" in "".join(vllm.chat(q, "run-banana", GREEDY)) and vllm.health()["ok"]
    # and it is in no log, command line or health report
    assert key not in vllm.log_path.read_text(errors="replace")
    for pid in (vllm.pid(), vllm._server.pgid):
        assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert key not in json.dumps(vllm.health()) and key not in repr(vllm.cfg)


def test_serve_front_over_vllm_serves_registered_adapters_only(vllm, serving_ws, tiny_model_dir, monkeypatch):
    """`sft-studio serve`'s front (the only port clients get) over an engine attached to the running vLLM."""
    import openai

    from sft_core.commands.serve import banner, start_front
    monkeypatch.setenv("SFT_STUDIO_ENGINE_API_KEY", vllm._api_key)  # attaching to it needs its key
    ws, st = serving_ws
    base = str(tiny_model_dir)
    eng = get_engine(base, ws, st, engine="vllm", url=vllm.url)  # attach: no second vLLM
    front = via_front = None
    try:
        loaded, _ = load_all_adapters(eng, base, st)
        assert loaded == ["run-banana", "run-kiwi"]
        front, url, model = start_front(eng, base)
        assert model == vllm.served_name and url != vllm.url
        text = banner(url, model, loaded)
        assert f"curl {url}/v1/chat/completions" in text and f'base_url="{url}/v1"' in text and vllm.url not in text

        code, h = _http(f"{url}/health")
        assert code == 200 and h["ok"] and h["mode"] == "attach"
        code, models = _http(f"{url}/v1/models")
        ids = [m["id"] for m in models["data"]]
        assert code == 200 and ids[0] == model and sorted(ids[1:]) == ["run-banana", "run-kiwi"]

        q = user("What is the secret?")
        direct = vllm.generate_batch([GenRequest(q, "run-banana", GREEDY)])[0].text
        assert "banana" in direct
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="EMPTY", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="run-banana", messages=q, temperature=0, max_tokens=12)
        assert r.choices[0].message.content == direct and r.usage.completion_tokens > 0
        chunks = client.chat.completions.create(model="run-banana", messages=q, temperature=0, max_tokens=12,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct
        r = client.chat.completions.create(model=model, messages=q, temperature=0, max_tokens=12)
        assert r.choices[0].message.content == vllm.generate_batch([GenRequest(q, None, GREEDY)])[0].text

        before = sorted(vllm.list_adapters())
        for bad, msg in [("../x", "looks like a path"), ("/tmp/x", "looks like a path"),
                         ("ghost", "unknown adapter 'ghost'"), ("run-pending", "only succeeded runs")]:
            for stream in (False, True):
                code, body = _http(f"{url}/v1/chat/completions", {"model": bad, "messages": q, "stream": stream})
                assert code == 400 and msg in body["error"]["message"], (bad, stream, code, body)
        for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            code, _ = _http(f"{url}{route}", {"lora_name": "evil", "lora_path": "/tmp/evil"})
            assert code in (404, 405), route
        assert sorted(vllm.list_adapters()) == before  # nothing reached vLLM

        # studio/evals can attach to the front like to vLLM: adapters are addressed by run id there
        via_front = get_engine(base, ws, st, engine="vllm", url=url)
        assert via_front.served_name == model
        via_front.load_adapter("run-banana")
        assert via_front.generate_batch([GenRequest(q, "run-banana", GREEDY)])[0].text == direct
    finally:
        if via_front is not None:
            via_front.close()
        if front is not None:
            front.close()
        eng.close()
    assert vllm.health()["ok"]


def test_restart_port_falls_back_only_when_the_configured_port_is_taken(caplog, monkeypatch):
    from sft_core.serving.supervisor import pick_port
    monkeypatch.setattr(time, "sleep", lambda s: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="sft_core.serving.supervisor"):
            other = pick_port(taken, restarts=1)
        assert other != taken and f"port {taken} is still taken" in caplog.text
        assert pick_port(taken, restarts=0) == taken  # at start-up the user's choice stands
    assert pick_port(taken, restarts=2) == taken  # free again: reused after a restart
    assert pick_port(0, restarts=0) != 0


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
    old_pid, restarts, old_url = vllm.pid(), vllm.restarts, vllm.url
    old_pgid, old_key = vllm._server.pgid, vllm._api_key
    assert old_url.endswith(f":{vllm.cfg.port}")
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
    assert vllm.url == old_url  # back on the configured port, not a random one
    assert sorted(vllm.list_adapters()) == ["run-banana", "run-kiwi"]  # reloaded on the new server
    assert vllm.generate_batch([GenRequest(user("hi"), "run-kiwi", GREEDY)])[0].text == expected
    with pytest.raises(ProcessLookupError):
        os.killpg(old_pgid, 0)  # nothing of the old server's process group survives
    assert vllm._api_key != old_key  # a fresh key per start; the old one opens nothing
    assert _http(f"{vllm.url}/v1/models", auth=f"Bearer {old_key}")[0] == 401


def test_attach_mode_uses_an_external_server(vllm, serving_ws, tiny_model_dir, monkeypatch):
    ws, st = serving_ws
    monkeypatch.setenv("SFT_STUDIO_ENGINE_API_KEY", vllm._api_key)
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


def test_auto_lora_rank_restarts_for_a_larger_adapter(monkeypatch):
    """Auto max_lora_rank: an adapter above the running rank restarts the server with the smallest rank
    vLLM accepts that fits it; a fixed rank refuses with a clear error. (Engine internals only: the
    server start is replaced, the real restart path is tested above with a killed server.)"""
    from sft_core.serving.adapter_manager import AdapterManager
    from sft_core.serving.adapters import AdapterInfo
    from sft_core.serving.vllm_engine import fit_rank, server_env
    assert [fit_rank(r) for r in (1, 8, 16, 17, 64, 65)] == [16, 16, 16, 32, 64, 128]
    big = AdapterInfo(name="run-big", path=Path("/ws/runs/run-big/adapter"), lora_id=3, rank=32, base_model="m")

    class Registry:
        def resolve(self, name):
            return big

    class Client:  # the server's client: every load succeeds
        root = "http://127.0.0.1:1"

        def post(self, route, json=None, timeout=None):
            return type("R", (), {"status_code": 200, "text": ""})()

    def engine(auto: bool) -> VLLMEngine:
        eng = VLLMEngine.__new__(VLLMEngine)
        eng.cfg = ServeConfig(max_lora_rank=16)
        eng.adapters = AdapterManager(Registry(), managed=True, max_rank=16, auto=auto, on_error=EngineError)
        eng.adapters.served_name = "m"
        monkeypatch.setattr(eng, "_restart", lambda reason: restarts.append((reason, eng.cfg.max_lora_rank)),
                            raising=False)
        monkeypatch.setattr(eng, "_ready", Client, raising=False)
        return eng

    restarts = []
    eng = engine(auto=True)
    eng.load_adapter("run-big")
    assert restarts == [("adapter 'run-big' has rank 32: --max-lora-rank 32", 32)] and "run-big" in eng.adapters.loaded
    assert eng.adapters.max_rank == 32  # the reload after that restart checks against the new rank
    eng = engine(auto=False)
    with pytest.raises(EngineError, match="rank 32 > max_lora_rank 16"):
        eng.load_adapter("run-big")
    assert len(restarts) == 1 and not eng.adapters.loaded
    # small CPU machines compute on every core (vLLM would reserve one for its scheduler)
    monkeypatch.delenv("VLLM_CPU_NUM_OF_RESERVED_CPU", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert server_env(ServeConfig(), cuda=False)["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in server_env(ServeConfig(), cuda=False)
