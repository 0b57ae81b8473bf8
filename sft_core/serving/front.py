"""The public OpenAI-compatible front of an engine (any kind): a FastAPI router, served by uvicorn.

``sft-studio serve`` hands clients this front only (``/v1/models``, ``/v1/chat/completions``
streamed or not, ``/health``); a managed vLLM behind it listens on an internal port with its own
per-start key. Requests name the base model or an adapter (a run id); the engine's registry refuses
anything else. There are deliberately no adapter load/unload routes: adapters hot-load on first use.

Errors are typed and answered in OpenAI's shape (``{"error": {"message", "type", "code"}}``):
a request that does not fit :class:`ChatRequest` -> 400 naming the field; a refused adapter or bad
option (``EngineError``, ``ConfigError``) -> 400; the engine down (``EngineUnavailable``: restarting,
failed, GPU lent to training) -> 503; a body over ``MAX_BODY_BYTES`` -> 413 on its header alone.

The body is validated by the dependency :func:`chat_request` rather than a plain body parameter,
for two things FastAPI's own parsing does not do: refusing an oversized body before reading it, and
pydantic's strict JSON parser (its errors name the field; a deeply nested body is "not valid JSON",
not a generic parse error). The schema is still published in the OpenAPI document.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from typing import Literal, Optional, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from sft_core import StudioError
from sft_core.config import DecodingConfig, load_config
from sft_core.serving.base import EngineError, EngineUnavailable, GenRequest

MAX_BODY_BYTES = 8 * 2**20  # one request: a long conversation fits many times over
MAX_TOKENS = 8192  # most tokens one request may ask for (the engines' context is smaller still)


# -- the request schema (strict: "0.5" is not a number, 5 is not text; unknown fields are ignored,
#    as OpenAI clients send many optional ones) ---------------------------------------------------
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

    def decoding(self) -> DecodingConfig:
        stop = self.stop or []
        return load_config(DecodingConfig, overrides={
            "temperature": 0.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "max_new_tokens": self.max_tokens or self.max_completion_tokens or 256,
            "stop": [stop] if isinstance(stop, str) else list(stop), "seed": self.seed or 0})

    def chat_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


class RequestError(ValueError):
    """A request that does not fit the schema: answered 400, naming the field."""


class BodyTooLarge(RequestError):
    """Answered 413."""


def parse_chat_request(raw: bytes) -> ChatRequest:
    """The request body as a :class:`ChatRequest`, or RequestError naming the field."""
    try:
        return ChatRequest.model_validate_json(raw or b"{}")
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


async def chat_request(request: Request) -> ChatRequest:
    """FastAPI dependency: the body, refused over ``MAX_BODY_BYTES`` (on Content-Length before reading it)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise RequestError("Content-Length: not a number")
        if int(length) > MAX_BODY_BYTES:
            raise BodyTooLarge(f"request body is {int(length):,} bytes, over the limit of {MAX_BODY_BYTES:,}")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise BodyTooLarge(f"request body is over the limit of {MAX_BODY_BYTES:,} bytes")
    return parse_chat_request(bytes(raw))


# -- errors ----------------------------------------------------------------------------------------
def error_status(e: Exception) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) for an exception, by its type."""
    if isinstance(e, BodyTooLarge):
        return 413, "BadRequestError"
    if isinstance(e, EngineUnavailable):
        return 503, "ServiceUnavailableError"
    if isinstance(e, (StudioError, ValueError)):  # a refused adapter, a bad option, a bad request
        return 400, "BadRequestError"
    return 500, "InternalServerError"


def error_body(code: int, kind: str, message: str) -> dict:
    return {"error": {"message": message, "type": kind, "code": code}}


def error_response(e: Exception) -> JSONResponse:
    code, kind = error_status(e)
    message = str(e) if code < 500 else f"{type(e).__name__}: {e}"
    return JSONResponse(error_body(code, kind, message), status_code=code)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    kinds = {401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowedError"}
    message = str(e.detail)
    if e.status_code in (404, 405):
        message = (f"no route {request.method} {request.url.path} (adapters are addressed by run id in 'model' "
                   "and load on first use)")
    return JSONResponse(error_body(e.status_code, kinds.get(e.status_code, "BadRequestError"), message),
                        status_code=e.status_code, headers=getattr(e, "headers", None))


# -- the router ------------------------------------------------------------------------------------
def key_check(api_key):
    """A dependency that requires ``Authorization: Bearer <key>``. ``api_key``: the key, a function
    returning the current one (a key that is rotated), or None (no check)."""
    current = api_key if callable(api_key) else (lambda: api_key)

    def check(request: Request) -> None:
        key = current()
        if not key:
            return
        scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(),
                                                                 hashlib.sha256(key.encode()).digest()):
            raise StarletteHTTPException(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
    return check


def build_router(engine, served_name: str, api_key=None) -> APIRouter:
    """The OpenAI-compatible routes over ``engine``; ``api_key`` (see :func:`key_check`): required on every
    route but /health (``sft-studio serve`` sets none: its front is open on 127.0.0.1, as before)."""
    router = APIRouter()
    keyed = [Depends(key_check(api_key))]

    @router.get("/health")
    def health():
        h = engine.health()
        return JSONResponse(h, status_code=200 if h.get("ok") else 503)

    @router.get("/v1/models", dependencies=keyed)
    def models():
        try:
            ids = [served_name] + [a for a in engine.list_adapters() if a != served_name]
        except Exception as e:  # noqa: BLE001 - answered in OpenAI's error shape
            return error_response(e)
        return {"object": "list", "data": [{"id": i, "object": "model", "owned_by": "sft-studio",
                                            "parent": None if i == served_name else served_name} for i in ids]}

    @router.post("/v1/chat/completions", dependencies=keyed,
                 openapi_extra={"requestBody": {"required": True, "content": {
                     "application/json": {"schema": ChatRequest.model_json_schema()}}}})
    async def chat_completions(req: ChatRequest = Depends(chat_request)):
        model = req.model or served_name
        adapter = None if model == served_name else model
        try:
            cfg = req.decoding()
            reply = dict(id=f"chatcmpl-{uuid.uuid4().hex[:12]}", created=int(time.time()), model=model)
            if req.stream:
                return await _stream(engine, req.chat_messages(), adapter, cfg, reply)
            one = GenRequest(req.chat_messages(), adapter, cfg, logprobs=bool(req.logprobs))
            r = (await run_in_threadpool(engine.generate_batch, [one]))[0]
            if r.error:  # already "where: message"
                raise (EngineUnavailable if r.retryable else EngineError)(r.error)
        except Exception as e:  # noqa: BLE001 - answered in OpenAI's error shape
            return error_response(e)
        choice = {"index": 0, "message": {"role": "assistant", "content": r.text},
                  "finish_reason": r.finish_reason or "stop", "logprobs": None}
        if req.logprobs and r.extra.get("token_ids"):
            choice["logprobs"] = {"content": [
                {"token": f"token_id:{t}", "logprob": lp, "bytes": None, "top_logprobs": []}
                for t, lp in zip(r.extra["token_ids"], r.extra["logprobs"])]}
        return {**reply, "object": "chat.completion", "choices": [choice],
                "usage": {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                          "total_tokens": r.prompt_tokens + r.completion_tokens}}

    return router


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _stream(engine, messages: list[dict], adapter: str | None, cfg: DecodingConfig,
                  reply: dict) -> StreamingResponse:
    """Server-sent events: one chunk per delta, a last one with the finish reason, then ``[DONE]``.
    The first delta is awaited before the 200 goes out, so a refused adapter or a down engine gets
    its own status; a failure after that is reported inside the stream, as OpenAI-compatible servers do."""
    info: dict = {}
    deltas = engine.chat(messages, adapter, cfg, info=info)
    first = await run_in_threadpool(next, deltas, None)

    def chunk(delta: dict, finish: str | None) -> str:
        return _sse({**reply, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    def events():  # a plain generator: Starlette iterates it on its thread pool (engines block)
        try:
            if first is not None:
                yield chunk({"role": "assistant", "content": first}, None)
                for d in deltas:
                    yield chunk({"content": d}, None)
            yield chunk({}, info.get("finish_reason") or "stop")
        except Exception as e:  # noqa: BLE001 - the headers are gone: the error goes in the stream
            code, _ = error_status(e)
            yield _sse({"error": {"message": str(e), "code": code}})
        finally:
            deltas.close()
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def build_app(engine, served_name: str, api_key=None) -> FastAPI:
    """A FastAPI app with the router and OpenAI-shaped errors for every failure."""
    app = FastAPI(title="SFT Studio", docs_url=None, redoc_url=None)
    app.include_router(build_router(engine, served_name, api_key))
    app.add_exception_handler(RequestError, lambda request, e: error_response(e))
    app.add_exception_handler(StarletteHTTPException, _http_error)
    return app


def served_model_name(engine, base: str) -> str:
    """The base model's name in the API: vLLM's served name, else the model directory's name."""
    name = getattr(engine, "served_name", "") or ""
    if name:
        return name
    from sft_core.workspace import safe_name
    return base if "/" not in base else safe_name(base.rstrip("/").rsplit("/", 1)[-1], "base")


# -- serving it --------------------------------------------------------------------------------------
class Front:
    """``app`` served by uvicorn on ``host:port`` (0: a free one) in a daemon thread; ``close()`` stops it."""

    def __init__(self, app: FastAPI, port: int = 0, host: str = "127.0.0.1"):
        import uvicorn
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise EngineError(f"cannot listen on {host}:{port}: {e.strerror or e}", "port") from None
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        # a stream still running at close() gets a few seconds, then is cut (the engine stops anyway)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, name="serve-http",
                                       daemon=True)
        self.thread.start()
        end = time.time() + 30
        while not self.server.started and self.thread.is_alive() and time.time() < end:
            time.sleep(0.02)
        if not self.server.started:
            self.close()
            raise EngineError(f"the API front did not start on {self.url}", "port")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def start_front(engine, base: str, port: int = 0, api_key=None) -> tuple[Front, str, str]:
    """Serve the front for ``engine`` on ``port`` (0: a free one). Returns (the front, its URL, the base
    model's name in the API); ``front.close()`` stops it."""
    model = served_model_name(engine, base)
    front = Front(build_app(engine, model, api_key), port)
    return front, front.url, model
