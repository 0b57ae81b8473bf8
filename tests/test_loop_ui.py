"""The app's side of closing the loop (issue 17 item 5) and the last items of issue 16, as a person sees them.

* Results → "Train on these votes": a campaign's decisive votes become a preference dataset and a queued
  preference run from the campaign's SFT run; a campaign of ties says so and stores nothing. The Train tab
  shows the run's lineage and has a preference mode whose form is generated from PreferenceConfig.
* Rate: the systems behind A and B are named after a vote only where the campaign allows it.
* Evaluate: a finished eval's timer redraws nothing, and its line says how long it took (no "ETA 0s").
* Chat: the line under each answer (latency, tokens, a "truncated" badge), from the engine's info dict.
* Knowledge: scores in words.

The browser tests run `python app.py` on a seeded workspace: the tiny random Llama, an SFT run whose adapter
is a fresh (untrained) LoRA on it, an eval of that run against the prompt-only system, campaigns over it.
"""
from __future__ import annotations

import asyncio
import json
import re
import time
import types
from pathlib import Path

import pytest

from tests.test_app import ARTIFACTS, browser, pick, start_app, stop_app  # noqa: F401 (browser: fixture)
from tests.test_results_ui import _db as db, _votes_by

SYS = ["sft:good", "prompt"]


# ------------------------------------------------------------------------------------------------
# No browser: the handlers' output
# ------------------------------------------------------------------------------------------------
class FakeEngine:
    """Streams a fixed answer per adapter and reports its end as the real engines do (serving/base.py)."""
    ANSWERS = {None: ("short answer", "stop", 2), "good": ("a long answer that ran on", "length", 16)}

    def chat(self, messages, adapter=None, decoding=None, info=None):
        text, reason, n = self.ANSWERS[adapter]
        for word in text.split(" "):
            yield word + " "
        if info is not None:
            info.update(finish_reason=reason, prompt_tokens=7, completion_tokens=n, latency_s=1.234)


def test_chat_line_under_each_answer_latency_tokens_and_truncated(monkeypatch):
    from ui import chat, common
    monkeypatch.setattr(common, "_studio", types.SimpleNamespace(engine=FakeEngine, settings=types.SimpleNamespace(
        admin_password="", demo_mode=False)))
    monkeypatch.setattr(chat, "_system_messages", lambda system, message, kb: {
        "messages": [{"role": "user", "content": message}], "adapter": None if system == "prompt" else "good"})

    async def collect():
        return [out async for out in chat.chat_send("hi", "prompt", "sft:good", None, None, None, 0.0, 16, None,
                                                   [], [], [], [])]
    outs = asyncio.run(collect())
    assert all(len(o) == 12 for o in outs)  # 4 histories, 4 passage lists, 4 answer lines
    first, last = outs[0], outs[-1]
    assert first[8:] == ("_answering…_", "_answering…_", "", "")  # the old lines go while the answers stream
    assert last[0][-1]["content"].strip() == "short answer" and last[1][-1]["content"].strip().endswith("ran on")
    assert re.fullmatch(r'<span class="chat-info">1\.2 s · 2 tokens</span>', last[8]), last[8]
    assert "1.2 s · 16 tokens" in last[9] and "⚠ truncated at 16 tokens" in last[9], last[9]
    assert "truncated" not in last[8] and last[10:] == ("", "")
    assert chat.answer_info({}, 16) == ""  # an engine that reports nothing: no line


def test_eval_timer_sends_nothing_twice_and_a_finished_eval_says_how_long(monkeypatch, ws, store):
    from sqlalchemy import insert, update

    from sft_core.db import evals as eval_rows, schema, write
    from tests.test_results_ui import seed_eval
    from ui import common, evaluate
    monkeypatch.setattr(common, "_studio", types.SimpleNamespace(ws=ws, store=store, settings=types.SimpleNamespace(
        admin_password=""), stage_download=lambda p: str(p)))
    eval_id = seed_eval(ws, store)
    now = time.time()
    write(store, insert(schema.jobs).values(id="job-e", kind="eval", status="succeeded", ref=eval_id,
                                            created_at=now - 100, started_at=now - 95, ended_at=now - 3,
                                            progress=json.dumps({"done": 27, "total": 27, "eta_s": 0.0})))
    first = evaluate.eval_tick(eval_id, None, None)
    summary = first[0]
    assert "took 1m32s" in summary and "ETA" not in summary, summary
    again = evaluate.eval_tick(eval_id, None, first[-1])
    import gradio as gr
    assert all(isinstance(v, type(gr.skip())) and v == gr.skip() for v in again[:-1]), again[:-1]
    # while it runs, the bar with its ETA; once the eval row is done but the job is not: the report is written
    progress = json.dumps({"done": 9, "total": 27, "unit": "answers", "eta_s": 20.0})
    write(store, update(schema.jobs).where(schema.jobs.c.id == "job-e").values(status="running", ended_at=None,
                                                                               progress=progress))
    eval_rows.set_status(store, eval_id, "running")
    assert "ETA 20s" in evaluate.eval_poll(eval_id)[0] and "<progress" in evaluate.eval_poll(eval_id)[0]
    eval_rows.set_status(store, eval_id, "succeeded")
    line = evaluate.eval_poll(eval_id)[0]
    assert "writing the report" in line and "ETA" not in line, line


def test_knowledge_scores_in_words():
    from ui.passages import _hits_markdown
    hits = [{"text": "## Sprockets\nSprockets are oiled monthly.", "source": "/x/widgets.md", "doc_id": "widgets",
             "position": "chunk 1", "score": 0.0328, "title": "Sprockets"},
            {"text": "Frobnicators.", "source": "/x/widgets.md", "doc_id": "widgets", "position": "chunk 0",
             "score": 0.0161, "title": ""}]
    out = _hits_markdown(hits, "sprockets", mode="hybrid", rrf_k=60)
    # the top score of hybrid search is 2/(60+1) = 0.0328: ranked first by keywords and by meaning
    assert "fused rank score 0.033 (most 0.033)" in out and "relevance 100%" in out and "relevance 49%" in out
    assert out.count("widgets.md") == 2 and "/x/" not in out  # the file name once per hit, no folder
    assert '<span class="passage-title">Sprockets</span>' in out
    assert "cosine similarity 0.810" in _hits_markdown([{**hits[0], "score": 0.81}], None, mode="dense")
    assert "BM25 score 7.25" in _hits_markdown([{**hits[0], "score": 7.25}], None, mode="bm25")


# ------------------------------------------------------------------------------------------------
# The app in a browser
# ------------------------------------------------------------------------------------------------
def make_adapter(base_dir: Path, out: Path) -> None:
    """A fresh LoRA on the tiny model, saved as a finished run leaves it (untrained: B = 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).save_pretrained(out)


def seed_home(home: Path, base_dir: Path) -> dict:
    from evals import rating
    from sft_core import data
    from sqlalchemy import insert

    from sft_core.config import DataConfig
    from sft_core.db import evals as eval_rows, ratings as rating_rows, runs as run_rows, schema, write
    from sft_core.store import Store
    from sft_core.workspace import Workspace, write_jsonl
    ws = Workspace.at(home)
    st = Store(ws.db_url)
    try:
        f = home.parent / "d.jsonl"
        f.write_text("".join(json.dumps({"instruction": f"What is item {i}?", "output": f"Item {i}."}) + "\n"
                             for i in range(16)))
        dv = data.import_dataset(f, "d", DataConfig(eval_fraction=0.0, test_fraction=0.5), ws=ws, store=st)
        make_adapter(base_dir, ws.runs_dir("good", "adapter"))
        run_rows.insert_run(st, "good", "d", dv.version, str(base_dir), str(ws.runs_dir("good")), {},
                            status="succeeded")
        rows = data.load_split("d", "test", dv.version, ws=ws, store=st)
        path = ws.evals_dir("ev1")
        path.mkdir(parents=True)
        write_jsonl(path / "outputs.jsonl", [
            {"set": "domain", "row_id": r["id"], "system": s, "instruction": r["instruction"], "context": None,
             "reference": r["response"], "output": f"{'good' if s == SYS[0] else 'poor'} answer to {r['instruction']}",
             "latency_s": 0.1, "prompt_tokens": 5, "completion_tokens": 4, "passages": []} for r in rows for s in SYS])
        cfg = {"dataset": "d", "dataset_version": dv.version, "split": "test", "systems": SYS, "judge": None,
               "metrics": ["token_f1"], "kb": None,
               "base_model": str(base_dir), "decoding": {"max_new_tokens": 8}}
        now = time.time()
        eval_rows.insert_eval(st, "ev1", "d", dv.version, "test", SYS, str(path), cfg, status="succeeded")
        from evals import runner
        runner.score_eval("ev1", ws, st)
        # the eval's job as the worker leaves it: 42 s of work, its last progress saying ETA 0
        write(st, insert(schema.jobs).values(id="job-ev1", kind="eval", status="succeeded", ref="ev1",
                                             created_at=now - 50, started_at=now - 45, ended_at=now - 3,
                                             progress=json.dumps({"done": 16, "total": 16, "eta_s": 0.0})))
        out = {"eval": "ev1"}
        out["votes"] = rating.create_campaign("ev1", ws=ws, store=st, seed=0, name="votes")
        out["ties"] = rating.create_campaign("ev1", ws=ws, store=st, seed=1, name="ties")
        for cid, pick_ in ((out["votes"], lambda t: "left" if t["system_left"] == "sft:good" else "right"),
                           (out["ties"], lambda t: "tie")):
            while (t := rating.next_task(cid, "seed-rater", ws=ws, store=st)) is not None:
                row = rating_rows.get_task(st, t["task_id"])
                rating.vote(cid, t["task_id"], "seed-rater", pick_(row), ws=ws, store=st)
        out["reveal"] = rating.create_campaign("ev1", ws=ws, store=st, seed=2, name="reveal", open_rating=True,
                                               reveal_after_vote=True)
        out["blind"] = rating.create_campaign("ev1", ws=ws, store=st, seed=3, name="blind", open_rating=True)
        out["n_rows"] = len(rows)
    finally:
        st.close()
    return out


@pytest.fixture(scope="module")
def loop_app(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("loop") / "home"
    seeded = seed_home(home, tiny_model_dir)
    proc, url = start_app(home, tiny_model_dir, SFT_STUDIO_SKIP_EXAMPLE="1")
    yield url, home, seeded
    stop_app(proc)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


@pytest.mark.browser
def test_train_on_these_votes_then_the_lineage_on_the_train_tab(loop_app, browser):
    url, home, seeded = loop_app
    page = browser.new_page(viewport={"width": 1280, "height": 1300})
    page.goto(url)
    page.get_by_role("tab", name="Results").click()
    page.locator("#results-loop").get_by_text("Close the loop").click()
    msg = page.locator("#results-train-msg")
    # a campaign of ties only: nothing to learn which answer is better from; said, and nothing stored
    pick(page, "results-campaign", seeded["ties"])
    page.locator("#results-train").click()
    msg.get_by_text("no decisive votes").wait_for(timeout=60000)
    assert "Not started" in msg.inner_text() and f"campaign {seeded['ties']}" in msg.inner_text()
    from sft_core.db import datasets as dataset_rows, runs as run_rows
    with db(home) as st:
        assert [n for n in dataset_rows.names(st) if n.startswith("votes-")] == []
        assert len(run_rows.ids(st)) == 1
    # the campaign with votes: a preference dataset and a queued preference run from sft:good
    pick(page, "results-campaign", seeded["votes"])
    page.locator("#results-train").click()
    msg.get_by_text("queued").wait_for(timeout=120000)
    text = msg.inner_text()
    shot(page, "results-train-on-votes")
    assert f"votes-{seeded['votes']}@" in text and "Preference dataset" in text, text
    run_id = re.search(r"preference run (\S+) queued", text).group(1)
    assert "SFT run good" in text and f"votes of campaign {seeded['votes']} on eval ev1" in text, text
    # the Train tab follows the new run, its lineage on the run's status
    page.get_by_role("tab", name="Train").click()
    progress = page.locator("#train-progress")
    progress.get_by_text("Lineage").wait_for(timeout=30000)
    line = progress.inner_text()
    assert run_id in line and "SFT run good (on d@" in line, line
    assert f"preference dataset votes-{seeded['votes']}@" in line and "DPO run " + run_id in line, line
    shot(page, "train-lineage")
    # the run shows up, with its lineage, however its worker fares; stop it (the queue is shared)
    page.locator("#train-cancel").click()
    page.locator("#train-msg").get_by_text("Cancel requested").wait_for(timeout=30000)


@pytest.mark.browser
def test_train_tab_preference_mode_form_from_the_config(loop_app, browser):
    from ui.train_form import PREF_FORM_SKIP
    from sft_core.config import PreferenceConfig, fields_for_form
    url, home, seeded = loop_app
    page = browser.new_page(viewport={"width": 1280, "height": 1300})
    page.goto(url)
    page.get_by_role("tab", name="Train").click()
    assert page.locator("#train-sft").is_visible() and not page.locator("#train-pref").is_visible()
    page.locator("#train-mode").get_by_text("Preference (from votes)").click()
    page.locator("#train-pref").wait_for(state="visible", timeout=15000)
    page.locator("#train-sft").wait_for(state="hidden", timeout=15000)
    page.locator("#train-start").wait_for(state="hidden", timeout=15000)  # the SFT button goes with its form
    page.locator("#pref-advanced").get_by_text("Preference options").click()
    # one widget per PreferenceConfig field, labelled in words (beta, the loss), with the field's help
    names = [f["name"] for f in fields_for_form(PreferenceConfig) if f["name"] not in PREF_FORM_SKIP]
    for n in names:
        page.locator(f"#pref-opt-{n.replace('_', '-')}").wait_for(state="visible", timeout=15000)
    beta = page.locator("#pref-opt-beta")
    assert "Beta" in beta.inner_text() and "reference" in beta.inner_text()
    assert "sigmoid" in page.locator("#pref-opt-loss-type input").input_value()
    shot(page, "train-preference-mode")
    # nothing chosen: said in words
    page.locator("#pref-start").click()
    page.locator("[data-testid='toast-body']").filter(has_text="choose a preference dataset").first.wait_for(
        timeout=30000)
    # the dataset list offers preference datasets only; one that holds instructions, typed in, is refused
    box = page.locator("#pref-dataset input")
    box.click()
    offered = page.get_by_role("option").all_inner_texts()
    assert "d" not in [o.strip() for o in offered], offered
    box.fill("d")
    box.press("Enter")
    page.locator("#pref-advanced").get_by_text("Preference options").click()  # focus away: the value is taken
    page.locator("#pref-start").click()
    page.locator("[data-testid='toast-body']").filter(has_text="instruction (SFT) dataset").first.wait_for(
        timeout=60000)
    page.locator("#train-mode").get_by_text("SFT (instruction data)").click()
    page.locator("#train-sft").wait_for(state="visible", timeout=15000)
    page.locator("#train-start").wait_for(state="visible", timeout=15000)


@pytest.mark.browser
def test_rate_reveals_systems_after_the_vote_only_where_allowed(loop_app, browser):
    url, home, seeded = loop_app
    page = browser.new_page(viewport={"width": 1280, "height": 1300})
    page.goto(url)
    page.get_by_role("tab", name="Rate").click()
    saved = page.locator("#rate-saved")
    for key, reveals in (("blind", False), ("reveal", True)):
        pick(page, "rate-campaign", seeded[key])
        page.locator("#rate-rater input, #rate-rater textarea").first.fill("vera")
        page.locator("#rate-next").click()
        page.locator("#rate-progress").get_by_text("vera").wait_for(timeout=30000)
        before = page.locator("#rate-left").inner_text() + page.locator("#rate-right").inner_text()
        page.locator("#vote-left").click()
        # the blind campaign's "Saved: A is better" is still on screen when the second campaign's vote is
        # cast: wait for what only the new message has (the whole message arrives in one update)
        saved.get_by_text("A was" if reveals else "A is better").wait_for(timeout=30000)
        text = saved.inner_text()
        with db(home) as st:
            task = _votes_by(st, "vera", seeded[key])[0]
        if reveals:
            assert f"A was {task['system_left']}, B was {task['system_right']}" in text, text
            assert not page.locator("#rate-undo").is_visible()  # a revealed vote stays as cast
            shot(page, "rate-revealed")
        else:
            assert "was" not in text and "sft:good" not in text and "prompt" not in text.lower(), text
            assert page.locator("#rate-undo").is_visible()
        assert "sft:good" not in before  # the answers were blind before the vote either way
        # the next task on screen is blind again
        assert "sft:good" not in page.locator("#rate-left").inner_text() + page.locator("#rate-right").inner_text()


# Every visible DOM change under the Evaluate tab's outputs, counted from the moment this runs. Gradio keeps a
# status tracker in each output even with show_progress="hidden" (display: none, its clock still ticking):
# changes nobody can see are not counted; a loading overlay, a redrawn table or card are.
WATCH_JS = """() => {
  window.__mutations = 0;
  window.__what = [];
  const seen = (n) => {
    const el = n.nodeType === 1 ? n : n.parentElement;
    return !!el && el.isConnected && el.checkVisibility({checkOpacity: true, checkVisibilityCSS: true});
  };
  const obs = new MutationObserver((list) => {
    for (const m of list) {
      if (!seen(m.target)) continue;
      window.__mutations += 1;
      if (window.__what.length < 30)
        window.__what.push(m.type + ' ' + (m.target.id || m.target.className || m.target.nodeName) + ' '
                           + (m.attributeName || '') + ' ' + String(m.target.textContent || '').slice(0, 40));
    }
  });
  for (const id of ['eval-summary', 'eval-card', 'eval-table', 'eval-examples', 'eval-report']) {
    const el = document.getElementById(id);
    if (el) obs.observe(el, {subtree: true, childList: true, attributes: true, characterData: true});
  }
  return true;
}"""


@pytest.mark.browser
def test_finished_eval_does_not_flicker_and_says_how_long_it_took(loop_app, browser):
    url, home, seeded = loop_app
    page = browser.new_page(viewport={"width": 1280, "height": 1300})
    page.goto(url)
    page.get_by_role("tab", name="Evaluate").click()
    pick(page, "eval-pick", seeded["eval"])
    summary = page.locator("#eval-summary")
    summary.get_by_text("took 42s").wait_for(timeout=30000)
    assert "ETA" not in summary.inner_text(), summary.inner_text()
    page.locator("#eval-card").get_by_text("Recommendation").wait_for(timeout=30000)
    page.wait_for_timeout(4000)  # the pick's own render and the first timer poll after it settle
    page.evaluate(WATCH_JS)
    page.wait_for_timeout(7000)  # the timer polls every 3 s: two polls or more
    assert page.evaluate("() => window.__mutations") == 0, page.evaluate("() => window.__what.slice(0, 30)")
    assert "took 42s" in summary.inner_text()
    shot(page, "evaluate-still")
