"""Concurrent visitors: N visitors chat at once through the app's HTTP API, against one visitor alone.

    python bench/concurrent_visitors.py [--visitors 8] [--tokens 48] [--engine vllm|hf] [--model NAME|DIR]
                                        [--compare-limit-1]

Starts the real app (``python app.py``, no admin password) in a temporary workspace, lets the first chat
start the engine (not timed), then measures in the same run:

* single: one visitor (one gradio_client session) sends a prompt-only chat and reads the whole answer;
  median wall time of 3 tries;
* concurrent: ``--visitors`` sessions send the same chat at the same moment; wall time until the last
  answer is complete (each visitor's own clock, from the gate to its whole answer), median of 3 rounds,
  plus each visitor's time to its first token;
* the engine alone: the same chat sent straight to the app's vLLM server, 1 against N, so the app's own
  share of the ratio is visible.

Every visitor asks the same question at temperature 0, so each does the same work. The last line reads
``concurrent/single R`` (wall-time ratio, two decimals): close to 1 when the engine batches the visitors,
about N when they are served one at a time. ``--compare-limit-1`` also runs the app with
SFT_STUDIO_CHAT_CONCURRENCY=1 (Gradio's old default of one event at a time) and prints its ratio first.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUESTION = "In two sentences, what is a Python list comprehension?"
CLIENT = "http"  # set by --client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(home: Path, engine: str, model: str, env_extra: dict) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    env = {**os.environ, "SFT_STUDIO_HOME": str(home), "SFT_STUDIO_ENGINE": engine, "SFT_STUDIO_BASE_MODEL": model,
           "SFT_STUDIO_SKIP_EXAMPLE": "1", "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", **env_extra}
    if (REPO / ".cache" / "models").is_dir():
        env.setdefault("SFT_STUDIO_MODEL_CACHE", str(REPO / ".cache" / "models"))
    log = home.parent / f"app-{port}.log"
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.time() + 300
    while time.time() < end:
        if proc.poll() is not None:
            raise SystemExit(f"app exited:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2):
                return proc, url, log
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("app did not become healthy in 300 s")


def chat_args(tokens: int) -> tuple:
    # message, 4 systems, knowledge base, temperature, max new tokens, 4 chat histories
    return (QUESTION, "prompt", None, None, None, None, 0.0, tokens, [], [], [], [])


def one_visitor(url: str, tokens: int, start: threading.Event | None = None) -> dict:
    return (one_visitor_http if CLIENT == "http" else one_visitor_gradio_client)(url, tokens, start)


def one_visitor_http(url: str, tokens: int, start: threading.Event | None = None) -> dict:
    """A visitor as Gradio's documented HTTP API sees it: POST ``/gradio_api/call/chat_send`` (an event id),
    then read that event's server-sent events until ``complete``. Lighter on the client side than
    gradio_client (which keeps a session, applies diffs and runs threads of its own), so on a 2-core machine
    where client and server share the cores the ratio measures the server more than the client."""
    import json
    import httpx
    with httpx.Client(base_url=url, timeout=300) as http:
        if start is not None:
            start.wait()
        t0 = time.perf_counter()
        event_id = http.post("/gradio_api/call/chat_send", json={"data": list(chat_args(tokens))}).json()["event_id"]
        first, event, result = None, None, None
        with http.stream("GET", f"/gradio_api/call/chat_send/{event_id}") as resp:
            for line in resp.iter_lines():
                if line.startswith("event: "):
                    event = line[7:].strip()
                elif line.startswith("data: ") and event in ("generating", "complete", "error"):
                    data = json.loads(line[6:])
                    if event == "error":
                        raise SystemExit(f"chat failed: {data!r}")
                    if first is None and isinstance(data, list) and data and _text(data):
                        first = time.perf_counter() - t0
                    if event == "complete":
                        result = data
                        break
        wall = time.perf_counter() - t0
    text = _text(result)
    if not text or "⚠️" in text:
        raise SystemExit(f"chat failed: {text!r}")
    return {"wall": wall, "first": first if first is not None else wall, "chars": len(text)}


def one_visitor_gradio_client(url: str, tokens: int, start: threading.Event | None = None) -> dict:
    from gradio_client import Client
    c = Client(url + "/", verbose=False)
    try:
        if start is not None:
            start.wait()
        t0 = time.perf_counter()
        job = c.submit(*chat_args(tokens), api_name="/chat_send")
        first = None
        while not job.done():
            outs = job.outputs()
            if first is None and outs and _text(outs[-1]):
                first = time.perf_counter() - t0
            time.sleep(0.05)  # the visitors' own polling must not take the 2 cores the server needs
        result = job.result()
        wall = time.perf_counter() - t0
        text = _text(result)
        if not text or "⚠️" in text:
            raise SystemExit(f"chat failed: {text!r}")
        return {"wall": wall, "first": first if first is not None else wall, "chars": len(text)}
    finally:
        c.close()


def _text(outputs) -> str:
    hist = outputs[0] if outputs else []
    if not hist or not isinstance(hist, list):  # a skipped output (gr.skip) is not a history
        return ""
    content = hist[-1].get("content") if isinstance(hist[-1], dict) else hist[-1]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


def measure(url: str, visitors: int, tokens: int, rounds: int = 3) -> tuple[float, float, list[dict]]:
    """Median single-visitor wall time and median N-visitor wall time over ``rounds`` each (one shot of
    each is too noisy on a 2-core machine: the engine's threads and the server share the cores)."""
    one_visitor(url, tokens)  # starts the engine and warms it: not timed
    single = statistics.median(one_visitor(url, tokens)["wall"] for _ in range(rounds))
    walls, every = [], []
    for _ in range(rounds):
        start = threading.Event()
        results: list[dict] = []
        threads = [threading.Thread(target=lambda: results.append(one_visitor(url, tokens, start)))
                   for _ in range(visitors)]
        for t in threads:
            t.start()
        time.sleep(2.0)  # every client has connected and waits at the gate
        start.set()
        for t in threads:
            t.join()
        if len(results) != visitors:
            raise SystemExit(f"only {len(results)} of {visitors} visitors got an answer")
        # Each visitor's own wall time runs from the gate to its complete answer, as the single visitor's
        # does; closing the client afterwards (gradio_client's threads) is not what a visitor waits for.
        walls.append(max(r["wall"] for r in results))
        every += results
    return single, statistics.median(walls), every


def engine_direct(home: Path, visitors: int, tokens: int) -> tuple[float, float]:
    """The engine's own ratio: the same chat sent straight to the app's vLLM server (URL and per-start key
    from ``run/engine.json``), one request against ``visitors`` at once, streamed like the app streams.
    What the app adds on top of this is its own overhead; this part is the engine's batching on this CPU."""
    import json
    from openai import OpenAI
    link = json.loads((home / "run" / "engine.json").read_text())
    client = OpenAI(base_url=link["url"].rstrip("/") + "/v1", api_key=link["api_key"] or "none")
    model = client.models.list().data[0].id
    from evals.systems import DEFAULT_SYSTEM_PROMPT as SYSTEM_PROMPT  # the prompt-only system's

    def one(start: threading.Event | None = None) -> float:
        if start is not None:
            start.wait()
        t0 = time.perf_counter()
        stream = client.chat.completions.create(
            model=model, messages=[{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": QUESTION}],
            temperature=0.0, max_tokens=tokens, stream=True)
        for _ in stream:
            pass
        return time.perf_counter() - t0

    one()
    single = statistics.median(one() for _ in range(3))
    walls = []
    for _ in range(3):
        start = threading.Event()
        threads = [threading.Thread(target=one, args=(start,)) for _ in range(visitors)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        t0 = time.perf_counter()
        start.set()
        for t in threads:
            t.join()
        walls.append(time.perf_counter() - t0)
    return single, statistics.median(walls)


def run(args, env_extra: dict, label: str) -> float:
    with tempfile.TemporaryDirectory(prefix="sft-visitors-") as tmp:
        proc, url, log = start_app(Path(tmp) / "home", args.engine, args.model, env_extra)
        try:
            single, concurrent, res = measure(url, args.visitors, args.tokens)
            if args.engine == "vllm":
                e1, en = engine_direct(Path(tmp) / "home", args.visitors, args.tokens)
                print(f"[{label}] engine alone (no app): single {e1:.2f} s; {args.visitors} at once {en:.2f} s; "
                      f"ratio {en / e1:.2f}", flush=True)
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    firsts = sorted(r["first"] for r in res)
    ratio = concurrent / single
    print(f"[{label}] single visitor: {single:.2f} s; {args.visitors} visitors at once: {concurrent:.2f} s "
          f"(first token: median {statistics.median(firsts):.2f} s, worst {firsts[-1]:.2f} s); "
          f"ratio {ratio:.2f}", flush=True)
    return ratio


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--visitors", type=int, default=8)
    p.add_argument("--tokens", type=int, default=48, help="max new tokens per answer (the UI's slider: 16..1024)")
    p.add_argument("--engine", default="vllm", choices=["vllm", "hf"])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--compare-limit-1", action="store_true")
    p.add_argument("--client", default="http", choices=["http", "gradio_client"],
                   help="how each visitor talks to the app: Gradio's plain HTTP API (SSE) or gradio_client")
    args = p.parse_args(argv)
    global CLIENT
    CLIENT = args.client
    print(f"engine {args.engine}, model {args.model}, {os.cpu_count()} CPUs, {args.visitors} visitors, "
          f"{args.tokens} tokens, client {args.client}", flush=True)
    if args.compare_limit_1:
        run(args, {"SFT_STUDIO_CHAT_CONCURRENCY": "1"}, "one event at a time (old default)")
    ratio = run(args, {}, "as configured")
    print(f"concurrent/single {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
