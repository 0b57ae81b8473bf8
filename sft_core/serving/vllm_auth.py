"""ASGI middleware loaded into the managed vLLM server (``--middleware``): every route but ``/health``
needs ``Authorization: Bearer <key>``, the key coming from ``VLLM_API_KEY`` in the server's
environment (the engine sets a fresh random one per start).

vLLM's own ``--api-key`` / ``VLLM_API_KEY`` check covers only paths under ``/v1``, ``/v2``,
``/inference`` and ``/cohere``. Other routes stay open: ``/invocations`` (inference), ``/tokenize``,
and, with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, the SageMaker route ``POST /adapters``
(``{"name": ..., "src": <any path>}``), which loads a LoRA from an arbitrary path just like
``/v1/load_lora_adapter``. This middleware closes them all; without a key it refuses everything
but ``/health`` (fails closed). It imports nothing beyond the standard library.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os

OPEN_PATHS = ("/health",)


class RequireKey:
    def __init__(self, app) -> None:
        self.app = app
        key = os.environ.get("VLLM_API_KEY") or ""
        self._digest = hashlib.sha256(key.encode()).digest() if key else None

    def _authorized(self, scope) -> bool:
        if self._digest is None:
            return False
        for name, value in scope.get("headers") or ():
            if name.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    return hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(), self._digest)
                return False
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if path in OPEN_PATHS or self._authorized(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": {"message": "Unauthorized", "type": "AuthenticationError", "code": 401}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
