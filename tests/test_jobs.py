"""The job queue with real worker processes: cancel, kill -9, resume from the checkpoint step, ordering."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from sqlalchemy import insert, update

from sft_core import jobs
from sft_core.db import jobs as jobs_db, runs as runs_db, write
from sft_core.db.schema import jobs as jobs_table
from sft_core.train import last_checkpoint
from tests.test_train import make_dataset, tiny_cfg


def _events(run_dir):
    p = run_dir / "events.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def _wait(pred, timeout=240, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _start(ws, store, run_id):
    """Claim the run's job and run it in a thread, as the app's dispatcher does."""
    job = jobs.claim(store)
    assert job and job["ref"] == run_id
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("status", jobs.run_job(job, ws, store)))
    t.start()
    return job, t, result


@pytest.fixture
def queue_env(ws, store, tmp_path, tiny_model_dir, monkeypatch):
    make_dataset(ws, store, tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # worker processes inherit it: faster on this shared 2-core box
    return ws, store


def test_cancel_then_resume_continues_from_checkpoint(queue_env, tiny_model_dir):
    ws, store = queue_env
    run_id = jobs.submit_train(tiny_cfg(tiny_model_dir, max_steps=400, save_steps=4, run_name="c1"), ws, store)
    run_dir = ws.runs_dir(run_id)
    job, t, result = _start(ws, store, run_id)
    _wait(lambda: last_checkpoint(run_dir) is not None, what="first checkpoint")
    assert jobs.cancel(run_id, ws, store) == "cancelling"
    t.join(120)
    assert result["status"] == "cancelled"
    assert runs_db.get(store, run_id)["status"] == "cancelled"
    ckpt = last_checkpoint(run_dir)
    step = int(ckpt.name.split("-")[-1])
    assert step >= 4 and not (run_dir / "adapter").exists()

    # resume: a new job for the same run, starting at the checkpoint's step, running to the end
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["config"]["max_steps"] = step + 6  # finish quickly: same run, a few more steps
    (run_dir / "config.json").write_text(json.dumps(cfg))
    jobs.resume(run_id, ws, store)
    job2, t2, result2 = _start(ws, store, run_id)
    t2.join(240)
    assert result2["status"] == "succeeded", jobs_db.recent(store)
    begins = [e for e in _events(run_dir) if e.get("event") == "train_begin"]
    assert begins[0]["step"] == 0 and begins[-1]["step"] == step, begins
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert runs_db.get(store, run_id)["status"] == "succeeded"


def test_kill_9_is_failed_with_reason_then_resumes_from_checkpoint(queue_env, tiny_model_dir):
    """kill -9 of a real worker once it has a checkpoint: job and run failed with the reason, the store
    consistent; `resume` continues from that checkpoint's step (not step 0) and finishes with an adapter."""
    ws, store = queue_env
    run_id = jobs.submit_train(tiny_cfg(tiny_model_dir, max_steps=400, save_steps=2, run_name="k1"), ws, store)
    run_dir = ws.runs_dir(run_id)
    job, t, result = _start(ws, store, run_id)
    _wait(lambda: last_checkpoint(run_dir) is not None, what="first checkpoint")
    pid = jobs_db.get(store, job["id"])["pid"]
    os.killpg(pid, signal.SIGKILL)
    t.join(60)
    row = jobs_db.get(store, job["id"])
    assert result["status"] == "failed" and row["status"] == "failed"
    assert "SIGKILL" in row["error"]
    assert runs_db.get(store, run_id)["status"] == "failed"
    assert jobs_db.with_status(store, "running") == []
    assert not (run_dir / "adapter").exists()

    # the last complete checkpoint (one cut off mid-write has no trainer_state.json and is skipped)
    step = int(last_checkpoint(run_dir).name.split("-")[-1])
    assert step >= 2
    cfg = json.loads((run_dir / "config.json").read_text())
    cfg["config"]["max_steps"] = step + 2  # finish quickly: same run, two more steps
    (run_dir / "config.json").write_text(json.dumps(cfg))
    job2_id = jobs.resume(run_id, ws, store)
    job2, t2, result2 = _start(ws, store, run_id)
    assert job2["id"] == job2_id
    t2.join(240)
    assert result2["status"] == "succeeded", jobs_db.recent(store)
    begins = [e for e in _events(run_dir) if e.get("event") == "train_begin"]
    assert begins[0]["step"] == 0 and begins[-1]["step"] == step, begins
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == step + 2
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["resumed"] is True and manifest["first_started_at"] < manifest["started_at"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert runs_db.get(store, run_id)["status"] == "succeeded"


def test_vanished_worker_found_by_reconcile(queue_env, tiny_model_dir):
    """A job left 'running' by a process that no longer exists (machine restart) is marked failed."""
    ws, store = queue_env
    run_id = jobs.submit_train(tiny_cfg(tiny_model_dir, run_name="v1"), ws, store)
    job = jobs.claim(store)
    import subprocess
    dead = subprocess.Popen(["true"])
    dead.wait()
    write(store, update(jobs_table).where(jobs_table.c.id == job["id"]).values(pid=dead.pid))
    assert jobs.reconcile(store, ws=ws) == [job["id"]]
    row = jobs_db.get(store, job["id"])
    assert row["status"] == "failed" and "disappeared" in row["error"]
    assert runs_db.get(store, run_id)["status"] == "failed"
    with pytest.raises(jobs.JobError, match="no checkpoint"):
        jobs.resume(run_id, ws, store)


def test_one_job_at_a_time_in_order(queue_env, tiny_model_dir):
    ws, store = queue_env
    a = jobs.submit_train(tiny_cfg(tiny_model_dir, run_name="a"), ws, store)
    b = jobs.submit_train(tiny_cfg(tiny_model_dir, run_name="b"), ws, store)
    first = jobs.claim(store)
    assert first["ref"] == a
    assert jobs.claim(store) is None  # a is running: b waits
    assert jobs.cancel(b, ws, store) == "cancelled"  # queued jobs cancel at once
    assert runs_db.get(store, b)["status"] == "cancelled"
    with pytest.raises(jobs.JobError):
        jobs.cancel("nope", ws, store)


def test_worker_that_ended_unwatched_keeps_its_own_outcome(queue_env, tiny_model_dir):
    """The watcher died (app restart, closed terminal) but the real worker ran on and finished:
    reconcile records what the worker says (exit.json), not a made-up failure; its heartbeat thread beat."""
    import subprocess
    ws, store = queue_env
    run_id = jobs.submit_train(tiny_cfg(tiny_model_dir, max_steps=3, run_name="u1"), ws, store)
    job = jobs.claim(store)
    argv = jobs.JOB_KINDS["train"].build_command(job, ws, store)
    proc = subprocess.Popen(argv, env={**os.environ, "SFT_STUDIO_HOME": str(ws.root)}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    write(store, update(jobs_table).where(jobs_table.c.id == job["id"]).values(pid=proc.pid))
    assert jobs.reconcile(store, ws=ws) == []  # alive and beating: left alone
    assert proc.wait(240) == 0
    assert jobs.reconcile(store, ws=ws) == [job["id"]]
    row = jobs_db.get(store, job["id"])
    assert row["status"] == "succeeded" and row["error"] is None
    assert row["heartbeat_at"] > row["started_at"]
    assert runs_db.get(store, run_id)["status"] == "succeeded"
    assert (ws.runs_dir(run_id) / "adapter" / "adapter_config.json").exists()


def test_heartbeat_thread_beats_and_picks_up_cancel(queue_env, tiny_model_dir):
    from sft_core import train
    ws, store = queue_env
    jobs.submit_train(tiny_cfg(tiny_model_dir, run_name="h1"), ws, store)
    job = jobs.claim(store)
    write(store, update(jobs_table).where(jobs_table.c.id == job["id"]).values(heartbeat_at=0))
    train._STOP["requested"] = False
    stop = train.start_heartbeat(store, job["id"], every_s=0.05)
    try:
        _wait(lambda: jobs_db.get(store, job["id"])["heartbeat_at"] > 0,
              timeout=10, what="a heartbeat")
        assert not train._STOP["requested"]
        jobs_db.request_cancel(store, job["id"])
        _wait(lambda: train._STOP["requested"], timeout=10, what="the cancel flag")
    finally:
        stop.set()
        train._STOP["requested"] = False


def test_stale_heartbeat_with_live_pid_is_failed(queue_env, tiny_model_dir):
    """After a restart the old pid may belong to another live process: no heartbeat for long = failed."""
    ws, store = queue_env
    run_id = jobs.submit_train(tiny_cfg(tiny_model_dir, run_name="s1"), ws, store)
    job = jobs.claim(store)
    write(store, update(jobs_table).where(jobs_table.c.id == job["id"])
          .values(pid=os.getpid(), heartbeat_at=time.time() - jobs.HEARTBEAT_STALE_S - 5))
    assert jobs.reconcile(store, ws=ws) == [job["id"]]
    row = jobs_db.get(store, job["id"])
    assert row["status"] == "failed" and "stopped reporting" in row["error"]
    assert runs_db.get(store, run_id)["status"] == "failed"


def _insert_running(store, job_id, ref, pid, pid_start):
    now = time.time()
    write(store, insert(jobs_table).values(id=job_id, kind="train", status="running", ref=ref, created_at=now,
                                           started_at=now, heartbeat_at=now, pid=pid, pid_start=pid_start))


def test_cancel_never_signals_a_reused_pid(ws, store):
    """The job's pid now belongs to another process (its start time differs): cancel records the
    request but signals nothing; reconcile treats the worker as gone. With the recorded start time,
    cancel does signal the group."""
    import subprocess
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        runs_db.insert_run(store, "r-reuse", "d", "v", "m", "/nowhere", {}, status="running")
        _insert_running(store, "j-reuse", "r-reuse", other.pid, "1")  # started at tick 1: not this process
        assert jobs.cancel("r-reuse", ws, store) == "cancelling"
        time.sleep(0.5)
        assert other.poll() is None, "cancel killed a process that was not the job's worker"
        assert jobs_db.cancel_requested(store, "j-reuse")
        assert "j-reuse" in jobs.reconcile(store, ws=ws)  # not our worker: the job is settled as failed
        assert jobs_db.get(store, "j-reuse")["status"] == "failed"

        runs_db.insert_run(store, "r-own", "d", "v", "m", "/nowhere", {}, status="running")
        _insert_running(store, "j-own", "r-own", other.pid, jobs._proc_start(other.pid))
        assert jobs.cancel("r-own", ws, store) == "cancelling"
        assert other.wait(10) == -signal.SIGTERM
    finally:
        if other.poll() is None:
            other.kill()
            other.wait()


def test_two_resumes_at_once_queue_one_job(ws, store, tmp_path, monkeypatch):
    """Both callers pass the checks that need no lock (a barrier holds them there together); the
    state check inside the re-queueing transaction lets exactly one of them queue a job."""
    run_dir = tmp_path / "r-twice"
    (run_dir / "checkpoint-2").mkdir(parents=True)
    runs_db.insert_run(store, "r-twice", "d", "v", "m", str(run_dir), {}, status="failed")
    barrier = threading.Barrier(2)
    import sft_core.train as train_mod
    real = train_mod.last_checkpoint

    def both_here(path):
        barrier.wait(10)
        return real(path) or path / "checkpoint-2"

    monkeypatch.setattr(train_mod, "last_checkpoint", both_here)
    results = []

    def go():
        from sft_core.store import Store
        st = Store(ws.db_url)  # one connection per caller, as two app workers would have
        try:
            results.append(("ok", jobs.resume("r-twice", ws, st)))
        except jobs.JobError as e:
            results.append(("refused", str(e)))
        finally:
            st.close()

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r[0] for r in results) == ["ok", "refused"], results
    assert [j["status"] for j in jobs_db.live(store, ref="r-twice")] == ["queued"]
