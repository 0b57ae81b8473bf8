"""End to end: train an adapter, evaluate four systems through the real vLLM CPU engine, resume, report."""
from __future__ import annotations

import json

import pytest

from evals import runner
from sft_core import jobs, retrieval, train
from sft_core.config import ServeConfig
from sft_core.db import evals as evals_db, runs as runs_db
from tests.memorise import require, training_until_memorised
from tests.test_train import ANSWER, MEMORISE_CAP, make_dataset, tiny_cfg

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def setup(module_home, tiny_model_dir):
    ws, store = module_home
    home = ws.root
    make_dataset(ws, store, home)
    (home / "docs").mkdir()
    (home / "docs" / "zorbia.md").write_text("# Zorbia\n\nZorbia is a small country. Its capital is Quuxville.")
    (home / "docs" / "other.md").write_text("# Other\n\nBananas are yellow fruit.")
    retrieval.build_kb([home / "docs"], "zkb", ws=ws, store=store)
    run_id = jobs.submit_train(tiny_cfg(tiny_model_dir, run_name="zrun", max_steps=MEMORISE_CAP), ws, store)
    with training_until_memorised() as cb:  # to the criterion, not a step count the CPU may not suffice for
        assert train.run(ws.runs_dir(run_id), store=store) == 0
    require(cb, MEMORISE_CAP)
    runs_db.set_status(store, run_id, "succeeded")
    from sft_core.serving.vllm_engine import VLLMEngine
    engine = VLLMEngine(str(tiny_model_dir), ws, store, cfg=ServeConfig(dtype="float32", max_model_len=1024))
    yield ws, store, engine, str(tiny_model_dir)
    engine.close()


SYSTEMS = ["prompt", "rag", "sft:zrun", "sft+rag:zrun"]


def test_four_systems_resume_and_reports(setup):
    ws, store, engine, base = setup
    eval_id = runner.create_eval("zorbia", SYSTEMS, split="train", kb="zkb", limit=3, base_model=base,
                                 max_new_tokens=24, ws=ws, store=store)
    calls = []  # requests the engine received, through the eval's sliding window (generate_stream)
    real = engine.generate_stream

    def counting(reqs, window=None, stop=None):
        def sent():
            for r in reqs:  # drawn by the window as each request is sent
                calls.append(r)
                yield r
        return real(sent(), window=window, stop=stop)

    engine.generate_stream = counting

    def interrupt(done, total):
        raise KeyboardInterrupt  # the eval is stopped after its first answer

    with pytest.raises(KeyboardInterrupt):
        runner.run_eval(eval_id, ws, store, engine=engine, progress=interrupt)
    path = ws.evals_dir(eval_id)
    first = [json.loads(line) for line in (path / "outputs.jsonl").read_text().splitlines()]  # each line whole
    first_keys = {(o["set"], o["row_id"], o["system"]) for o in first}
    assert len(first) == len(first_keys) == 1 and first[0]["output"] and first[0]["completion_tokens"] > 0
    assert evals_db.get(store, eval_id)["status"] == "interrupted"
    assert len(calls) > 1  # the window was full (more than one request in flight) when it was stopped

    calls.clear()
    runner.run_eval(eval_id, ws, store, engine=engine)
    del engine.generate_stream  # back to the class's method
    outs = [json.loads(line) for line in (path / "outputs.jsonl").read_text().splitlines()]
    keys = [(o["set"], o["row_id"], o["system"]) for o in outs]
    assert len(keys) == len(set(keys)) == (3 + 3) * 4  # 3 domain + 3 general rows x 4 systems, none twice
    assert len(calls) == len(keys) - len(first)  # the rerun generated exactly what was missing
    assert outs[:len(first)] == first  # appended after what was there

    by = {(o["row_id"], o["system"]): o for o in outs if o["set"] == "domain"}
    rid = next(iter({o["row_id"] for o in outs if o["set"] == "domain"}))
    assert by[(rid, "sft:zrun")]["output"].strip().startswith(ANSWER)    # the adapter learned the answer
    assert by[(rid, "prompt")]["output"] != by[(rid, "sft:zrun")]["output"]
    assert by[(rid, "rag")]["passages"] and not by[(rid, "prompt")]["passages"]
    assert all(o["latency_s"] > 0 and o["completion_tokens"] > 0 for o in outs)

    scores = json.loads((path / "scores.json").read_text())
    summ = scores["sets"]["domain"]["summary"]
    assert set(summ["systems"]) == set(SYSTEMS)
    assert summ["systems"]["sft:zrun"]["token_f1"]["mean"] > summ["systems"]["prompt"]["token_f1"]["mean"]
    assert "groundedness" in summ["systems"]["rag"] and "groundedness" not in summ["systems"]["prompt"]
    html, md = (path / "report.html").read_text(), (path / "report.md").read_text()
    assert "Recommendation: sft" in md and "<svg" in html and "Quuxville" in html
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["config"]["systems"] == SYSTEMS and manifest["config"]["dataset_version"]


def test_bad_inputs_store_nothing(setup, monkeypatch):
    ws, store, engine, base = setup
    before = sorted(p.name for p in ws.evals_dir().iterdir()) if ws.evals_dir().exists() else []
    runs_db.insert_run(store, "half", "zorbia", "v", base, "/nowhere", {}, status="running")
    cases = [(["prompt", "magic"], {}, "unknown system"), (["sft:half"], {}, "not finished"),
             (["sft:nope"], {}, "unknown run"), (["rag"], {"kb": None}, "knowledge base"),
             (["prompt"], {"split": "validation"}, "no 'validation' split")]
    for systems, kw, needle in cases:
        args = {"split": "train", "kb": "zkb", **kw}
        with pytest.raises(Exception, match=needle):
            runner.create_eval("zorbia", systems, base_model=base, ws=ws, store=store, **args)
    after = sorted(p.name for p in ws.evals_dir().iterdir()) if ws.evals_dir().exists() else []
    assert after == before

    # an external endpoint that is down at creation: refused by the pre-flight, nothing stored
    monkeypatch.setenv("SFT_STUDIO_OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    with pytest.raises(Exception, match="openai:ref: cannot reach the endpoint http://127.0.0.1:9/v1"):
        runner.create_eval("zorbia", ["openai:ref"], split="train", limit=2, base_model=base, ws=ws, store=store)
    assert (sorted(p.name for p in ws.evals_dir().iterdir()) if ws.evals_dir().exists() else []) == before

    # one that goes down after the eval was created: a clear error, the eval marked failed, no answer recorded
    from tests.test_judge import ScriptedOpenAI
    srv = ScriptedOpenAI()
    monkeypatch.setenv("SFT_STUDIO_OPENAI_BASE_URL", srv.url)
    eval_id = runner.create_eval("zorbia", ["openai:ref"], split="train", limit=2, base_model=base, ws=ws, store=store)
    srv.close()
    with pytest.raises(runner.EvalError, match="openai:ref: endpoint .* failed"):
        runner.run_eval(eval_id, ws, store, engine=engine)
    assert evals_db.get(store, eval_id)["status"] == "failed"
    assert not (ws.evals_dir(eval_id) / "outputs.jsonl").exists()
