"""The job queue with real worker processes: cancel, kill -9, resume from the checkpoint step, ordering."""
from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from sft_core import jobs
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
def queue_env(ws, store, tmp_path, tiny_model_dir):
    make_dataset(ws, store, tmp_path)
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
    assert store.query_one("SELECT status FROM runs WHERE id=?", (run_id,))["status"] == "cancelled"
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
    assert result2["status"] == "succeeded", store.query("SELECT * FROM jobs")
    begins = [e for e in _events(run_dir) if e.get("event") == "train_begin"]
    assert begins[0]["step"] == 0 and begins[-1]["step"] == step, begins
    assert (run_dir / "adapter" / "adapter_config.json").exists()
    assert store.query_one("SELECT status FROM runs WHERE id=?", (run_id,))["status"] == "succeeded"


def test_kill_9_is_failed_with_reason_and_store_consistent(queue_env, tiny_model_dir):
    ws, store = queue_env
    run_id = jobs.submit_train(tiny_cfg(tiny_model_dir, max_steps=400, save_steps=4, run_name="k1"), ws, store)
    job, t, result = _start(ws, store, run_id)
    _wait(lambda: any("loss" in e for e in _events(ws.runs_dir(run_id))), what="training to start")
    pid = store.query_one("SELECT pid FROM jobs WHERE id=?", (job["id"],))["pid"]
    os.killpg(pid, signal.SIGKILL)
    t.join(60)
    row = store.query_one("SELECT * FROM jobs WHERE id=?", (job["id"],))
    assert result["status"] == "failed" and row["status"] == "failed"
    assert "SIGKILL" in row["error"]
    assert store.query_one("SELECT status FROM runs WHERE id=?", (run_id,))["status"] == "failed"
    assert store.query("SELECT * FROM jobs WHERE status='running'") == []


def test_vanished_worker_found_by_reconcile(queue_env, tiny_model_dir):
    """A job left 'running' by a process that no longer exists (machine restart) is marked failed."""
    ws, store = queue_env
    run_id = jobs.submit_train(tiny_cfg(tiny_model_dir, run_name="v1"), ws, store)
    job = jobs.claim(store)
    import subprocess
    dead = subprocess.Popen(["true"])
    dead.wait()
    store.execute("UPDATE jobs SET pid=? WHERE id=?", (dead.pid, job["id"]))
    assert jobs.reconcile(store) == [job["id"]]
    row = store.query_one("SELECT * FROM jobs WHERE id=?", (job["id"],))
    assert row["status"] == "failed" and "disappeared" in row["error"]
    assert store.query_one("SELECT status FROM runs WHERE id=?", (run_id,))["status"] == "failed"
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
    assert store.query_one("SELECT status FROM runs WHERE id=?", (b,))["status"] == "cancelled"
    with pytest.raises(jobs.JobError):
        jobs.cancel("nope", ws, store)
