"""`sft-studio serve [--base MODEL] [--port P] [--engine vllm|hf]`: the engine in the foreground.

Every finished run's adapter (trained on the same base) is loaded up front; the command prints a
copy-paste ``curl`` and ``openai`` example and runs until Ctrl-C. Clients always talk to a small
OpenAI-compatible HTTP server in this process (``/v1/models``, ``/v1/chat/completions`` streaming or
not, ``/health``) on ``--port``; it hands every request to the engine, whose adapter registry refuses
names that are not succeeded runs or that look like paths. With vLLM the engine's own server runs on
an internal free localhost port and is never handed to clients, so its runtime LoRA endpoints
(``/v1/load_lora_adapter`` with an arbitrary path) are not reachable through ``--port``; that internal
server also refuses every request (but ``/health``) without the engine's per-start random API key,
which only the engine itself sends. SIGTERM/SIGINT close the engine (its whole vLLM process group)
before the process exits; a supervisor stops vLLM even if this process is killed outright.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sft_core import StudioError
from sft_core.config import DecodingConfig, ServeConfig, StudioSettings, add_arguments, load_config, overrides_from_args
from sft_core.serving import get_engine, load_all_adapters
from sft_core.serving.base import EngineError, GenRequest
from sft_core.store import open_store
from sft_core.workspace import Workspace


def example(url: str, model: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64})
    return (f"curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'\n\n"
            f"python - <<'EOF'\nfrom openai import OpenAI\nclient = OpenAI(base_url=\"{url}/v1\", api_key=\"EMPTY\")\n"
            f"r = client.chat.completions.create(model=\"{model}\", messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}])\n"
            f"print(r.choices[0].message.content)\nEOF")


def banner(url: str, model: str, loaded: list[str]) -> str:
    """What `serve` prints once it is up: where it listens and a copy-paste example (front URL only)."""
    return (f"\nserving {model} and {len(loaded)} adapter(s) at {url}  (Ctrl-C stops)\n\n"
            + example(url, loaded[0] if loaded else model))


MAX_BODY_BYTES = 8 * 2**20  # one request: a long conversation fits many times over
MAX_TOKENS = 8192  # most tokens one request may ask for (the engines' context is smaller still)


def _request_model():
    """The schema of a chat request (pydantic, strict: "0.5" is not a number, 5 is not text), built on
    first use so that importing the CLI stays cheap. Unknown fields are ignored, as OpenAI clients send
    many optional ones."""
    global _ChatRequest
    if _ChatRequest is not None:
        return _ChatRequest
    from typing import Literal, Optional, Union

    from pydantic import BaseModel, ConfigDict, Field

    class Message(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)
        role: Literal["system", "user", "assistant"]
        content: str

    class ChatRequest(BaseModel):
        model_config = ConfigDict(extra="ignore", strict=True)
        model: Optional[str] = Field(None, max_length=200)
        messages: list[Message] = Field(min_length=1)
        temperature: Optional[float] = Field(None, ge=0, le=2, allow_inf_nan=False)
        top_p: Optional[float] = Field(None, gt=0, le=1, allow_inf_nan=False)
        max_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS)
        max_completion_tokens: Optional[int] = Field(None, ge=1, le=MAX_TOKENS)
        n: Optional[Literal[1]] = None  # one answer per request
        stream: Optional[bool] = None
        stop: Union[str, list[str], None] = Field(None, max_length=16)
        seed: Optional[int] = Field(None, ge=0, lt=2**63)
        logprobs: Optional[bool] = None

    _ChatRequest = ChatRequest
    return ChatRequest


_ChatRequest = None


class RequestError(ValueError):
    """A request that does not fit the schema: answered 400, naming the field."""


def parse_chat_request(raw: bytes) -> dict:
    """The request body as a dict with only the fields this front uses, or RequestError naming the field."""
    from pydantic import ValidationError
    try:
        req = _request_model().model_validate_json(raw or b"{}")
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise RequestError(f"request body is not valid JSON: {err['msg']}") from None
        where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in err["loc"]).lstrip(".")
        if err["type"] in ("model_type", "model_attributes_type") and not where:
            raise RequestError("request body must be a JSON object") from None
        if where == "messages" and err["type"] in ("missing", "too_short"):
            raise RequestError("messages: required, a non-empty list of chat messages") from None
        if where == "n":
            raise RequestError("n: only n=1 is supported (one answer per request)") from None
        raise RequestError(f"{where or 'request body'}: {err['msg']}") from None
    body = req.model_dump(exclude_none=True)
    body["messages"] = [{"role": m.role, "content": m.content} for m in req.messages]
    return body


def decoding_from_openai(body: dict) -> DecodingConfig:
    stop = body.get("stop") or []
    return load_config(DecodingConfig, overrides={
        "temperature": body.get("temperature", 0.0), "top_p": body.get("top_p", 1.0),
        "max_new_tokens": body.get("max_tokens") or body.get("max_completion_tokens") or 256,
        "stop": [stop] if isinstance(stop, str) else list(stop), "seed": body.get("seed") or 0})


def served_model_name(engine, base: str) -> str:
    """The base model's name in the API: vLLM's served name, else the model directory's name."""
    name = getattr(engine, "served_name", "") or ""
    if name:
        return name
    from sft_core.workspace import safe_name
    return base if "/" not in base else safe_name(base.rstrip("/").rsplit("/", 1)[-1], "base")


def _status_for(e: Exception) -> int:
    """400 for a bad request (unknown adapter, path as name, bad option); 503 while the engine is down."""
    msg = str(e)  # StudioError's str is "where: message"; a batch result's error is that same string
    msg = msg[len("vllm: "):] if msg.startswith("vllm: ") else msg
    return 503 if msg.startswith(("engine restarting", "engine failed", "engine is ", "engine closed",
                                  "cannot reach")) else 400


def make_http_server(engine, port: int, served_name: str) -> ThreadingHTTPServer:
    """A minimal OpenAI-compatible front for an engine (any kind): the only API clients of `serve` see.

    Requests name the base model or an adapter (a run id); the engine's registry refuses anything
    else. There are deliberately no adapter load/unload routes: adapters hot-load on first use.
    """

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

        def _error(self, code: int, message: str, kind: str = "BadRequestError") -> None:
            self._json(code, {"error": {"message": message, "type": kind, "code": code}})

        def do_GET(self):
            try:
                if self.path == "/health":
                    h = engine.health()
                    return self._json(200 if h.get("ok") else 503, h)
                if self.path == "/v1/models":
                    ids = [served_name] + [a for a in engine.list_adapters() if a != served_name]
                    return self._json(200, {"object": "list", "data": [
                        {"id": i, "object": "model", "owned_by": "sft-studio",
                         "parent": None if i == served_name else served_name} for i in ids]})
            except StudioError as e:
                return self._error(_status_for(e), str(e), "ServiceUnavailableError")
            self._error(404, f"no route GET {self.path}", "NotFoundError")

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                return self._error(404, f"no route POST {self.path} (adapters are addressed by run id in "
                                        "'model' and load on first use)", "NotFoundError")
            streaming = False
            try:
                try:
                    length = int(self.headers.get("Content-Length", 0) or 0)
                except ValueError:
                    raise RequestError("Content-Length: not a number") from None
                if length < 0:
                    raise RequestError("Content-Length: negative")
                if length > MAX_BODY_BYTES:
                    self.close_connection = True  # the body is not read
                    return self._error(413, f"request body is {length:,} bytes, over the limit of "
                                            f"{MAX_BODY_BYTES:,}", "BadRequestError")
                body = parse_chat_request(self.rfile.read(length))
                messages = body["messages"]
                model = body.get("model") or served_name
                adapter = None if model == served_name else model
                cfg = decoding_from_openai(body)
                cid = f"chatcmpl-{uuid.uuid4().hex[:12]}"
                created = int(time.time())
                if body.get("stream"):
                    deltas = engine.chat(messages, adapter, cfg)
                    first = next(deltas, None)  # errors (unknown adapter, engine down) surface before the 200
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Cache-Control", "no-cache")
                    self.end_headers()
                    streaming = True

                    def send(delta: dict, finish: str | None) -> None:
                        chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                        self.wfile.flush()

                    if first is not None:
                        send({"role": "assistant", "content": first}, None)
                        for d in deltas:
                            send({"content": d}, None)
                    send({}, "stop")
                    self.wfile.write(b"data: [DONE]\n\n")
                    return
                want_logprobs = bool(body.get("logprobs"))
                r = engine.generate_batch([GenRequest(messages, adapter, cfg, logprobs=want_logprobs)])[0]
                if r.error:
                    raise EngineError(r.error)  # already "where: message"
                choice = {"index": 0, "message": {"role": "assistant", "content": r.text},
                          "finish_reason": r.finish_reason or "stop", "logprobs": None}
                if want_logprobs and r.extra.get("token_ids"):
                    choice["logprobs"] = {"content": [
                        {"token": f"token_id:{t}", "logprob": lp, "bytes": None, "top_logprobs": []}
                        for t, lp in zip(r.extra["token_ids"], r.extra["logprobs"])]}
                self._json(200, {"id": cid, "object": "chat.completion", "created": created, "model": model,
                                 "choices": [choice],
                                 "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                                           "total_tokens": r.prompt_tokens + r.completion_tokens}})
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away
            except Exception as e:
                message = str(e)
                if isinstance(e, (StudioError, ValueError)):
                    code, kind = _status_for(e), "BadRequestError"
                    kind = "ServiceUnavailableError" if code == 503 else kind
                else:
                    code, kind, message = 500, "InternalServerError", f"{type(e).__name__}: {e}"
                if streaming:  # headers are gone: report in the stream, as OpenAI-compatible servers do
                    try:
                        self.wfile.write(f"data: {json.dumps({'error': {'message': message, 'code': code}})}\n\n"
                                         .encode() + b"data: [DONE]\n\n")
                    except OSError:
                        pass
                    return
                self._error(code, message, kind)

    try:
        return ThreadingHTTPServer(("127.0.0.1", port), Handler)
    except OSError as e:
        raise EngineError(f"cannot listen on 127.0.0.1:{port}: {e.strerror or e}", "port") from None


def start_front(engine, base: str, port: int = 0) -> tuple[ThreadingHTTPServer, str, str]:
    """Start the OpenAI-compatible front for ``engine`` in a daemon thread on ``port`` (0: a free one).

    Returns (server, its URL, the base model's name in the API); ``server.shutdown()`` stops it.
    """
    model = served_model_name(engine, base)
    httpd = make_http_server(engine, port, model)
    threading.Thread(target=httpd.serve_forever, name="serve-http", daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}", model


def cmd_serve(args) -> int:
    settings = StudioSettings.from_env()
    ws = Workspace.from_env()
    store = open_store(settings.db_url or ws.db_url)
    overrides = overrides_from_args(args, ServeConfig)
    overrides["url"] = overrides.get("url") or settings.engine_url or None
    overrides["engine"] = overrides.get("engine") or settings.engine
    cfg = load_config(ServeConfig, args.config, overrides)
    base = args.base or settings.base_model
    # --port is the front's; a managed vLLM listens on an internal free port that clients never see
    engine_cfg = dataclasses.replace(cfg, port=0)
    print(f"starting the {cfg.engine} engine for {base} (vLLM takes ~30-90 s on a CPU) ...", flush=True)
    from sft_core.serving.supervise import close_on_signals
    from sft_core.serving.vllm_engine import close_all
    close_on_signals(close_all)  # before the start: a vLLM still starting up is stopped too
    engine = get_engine(base, ws, store, cfg=engine_cfg)
    httpd = None
    try:
        loaded, skipped = load_all_adapters(engine, base, store)
        print(f"adapters loaded: {', '.join(loaded) or 'none'}"
              + (f"; skipped (trained on another base): {', '.join(skipped)}" if skipped else ""))
        httpd, url, model = start_front(engine, base, cfg.port)
        print(banner(url, model, loaded), flush=True)
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
            httpd.server_close()
        engine.close()


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the base model and every finished adapter (OpenAI-compatible API)")
    p.add_argument("--base", default=None, help="base model (default $SFT_STUDIO_BASE_MODEL or the embedded model)")
    p.add_argument("--config", default=None, help="YAML file with ServeConfig options")
    p.add_argument("--port", default=None, metavar="PORT",
                   help="port of the OpenAI-compatible API on 127.0.0.1 (default 0: a free port); a managed "
                        "vLLM always runs on an internal port behind it")
    add_arguments(p, ServeConfig, skip=("port",))
    p.set_defaults(func=cmd_serve)
