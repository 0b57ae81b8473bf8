"""The studio's real jobs through the Ray backend (SFT_STUDIO_JOBS=ray): tiny-model training and an eval
run as Ray jobs on a real local head (tests/ray_head.py), watched by ``jobs.run_in_foreground`` in a
thread; cancel, a killed worker, a worker nobody watches (``reconcile``), and submit-time refusals
that write nothing.

One workspace for the module (the eval uses the adapter the training test made); after each test
whatever it left running (workers, live job rows, Ray jobs) is ended so the next test starts clean.
Every wait has a deadline and says what it waited for."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from evals import runner
from sft_core import StudioError, job_backends, jobs
from sft_core.db import evals as evals_db, jobs as jobs_db, runs as runs_db
from sft_core.job_backends import RayBackend
from sft_core.train import EXIT_FILE, last_checkpoint
from sft_core.workspace import read_jsonl
from tests.ray_head import free_port, ray_url  # noqa: F401 (ray_url: the head fixture)
from tests.test_train import make_dataset, tiny_cfg

JOB_S = 300  # one worker on a busy 2-core machine: Ray's supervisor actor, python + torch import, the work
SUBMIT_S = 30  # a refusal at submit time: seconds, not a hang
LIVE = ("PENDING", "RUNNING")


# ---- helpers ---------------------------------------------------------------------------------------------
def _wait(pred, what: str, timeout: float = JOB_S, detail=lambda: ""):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"{what}: not within {timeout:.0f}s. {detail()}")


def _run(ws, store, job_id: str):
    """Run the job as the CLI does (``run_in_foreground``), in a thread; (thread, result box)."""
    box: dict = {}

    def go():
        try:
            box["status"] = jobs.run_in_foreground(job_id, ws, store)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box["error"] = e
    t = threading.Thread(target=go, name=f"runner-{job_id}", daemon=True)
    t.start()
    return t, box


def _join(t: threading.Thread, box: dict, what: str, timeout: float = JOB_S, detail=lambda: "") -> str:
    t.join(timeout)
    if t.is_alive():
        pytest.fail(f"{what}: the runner still watches its job after {timeout:.0f}s. {detail()}")
    if "error" in box:
        raise box["error"]
    return box["status"]


def _about(store, job_id: str, log=None):
    """For failure messages: the job's row and the tail of its worker log."""
    def text():
        row = jobs_db.get(store, job_id)
        tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else "(no log)"
        return f"job row: {row}\nworker log tail:\n{tail}"
    return text


def _train_job(ws, store, tiny_model_dir, name: str, **cfg) -> tuple[str, str]:
    run_id = jobs.submit_train(tiny_cfg(tiny_model_dir, run_name=name, **cfg), ws, store)
    return run_id, jobs.latest_job(run_id, store)["id"]


def _events(run_dir):
    p = run_dir / "events.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def _worker_processes(marker: str, job_id: str | None = None) -> list:
    """Processes (not this one) whose command line holds ``marker``; with ``job_id``, only a worker's
    own process, whose arguments include ``--job-id <job_id>`` (not the shell Ray starts it from, whose
    single ``-c`` argument merely contains the text)."""
    import psutil
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = p.info["cmdline"] or []
            if p.pid == os.getpid() or not any(marker in a for a in cmd):
                continue
            if job_id is not None and not any(a == "--job-id" and b == job_id for a, b in zip(cmd, cmd[1:])):
                continue
            found.append(p)
        except psutil.Error:
            pass
    return found


def _ray_job(url: str, ref: str):
    """What Ray itself says about the worker ``ref`` names (JobDetails)."""
    assert ref.startswith("ray:"), ref
    return RayBackend(url).ask("get_job_info", ref[len("ray:"):])


# ---- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def home(module_home, tiny_model_dir, ray_url):  # noqa: F811
    """(Workspace, Store, head URL): the module's workspace with the zorbia dataset, and the studio
    configured for the head (SFT_STUDIO_JOBS=ray, RAY_ADDRESS) meanwhile."""
    ws, store = module_home
    make_dataset(ws, store, ws.root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFT_STUDIO_JOBS", "ray")
        mp.setenv("RAY_ADDRESS", ray_url)
        yield ws, store, ray_url


@pytest.fixture(autouse=True)
def leave_nothing_running(home):
    """After each test: no Ray job of its left pending or running on the head (2 CPUs, 1 per job; each is
    stopped, its worker killed) and no live job row (it would hold the queue's accelerator slot)."""
    yield
    ws, store, url = home
    import psutil
    client = RayBackend(url)

    def settled() -> bool:
        live = [j for j in client.ask("list_jobs") if str(getattr(j.status, "value", j.status)) in LIVE]
        for j in live:
            client.ask("stop_job", j.submission_id)
        for p in _worker_processes(str(ws.root)):  # the workers themselves: no step, no checkpoint first
            try:
                p.kill()
            except psutil.Error:
                pass
        return not live
    _wait(settled, "the Ray jobs the test left to end", 120)
    for job in jobs_db.live(store):
        jobs._finish(store, job, "failed", "left behind by a test", ws=ws)


@pytest.fixture(scope="module")
def trained(home, tiny_model_dir):
    """A short training run through Ray, watched to its end: (run_id, job_id, final status)."""
    ws, store, _ = home
    run_id, job_id = _train_job(ws, store, tiny_model_dir, "ray-trained", max_steps=4)
    t, box = _run(ws, store, job_id)
    status = _join(t, box, "the training run", detail=_about(store, job_id, ws.runs_dir(run_id) / "worker.log"))
    return run_id, job_id, status


# ---- 1. training -----------------------------------------------------------------------------------------
def test_training_runs_as_a_ray_job(home, trained):
    ws, store, url = home
    run_id, job_id, status = trained
    run_dir = ws.runs_dir(run_id)
    row = jobs_db.get(store, job_id)
    assert status == "succeeded", _about(store, job_id, run_dir / "worker.log")()
    assert row["status"] == "succeeded" and row["error"] is None
    assert row["worker_ref"].startswith("ray:") and row["pid"] is None  # no local process of ours
    info = _ray_job(url, row["worker_ref"])  # Ray ran it: the job's own command line, to its end
    assert str(getattr(info.status, "value", info.status)) == "SUCCEEDED"
    assert "sft_core.train" in info.entrypoint and job_id in info.entrypoint
    assert runs_db.get(store, run_id)["status"] == "succeeded"
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((run_dir / EXIT_FILE).read_text())["job_id"] == job_id  # the worker's own exit record
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 4
    log = (run_dir / "worker.log").read_text()
    assert "'loss'" in log and "train_runtime" in log, log[-2000:]  # the Trainer's printed logs, through Ray


# ---- 2. eval ---------------------------------------------------------------------------------------------
def test_eval_of_the_adapter_runs_as_a_ray_job(home, trained, tiny_model_dir, monkeypatch):
    """The base model and the adapter the training job made, two rows each, on the transformers engine
    (SFT_STUDIO_ENGINE travels to the Ray worker with the SFT_STUDIO_* settings)."""
    ws, store, url = home
    run_id, _, status = trained
    assert status == "succeeded", "needs the adapter of test_training_runs_as_a_ray_job"
    monkeypatch.setenv("SFT_STUDIO_ENGINE", "hf")
    systems = ["prompt", f"sft:{run_id}"]
    eval_id = runner.create_eval("zorbia", systems, split="train", limit=2, metrics=["exact_match"], general=False,
                                 max_new_tokens=8, base_model=str(tiny_model_dir), ws=ws, store=store)
    job_id = runner.submit_eval(eval_id, ws, store)
    log = ws.root / "logs" / f"{job_id}.log"
    t, box = _run(ws, store, job_id)
    status = _join(t, box, "the eval", detail=_about(store, job_id, log))
    assert status == "succeeded", _about(store, job_id, log)()
    row = jobs_db.get(store, job_id)
    assert row["worker_ref"].startswith("ray:") and row["pid"] is None
    assert "sft_core.worker" in _ray_job(url, row["worker_ref"]).entrypoint
    assert evals_db.get(store, eval_id)["status"] == "succeeded"
    outs = read_jsonl(ws.evals_dir(eval_id) / "outputs.jsonl")
    keys = [(o["row_id"], o["system"]) for o in outs]
    assert len(keys) == len(set(keys)) == 2 * len(systems) and {s for _, s in keys} == set(systems), keys
    # what a random tiny model says is its floats' business: answered, within max_new_tokens
    assert all(isinstance(o["output"], str) and o["prompt_tokens"] > 0 and 0 <= o["completion_tokens"] <= 8
               and o["latency_s"] > 0 for o in outs), outs
    assert (ws.evals_dir(eval_id) / "scores.json").exists() and (ws.evals_dir(eval_id) / "report.md").exists()
    assert f"eval {eval_id}: attempt 1" in log.read_text()  # the worker's output, in the job's log


# ---- 3. cancel, then resume ------------------------------------------------------------------------------
def test_cancel_stops_the_ray_job_keeps_the_checkpoint_and_resume_runs_through_ray(home, tiny_model_dir):
    ws, store, url = home
    run_id, job_id = _train_job(ws, store, tiny_model_dir, "ray-cancel", max_steps=400, save_steps=2)
    run_dir = ws.runs_dir(run_id)
    about = _about(store, job_id, run_dir / "worker.log")
    t, box = _run(ws, store, job_id)
    _wait(lambda: last_checkpoint(run_dir), "the run's first checkpoint", detail=about)
    assert jobs.cancel(run_id, ws, store) == "cancelling"  # from this thread, not the runner's
    status = _join(t, box, "the cancelled run", timeout=120, detail=about)
    row = jobs_db.get(store, job_id)
    assert status == "cancelled" and row["status"] == "cancelled" and row["error"] is None, about()
    assert row["worker_ref"].startswith("ray:")
    assert runs_db.get(store, run_id)["status"] == "cancelled"
    ckpt = last_checkpoint(run_dir)
    step = int(ckpt.name.split("-")[-1])
    assert step >= 2 and not (run_dir / "adapter").exists()
    assert any(e.get("event") == "cancelled" for e in _events(run_dir))  # the worker stopped itself, cleanly

    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["config"]["max_steps"] = step + 2  # the same run, two more steps
    (run_dir / "config.json").write_text(json.dumps(cfg))
    job2 = jobs.resume(run_id, ws, store)
    about2 = _about(store, job2, run_dir / "worker.log")
    t, box = _run(ws, store, job2)
    assert _join(t, box, "the resumed run", detail=about2) == "succeeded", about2()
    row2 = jobs_db.get(store, job2)
    assert row2["worker_ref"].startswith("ray:") and row2["worker_ref"] != row["worker_ref"]
    begins = [e["step"] for e in _events(run_dir) if e.get("event") == "train_begin"]
    assert begins[0] == 0 and begins[-1] == step, begins
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert runs_db.get(store, run_id)["status"] == "succeeded"


# ---- 4. a killed worker ----------------------------------------------------------------------------------
def test_killed_ray_worker_fails_its_job_with_the_reason(home, tiny_model_dir):
    ws, store, url = home
    run_id, job_id = _train_job(ws, store, tiny_model_dir, "ray-killed", max_steps=400, save_steps=1000)
    about = _about(store, job_id, ws.runs_dir(run_id) / "worker.log")
    t, box = _run(ws, store, job_id)
    procs = _wait(lambda: _worker_processes("sft_core.train", job_id), "the training worker's process", detail=about)
    assert len(procs) == 1, procs
    _wait(lambda: _events(ws.runs_dir(run_id)), "the worker to start its run", detail=about)
    os.kill(procs[0].pid, signal.SIGKILL)
    status = _join(t, box, "the runner to see the killed worker", timeout=120, detail=about)
    row = jobs_db.get(store, job_id)
    assert status == "failed" and row["status"] == "failed", about()
    assert "killed by SIGKILL" in row["error"], row["error"]
    assert runs_db.get(store, run_id)["status"] == "failed"
    assert jobs_db.with_status(store, "running") == []
    assert not jobs.reconcile(store, ws=ws)  # nothing left to settle


def test_ray_workers_nobody_watches_are_settled_by_reconcile(home, tiny_model_dir):
    """The watcher went away (app restart): a Ray job that finished meanwhile gets the outcome its worker
    recorded; one Ray does not know (deleted, or the cluster was replaced) is failed as disappeared."""
    ws, store, url = home
    run_id, job_id = _train_job(ws, store, tiny_model_dir, "ray-unwatched", max_steps=2)
    job = jobs.claim(store)
    assert job is not None and job["id"] == job_id
    run_dir = ws.runs_dir(run_id)
    backend = job_backends.backend_from_env()
    handle = backend.start(jobs.JOB_KINDS["train"].build_command(job, ws, store),
                           {**os.environ, "SFT_STUDIO_HOME": str(ws.root)}, run_dir / "worker.log", job_id=job_id)
    jobs_db.set_worker(store, job_id, None, None, handle.ref)
    about = _about(store, job_id, run_dir / "worker.log")
    assert jobs.reconcile(store, ws=ws) == []  # on the cluster, pending or running: left alone
    _wait(lambda: not backend.alive(handle.ref), "the unwatched Ray job to end", detail=about)
    assert jobs_db.get(store, job_id)["status"] == "running"  # nobody has looked yet
    assert jobs.reconcile(store, ws=ws) == [job_id]
    row = jobs_db.get(store, job_id)
    assert row["status"] == "succeeded" and row["error"] is None, about()
    assert runs_db.get(store, run_id)["status"] == "succeeded"
    assert (run_dir / "adapter" / "adapter_config.json").exists()

    gone_run, gone_job = _train_job(ws, store, tiny_model_dir, "ray-gone", max_steps=2)
    assert jobs.claim(store)["id"] == gone_job
    jobs_db.set_worker(store, gone_job, None, None, "ray:sft-never-submitted-00000000")
    assert jobs.reconcile(store, ws=ws) == [gone_job]
    row = jobs_db.get(store, gone_job)
    assert row["status"] == "failed" and "disappeared" in row["error"], row
    assert runs_db.get(store, gone_run)["status"] == "failed"


# ---- 5. refused at submit time ---------------------------------------------------------------------------
def _refused(fn) -> StudioError:
    """``fn()`` in a thread, bounded: it must raise StudioError within SUBMIT_S, not hang or pass."""
    box = []

    def go():
        try:
            fn()
            box.append(None)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            box.append(e)
    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(SUBMIT_S)
    assert not t.is_alive(), f"still no answer after {SUBMIT_S}s"
    assert isinstance(box[0], StudioError), f"expected a StudioError, got {box[0]!r}"
    return box[0]


def _written(ws, store, name: str) -> dict:
    evals_dir = ws.evals_dir()
    return {"run row": runs_db.exists(store, name), "run dir": ws.runs_dir(name).exists(),
            "jobs": jobs_db.count(store), "evals": len(evals_db.list_evals(store)),
            "eval dirs": sorted(p.name for p in evals_dir.iterdir()) if evals_dir.exists() else []}


def test_bad_ray_configuration_is_refused_at_submit_and_writes_nothing(home, tiny_model_dir, monkeypatch):
    ws, store, url = home
    before = _written(ws, store, "ray-refused")
    assert not before["run row"] and not before["run dir"]

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", dead)
    e = _refused(lambda: jobs.submit_train(tiny_cfg(tiny_model_dir, run_name="ray-refused"), ws, store))
    assert e.where == "RAY_ADDRESS" and "cannot reach the Ray cluster" in e.message and dead in e.message, e
    e = _refused(lambda: runner.create_eval("zorbia", ["prompt"], split="train", limit=1, general=False,
                                            base_model=str(tiny_model_dir), ws=ws, store=store))
    assert e.where == "RAY_ADDRESS" and dead in e.message, e
    assert _written(ws, store, "ray-refused") == before

    monkeypatch.setenv("RAY_ADDRESS", url)  # the real head, which has no GPU
    e = _refused(lambda: jobs.submit_train(tiny_cfg(tiny_model_dir, run_name="ray-refused", num_gpus=1), ws, store))
    assert e.where == "RAY_ADDRESS" and "no GPU" in e.message and url in e.message, e
    assert _written(ws, store, "ray-refused") == before
