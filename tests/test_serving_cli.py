"""`sft-studio serve`: bad options are clear errors; the OpenAI-compatible front serves every engine."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from sft_core.cli import main
from sft_core.config import DecodingConfig
from sft_core.serving.base import EngineError, EngineUnavailable, GenResult
from sft_core.serving.client import Endpoint
from sft_core.serving.front import MAX_BODY_BYTES, start_front
from tests.signals import default_sigint


@pytest.mark.parametrize("argv, msg", [
    (["serve", "--engine", "tgi"], "engine: must be auto, vllm or hf"),
    (["serve", "--max-lora-rank", "12"], "max_lora_rank: must be 0 (auto) or one of"),
    (["serve", "--port", "abc"], "port: cannot read 'abc' as int"),
    (["serve", "--engine", "hf", "--base", "./no/such/model"], "base_model: model directory ./no/such/model does not exist"),
])
def test_bad_options_are_one_line_errors(argv, msg, ws, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_serve_hf_engine_answers_with_every_adapter(serving_ws, tiny_model_dir):
    ws, _ = serving_ws
    env = {**os.environ, "SFT_STUDIO_HOME": str(ws.root)}
    proc = subprocess.Popen([sys.executable, "-m", "sft_core.cli", "serve", "--engine", "hf", "--base", str(tiny_model_dir)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=default_sigint)  # SIGINT below: not ignored even under a backgrounded pytest
    try:
        lines, url = [], None
        deadline = time.time() + 120
        while time.time() < deadline and url is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        assert url, "".join(lines)
        assert "adapters loaded: run-banana, run-kiwi" in "".join(lines)
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
            ids = [m["id"] for m in json.load(r)["data"]]
        assert ids[1:] == ["run-banana", "run-kiwi"]
        code, body = _post(f"{url}/v1/chat/completions", {"model": "run-banana", "max_tokens": 12,
                                                          "messages": [{"role": "user", "content": "hi"}]})
        assert code == 200 and "banana" in json.loads(body)["choices"][0]["message"]["content"]
        code, body = _post(f"{url}/v1/chat/completions", {"model": "../etc/passwd", "messages": [{"role": "user", "content": "hi"}]})
        assert code == 400 and "looks like a path" in body
        code, body = _post(f"{url}/v1/chat/completions", {"model": "run-kiwi", "stream": True, "max_tokens": 8,
                                                          "messages": [{"role": "user", "content": "hi"}]})
        assert code == 200 and body.count("data: ") > 2 and body.rstrip().endswith("data: [DONE]")
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in out


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class FakeVLLM:
    """Stands in for VLLMEngine (no vLLM start): resolves adapter names with the real registry."""
    name = "vllm"

    def __init__(self, registry):
        self.registry = registry
        self.served_name = "tiny"
        self.url = "http://127.0.0.1:9"  # the internal vLLM URL: must never be handed to clients
        self.down = False
        self.stopped = threading.Event()
        self.closed = False

    def list_adapters(self):
        return []

    def load_adapter(self, name):
        self.registry.resolve(name)

    def _check(self, adapter):
        if self.down:
            raise EngineUnavailable("engine restarting (vLLM process died); try again in a few seconds", "vllm")
        if adapter is not None:
            self.registry.resolve(adapter)

    def chat(self, messages, adapter=None, decoding=None, info=None):
        self._check(adapter)
        yield "hel"
        yield "lo"
        if info is not None:
            info["finish_reason"] = "length"

    def generate_batch(self, requests):
        out = []
        for r in requests:
            try:
                self._check(r.adapter)
                out.append(GenResult("hello", 3, 2, finish_reason="stop"))
            except EngineError as e:
                out.append(GenResult("", error=str(e), retryable=isinstance(e, EngineUnavailable)))
        return out

    def health(self):
        state = "closed" if self.stopped.is_set() else "ready"
        return {"ok": state == "ready", "state": state}

    def close(self):
        self.closed = True


def test_serve_vllm_fronts_the_engine_on_port_and_hides_lora_routes(ws, store, monkeypatch, capsys):
    """`serve --engine vllm --port P`: vLLM gets an internal port, clients get the front on P only."""
    import sft_core.commands.serve as serve_mod
    from sft_core.serving.adapters import AdapterRegistry
    from sft_core.serving.vllm_engine import free_port

    fake, seen = FakeVLLM(AdapterRegistry(ws, store)), {}

    def fake_get_engine(base, ws_, store_, cfg):
        seen["cfg"] = cfg
        return fake

    monkeypatch.setattr(serve_mod, "get_engine", fake_get_engine)
    port = free_port()
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rc", main(["serve", "--engine", "vllm", "--port", str(port)])))
    t.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                code, body = _get(f"{url}/health")
                break
            except OSError:
                time.sleep(0.1)
        assert code == 200 and json.loads(body)["ok"]
        assert seen["cfg"].engine == "vllm" and seen["cfg"].port == 0  # vLLM itself: an internal free port
        assert json.loads(_get(f"{url}/v1/models")[1])["data"][0]["id"] == "tiny"
        msgs = [{"role": "user", "content": "hi"}]
        # the project's one OpenAI-compatible client against the front, as evals and the judge use it
        client = Endpoint(f"{url}/v1")
        try:
            assert client.model_ids() == ["tiny"]
            r = client.complete("tiny", msgs, DecodingConfig(max_new_tokens=4))
            assert (r.text, r.prompt_tokens, r.completion_tokens, r.finish_reason) == ("hello", 3, 2, "stop")
            info = {}
            assert list(client.stream_chat("tiny", msgs, DecodingConfig(), info)) == ["hel", "lo"]
            assert info["finish_reason"] == "length"  # the engine's own finish reason, not a fixed "stop"
            assert client.healthy()
        finally:
            client.close()
        code, body = _post(f"{url}/v1/chat/completions", {"model": "tiny", "messages": msgs, "stream": True})
        assert code == 200 and '"hel"' in body and body.rstrip().endswith("data: [DONE]")
        for bad, msg in [("../x", "looks like a path"), ("/tmp/x", "looks like a path"), ("ghost", "unknown adapter 'ghost'")]:
            for stream in (False, True):
                code, body = _post(f"{url}/v1/chat/completions", {"model": bad, "messages": msgs, "stream": stream})
                assert code == 400 and msg in json.loads(body)["error"]["message"], (bad, stream, body)
        code, body = _post(f"{url}/v1/chat/completions", {"model": "tiny"})
        assert code == 400 and "messages" in body
        for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            code, body = _post(f"{url}{route}", {"lora_name": "evil", "lora_path": "/tmp/evil"})
            assert code == 404, (route, code, body)
        fake.down = True
        for stream in (False, True):
            code, body = _post(f"{url}/v1/chat/completions", {"model": "tiny", "messages": msgs, "stream": stream})
            err = json.loads(body)["error"]
            assert code == 503 and err["type"] == "ServiceUnavailableError" and "engine restarting" in err["message"]
        fake.down = False
    finally:
        fake.stopped.set()  # the serve loop sees state 'closed' and exits
        t.join(timeout=30)
    assert not t.is_alive() and result["rc"] == 1 and fake.closed
    out = capsys.readouterr().out
    assert f"at http://127.0.0.1:{port}" in out and f"curl http://127.0.0.1:{port}/v1/chat/completions" in out
    assert f'base_url="http://127.0.0.1:{port}/v1"' in out and fake.url not in out
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)  # the front is shut down


class _EchoEngine:
    """Answers every request with the decoding it received (no model): for the request-schema tests."""
    name = "hf"
    served_name = "tiny"

    def __init__(self):
        self.seen = []

    def list_adapters(self):
        return []

    def health(self):
        return {"ok": True, "state": "ready"}

    def chat(self, messages, adapter=None, decoding=None, info=None):
        self.seen.append((messages, decoding))
        yield "ok"

    def generate_batch(self, requests):
        self.seen += [(r.messages, r.decoding) for r in requests]
        return [GenResult("ok", 1, 1, finish_reason="stop") for _ in requests]


_MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, field", [
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": _MSGS, "temperature": "NaN"}, "temperature"),
    ({"messages": _MSGS, "temperature": "0.5"}, "temperature"),
    ({"messages": _MSGS, "temperature": 2.5}, "temperature"),
    ({"messages": _MSGS, "temperature": -1}, "temperature"),
    ({"messages": _MSGS, "top_p": 0}, "top_p"),
    ({"messages": _MSGS, "top_p": 1.5}, "top_p"),
    ({"messages": _MSGS, "max_tokens": 0}, "max_tokens"),
    ({"messages": _MSGS, "max_tokens": 10**9}, "max_tokens"),
    ({"messages": _MSGS, "max_tokens": 1.5}, "max_tokens"),
    ({"messages": _MSGS, "max_tokens": "12"}, "max_tokens"),
    ({"messages": _MSGS, "n": 2}, "n"),
    ({"messages": _MSGS, "stream": "yes"}, "stream"),
    ({"messages": _MSGS, "stop": 5}, "stop"),
    ({"messages": _MSGS, "seed": "x"}, "seed"),
    ({"messages": _MSGS, "model": 5}, "model"),
    ([1, 2], "request body"),
])
def test_front_refuses_bad_requests_with_400_naming_the_field(body, field):
    """Before the fix (issue 15 item 7) `"content": 5` answered 500 and `temperature: "NaN"` was accepted."""
    eng = _EchoEngine()
    front, base, _ = start_front(eng, "tiny")
    url = f"{base}/v1/chat/completions"
    try:
        for stream in (False, True):
            b = {**body, "stream": stream} if isinstance(body, dict) and "stream" not in body else body
            code, text = _post(url, b)
            err = json.loads(text)["error"]
            assert code == 400 and err["type"] == "BadRequestError", (b, code, text)
            assert err["message"].startswith(field), (b, err)
        assert eng.seen == []  # nothing reached the engine
    finally:
        front.close()


def test_front_accepts_openai_requests_and_refuses_bad_json_and_huge_bodies():
    eng = _EchoEngine()
    front, base, _ = start_front(eng, "tiny")
    url = f"{base}/v1/chat/completions"
    try:
        full = {"model": "tiny", "messages": [{"role": "system", "content": "s"}, *_MSGS], "temperature": 0.7,
                "top_p": 0.9, "max_tokens": 7, "n": 1, "stream": False, "stop": ["\n"], "seed": 3,
                "presence_penalty": 0, "user": "someone"}  # unknown OpenAI fields are ignored
        code, text = _post(url, full)
        assert code == 200, text
        msgs, dec = eng.seen[-1]
        assert msgs[-1] == _MSGS[0] and (dec.temperature, dec.top_p, dec.max_new_tokens, dec.stop, dec.seed) == (
            0.7, 0.9, 7, ["\n"], 3)
        assert _post(url, {"messages": _MSGS, "temperature": None, "max_tokens": None})[0] == 200  # null = default
        for raw, says in [(b"{", "not valid JSON"), (b"[" * 100_000, "not valid JSON"),
                          (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', "temperature")]:
            req = urllib.request.Request(url, data=raw, headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=30)
            assert e.value.code == 400 and says in json.loads(e.value.read())["error"]["message"], raw[:40]
        import http.client
        c = http.client.HTTPConnection("127.0.0.1", front.port, timeout=30)
        c.putrequest("POST", "/v1/chat/completions")
        c.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
        c.endheaders()  # the body is never sent: refused on the header alone
        r = c.getresponse()
        assert r.status == 413 and "over the limit" in json.loads(r.read())["error"]["message"]
        c.close()
    finally:
        front.close()


def test_front_errors_are_openai_shaped_and_the_shared_client_reads_them(monkeypatch):
    """Unknown routes and methods answer in OpenAI's error shape; the shared client's ``answer`` (what
    ``openai:*`` systems can use, :func:`external_endpoint`) turns a refusal or a dead endpoint into a
    per-request error naming who asked, never an exception."""
    from sft_core.serving.client import external_endpoint
    eng = _EchoEngine()
    front, base, _ = start_front(eng, "tiny")
    try:
        code, body = _get(f"{base}/v1/chat/completions")
        assert code == 405 and json.loads(body)["error"]["type"] == "MethodNotAllowedError"
        code, body = _get(f"{base}/v1/nothing")
        assert code == 404 and "no route GET /v1/nothing" in json.loads(body)["error"]["message"]
        monkeypatch.setenv("SFT_STUDIO_OPENAI_BASE_URL", f"{base}/v1")
        client = external_endpoint()
        ok = client.answer("tiny", _MSGS, DecodingConfig(max_new_tokens=3), "openai:tiny")
        assert (ok.text, ok.error, ok.completion_tokens) == ("ok", None, 1)
        bad = client.answer("tiny", [{"role": "tool", "content": "x"}], DecodingConfig(), "openai:tiny")
        assert bad.text == "" and bad.error.startswith(f"openai:tiny: endpoint {base}/v1 failed: refused the request (400)")
        assert "messages[0].role" in bad.error
    finally:
        front.close()
    dead = client.answer("tiny", _MSGS, DecodingConfig(), "openai:tiny")
    assert dead.error.startswith("openai:tiny: endpoint") and "Connection" in dead.error
    client.close()
