"""`sft-studio serve [--base MODEL] [--port P] [--engine vllm|hf]`: the engine in the foreground.

Every finished run's adapter (trained on the same base) is loaded up front; the command prints a
copy-paste ``curl`` and ``openai`` example and runs until Ctrl-C. With vLLM the OpenAI API is vLLM's
own server; with the transformers engine a small OpenAI-compatible HTTP server (chat completions,
streaming or not, and ``/v1/models``) runs in this process.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sft_core import StudioError
from sft_core.config import DecodingConfig, ServeConfig, StudioSettings, add_arguments, load_config, overrides_from_args
from sft_core.serving import get_engine, load_all_adapters
from sft_core.serving.base import EngineError
from sft_core.store import open_store
from sft_core.workspace import Workspace


def example(url: str, model: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64})
    return (f"curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'\n\n"
            f"python - <<'EOF'\nfrom openai import OpenAI\nclient = OpenAI(base_url=\"{url}/v1\", api_key=\"EMPTY\")\n"
            f"r = client.chat.completions.create(model=\"{model}\", messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}])\n"
            f"print(r.choices[0].message.content)\nEOF")


def decoding_from_openai(body: dict) -> DecodingConfig:
    stop = body.get("stop") or []
    return load_config(DecodingConfig, overrides={
        "temperature": body.get("temperature", 0.0), "top_p": body.get("top_p", 1.0),
        "max_new_tokens": body.get("max_tokens") or body.get("max_completion_tokens") or 256,
        "stop": [stop] if isinstance(stop, str) else list(stop), "seed": body.get("seed") or 0})


def make_http_server(engine, port: int, served_name: str) -> ThreadingHTTPServer:
    """A minimal OpenAI-compatible front for an in-process engine (the transformers fallback)."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt, *args):  # quiet; errors are returned to the client
            pass

        def _json(self, code: int, obj: dict) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                return self._json(200, engine.health())
            if self.path == "/v1/models":
                ids = [served_name] + engine.list_adapters()
                return self._json(200, {"object": "list", "data": [
                    {"id": i, "object": "model", "parent": None if i == served_name else served_name} for i in ids]})
            self._json(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                return self._json(404, {"error": {"message": f"no route {self.path}"}})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                model = body.get("model") or served_name
                adapter = None if model == served_name else model
                cfg = decoding_from_openai(body)
                cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
                if body.get("stream"):
                    deltas = engine.chat(body["messages"], adapter, cfg)
                    first = next(deltas, None)  # errors surface before the 200 is sent
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    for d in ([first] if first is not None else []) + list(deltas):
                        chunk = {"id": cid, "object": "chat.completion.chunk", "model": model,
                                 "choices": [{"index": 0, "delta": {"content": d}, "finish_reason": None}]}
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()
                    self.wfile.write(b"data: [DONE]\n\n")
                    return
                from sft_core.serving.base import GenRequest
                r = engine.generate_batch([GenRequest(body["messages"], adapter, cfg)])[0]
                if r.error:
                    raise EngineError(r.error)
                self._json(200, {"id": cid, "object": "chat.completion", "model": model, "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": r.finish_reason}],
                    "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                              "total_tokens": r.prompt_tokens + r.completion_tokens}})
            except (StudioError, KeyError, ValueError) as e:
                self._json(400, {"error": {"message": str(e), "type": "BadRequestError"}})

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def cmd_serve(args) -> int:
    settings = StudioSettings.from_env()
    ws = Workspace.from_env()
    store = open_store(settings.db_url or ws.db_url)
    overrides = overrides_from_args(args, ServeConfig)
    overrides["url"] = overrides.get("url") or settings.engine_url or None
    overrides["engine"] = overrides.get("engine") or settings.engine
    cfg = load_config(ServeConfig, args.config, overrides)
    base = args.base or settings.base_model
    print(f"starting the {cfg.engine} engine for {base} (vLLM takes ~30-90 s on a CPU) ...", flush=True)
    engine = get_engine(base, ws, store, cfg=cfg)
    httpd = None
    try:
        loaded, skipped = load_all_adapters(engine, base, store)
        print(f"adapters loaded: {', '.join(loaded) or 'none'}"
              + (f"; skipped (trained on another base): {', '.join(skipped)}" if skipped else ""))
        if getattr(engine, "name", "") == "vllm":
            url, model = engine.url, engine.served_name
        else:
            from sft_core.workspace import safe_name
            from sft_core.serving.vllm_engine import free_port
            model = base if "/" not in base else safe_name(base.rstrip("/").rsplit("/", 1)[-1], "base")
            httpd = make_http_server(engine, cfg.port or free_port(), model)
            threading.Thread(target=httpd.serve_forever, name="serve-http", daemon=True).start()
            url = f"http://127.0.0.1:{httpd.server_address[1]}"
        print(f"\nserving {model} and {len(loaded)} adapter(s) at {url}  (Ctrl-C stops)\n")
        print(example(url, loaded[0] if loaded else model), flush=True)
        last = None
        while True:
            state = engine.health().get("state")
            if state != last:
                print(f"[{time.strftime('%H:%M:%S')}] engine {state}", flush=True)
                last = state
            if state in ("failed", "closed"):
                raise EngineError(f"engine {state}: {engine.health().get('error', '')}", "serve")
            time.sleep(2)
    finally:
        if httpd is not None:
            httpd.shutdown()
        engine.close()


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the base model and every finished adapter (OpenAI-compatible API)")
    p.add_argument("--base", default=None, help="base model (default $SFT_STUDIO_BASE_MODEL or the embedded model)")
    p.add_argument("--config", default=None, help="YAML file with ServeConfig options")
    add_arguments(p, ServeConfig)
    p.set_defaults(func=cmd_serve)
