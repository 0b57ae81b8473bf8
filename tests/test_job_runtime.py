"""One job runtime: evals, index builds and the example bootstrap run as jobs in worker processes.

Real processes and real SQLite throughout. The eval's systems are ``openai:*`` models served by the
scripted local endpoint of tests/test_judge.py (the boundary that stands in for a remote model), slowed
down per answer so a test can act while the worker is mid-generation.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
from sqlalchemy import insert, update

from evals import runner
from sft_core import jobs
from sft_core.config import StudioSettings
from sft_core.db import evals as evals_db, jobs as jobs_db, runs as runs_db, write
from sft_core.db.schema import jobs as jobs_table
from sft_core.workspace import read_jsonl
from tests.test_jobs import _wait
from tests.test_judge import ScriptedOpenAI, import_tiny

ROWS = [(f"Question number {i}?", f"Answer {i}.") for i in range(12)]
SYSTEMS = ["openai:zorbia", "openai:echo"]


@pytest.fixture
def slow_server(monkeypatch):
    srv = ScriptedOpenAI()
    srv.delay_s = 0.4
    monkeypatch.setenv("SFT_STUDIO_OPENAI_BASE_URL", srv.url)
    yield srv
    srv.close()


def _new_eval(ws, store) -> str:
    import_tiny(ws, store, test_rows=ROWS)
    return runner.create_eval("tiny", SYSTEMS, metrics=["exact_match"], general=False, ws=ws, store=store,
                              settings=StudioSettings())


def _watch(ws, store):
    """Claim the next job and watch it in a thread, as the app's dispatcher does."""
    job = jobs.claim(store)
    assert job is not None
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("status", jobs.run_job(job, ws, store)))
    t.start()
    return job, t, out


def _outputs(ws, eval_id):
    return read_jsonl(ws.evals_dir(eval_id) / "outputs.jsonl")


def _assert_complete(ws, eval_id):
    keys = [(o["set"], o["row_id"], o["system"]) for o in _outputs(ws, eval_id)]
    assert len(keys) == len(set(keys)) == len(ROWS) * len(SYSTEMS), len(keys)


def test_eval_job_killed_then_resumed_answers_each_row_once(ws, store, slow_server):
    eval_id = _new_eval(ws, store)
    job_id = runner.submit_eval(eval_id, ws, store)
    assert json.loads(jobs.job_row(job_id, store)["payload"])["accelerator"] is False  # only remote systems
    job, t, out = _watch(ws, store)
    _wait(lambda: len(_outputs(ws, eval_id)) >= 3, what="the first answers")
    pid = jobs.job_row(job_id, store)["pid"]
    os.kill(pid, signal.SIGKILL)  # mid-generation
    t.join(60)
    assert out["status"] == "failed" and "SIGKILL" in jobs.job_row(job_id, store)["error"]
    assert evals_db.get(store, eval_id)["status"] == "failed"
    before = len(_outputs(ws, eval_id))
    assert 3 <= before < len(ROWS) * len(SYSTEMS)

    slow_server.requests.clear()
    runner.submit_eval(eval_id, ws, store)  # resume
    job, t, out = _watch(ws, store)
    t.join(240)
    assert out["status"] == "succeeded", jobs.job_row(job["id"], store)
    _assert_complete(ws, eval_id)
    answered = [r for r in slow_server.requests if not r["messages"][-1]["content"].startswith(("You are judging", "Score"))]
    assert len(answered) == len(ROWS) * len(SYSTEMS) - before  # nothing stored was asked again
    assert evals_db.get(store, eval_id)["status"] == "succeeded"
    assert (ws.evals_dir(eval_id) / "report.html").exists()
    p = jobs.progress_of(jobs.job_row(job["id"], store))
    assert p["done"] == p["total"]


def test_eval_worker_outlives_its_watcher_and_reconcile_settles_it(ws, store, slow_server):
    """The app (the watcher) goes away mid-eval; the worker goes on and finishes; a later reconcile
    (the restarted app) settles the job from the worker's exit record. A worker that died with its
    watcher is failed by reconcile instead, and the eval resumes."""
    eval_id = _new_eval(ws, store)
    job_id = runner.submit_eval(eval_id, ws, store)
    job = jobs.claim(store)
    argv = jobs.JOB_KINDS["eval"].build_command(job, ws, store)
    proc = subprocess.Popen(argv, start_new_session=True, env={**os.environ, "SFT_STUDIO_HOME": str(ws.root)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    write(store, update(jobs_table).where(jobs_table.c.id == job_id)
          .values(pid=proc.pid, pid_start=jobs._proc_start(proc.pid)))
    _wait(lambda: len(_outputs(ws, eval_id)) >= 2, what="the first answers")
    assert jobs.reconcile(store, ws=ws) == []  # alive and heartbeating: left alone
    assert jobs.describe(jobs.job_row(job_id, store), store).startswith(f"eval {eval_id}: running")
    proc.wait(240)  # nobody watches it; it finishes on its own
    assert jobs.reconcile(store, ws=ws) == [job_id]
    assert jobs.job_row(job_id, store)["status"] == "succeeded"
    _assert_complete(ws, eval_id)

    # the same, but the worker dies too (kill -9 while unwatched): failed by reconcile, resumable
    eval2 = runner.create_eval("tiny", SYSTEMS, metrics=["exact_match"], general=False, ws=ws, store=store,
                               settings=StudioSettings())
    job2 = runner.submit_eval(eval2, ws, store)
    job = jobs.claim(store)
    proc = subprocess.Popen(jobs.JOB_KINDS["eval"].build_command(job, ws, store), start_new_session=True,
                            env={**os.environ, "SFT_STUDIO_HOME": str(ws.root)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    write(store, update(jobs_table).where(jobs_table.c.id == job2)
          .values(pid=proc.pid, pid_start=jobs._proc_start(proc.pid)))
    _wait(lambda: len(_outputs(ws, eval2)) >= 2, what="the first answers")
    proc.kill()
    proc.wait()
    assert jobs.reconcile(store, ws=ws) == [job2]
    assert jobs.job_row(job2, store)["status"] == "failed"
    assert evals_db.get(store, eval2)["status"] == "failed"
    runner.submit_eval(eval2, ws, store)
    _, t, out = _watch(ws, store)
    t.join(240)
    assert out["status"] == "succeeded"
    _assert_complete(ws, eval2)


def test_cancel_every_kind(ws, store, slow_server, tmp_path):
    from sft_core import example, retrieval
    # queued: cancelled at once, whatever the kind
    eval_id = _new_eval(ws, store)
    runner.submit_eval(eval_id, ws, store)
    doc = tmp_path / "a.md"
    doc.write_text("# A\n\nSome text.")
    retrieval.submit_build([doc], "kb1", ws=ws, store=store)
    example.submit_bootstrap(ws, store, base_model="m")
    for ref in (eval_id, "kb1", example.BOOTSTRAP_REF):
        assert jobs.cancel(ref, ws, store) == "cancelled"
        assert jobs.latest_job(ref, store)["status"] == "cancelled"
    assert evals_db.get(store, eval_id)["status"] == "interrupted"
    # running: the worker stops between answers, keeps them, and the eval can resume
    runner.submit_eval(eval_id, ws, store)
    job, t, out = _watch(ws, store)
    _wait(lambda: len(_outputs(ws, eval_id)) >= 2, what="the first answers")
    assert jobs.cancel(eval_id, ws, store) == "cancelling"
    t.join(60)
    assert out["status"] == "cancelled"
    assert evals_db.get(store, eval_id)["status"] == "interrupted"
    kept = len(_outputs(ws, eval_id))
    assert 2 <= kept < len(ROWS) * len(SYSTEMS)


def test_kb_build_job_builds_the_index(ws, store, tmp_path):
    from sft_core import retrieval
    doc = tmp_path / "zorbia.md"
    doc.write_text("# Zorbia\n\nThe capital of Zorbia is Quuxville.")
    job_id = retrieval.submit_build([doc], "zkb", ws=ws, store=store)
    assert jobs.run_in_foreground(job_id, ws, store) == "succeeded"
    assert jobs.progress_of(jobs.job_row(job_id, store))["result"]  # what the build reported
    hits = retrieval.open_kb("zkb", ws).search("capital of Zorbia", k=1)
    assert "Quuxville" in hits[0].text
    assert not list((ws.root / "uploads").iterdir())  # the staged copies are gone


def test_accelerator_jobs_wait_light_jobs_do_not(ws, store):
    """A queued eval that computes locally waits for a running training job; an index build (no
    accelerator) runs beside it; queue order holds within each resource."""
    now = time.time()
    for i, (kind, ref, payload) in enumerate([("train", "run-1", {}), ("eval", "eval-1", {"accelerator": True}),
                                              ("kb_build", "kb-1", {}), ("eval", "eval-2", {"accelerator": False})]):
        write(store, insert(jobs_table).values(id=f"j{i}", kind=kind, status="queued", ref=ref,
                                               payload=json.dumps(payload), created_at=now + i))
    runs_db.insert_run(store, "run-1", "d", "v", "m", "/x", {}, status="queued")
    assert jobs.claim(store)["id"] == "j0"  # training takes the accelerator
    assert jobs.claim(store, "j1") is None  # the local eval waits for it
    assert "waiting for train run-1" in jobs.describe(jobs.job_row("j1", store), store)
    assert jobs.claim(store)["id"] == "j2"  # the index build runs beside it
    assert jobs.claim(store)["id"] == "j3"  # so does an eval of remote systems (second light slot)
    assert jobs.claim(store) is None
    jobs._finish(store, jobs.job_row("j0", store), "succeeded", ws=ws)
    assert jobs.claim(store)["id"] == "j1"  # now the eval


# Several processes claiming from one queue (one accelerator job at a time): tests/test_store_backends.py,
# on SQLite and on PostgreSQL.


def test_app_killed_mid_eval_shows_the_true_state_and_the_eval_finishes(tmp_path, tiny_model_dir, slow_server):
    """The app is killed (SIGKILL) while its eval job runs; the worker goes on. The restarted app shows
    the eval as it really is (running, with progress), and settles it as succeeded when the worker ends."""
    from gradio_client import Client
    from sft_core.store import Store
    from sft_core.workspace import Workspace
    from tests.test_app import start_app, stop_app
    # the check needs the eval still running after a kill and a restart; the restart (imports, the studio,
    # /healthz) took 8-15 s on a loaded 2-core machine, while 24 answers at 0.4 s are done in ~10 s: at
    # 1.2 s an answer the eval runs ~29 s, twice the slowest restart seen
    slow_server.delay_s = 1.2
    home = tmp_path / "home"
    ws = Workspace.at(home)
    st = Store(ws.db_url)
    try:
        eval_id = _new_eval(ws, st)
    finally:
        st.close()
    proc, url = start_app(home, tiny_model_dir, SFT_STUDIO_SKIP_EXAMPLE="1",
                          SFT_STUDIO_OPENAI_BASE_URL=slow_server.url)
    try:
        c = Client(url + "/", verbose=False)
        assert "queued again" in c.predict(eval_id, api_name="/eval_resume")
        c.close()
        _wait(lambda: len(_outputs(ws, eval_id)) >= 2, what="the first answers")
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            stop_app(proc)
    st = Store(ws.db_url)
    job = jobs.latest_job(eval_id, st)
    assert job["status"] == "running" and jobs._same_process(job["pid"], job["pid_start"])  # the worker lives on
    proc, url = start_app(home, tiny_model_dir, SFT_STUDIO_SKIP_EXAMPLE="1",
                          SFT_STUDIO_OPENAI_BASE_URL=slow_server.url)
    try:
        c = Client(url + "/", verbose=False)
        summary = c.predict(eval_id, api_name="/eval_poll")[0]
        assert f"eval {eval_id}: running" in summary and "answers" in summary, summary
        _wait(lambda: "succeeded" in c.predict(eval_id, api_name="/eval_poll")[0], timeout=240, what="the eval")
        _wait(lambda: jobs.latest_job(eval_id, st)["status"] == "succeeded", what="the job settled")
        c.close()
    finally:
        stop_app(proc)
        st.close()
    _assert_complete(ws, eval_id)


def test_cli_eval_follows_its_job_and_detach_returns_at_once(ws, store, slow_server, capsys):
    """`sft-studio eval` submits a job and follows it to the end (blocking, as before); with --detach it
    returns at once and a background process runs the job when its turn comes."""
    from sft_core import cli
    slow_server.delay_s = 0.0
    import_tiny(ws, store, test_rows=ROWS[:3])
    assert cli.main(["eval", "--dataset", "tiny", "--systems", ",".join(SYSTEMS), "--metrics", "exact_match"]) == 0
    out = capsys.readouterr().out
    assert "report:" in out
    done = evals_db.list_evals(store)
    assert [r["status"] for r in done] == ["succeeded"]
    assert jobs.latest_job(done[0]["id"], store)["status"] == "succeeded"

    slow_server.delay_s = 0.3  # 6 answers: the detached job cannot be done when the command returns
    assert cli.main(["eval", "--dataset", "tiny", "--systems", ",".join(SYSTEMS), "--metrics", "exact_match",
                     "--detach"]) == 0
    assert "queued; it runs in the background" in capsys.readouterr().out
    new = next(r["id"] for r in evals_db.list_evals(store) if r["id"] != done[0]["id"])
    assert evals_db.get(store, new)["status"] in ("queued", "running")  # not done
    _wait(lambda: jobs.latest_job(new, store)["status"] == "succeeded", timeout=180, what="the detached eval")
    assert evals_db.get(store, new)["status"] == "succeeded"


def test_merge_waits_for_training_export_does_not_and_cancel_picks_the_right_job(ws, store, tmp_path):
    """merge loads the whole base model: it takes the accelerator slot like training; export only copies.
    A run's merge/export jobs share its ref, so a kind-aware cancel and latest_job keep them apart."""
    from sft_core import artifacts
    run_dir = ws.runs_dir("run-1")
    (run_dir / "adapter").mkdir(parents=True)
    runs_db.insert_run(store, "run-1", "d", "v", "m", str(run_dir), {}, status="succeeded")
    runs_db.insert_run(store, "run-2", "d", "v", "m", "/x", {}, status="queued")
    write(store, insert(jobs_table).values(id="t", kind="train", status="queued", ref="run-2", payload="{}",
                                           created_at=0))
    assert jobs.claim(store)["id"] == "t"
    merge = artifacts.submit("merge", "run-1", tmp_path / "merged", ws, store)
    export = artifacts.submit("export", "run-1", tmp_path / "exported", ws, store)
    assert jobs.claim(store, merge) is None  # waits for the training run
    assert jobs.claim(store)["id"] == export  # a copy runs beside it
    assert jobs.latest_job("run-1", store, kind="merge")["id"] == merge
    assert jobs.cancel("run-1", ws, store, kind="merge") == "cancelled"
    assert jobs.job_row(export, store)["status"] == "running"  # untouched by the merge's cancel


def test_artifact_jobs_refuse_bad_requests_before_queueing(ws, store, tmp_path):
    from sft_core import StudioError, artifacts
    runs_db.insert_run(store, "failed-run", "d", "v", "m", "/x", {}, status="failed")
    (tmp_path / "taken").mkdir()
    for args, needle in [(("merge", "nope", tmp_path / "o"), "unknown run 'nope'"),
                         (("export", "failed-run", tmp_path / "o"), "only finished runs"),
                         (("merge", "failed-run", tmp_path / "o"), "only finished runs")]:
        with pytest.raises(StudioError, match=needle):
            artifacts.submit(*args, ws, store)
    run_dir = ws.runs_dir("ok")
    (run_dir / "adapter").mkdir(parents=True)
    runs_db.insert_run(store, "ok", "d", "v", "m", str(run_dir), {}, status="succeeded")
    with pytest.raises(StudioError, match="already exists"):
        artifacts.submit("export", "ok", tmp_path / "taken", ws, store)
    with pytest.raises(StudioError, match="only an export"):
        artifacts.submit("merge", "ok", tmp_path / "m", ws, store, push_to_hub="a/b")
    assert jobs_db.count(store, kind=("merge", "export")) == 0  # nothing was queued


def test_cli_kb_build_runs_as_a_job_and_jobs_list_shows_it(ws, store, tmp_path, monkeypatch, capsys):
    from sft_core import cli, retrieval
    monkeypatch.setenv("SFT_STUDIO_HOME", str(ws.root))
    doc = tmp_path / "zorbia.md"
    doc.write_text("# Zorbia\n\nThe capital of Zorbia is Quuxville.")
    assert cli.main(["kb", "build", str(doc), "--name", "zkb", "--chunk-tokens", "128"]) == 0
    out = capsys.readouterr().out
    assert "knowledge base zkb:" in out
    job = jobs.latest_job("zkb", store, kind="kb_build")
    assert job["status"] == "succeeded"
    assert json.loads(job["payload"])["config"]["chunk_tokens"] == 128  # the flags reached the worker
    assert "Quuxville" in retrieval.open_kb("zkb", ws).search("capital of Zorbia", k=1)[0].text
    assert cli.main(["jobs", "list"]) == 0
    assert f"{job['id']}" in capsys.readouterr().out
    assert cli.main(["jobs", "cancel", job["id"]]) == 1  # finished: nothing to cancel, one line
    assert "nothing to cancel" in capsys.readouterr().err
