"""Job backends (sft_core/job_backends.py): the local subprocess backend, and the Ray Jobs backend
against a real local Ray head (tests/ray_head.py: its own ports and temp dir, shared with the next
modules that need one; teardown stops only its processes, never `ray stop`).

Workers are tiny `python -c` programs; every wait has a deadline and says what it waited for."""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from sft_core import StudioError
from sft_core.job_backends import (LocalBackend, RayBackend, RayHandle, _proc_start, backend_for_ref,
                                   backend_from_env)
from sft_core.train import EXIT_CANCELLED
from tests.ray_head import free_port as _free_port, ray_url  # noqa: F401 (ray_url: the head fixture)

PY = sys.executable
JOB_S = 120  # a job on a busy 2-core machine: supervisor actor start, runtime env, python start


def _wait(pred, what: str, timeout: float = JOB_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value is not None and value is not False:
            return value
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout:.0f}s")


def _end(handle, timeout: float = JOB_S) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = handle.poll()
        if code is not None:
            return code
        time.sleep(0.2)
    pytest.fail(f"worker {handle.ref} did not end within {timeout:.0f}s")


def _pid_file(path: Path) -> int:
    return _wait(lambda: int(path.read_text()) if path.exists() else None, f"worker to write {path.name}")


def _worker(ready: Path, trap: bool = False, cleanup_s: float = 0.0) -> list[str]:
    """A worker that writes its pid to ``ready`` (atomically) once set up, then sleeps; with ``trap``
    SIGTERM makes it clean up for ``cleanup_s``, print 'cleaned up' and exit with EXIT_CANCELLED."""
    code = f"""
import os, signal, sys, time
def stop(*_):
    time.sleep({cleanup_s})
    print('cleaned up', flush=True)
    sys.exit({EXIT_CANCELLED})
if {trap}:
    signal.signal(signal.SIGTERM, stop)
print('ready', flush=True)
open({str(ready)!r} + '.tmp', 'w').write(str(os.getpid()))
os.replace({str(ready)!r} + '.tmp', {str(ready)!r})
time.sleep(300)
"""
    return [PY, "-c", code]


# ---- backend choice ----------------------------------------------------------------------------------
def test_backend_from_env():
    assert isinstance(backend_from_env({}), LocalBackend)
    assert isinstance(backend_from_env({"SFT_STUDIO_JOBS": "local"}), LocalBackend)
    b = backend_from_env({"SFT_STUDIO_JOBS": "ray", "RAY_ADDRESS": "http://head:8265/"})
    assert isinstance(b, RayBackend) and b.address == "http://head:8265" and b.stop_wait_s == 600
    with pytest.raises(StudioError) as e:
        backend_from_env({"SFT_STUDIO_JOBS": "bogus"})
    assert e.value.where == "SFT_STUDIO_JOBS" and "'bogus'" in e.value.message and "local, ray" in e.value.message
    with pytest.raises(StudioError) as e:
        backend_from_env({"SFT_STUDIO_JOBS": "ray", "SFT_STUDIO_RAY_STOP_WAIT_S": "soon"})
    assert e.value.where == "SFT_STUDIO_RAY_STOP_WAIT_S"
    assert isinstance(backend_for_ref("local:1:2"), LocalBackend)
    assert backend_for_ref("ray:sft-x", {"RAY_ADDRESS": "http://h:1"}).address == "http://h:1"
    with pytest.raises(StudioError):
        backend_for_ref("1234")


# ---- local -------------------------------------------------------------------------------------------
def test_local_exit_code_and_log(tmp_path):
    log = tmp_path / "w.log"
    log.write_text("earlier\n")
    h = LocalBackend().start([PY, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(5)"],
                             dict(os.environ), log)
    assert h.ref == f"local:{h.pid}:{_proc_start(h.pid) or ''}"
    assert _end(h, 60) == 5
    assert log.read_text().splitlines() == ["earlier", "out", "err"]


def test_local_terminate_and_alive(tmp_path):
    b = LocalBackend()
    trapped = b.start(_worker(tmp_path / "a.pid", trap=True), dict(os.environ), tmp_path / "a.log")
    plain = b.start(_worker(tmp_path / "b.pid"), dict(os.environ), tmp_path / "b.log")
    try:
        _pid_file(tmp_path / "a.pid"), _pid_file(tmp_path / "b.pid")
        assert b.alive(trapped.ref) and b.alive(plain.ref)
        pid, start = trapped.ref.split(":")[1:]
        if start:  # same pid, another start time: a recycled pid is not our worker
            assert not b.alive(f"local:{pid}:{int(start) + 1}")
        trapped.terminate()
        plain.terminate()
        assert _end(trapped, 60) == EXIT_CANCELLED
        assert _end(plain, 60) == -signal.SIGTERM
        assert "cleaned up" in (tmp_path / "a.log").read_text()
        assert not b.alive(trapped.ref) and not b.alive(plain.ref)
    finally:
        for h in (trapped, plain):
            if h.poll() is None:
                os.killpg(h.pid, signal.SIGKILL)
    with pytest.raises(StudioError):
        b.alive("ray:sft-x")


def test_ray_poll_while_the_cluster_is_unreachable(tmp_path):
    """A dashboard restart is not the worker's end: poll() keeps waiting, alive() says 'can't tell'
    (reconcile's stale heartbeat settles it); only after give_up_s does the handle report a failure."""
    log = tmp_path / "w.log"
    b = RayBackend(f"http://127.0.0.1:{_free_port()}", timeout_s=2, give_up_s=3600)
    h = RayHandle(b, "sft-x-12345678", str(log))
    assert h.poll() is None
    assert b.alive(h.ref)
    h.terminate()  # logged, not raised: the worker also stops on the job's cancel flag
    b.give_up_s = 0
    assert h.poll() == 1 and h.poll() == 1
    assert "lost contact with the Ray cluster" in h.reason and h.reason in log.read_text()


# ---- Ray: the shared real head (tests/ray_head.py) ------------------------------------------------------
@pytest.fixture
def ray(ray_url):
    """A RayBackend on the module's head; jobs a test leaves running are stopped (2 CPUs, 1 per job)."""
    b = RayBackend(ray_url)
    started = []
    real_start = b.start
    b.start = lambda *a, **k: started.append(real_start(*a, **k)) or started[-1]
    yield b
    for h in started:
        if h.poll() is None:
            h.terminate()
    for h in started:
        _end(h)


def test_ray_runs_worker_to_success_with_its_log_and_env(ray, tmp_path):
    log = tmp_path / "w.log"
    log.write_text("earlier\n")
    env = {"SFT_STUDIO_PROBE": "yes", "HF_HUB_OFFLINE": "1", "NOT_PASSED": "secret", "PATH": os.environ["PATH"]}
    code = ("import os, sys; print('hello from ray'); print('err line', file=sys.stderr); "
            "print([os.environ.get(k) for k in ('SFT_STUDIO_PROBE', 'HF_HUB_OFFLINE', 'NOT_PASSED')]); "
            "print('cwd', os.getcwd())")
    h = ray.start([PY, "-c", code], env, log, job_id="job/1 x")
    assert h.ref.startswith("ray:sft-job-1-x-") and h.ref == f"ray:{h.submission_id}"
    assert _end(h) == 0
    lines = log.read_text().splitlines()
    assert lines[0] == "earlier" and "hello from ray" in lines and "err line" in lines
    assert "['yes', '1', None]" in lines and f"cwd {os.getcwd()}" in lines
    assert not ray.alive(h.ref)


def test_ray_job_waiting_for_resources_is_alive_and_waiting(ray, tmp_path):
    """A Ray job queued behind another that holds the head's 2 CPUs stays PENDING: alive (reconcile keeps it)
    and waiting (its silence is not a hang); once the CPUs free up it runs and is neither. Submitted straight
    through the client, since start() asks for one CPU."""
    tag = f"{os.getpid()}-{int(time.time())}"
    blocker, queued = f"sft-blocker-{tag}", f"sft-queued-{tag}"
    ray.ask("submit_job", entrypoint="sleep 120", submission_id=blocker, entrypoint_num_cpus=2)
    try:
        _wait(lambda: ray.ask("get_job_status", blocker).value == "RUNNING", "the blocker to run")
        ray.ask("submit_job", entrypoint="true", submission_id=queued, entrypoint_num_cpus=1)
        time.sleep(2)  # a scheduling round: with both CPUs held, the job cannot start
        assert ray.alive(f"ray:{queued}") and ray.waiting(f"ray:{queued}")
    finally:
        ray.ask("stop_job", blocker)
    _wait(lambda: not ray.alive(f"ray:{queued}"), "the queued job to run once the CPUs are free")
    assert not ray.waiting(f"ray:{queued}") and ray.ask("get_job_status", queued).value == "SUCCEEDED"


def test_ray_exit_code(ray, tmp_path):
    h = ray.start([PY, "-c", "raise SystemExit(5)"], {}, tmp_path / "w.log", job_id="j5")
    assert _end(h) == 5
    assert h.reason is None


def test_ray_terminate_reaches_the_worker(ray, tmp_path):
    """Ray's stop: SIGTERM reaches the worker through the sh wrapper; a worker that cleans up for longer
    than Ray's default 3 s before SIGKILL still finishes (stop_wait_s travels in the runtime_env)."""
    trapped = ray.start(_worker(tmp_path / "a.pid", trap=True, cleanup_s=4), {}, tmp_path / "a.log", job_id="trap")
    _pid_file(tmp_path / "a.pid")
    trapped.terminate()
    assert _end(trapped) == EXIT_CANCELLED
    assert "cleaned up" in (tmp_path / "a.log").read_text()

    plain = ray.start(_worker(tmp_path / "b.pid"), {}, tmp_path / "b.log", job_id="plain")
    _pid_file(tmp_path / "b.pid")
    assert ray.alive(plain.ref)
    plain.terminate()
    assert _end(plain) == EXIT_CANCELLED  # asked to stop: the runner reads it as cancelled
    again = RayHandle(ray, plain.submission_id)  # a watcher that did not ask (another process)
    assert again.poll() == -signal.SIGTERM
    assert not ray.alive(plain.ref)


def test_ray_worker_killed(ray, tmp_path):
    h = ray.start(_worker(tmp_path / "k.pid"), {}, tmp_path / "k.log", job_id="kill")
    pid = _pid_file(tmp_path / "k.pid")
    reattached = backend_for_ref(h.ref, {"RAY_ADDRESS": ray.address})  # what reconcile does after a restart
    assert reattached.alive(h.ref)
    os.kill(pid, signal.SIGKILL)
    assert _end(h) == -signal.SIGKILL
    assert not reattached.alive(h.ref)


def test_ray_check(ray, tmp_path):
    ray.check(0)  # reachable
    with pytest.raises(StudioError) as e:
        ray.check(num_gpus=1)
    assert e.value.where == "RAY_ADDRESS" and "no GPU" in e.value.message
    with pytest.raises(StudioError) as e:
        ray.start([PY, "-c", "pass"], {}, tmp_path / "w.log", num_gpus=1)
    assert "no GPU" in e.value.message and not (tmp_path / "w.log").exists()
    assert not ray.alive("ray:sft-never-submitted")
    with pytest.raises(StudioError):
        ray.alive("local:1:2")


def _raises_promptly(backend: RayBackend) -> StudioError:
    """check() in a thread, bounded: it must raise StudioError, not hang."""
    box = []

    def run():
        try:
            backend.check()
            box.append(None)
        except Exception as e:  # noqa: BLE001 - handed to the test
            box.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), f"check() against {backend.address} still hangs after 60s"
    assert isinstance(box[0], StudioError), f"expected StudioError, got {box[0]!r}"
    return box[0]


def test_ray_check_without_a_cluster():
    e = _raises_promptly(backend_from_env({"SFT_STUDIO_JOBS": "ray"}))
    assert e.where == "RAY_ADDRESS" and "needs RAY_ADDRESS" in e.message
    e = _raises_promptly(RayBackend("ray://head:10001"))
    assert e.where == "RAY_ADDRESS" and "dashboard URL" in e.message
    e = _raises_promptly(RayBackend(f"http://127.0.0.1:{_free_port()}"))  # nothing listening
    assert e.where == "RAY_ADDRESS" and "cannot reach" in e.message
    with socket.socket() as silent:  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        e = _raises_promptly(RayBackend(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout_s=1))
    assert e.where == "RAY_ADDRESS" and "cannot reach" in e.message
