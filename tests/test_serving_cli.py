"""`sft-studio serve`: bad options are clear errors; the transformers engine serves an OpenAI API."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from sft_core.cli import main


@pytest.mark.parametrize("argv, msg", [
    (["serve", "--engine", "tgi"], "engine: must be auto, vllm or hf"),
    (["serve", "--max-lora-rank", "12"], "max_lora_rank: must be one of"),
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
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
