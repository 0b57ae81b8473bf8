"""The UI of issue #18 in a real browser (Debian's Chromium via Playwright): the Knowledge tab's "generate a
training set from this knowledge base" (preview, then a synth job whose dataset shows on the Data tab), the
Train tab's RAFT mode, and a RAFT run offered as ``raft:RUN`` wherever systems are chosen.

The generator is tests/test_synth.py's ``ScriptedGenerator`` (tests/test_judge.py's ``ScriptedOpenAI``, an
OpenAI-compatible HTTP server on 127.0.0.1): a boundary stand-in for an external LLM, since no real remote
model exists in this sandbox; the app and its job worker reach it by its URL, exactly as they would a real
endpoint. The app runs as its own process on the tiny random Llama (tests/test_app.py's ``start_app``), on a
workspace seeded beforehand: the knowledge base of tests/test_synth.py's six one-chunk documents, a small
dataset, and two finished runs written as a training run leaves them in the store (no training: a plain run
and one whose config says ``mode: raft``).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.test_app import browser, clients, expect_error, fill, open_tab, pick, shot, start_app, stop_app  # noqa: F401
from tests.test_synth import DOCS, ScriptedGenerator

pytestmark = pytest.mark.browser

KB = "zkb"
# What the preview keeps and drops. It takes the first ceil(10 pairs / 2 per chunk) = 5 chunks, doc-a..doc-e
# (one chunk each, in the knowledge base's order), through tests/test_synth.py's REPLIES:
#   doc-a 3 pairs, one a near-duplicate of the flag question; doc-b 2 pairs, "Who invented Quux tea?" ungrounded;
#   doc-c no JSON (unparsable); doc-d 1 pair + 1 item without an answer (unparsable); doc-e 2 pairs (the
#   closed-book filter is off by default, and no other dataset has a test split to leak into).
PREVIEW_COUNTS = {"chunks": 5, "pairs": 8, "kept": 6, "unparsable": "2", "restates_question": "0", "ungrounded": "1",
                  "leaked": "0",
                  "near_duplicate": "1", "answerable_closed_book": "off"}
PREVIEW_KEPT = ["What is the capital of Zorbia?", "What colour is the Zorbian flag?", "How do I brew Quux tea?",
                "Where does the Quux river flow?", "What is the capital of France?",
                "When do Zorbian travellers visit Paris?"]
PREVIEW_DROPPED = ["Who invented Quux tea?", "what colour is the zorbian flag ?"]
# the job reads all six chunks: doc-f adds its two pairs to the six above
JOB_KEPT = 8

# A Gradio 6 Dataframe's cells, row by row (its grid: div role=row > role=gridcell, virtualised; the tables
# read here are short enough to be drawn whole)
TABLE_ROWS_JS = """(id) => Array.from(document.querySelectorAll('#' + id + ' [role=grid] div[role=row]'))
  .sort((a, b) => (+a.getAttribute('aria-rowindex')) - (+b.getAttribute('aria-rowindex')))
  .map(row => Array.from(row.querySelectorAll('[role=gridcell]')).map(c => c.innerText.trim()))"""


def seed(home: Path) -> None:
    """The knowledge base, a dataset, and two finished runs (plain and RAFT) as the store records them."""
    from sft_core import data, retrieval
    from sft_core.config import TrainConfig, load_config, to_dict
    from sft_core.db import runs
    from sft_core.store import Store
    from sft_core.workspace import Workspace
    ws = Workspace.at(home)
    st = Store(ws.db_url)
    try:
        docs = home.parent / f"{KB}.jsonl"
        docs.write_text("".join(json.dumps({"id": d, "title": d, "text": t}) + "\n" for d, t in DOCS.items()))
        retrieval.build_kb([docs], KB, ws=ws, store=st)
        rows = home.parent / "plain.jsonl"
        rows.write_text("".join(json.dumps({"instruction": f"What is item {i}?", "output": f"Item {i}."}) + "\n"
                                for i in range(12)))
        dv = data.import_dataset(rows, "plain-ds", ws=ws, store=st)
        now = time.time()
        for i, (run_id, mode) in enumerate((("plain-run", "sft"), ("raft-run", "raft"))):
            raft = {"kb": KB, "max_length": 1280} if mode == "raft" else {}
            cfg = load_config(TrainConfig, overrides={"dataset": "plain-ds", "run_name": run_id, "mode": mode, **raft})
            ws.runs_dir(run_id, "adapter").mkdir(parents=True)
            (ws.runs_dir(run_id, "adapter") / "adapter_config.json").write_text("{}")
            runs.insert_run(st, run_id, "plain-ds", dv.version, "m", str(ws.runs_dir(run_id)), to_dict(cfg),
                            status="succeeded", created_at=now + i)
    finally:
        st.close()


@pytest.fixture(scope="module")
def synth_app(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("synth-ui") / "home"
    seed(home)
    gen = ScriptedGenerator(models=("scripted-gen",))
    proc, url = start_app(home, tiny_model_dir, SFT_STUDIO_SKIP_EXAMPLE="1")
    yield url, home, gen
    stop_app(proc)
    gen.close()


def table_rows(page, elem_id: str) -> list[list[str]]:
    return page.evaluate(TABLE_ROWS_JS, elem_id)


def box_value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input, #{elem_id} textarea").first.input_value()


def wait_value(page, elem_id: str, value: str, timeout: float = 30000) -> None:
    end = time.time() + timeout / 1000
    while box_value(page, elem_id) != value:
        if time.time() > end:
            raise AssertionError(f"#{elem_id} shows {box_value(page, elem_id)!r}, expected {value!r}")
        page.wait_for_timeout(200)


def datasets_in_store(home: Path) -> list[str]:
    from sft_core.db import datasets
    from sft_core.store import Store
    from sft_core.workspace import Workspace
    st = Store(Workspace.at(home).db_url)
    try:
        return [r["name"] for r in datasets.list_versions(st)]
    finally:
        st.close()


def test_synth_preview_shows_pairs_and_filter_counts_then_generate_stores_a_dataset(synth_app, browser):
    url, home, gen = synth_app
    page = browser.new_page(viewport={"width": 1300, "height": 1400})
    open_tab(page, url, "Knowledge")
    pick(page, "kb-pick", KB)
    page.get_by_text("Generate a training set from this knowledge base").click()
    wait_value(page, "synth-opt-name", f"{KB}-synth")  # the dataset name follows the knowledge base
    assert box_value(page, "synth-opt-generator") == "local"  # SynthConfig's default, from the dataclass
    assert not page.locator("#synth-opt-prompt-template").is_visible()  # folded with the other options

    # bad input: the app's one-line error naming the field; nothing runs
    fill(page, "synth-opt-generator", "ftp://nowhere")
    # focus away, so the box's value is the form's before the click reads it (in one full run the click
    # went out with the default, "local", and the toast was another one)
    page.locator("#synth-opt-generator input, #synth-opt-generator textarea").first.blur()
    wait_value(page, "synth-opt-generator", "ftp://nowhere")
    expect_error(page, lambda: page.locator("#synth-preview").click(),
                 "generator: must be local or an endpoint URL")

    fill(page, "synth-opt-generator", gen.url)
    page.locator("#synth-preview").click()
    page.locator("#synth-msg").get_by_text("nothing stored").wait_for(timeout=180000)
    msg = page.locator("#synth-msg").inner_text()
    c = PREVIEW_COUNTS
    assert f"{c['chunks']} chunk(s) → {c['pairs']} pair(s) generated → {c['kept']} kept" in msg, msg
    pairs = table_rows(page, "synth-pairs")
    assert [r[0] for r in pairs] == PREVIEW_KEPT, pairs
    by_q = {r[0]: r for r in pairs}
    assert by_q["How do I brew Quux tea?"][1].startswith("Boil water") and "doc-b" in by_q["How do I brew Quux tea?"][2]
    assert "doc-a" in by_q["What is the capital of Zorbia?"][2] and f"{KB}.jsonl" in by_q["What is the capital of Zorbia?"][2]
    assert not set(PREVIEW_DROPPED) & set(by_q)
    counts = {r[0].split(" (")[0]: r[1] for r in table_rows(page, "synth-counts")}
    assert counts == {"unparsable generation": c["unparsable"],
                      "answer restates its question": c["restates_question"],
                      "answer not supported by its passage": c["ungrounded"],
                      "question already in another dataset's eval or test split": c["leaked"],
                      "near-duplicate of a question kept before it": c["near_duplicate"],
                      "answerable without the passage": c["answerable_closed_book"]}, counts
    shot(page, "knowledge-synth-preview")
    assert f"{KB}-synth" not in datasets_in_store(home) and not (home / "datasets" / f"{KB}-synth").exists()

    # Generate: a synth job in a worker process; its line follows it until the dataset is stored
    page.locator("#synth-start").click()
    page.locator("#synth-msg").get_by_text("Queued").wait_for(timeout=60000)
    page.locator("#synth-job").get_by_text("Stored").wait_for(timeout=300000)
    assert f"{KB}-synth@" in page.locator("#synth-job").inner_text()
    shot(page, "knowledge-synth-done")
    # the Data tab's list shows it (this page's table was refreshed by the job's end; a reload reads the store)
    for reload in (False, True):
        if reload:
            page.reload()
        page.get_by_role("tab", name="Data").click()
        page.wait_for_function("(n) => document.querySelector('#data-versions').innerText.includes(n)",
                               arg=f"{KB}-synth", timeout=30000)
        row = next(r for r in table_rows(page, "data-versions") if r[0] == f"{KB}-synth")
        # name, version, rows, splits, source: every kept pair, split with a document held out as test
        assert row[2] == str(JOB_KEPT) and f"synth:{KB}" in row[4], row
        assert "test " in row[3] and "train " in row[3], row


def test_train_tab_raft_fields_show_only_in_raft_mode(synth_app, browser):
    url, home, gen = synth_app
    page = browser.new_page(viewport={"width": 1300, "height": 1400})
    open_tab(page, url, "Train")
    raft_box = page.locator("#train-raft")
    assert not raft_box.is_visible() and not page.locator("#train-opt-kb").is_visible()
    page.get_by_text("LoRA and training options").click()
    wait_value(page, "train-opt-max-length", "256")  # the default preset (quick test), plain mode
    assert not page.locator("#train-opt-raft-distractors").is_visible()  # not among the Advanced options either

    page.locator("#train-opt-mode").get_by_text("RAFT: each question with retrieved passages", exact=True).click()
    raft_box.wait_for(state="visible", timeout=30000)
    assert "raft:RUN" in page.locator("#train-raft-note").inner_text()
    for field in ("raft-distractors", "raft-oracle-drop", "raft-cite", "raft-context-tokens"):
        assert page.locator(f"#train-opt-{field}").is_visible(), field
    # the knowledge base picker is filled with the existing knowledge bases, the page's one chosen
    wait_value(page, "train-opt-kb", KB)
    page.locator("#train-opt-kb input").click()
    page.get_by_role("option", name=KB, exact=True).wait_for(timeout=10000)
    page.keyboard.press("Escape")
    # the quick-test preset in raft mode: a short passage budget, and max length leaving the answer room
    wait_value(page, "train-opt-raft-context-tokens", "384")
    wait_value(page, "train-opt-max-length", "640")
    # another preset keeps the mode and the knowledge base, and sizes max length for the passages again
    page.locator("#train-preset").get_by_text("standard", exact=True).click()
    wait_value(page, "train-opt-max-length", "1280")
    assert box_value(page, "train-opt-raft-context-tokens") == "1024" and raft_box.is_visible()
    assert box_value(page, "train-opt-kb") == KB
    shot(page, "train-raft")

    # bad input: a one-line error naming the field, and no run queued
    pick(page, "train-dataset", "plain-ds")
    fill(page, "train-opt-raft-distractors", "99")
    expect_error(page, lambda: page.locator("#train-start").click(), "raft_distractors: must be between 0 and 20")
    assert not list((home / "runs").glob("run-*"))

    # back to plain SFT: the RAFT fields go, max length is the preset's again
    page.locator("#train-opt-mode").get_by_text("Plain: each question as it is", exact=True).click()
    raft_box.wait_for(state="hidden", timeout=30000)
    wait_value(page, "train-opt-max-length", "512")


def test_raft_run_is_offered_as_raft_system(synth_app, browser, clients):
    url, home, gen = synth_app
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    open_tab(page, url, "Chat")
    # the fourth pane starts on the newest finished run with retrieval, as that run was trained to use it
    wait_value(page, "chat-sys-3", "raft:raft-run")
    page.locator("#chat-head-3").get_by_text("RAFT").wait_for(timeout=30000)
    page.locator("#chat-sys-2 input").click()
    for name in ("raft:raft-run", "sft:raft-run", "sft+rag:raft-run", "sft:plain-run", "sft+rag:plain-run"):
        page.get_by_role("option", name=name, exact=True).wait_for(timeout=10000)
    assert page.get_by_role("option", name="raft:plain-run", exact=True).count() == 0  # a plain run is no RAFT run
    page.keyboard.press("Escape")
    shot(page, "chat-raft-system")

    page.get_by_role("tab", name="Evaluate").click()
    systems = page.locator("#eval-systems")
    systems.get_by_label("raft:raft-run", exact=True).wait_for(timeout=30000)
    assert systems.get_by_label("raft:raft-run", exact=True).is_checked()  # compared by default with the KB chosen
    assert systems.get_by_label("raft:plain-run", exact=True).count() == 0
    # raft:RUN retrieves: without a knowledge base the eval is refused in one line, nothing created
    client = clients(url)
    with pytest.raises(Exception, match="choose a knowledge base: raft:raft-run answer with passages"):
        client.predict("plain-ds", "test", ["raft:raft-run"], None, 2, ["token_f1"], False, api_name="/eval_start")
    assert not (home / "evals").exists() or not any((home / "evals").iterdir())


def test_every_train_preset_is_valid_in_raft_mode():
    """The Train tab's presets in raft mode (sft_core/guide.preset_values) pass TrainConfig's checks."""
    from sft_core import guide
    from sft_core.config import TrainConfig, load_config
    for name in guide.TRAIN_PRESETS:
        values = guide.preset_values(name, "raft")
        cfg = load_config(TrainConfig, overrides={**values, "dataset": "d", "kb": KB})
        assert cfg.mode == "raft" and cfg.max_length >= cfg.raft_context_tokens + guide.RAFT_ANSWER_TOKENS, name
        assert {k: getattr(cfg, k) for k in guide.TRAIN_PRESETS[name] if k != "max_length"} == \
            {k: v for k, v in guide.TRAIN_PRESETS[name].items() if k != "max_length"}, name
        assert guide.preset_values(name)["mode"] == "sft"  # plain mode keeps the preset as it was
