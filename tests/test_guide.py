"""The guided path (sft_core/guide.py): step states and the next action from a real store, the
selections a page starts on, a training run's phases, the Train presets and the hardware limits."""
from __future__ import annotations

import json
import time

import pytest
from sqlalchemy import insert, update

from sft_core import guide
from sft_core.db import jobs as job_rows, kbs as kb_rows, runs as run_rows, schema, write
from sft_core.config import TrainConfig, load_config


# ---- presets and hardware ------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(guide.TRAIN_PRESETS))
def test_every_preset_is_a_valid_train_config(name):
    values = guide.preset_values(name)
    cfg = load_config(TrainConfig, overrides={**values, "dataset": "pydocs"})  # validate() runs here
    assert {k: getattr(cfg, k) for k in guide.TRAIN_PRESETS[name]} == guide.TRAIN_PRESETS[name]
    assert name in guide.PRESET_HELP
    assert set(values) == set(TrainConfig.__dataclass_fields__)


def test_presets_differ_in_how_long_they_train():
    quick, standard, thorough = (guide.preset_values(n) for n in ("quick test", "standard", "thorough"))
    assert 0 < quick["max_steps"] <= 50 and standard["max_steps"] == 0 and standard["epochs"] == 1.0
    assert thorough["epochs"] > standard["epochs"] and thorough["early_stopping_patience"] > 0
    with pytest.raises(KeyError, match="unknown preset"):
        guide.preset_values("turbo")


def test_hardware_limits_disable_what_cannot_apply():
    cpu, one, four = guide.hardware_limits(0), guide.hardware_limits(1), guide.hardware_limits(4)
    assert set(cpu["disabled"]) == {"load_in_4bit", "gradient_checkpointing", "num_gpus"}
    assert all("CUDA" in why or "CPU" in why for why in cpu["disabled"].values())
    assert set(one["disabled"]) == {"num_gpus"} and four["disabled"] == {}
    assert "CPU" in cpu["summary"] and "4 CUDA GPUs" in four["summary"]
    for limits in (cpu, one):  # every name is a real TrainConfig field
        assert set(limits["disabled"]) <= set(TrainConfig.__dataclass_fields__)


# ---- a training run's phase -------------------------------------------------------------------------
def test_run_progress_follows_the_phases():
    t = time.time()
    ev = [{"time": t, "event": "phase", "phase": "loading data"}]
    assert guide.run_progress("queued", [], "train r: queued (position 2)")["text"] == "train r: queued (position 2)"
    assert guide.run_progress("running", [])["text"] == "starting the training worker"
    p = guide.run_progress("running", ev + [{"event": "phase", "phase": "loading model"}])
    assert (p["phase"], p["text"], p["fraction"]) == ("loading model", "loading model…", 0.0)
    ev += [{"event": "phase", "phase": "tokenising"}, {"event": "train_begin", "step": 0, "max_steps": 30}]
    p = guide.run_progress("running", ev)
    assert (p["text"], p["fraction"]) == ("step 0/30 · first step running", 0.0)
    ev.append({"step": 10, "max_steps": 30, "loss": 2.0, "eta_s": 80.4, "tokens_per_s": 512.3})
    p = guide.run_progress("running", ev)
    assert p["text"] == "step 10/30 · ETA 1m20s · 512 tok/s" and p["fraction"] == pytest.approx(1 / 3)
    ev += [{"step": 30, "max_steps": 30, "loss": 1.0}, {"event": "phase", "phase": "saving adapter"}]
    p = guide.run_progress("running", ev)
    assert (p["text"], p["fraction"]) == ("saving adapter… (after step 30/30)", 1.0)
    assert guide.run_progress("succeeded", ev)["text"] == "succeeded · step 30/30"
    assert guide.run_progress("cancelled", ev[:4])["fraction"] == pytest.approx(1 / 3)


def test_progress_bar_html_is_escaped_and_bounded():
    html = guide.progress_bar_html(1.7, "<b>x</b>")
    assert 'value="1.000"' in html and "&lt;b&gt;x&lt;/b&gt;" in html and "<b>" not in html
    assert "value=" not in guide.progress_bar_html(None, "waiting")  # indeterminate


# ---- the five steps and the next action, from a real store --------------------------------------------
def _dataset(ws, store, tmp_path, name="pydocs"):
    from sft_core import data
    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(10)))
    return data.import_dataset(src, name, ws=ws, store=store)


def _state(g):
    return {s.key: s.state for s in g.steps}


def test_guide_walks_the_example_path(ws, store, tmp_path):
    from evals import rating
    from sft_core import jobs
    g = guide.guide_state(ws, store)
    assert _state(g) == dict.fromkeys(("data", "knowledge", "train", "evaluate", "rate"), "todo")
    assert (g.next.kind, g.next.tab) == ("open", "data")

    # the app queued the example bootstrap: nothing to click yet
    boot = jobs.submit("example", "example-domain", {"base_model": "x", "name": "pydocs"}, ws=ws, store=store)
    g = guide.guide_state(ws, store)
    assert _state(g)["data"] == "running" and g.next.kind == "wait"

    # the example is built: dataset and knowledge base ready, the next action trains on it
    _dataset(ws, store, tmp_path)
    now = time.time()
    kb_rows.upsert(store, "pydocs", "x", n_docs=3, n_chunks=9, embedder="minilm")
    write(store, update(schema.jobs).where(schema.jobs.c.id == boot).values(status="succeeded"))
    g = guide.guide_state(ws, store)
    assert _state(g) == {"data": "done", "knowledge": "done", "train": "todo", "evaluate": "todo", "rate": "todo"}
    assert (g.next.kind, g.next.label) == ("train", "Train on pydocs (quick test)")
    assert g.facts["dataset"] == "pydocs" and g.facts["kb"] == "pydocs"
    assert "pydocs (example)" in g.steps[0].detail

    # a run trains: its phase shows, the next action is to watch it
    run_dir = ws.runs_dir("run-1")
    run_dir.mkdir(parents=True)
    (run_dir / "events.jsonl").write_text(json.dumps({"event": "phase", "phase": "tokenising"}) + "\n")
    run_rows.insert_run(store, "run-1", "pydocs", "v", "m", str(run_dir), {}, status="running", created_at=now)
    train_job = job_rows.insert_job(store, "train", "run-1", {}, status="running")
    g = guide.guide_state(ws, store)
    assert _state(g)["train"] == "running" and g.steps[2].detail == "run-1: tokenising…"
    assert (g.next.kind, g.next.tab) == ("open", "train")

    # it finished: compare the systems next
    run_rows.set_metrics(store, "run-1", {"train_loss": 1.23456})
    run_rows.set_status(store, "run-1", "succeeded")
    assert job_rows.finish(store, train_job, "succeeded")
    g = guide.guide_state(ws, store)
    assert _state(g)["train"] == "done" and g.steps[2].detail == "run-1 finished · train loss 1.235"
    assert (g.next.kind, g.next.tab, g.facts["run"]) == ("evaluate", "evaluate", "run-1")

    # an eval without the new run does not count; one with it does
    path = ws.evals_dir("eval-1")
    path.mkdir(parents=True)
    outputs = [{"set": "domain", "row_id": r, "system": s, "instruction": f"question {r}", "reference": "ref",
                "output": f"answer {s} {r}"} for r in ("r1", "r2") for s in ("prompt", "sft:run-1")]
    (path / "outputs.jsonl").write_text("".join(json.dumps(o) + "\n" for o in outputs))
    for eid, systems in (("eval-0", ["prompt", "rag"]), ("eval-1", ["prompt", "sft:run-1"])):
        write(store, insert(schema.evals).values(
            id=eid, dataset="pydocs", dataset_version="v", split="test", systems=json.dumps(systems),
            status="succeeded", created_at=now if eid == "eval-0" else now + 1, path=str(ws.evals_dir(eid))))
        if eid == "eval-0":
            g = guide.guide_state(ws, store)
            assert _state(g)["evaluate"] == "todo" and g.next.kind == "evaluate"
    g = guide.guide_state(ws, store)
    assert _state(g)["evaluate"] == "done" and g.facts["eval"] == "eval-1"
    assert (g.next.kind, g.next.tab) == ("rate", "rate")

    # a campaign on that eval: rate it; after a vote, the leaderboard
    cid = rating.create_campaign("eval-1", ws=ws, store=store, seed=0)
    g = guide.guide_state(ws, store)
    assert (g.next.kind, g.next.tab) == ("open", "rate") and g.steps[4].detail == f"{cid}: no votes yet"
    inv = rating.create_invites(cid, ["you"], ws=ws, store=store)[0]
    task = rating.next_task(cid, inv["rater"], ws=ws, store=store)
    rating.vote(cid, task["task_id"], inv["rater"], "left", ws=ws, store=store)
    g = guide.guide_state(ws, store)
    assert _state(g)["rate"] == "done" and (g.next.kind, g.next.tab) == ("open", "results")
    assert "✓" in guide.checklist_html(g)


def test_a_failed_first_run_is_shown_and_training_is_offered_again(ws, store, tmp_path):
    _dataset(ws, store, tmp_path, "support")
    run_rows.insert_run(store, "run-x", "support", "v", "m", "x", {}, status="failed")
    g = guide.guide_state(ws, store, selected_dataset="support")
    assert _state(g)["train"] == "failed" and g.next.kind == "train" and g.facts["dataset"] == "support"
    assert _state(g)["knowledge"] == "todo"  # optional: it does not block training


def test_selection_defaults_prefer_running_then_newest(ws, store, tmp_path):
    _dataset(ws, store, tmp_path, "older")
    _dataset(ws, store, tmp_path, "newer")
    now = time.time()
    for i, (rid, status) in enumerate((("r-old", "succeeded"), ("r-live", "running"), ("r-new", "failed"))):
        run_rows.insert_run(store, rid, "older", "v", "m", "x", {}, status=status, created_at=now + i)
    d = guide.default_selection(ws, store)
    assert (d["dataset"], d["run"], d["succeeded_run"], d["eval"], d["campaign"]) == ("newer", "r-live", "r-old",
                                                                                      None, None)
    assert guide.choose("older", ["newer", "older"], "newer") == "older"      # remembered and still there
    assert guide.choose("deleted", ["newer", "older"], "newer") == "newer"    # gone: the default
    assert guide.choose(None, ["a", "b"], "missing") == "a" and guide.choose("x", [], "y") is None


def test_checklist_html_escapes_details():
    g = guide.Guide([guide.Step("data", "Data", "done", "<img src=x>")], guide.Action("open", "Go", "data", "a & b"))
    html = guide.checklist_html(g) + guide.next_html(g)
    assert "<img" not in html and "&lt;img src=x&gt;" in html and "a &amp; b" in html
