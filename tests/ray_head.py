"""One real local Ray head for the test modules that need one (tests/test_ray_backend.py,
tests/test_ray_jobs.py): ``from tests.ray_head import ray_url`` gives a module the fixture.

The head has its own ports and temp dir. It starts on the first module's first use and is shared
with the modules that run right after it: at a module's end it is stopped unless a later test of the
session still needs it (so the suite pays one start, ~30 s on a 2-core machine, and the rest of the
suite never runs beside an idle head), and at the end of the session whatever happens. Teardown stops
only this head's processes, never `ray stop` (that would stop every Ray on the machine).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HEAD_START_S = 180
FIXTURE = "ray_url"

_HEAD: dict = {}  # the running head: proc, tmp, url; or outcome: ("skip" | "fail", message) when it could not start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def head_processes(root_pid: int, tmp: str) -> list:
    import psutil
    procs, me = {}, os.getpid()
    try:
        root = psutil.Process(root_pid)
        procs = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["cmdline"]):  # anything else that names this head's temp dir
        try:
            if p.pid != me and tmp in " ".join(p.info["cmdline"] or []):
                procs.setdefault(p.pid, p)
                procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.Error:
            pass
    procs.pop(me, None)
    return list(procs.values())


def stop_head(proc: subprocess.Popen, tmp: str) -> None:
    import psutil
    procs = head_processes(proc.pid, tmp)
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=3)  # some (gcs, raylet) linger on SIGTERM: then SIGKILL
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)
    proc.wait(timeout=10)
    left = head_processes(proc.pid, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
    assert not left, f"Ray head processes survived teardown: {[p.pid for p in left]}"


def _start_head() -> str:
    """Start the head (or report how an earlier attempt in this session ended); returns its dashboard URL."""
    if "url" in _HEAD:
        return _HEAD["url"]
    if "outcome" in _HEAD:  # do not wait HEAD_START_S again for a head that already could not start
        how, message = _HEAD["outcome"]
        (pytest.skip if how == "skip" else pytest.fail)(message)
    import requests
    tmp = tempfile.mkdtemp(prefix="sftray", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    gcs, dash, client, agent = (free_port() for _ in range(4))
    url = f"http://127.0.0.1:{dash}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--include-dashboard=true", "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--temp-dir", tmp, "--disable-usage-stats"]
    head_log = Path(tmp) / "head.log"
    with open(head_log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    t0, deadline, ready = time.monotonic(), time.monotonic() + HEAD_START_S, False
    try:
        while not ready and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
            try:
                r = requests.get(f"{url}/api/v0/nodes", params={"detail": "1"}, timeout=5)
                ready = r.ok and any(n["state"] == "ALIVE" for n in r.json()["data"]["result"]["result"])
            except (OSError, ValueError, KeyError):
                pass
    except BaseException:
        stop_head(proc, tmp)
        raise
    if not ready:
        tail = head_log.read_text(errors="replace")[-3000:]
        exited = proc.poll() is not None
        stop_head(proc, tmp)
        if exited:
            _HEAD["outcome"] = ("skip", f"THE RAY HEAD COULD NOT START (ray start exited {proc.returncode}); "
                                        f"Ray backend tests not run. Log tail:\n{tail}")
        else:
            _HEAD["outcome"] = ("fail", f"the Ray head did not come up within {HEAD_START_S}s. Log tail:\n{tail}")
        return _start_head()
    print(f"\nRay head up in {time.monotonic() - t0:.1f}s at {url}")
    _HEAD.update(proc=proc, tmp=tmp, url=url)
    return url


def _stop_shared_head() -> None:
    if "proc" in _HEAD:
        proc, tmp = _HEAD.pop("proc"), _HEAD.pop("tmp")
        _HEAD.pop("url")
        stop_head(proc, tmp)


def _needed_later(request) -> bool:
    """Whether a test after this module's last one (in this session's run order) uses the head."""
    items = request.session.items
    mine = [i for i, item in enumerate(items) if item.getparent(pytest.Module) is request.node]
    later = items[max(mine) + 1:] if mine else []
    return any(FIXTURE in item.fixturenames for item in later)


@pytest.fixture(scope="module")
def ray_url(request):
    """The dashboard URL of the shared local Ray head (2 CPUs, no GPU)."""
    pytest.importorskip("ray.job_submission", reason="RAY IS NOT INSTALLED (pip install 'ray[default]'): "
                                                     "the Ray backend cannot be tested")
    if "proc" not in _HEAD:
        request.config.add_cleanup(_stop_shared_head)  # at the latest when the session ends
    url = _start_head()
    yield url
    if not _needed_later(request):
        _stop_shared_head()
