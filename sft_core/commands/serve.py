"""`sft-studio serve [--base MODEL] [--port P] [--engine vllm|hf]`: the engine in the foreground.

Every finished run's adapter (trained on the same base) is loaded up front; the command prints a
copy-paste ``curl`` and ``openai`` example and runs until Ctrl-C. Clients always talk to the
OpenAI-compatible front in this process (``sft_core/serving/front.py``: a FastAPI router served by
uvicorn; ``/v1/models``, ``/v1/chat/completions`` streaming or not, ``/health``) on ``--port``; it
hands every request to the engine, whose adapter registry refuses names that are not succeeded runs
or that look like paths. With vLLM the engine's own server runs on
an internal free localhost port and is never handed to clients, so its runtime LoRA endpoints
(``/v1/load_lora_adapter`` with an arbitrary path) are not reachable through ``--port``; that internal
server also refuses every request (but ``/health``) without the engine's per-start random API key,
which only the engine itself sends. SIGTERM/SIGINT close the engine (its whole vLLM process group)
before the process exits; a supervisor stops vLLM even if this process is killed outright.
"""
from __future__ import annotations

import dataclasses
import json
import time

from sft_core.config import ServeConfig, StudioSettings, add_arguments, load_config, overrides_from_args
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


def banner(url: str, model: str, loaded: list[str]) -> str:
    """What `serve` prints once it is up: where it listens and a copy-paste example (front URL only)."""
    return (f"\nserving {model} and {len(loaded)} adapter(s) at {url}  (Ctrl-C stops)\n\n"
            + example(url, loaded[0] if loaded else model))


def start_front(engine, base: str, port: int = 0):
    """The OpenAI-compatible front for ``engine`` (``sft_core/serving/front.py``: a FastAPI router served
    by uvicorn) on ``port`` (0: a free one). Returns (front, its URL, the base model's name in the API)."""
    from sft_core.serving.front import start_front as start
    return start(engine, base, port)


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
    front = None
    try:
        loaded, skipped = load_all_adapters(engine, base, store)
        print(f"adapters loaded: {', '.join(loaded) or 'none'}"
              + (f"; skipped (trained on another base): {', '.join(skipped)}" if skipped else ""))
        front, url, model = start_front(engine, base, cfg.port)
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
        if front is not None:
            front.close()
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
