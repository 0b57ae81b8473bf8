"""The managed vLLM server dies with the app (SIGTERM, SIGINT, SIGKILL of the app), behind a per-start
API key on every route but /health, and reloads only adapters the registry still resolves.

The process-group tests run twice: against a stand-in server (a Python process with a child of its
own, seconds) and against a real vLLM CPU server (marked ``vllm``; one start per signal)."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sft_core.serving.base import EngineError
from sft_core.serving.supervise import POLL_S, group_members
from sft_core.serving.vllm_engine import STOP_GRACE_S, VLLMEngine
from tests.signals import default_sigint

REPO = Path(__file__).resolve().parents[1]
HAS_VLLM = importlib.util.find_spec("vllm") is not None

# a stand-in for vLLM: an "API server" with an "engine core" child in the same process group
FAKE_SERVER = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
               "time.sleep(600)")
# the same, but both ignore SIGTERM: only the SIGKILL after the grace stops them
STUBBORN_SERVER = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                   "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                   "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); time.sleep(600)")

# the "app": starts a server the way VLLMEngine does, installs the app's signal handlers, reports
APP = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from sft_core.serving.supervise import close_on_signals
    kind, home, arg, grace = sys.argv[1], Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    if kind == "vllm":
        from sft_core.config import ServeConfig
        from sft_core.serving.vllm_engine import VLLMEngine, close_all
        from sft_core.store import Store
        from sft_core.workspace import Workspace
        ws = Workspace.at(home)
        cfg = ServeConfig(engine="vllm", max_loras=1, max_lora_rank=16, max_model_len=256, dtype="float32",
                          startup_timeout_s=400)
        eng = VLLMEngine(arg, ws, Store(ws.db_url), cfg=cfg)
        close_on_signals(close_all)
        srv, port = eng._server, eng._server.port
    else:
        from sft_core.serving.supervisor import Server
        srv = Server([sys.executable, "-c", arg], dict(os.environ), 0, home / "server.log", grace_s=grace)
        close_on_signals(srv.stop)
        port = 0
    time.sleep(1)  # the stand-in's "engine core" is started
    print(json.dumps({"pid": srv.pid, "pgid": srv.pgid, "port": port}), flush=True)
    while True:
        time.sleep(1)
""")


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _run_app(tmp_path, kind: str, arg: str, grace: float, start_timeout: float):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    app = subprocess.Popen([sys.executable, "-c", APP, kind, str(tmp_path / "home"), arg, str(grace)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                           preexec_fn=default_sigint)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(app.stdout), daemon=True)
    reader.start()
    end = time.time() + start_timeout
    while not lines and time.time() < end and app.poll() is None:
        time.sleep(0.2)
    if not lines:
        app.kill()
        pytest.fail(f"the app did not start its server (code {app.poll()}):\n{app.stderr.read()[-3000:]}")
    return app, json.loads(lines[0])


def _check_group_dies(app, info: dict, sig: int, bound_s: float) -> float:
    pgid = info["pgid"]
    members = group_members(pgid)
    assert info["pid"] in members and pgid in members and len(members) >= 3, members  # supervisor, server, child
    t0 = time.time()
    os.kill(app.pid, sig)
    while group_members(pgid) and time.time() - t0 < bound_s:
        time.sleep(0.1)
    took = time.time() - t0
    left = group_members(pgid)
    try:
        assert not left, f"{left} of group {pgid} still alive {took:.1f}s after {signal.Signals(sig).name}"
        if sig != signal.SIGKILL:  # the app reaped the supervisor (after SIGKILL it is a zombie until init reaps it)
            # the group leader is the app's own child: gone once the app reaped it. The leader's children are
            # orphans that this sandbox's init reaps on its own schedule, so killpg(pgid, 0) may still find
            # their zombies for a while: that is init's work, not the app's (it made this check flaky)
            end = time.time() + 10
            while Path(f"/proc/{pgid}").exists() and time.time() < end:
                time.sleep(0.1)
            assert not Path(f"/proc/{pgid}").exists(), f"the app left its supervisor {pgid} unreaped"
        if info["port"]:
            assert not _port_open(info["port"])
        app.wait(timeout=30)
        # the app still ends by the signal, after closing (SIGINT: an uncaught KeyboardInterrupt)
        assert app.returncode == -sig, app.stderr.read()[-2000:]
    finally:
        for pid in group_members(pgid):
            os.kill(pid, signal.SIGKILL)
        if app.poll() is None:
            app.kill()
    return took


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_stand_in_server_group_dies_with_the_app(tmp_path, sig):
    app, info = _run_app(tmp_path, "fake", FAKE_SERVER, grace=STOP_GRACE_S, start_timeout=30)
    took = _check_group_dies(app, info, sig, bound_s=10)
    assert took < 5  # it stops on SIGTERM at once; no grace needed


def test_stand_in_server_ignoring_sigterm_is_killed_after_the_grace(tmp_path):
    grace = 2.0
    app, info = _run_app(tmp_path, "fake", STUBBORN_SERVER, grace=grace, start_timeout=30)
    took = _check_group_dies(app, info, signal.SIGKILL, bound_s=grace + 10)
    assert took >= grace - POLL_S  # SIGTERM was ignored: SIGKILL came after the grace
    assert "SIGKILL" in (tmp_path / "home" / "server.log").read_text()


def test_supervisor_reports_the_servers_own_exit_and_alive_follows_the_server(tmp_path):
    """vLLM dying on its own: alive() turns false at once, the group goes, the exit status is vLLM's."""
    from sft_core.serving.supervisor import Server
    srv = Server([sys.executable, "-c", FAKE_SERVER], dict(os.environ), 0, tmp_path / "server.log", grace_s=5)
    try:
        time.sleep(1)
        assert srv.alive() and srv.pid != srv.pgid and srv.pid in group_members(srv.pgid)
        os.kill(srv.pid, signal.SIGKILL)
        t0 = time.time()
        while srv.alive() and time.time() - t0 < 5:
            time.sleep(0.05)
        assert not srv.alive() and time.time() - t0 < 2
        srv.proc.wait(timeout=10)
        assert srv.returncode() == -signal.SIGKILL and not group_members(srv.pgid)
    finally:
        srv.stop(grace_s=1)


def test_server_gets_sigterm_when_its_supervisor_dies_alone(tmp_path):
    """PR_SET_PDEATHSIG: a supervisor killed on its own still takes the API server down; the app's
    stop() (what the watchdog runs before a restart) then clears the rest of the group."""
    from sft_core.serving.supervisor import Server
    srv = Server([sys.executable, "-c", FAKE_SERVER], dict(os.environ), 0, tmp_path / "server.log", grace_s=5)
    try:
        time.sleep(1)
        os.kill(srv.pgid, signal.SIGKILL)
        t0 = time.time()
        while srv.vllm_pid in group_members(srv.pgid) and time.time() - t0 < 5:
            time.sleep(0.05)
        assert srv.vllm_pid not in group_members(srv.pgid) and not srv.alive()
    finally:
        srv.stop(grace_s=1)
    assert not group_members(srv.pgid)


def test_auth_middleware_guards_every_route_but_health(monkeypatch):
    from sft_core.serving.vllm_auth import RequireKey
    seen = []

    async def inner(scope, receive, send):
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def call(mw, path, auth=None):
        sent = []

        async def send(msg):
            sent.append(msg)
        headers = [(b"authorization", auth.encode())] if auth else []
        asyncio.run(mw({"type": "http", "path": path, "method": "POST", "headers": headers}, None, send))
        return sent[0]["status"]

    monkeypatch.setenv("VLLM_API_KEY", "s3cret")
    mw = RequireKey(inner)
    for path in ("/v1/models", "/v1/load_lora_adapter", "/adapters", "/invocations", "/tokenize", "/metrics"):
        assert call(mw, path) == 401 and call(mw, path, "Bearer wrong") == 401 and call(mw, path, "Basic s3cret") == 401
        assert call(mw, path, "Bearer s3cret") == 200
    assert call(mw, "/health") == 200
    monkeypatch.delenv("VLLM_API_KEY")
    assert call(RequireKey(inner), "/v1/models", "Bearer ") == 401  # no key configured: fail closed
    assert seen.count("/health") == 1


def test_restart_reloads_only_adapters_the_registry_still_resolves(caplog):
    from sft_core.serving.adapter_manager import AdapterManager
    from sft_core.serving.adapters import AdapterInfo
    infos = {n: AdapterInfo(name=n, path=Path(f"/ws/runs/{n}/adapter"), lora_id=i, rank=8, base_model="m")
             for i, n in enumerate(["run-a", "run-gone", "run-big", "run-broken"], 1)}

    class Registry:
        def resolve(self, name):
            if name == "run-gone":
                raise EngineError("unknown adapter 'run-gone' (no such training run)", "adapter")
            if name == "run-big":
                return AdapterInfo(name=name, path=infos[name].path, lora_id=3, rank=64, base_model="m")
            return infos[name]

    class Response:
        def __init__(self, code, text=""):
            self.status_code, self.text = code, text

    class Client:  # stands in for the server's client: what reload() posts, and vLLM refusing one adapter
        root = "http://127.0.0.1:1"

        def __init__(self):
            self.posted = []

        def post(self, route, json=None, timeout=None):
            self.posted.append((route, json["lora_name"]))
            return Response(400, "bad adapter") if json["lora_name"] == "run-broken" else Response(200)

    mgr = AdapterManager(Registry(), managed=True, max_rank=16, auto=False, on_error=lambda e: EngineError(str(e)))
    mgr.served_name = "m"
    mgr.loaded.update((n, infos[n]) for n in infos)
    client = Client()
    mgr.reload(client, server_alive=lambda: True)
    assert client.posted == [("/v1/load_lora_adapter", "run-a"), ("/v1/load_lora_adapter", "run-broken")]
    assert list(mgr.loaded) == ["run-a"]
    assert "run-gone not reloaded" in caplog.text and "run-big not reloaded" in caplog.text
    assert "run-broken not reloaded" in caplog.text
    # an adapter that fails to load because the server itself died fails the restart instead
    mgr.loaded.update((n, infos[n]) for n in ("run-a", "run-broken"))
    with pytest.raises(EngineError, match="could not load adapter 'run-broken'"):
        mgr.reload(Client(), server_alive=lambda: False)


class _NamedEngine:
    """The least engine the real front needs: a base model, no adapters."""
    served_name = "base"

    def health(self):
        return {"ok": True, "state": "ready"}

    def list_adapters(self):
        return []


def test_attach_mode_sends_the_configured_api_key(ws, monkeypatch):
    """SFT_STUDIO_ENGINE_API_KEY (or api_key=) goes to an attached server as a bearer token (the server:
    the real OpenAI-compatible front, requiring key k1)."""
    from sft_core.config import ServeConfig
    from sft_core.serving.front import Front, build_app
    auths = []
    app = build_app(_NamedEngine(), "base", api_key="k1")

    @app.middleware("http")
    async def record(request, call_next):
        if request.url.path != "/health":
            auths.append(request.headers.get("authorization"))
        return await call_next(request)

    front = Front(app)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    try:
        monkeypatch.delenv("SFT_STUDIO_ENGINE_API_KEY", raising=False)
        with pytest.raises(EngineError, match="401"):
            VLLMEngine("base", ws=ws, registry=object(), store=object(), cfg=ServeConfig(), url=front.url)
        monkeypatch.setenv("SFT_STUDIO_ENGINE_API_KEY", "k1")
        eng = VLLMEngine("base", ws=ws, registry=object(), store=object(), cfg=ServeConfig(), url=front.url)
        assert eng.served_name == "base" and eng.endpoint.api_key == "k1" and eng.endpoint.openai.api_key == "k1"
        assert eng.list_adapters() == [] and eng.health()["ok"]
        assert "k1" not in json.dumps(eng.health())
        eng.close()
        monkeypatch.delenv("SFT_STUDIO_ENGINE_API_KEY")
        eng = VLLMEngine("base", ws=ws, registry=object(), store=object(), cfg=ServeConfig(), url=front.url, api_key="k1")
        eng.close()
        assert auths[0] is None and len(auths) >= 3 and set(auths[1:]) == {"Bearer k1"}
    finally:
        front.close()


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not HAS_VLLM, reason="vllm is not installed")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_vllm_group_dies_with_the_app(tmp_path, tiny_model_dir, sig):
    """A real vLLM started by VLLMEngine in an app process: SIGTERM (handlers close the engine) and
    SIGKILL (a crash: the supervisor notices) both leave no process of its group and a closed port."""
    app, info = _run_app(tmp_path, "vllm", str(tiny_model_dir), grace=STOP_GRACE_S, start_timeout=420)
    assert _port_open(info["port"])
    # bound: the engine's stop grace (SIGTERM -> SIGKILL), the SIGKILL wait, the supervisor's poll, slack
    took = _check_group_dies(app, info, sig, bound_s=STOP_GRACE_S + 5 + POLL_S + 10)
    print(f"{sig.name}: vLLM group gone after {took:.1f}s")
