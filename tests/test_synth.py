"""Synthetic Q&A from a knowledge base (sft_core/synth.py): filters, the document-held-out split, the
``synth`` job and ``sft-studio data synth``.

The tiny random model writes garbage, so the filter logic is driven by a scripted generator:
``ScriptedGenerator`` (built on tests/test_judge.py's ``ScriptedOpenAI``, an HTTP server on 127.0.0.1)
stands in for an external LLM -- a boundary: no real remote model exists in this sandbox. It answers
each generation prompt with a fixed reply per document (found by a marker word in the passage), and a
closed-book question (no passage) with a fixed answer. The same server also stands behind the local
engine path (the vLLM engine attached by SFT_STUDIO_ENGINE_URL), and the real HF engine on the tiny
model runs the local path for real (its garbage must all count as unparsable).
"""
from __future__ import annotations

import json

import pytest

from sft_core import StudioError, cli, data, jobs, retrieval, synth
from sft_core.config import StudioSettings
from sft_core.db import datasets as datasets_db, jobs as jobs_db
from sft_core.records import make_record
from tests.test_judge import ScriptedOpenAI, closed_port

DOCS = {  # doc id -> text; one chunk each (far below chunk_tokens)
    "doc-a": "Zorbia is a small country. The capital of Zorbia is Quuxville. The Zorbian flag is green and silver.",
    "doc-b": "To brew Quux tea, boil water, add two spoons of quux leaves and steep for five minutes.",
    "doc-c": "Glimmerstone is a soft blue mineral mined in the hills of Zorbia.",
    "doc-d": "The Quux river flows north through Quuxville into the Glimmer sea.",
    "doc-e": "Paris is the capital of France. Zorbian travellers often visit Paris in spring.",
    "doc-f": "Quuxville hosts the Lantern festival every October, when the streets are lit with blue lanterns.",
}
LEAK_Q = "When is the Lantern festival held in Quuxville?"     # in another dataset's test split: dropped
TRAIN_Q = "What lights the streets of Quuxville during the festival?"  # only in its train split: kept
CLOSED_Q = "What is the capital of France?"                      # the model knows it without the chunk
ECHO_Q = "When does Quuxville host the Lantern festival?"        # answered by restating it
REPLIES = {  # marker in the passage -> the generator's reply
    "Zorbian flag": json.dumps([
        {"question": "What is the capital of Zorbia?", "answer": "The capital of Zorbia is Quuxville."},
        {"question": "What colour is the Zorbian flag?", "answer": "The Zorbian flag is green and silver."},
        # the same question but for case and spacing: the embedder is uncased and splits off "?", so the
        # token ids, and the embeddings, are the same (cosine 1.0 >= 0.95); normalised keys are equal too
        {"question": "what colour is the zorbian flag ?", "answer": "It is green and silver."}]),
    "Quux tea": json.dumps([
        {"question": "How do I brew Quux tea?", "answer": "Boil water, add two spoons of quux leaves and steep for five minutes."},
        # content words quux, tea, invented, emperor, glorbax, 1642: 2 of 6 in the chunk = 0.33 < 0.6
        {"question": "Who invented Quux tea?", "answer": "Quux tea was invented by Emperor Glorbax in 1642."}]),
    "Glimmerstone": "Sorry, I cannot help with that.",
    "Quux river": "Here you are:\n```json\n" + json.dumps([
        {"question": "Where does the Quux river flow?", "answer": "The Quux river flows north through Quuxville into the Glimmer sea."},
        {"question": "A question without an answer?"}]) + "\n```",
    "capital of France": json.dumps({"pairs": [
        {"question": CLOSED_Q, "answer": "Paris is the capital of France."},
        {"question": "When do Zorbian travellers visit Paris?", "answer": "Zorbian travellers often visit Paris in spring."}]}),
    "Lantern festival": json.dumps([
        {"question": LEAK_Q, "answer": "Quuxville hosts the Lantern festival every October."},
        {"question": TRAIN_Q, "answer": "The streets are lit with blue lanterns."},
        # the question again as its answer (no content word beyond the question's), what the 135M model often
        # writes: dropped, although every word of it is in the passage. Kept: answers that repeat the question's
        # frame and add the fact ("The capital of Zorbia is Quuxville."), as every kept pair above does
        {"question": ECHO_Q, "answer": ECHO_Q.rstrip("?") + "."}]),
}
# every pair above, by what must happen to it
EXPECTED = {"chunks": 6, "pairs": 11, "unparsable": 2, "restates_question": 1, "ungrounded": 1, "leaked": 1,
            "near_duplicate": 1, "answerable_closed_book": 1, "kept": 6}


class ScriptedGenerator(ScriptedOpenAI):
    """The scripted external LLM (a boundary, see the module docstring)."""

    def reply(self, model, messages):
        prompt = str(messages[-1]["content"]) if messages else ""
        if prompt.startswith("You write training data"):
            return next((r for marker, r in REPLIES.items() if marker in prompt), "[]")
        # closed-book: the question alone, under the prompt system's system message
        return "The capital of France is Paris." if "capital of France" in prompt else "I do not know."


@pytest.fixture
def gen_server():
    srv = ScriptedGenerator(models=("scripted-gen",))
    yield srv
    srv.close()


def _kb(ws, store, tmp_path, docs=DOCS, name="zkb"):
    f = tmp_path / f"{name}.jsonl"
    f.write_text("".join(json.dumps({"id": d, "title": d, "text": t}) + "\n" for d, t in docs.items()))
    retrieval.build_kb([f], name, ws=ws, store=store)
    return retrieval.open_kb(name, ws)


def _other_dataset(ws, store):
    data.import_records({"train": [make_record(TRAIN_Q, "Blue lanterns.")],
                         "test": [make_record(LEAK_Q + " ", "In October.")]}, "other", ws=ws, store=store)


def _cfg(**kw):
    base = dict(kb="zkb", name="zsynth", filter_closed_book=True, test_docs=0.2)
    return synth.SynthConfig(**(base | kw))


def _strip_generator(rows):
    return [{**r, "meta": {k: v for k, v in r["meta"].items() if k != "generator"}} for r in rows]


def test_every_filter_drops_and_keeps_and_the_split_holds_out_documents(ws, store, tmp_path, gen_server):
    kb = _kb(ws, store, tmp_path)
    _other_dataset(ws, store)
    res = synth.run_synth(_cfg(generator=gen_server.url), ws=ws, store=store)
    assert res.counts == EXPECTED, res.counts
    by_reason = {}
    for d in res.dropped:
        by_reason.setdefault(d["reason"], []).append(d.get("question"))
    assert by_reason == {"unparsable": [None], "restates_question": [ECHO_Q],
                         "ungrounded": ["Who invented Quux tea?"], "leaked": [LEAK_Q],
                         "near_duplicate": ["what colour is the zorbian flag ?"],
                         "answerable_closed_book": [CLOSED_Q]}
    kept = {r["instruction"] for r in res.kept}
    assert kept == {"What is the capital of Zorbia?", "What colour is the Zorbian flag?",  # kept beside a near-dup
                    "How do I brew Quux tea?",                                     # grounded (1.0)
                    "Where does the Quux river flow?",                             # parsed from a fenced block
                    "When do Zorbian travellers visit Paris?",                     # the model does not know it
                    TRAIN_Q}                                                       # in another set's train only
    # every row names its document and chunk, and the chunk is that document's
    for r in res.kept:
        chunk = kb.chunks[r["meta"]["chunk"]]
        assert chunk["doc_id"] == r["meta"]["source"] and r["meta"]["kb"] == "zkb"
        assert synth.groundedness(r["response"], chunk["text"]) >= 0.6
    # a normal dataset version, split by document
    v = data.get_version("zsynth", ws=ws, store=store)
    assert v.version == res.version
    splits = {s: data.load_split("zsynth", s, ws=ws, store=store) for s in ("train", "eval", "test", "test_seen")}
    assert sum(map(len, splits.values())) == len(res.kept)
    docs = {s: {r["meta"]["source"] for r in rows} for s, rows in splits.items()}
    assert docs["test"] and splits["train"] and splits["test_seen"]
    assert not docs["test"] & (docs["train"] | docs["eval"] | docs["test_seen"])  # held out by document
    assert docs["test_seen"] <= docs["train"]  # seen documents: memorisation, not generalisation
    report = json.loads((v.path / "report.json").read_text())
    assert report["synth"]["counts"] == EXPECTED and report["stats"]["leakage"]["test"] == 0
    # the generator was asked once per chunk, plus one closed-book question per pair that got that far
    asked = [r for r in gen_server.requests if r["messages"][-1]["content"].startswith("You write training data")]
    assert len(asked) == 6 and {r["model"] for r in gen_server.requests} == {"scripted-gen"}
    assert len(gen_server.requests) - len(asked) == EXPECTED["kept"] + EXPECTED["answerable_closed_book"]


def test_filters_off_or_relaxed_keep_what_they_dropped(ws, store, tmp_path, gen_server):
    """The keep side of the thresholds: no closed-book filter keeps the France question, a 0.3
    groundedness threshold keeps the 0.33 answer, a dedup threshold of 1.0 still drops the uncased twin
    (cosine 1.0) -- and the preview shows the pairs and counts without storing anything."""
    _kb(ws, store, tmp_path)
    out = synth.preview(_cfg(generator=gen_server.url, filter_closed_book=False, min_groundedness=0.3,
                             dedup_threshold=1.0), ws=ws, store=store, n_pairs=20)
    c = out["counts"]
    assert (c["ungrounded"], c["answerable_closed_book"], c["leaked"], c["near_duplicate"]) == (0, 0, 0, 1)
    questions = {r["instruction"] for r in out["pairs"]}
    assert {CLOSED_Q, "Who invented Quux tea?", LEAK_Q} <= questions  # no other dataset: nothing leaks
    assert datasets_db.list_versions(store) == [] and jobs_db.count(store) == 0
    small = synth.preview(_cfg(generator=gen_server.url), ws=ws, store=store, n_pairs=4)  # 4 pairs / 2 per chunk
    assert small["counts"]["chunks"] == 2


def test_the_local_engine_path_gives_the_same_dataset(ws, store, tmp_path, gen_server, monkeypatch):
    """generator=local through the engine's batched API, the engine attached (the settings' engine_url,
    SFT_STUDIO_ENGINE_URL) to the same scripted server: the same pairs, counts and splits as the endpoint path."""
    _kb(ws, store, tmp_path)
    _other_dataset(ws, store)
    # the same dataset name: its earlier version is being replaced, so its held-out splits do not count as leakage
    by_url = synth.run_synth(_cfg(generator=gen_server.url), ws=ws, store=store)
    monkeypatch.delenv("SFT_STUDIO_ENGINE_API_KEY", raising=False)
    cfg = _cfg(generator="local")
    engine, owned = synth.open_engine(cfg, ws, store, StudioSettings(engine_url=gen_server.base))
    try:
        by_engine = synth.run_synth(cfg, engine, ws=ws, store=store)
    finally:
        engine.close()
    assert owned and by_engine.counts == by_url.counts == EXPECTED
    assert {s: _strip_generator(r) for s, r in by_engine.splits.items()} == \
           {s: _strip_generator(r) for s, r in by_url.splits.items()}


def test_real_hf_engine_on_the_tiny_model(ws, store, tmp_path, tiny_model_dir):
    """The local path on the real HF engine: the tiny random model's replies are no JSON, so every
    generation counts as unparsable, and a run stores nothing (one-line error)."""
    from sft_core.serving import get_engine
    _kb(ws, store, tmp_path)
    engine = get_engine(str(tiny_model_dir), ws, store, engine="hf")
    try:
        cfg = _cfg(generator="local", base_model=str(tiny_model_dir), max_new_tokens=16, temperature=0.0)
        out = synth.preview(cfg, engine, ws=ws, store=store, n_pairs=6)
        assert out["counts"]["chunks"] == 3 and out["counts"]["kept"] == 0
        assert out["counts"]["unparsable"] == 3 and [d["reason"] for d in out["dropped"]] == ["unparsable"] * 3
        with pytest.raises(synth.SynthError, match="no pair survived the filters.*nothing stored"):
            synth.run_synth(_cfg(generator="local", base_model=str(tiny_model_dir), max_new_tokens=16, n_chunks=2),
                            engine, ws=ws, store=store)
    finally:
        engine.close()
    assert datasets_db.list_versions(store) == [] and not ws.datasets_dir().exists()


def test_synth_job_and_cli_end_to_end(ws, store, tmp_path, gen_server, monkeypatch, capsys):
    _kb(ws, store, tmp_path)
    _other_dataset(ws, store)
    job_id = synth.submit_synth(_cfg(generator=gen_server.url), ws, store)
    job = jobs.job_row(job_id, store)
    assert (job["kind"], job["ref"]) == ("synth", "zsynth")
    assert not jobs.needs_accelerator(job)  # an external generator computes elsewhere
    with pytest.raises(StudioError, match="queued or running already"):
        synth.submit_synth(_cfg(generator=gen_server.url), ws, store)
    assert jobs.cancel("zsynth", ws, store, kind="synth") == "cancelled"  # queued: cancelled at once
    # the CLI queues the same job kind and follows it here: a real worker process runs it
    monkeypatch.setenv("SFT_STUDIO_HOME", str(ws.root))
    assert cli.main(["data", "synth", "--kb", "zkb", "--generator", gen_server.url, "--model", "scripted-gen",
                     "--name", "zsynth", "--filter-closed-book", "--test-docs", "0.2"]) == 0
    job = jobs.latest_job("zsynth", store, kind="synth")
    assert job["status"] == "succeeded" and json.loads(job["payload"])["config"]["filter_closed_book"] is True
    prog = jobs.progress_of(job)
    assert prog["counts"] == EXPECTED and prog["result"].startswith(f"zsynth@{prog['version']}")
    assert f"dataset zsynth@{prog['version']}" in capsys.readouterr().out
    v = data.get_version("zsynth", ws=ws, store=store)
    assert v.version == prog["version"] and v.splits["test"] > 0


def test_bad_inputs_are_one_line_errors_and_store_nothing(ws, store, tmp_path, gen_server, monkeypatch, capsys):
    monkeypatch.setenv("SFT_STUDIO_HOME", str(ws.root))
    _kb(ws, store, tmp_path, docs={"only": "A single document about Zorbia."}, name="one")
    _kb(ws, store, tmp_path)
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    cases = [(["--kb", "nope", "--name", "x"], "unknown knowledge base 'nope'"),
             (["--kb", "one", "--name", "x"], "has 1 document"),
             (["--kb", "zkb", "--name", "x", "--generator", dead], f"cannot reach the endpoint {dead}"),
             (["--kb", "zkb", "--name", "x", "--generator", gen_server.url, "--model", "gpt-9"], "not 'gpt-9'"),
             (["--kb", "zkb", "--name", "x", "--prompt-template", "{{ chunk }} {{ oops }}"], "prompt_template"),
             (["--kb", "zkb", "--name", "x", "--adapter", "no-such-run"], "unknown run 'no-such-run'"),
             (["--kb", "zkb", "--name", "../x"], "path separators"),
             (["--kb", "zkb", "--name", "x", "--styles", "poetry"], "styles")]
    capsys.readouterr()  # building the knowledge bases may print model-loading bars: not the CLI's output
    for argv, msg in cases:
        assert cli.main(["data", "synth", *argv]) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and msg in err and "\n" not in err, (argv, err)
    assert jobs_db.count(store) == 0 and datasets_db.list_versions(store) == []


def test_split_needs_two_documents_and_sampling_spreads_over_them():
    recs = [make_record(f"Q{i}?", f"A{i}.", meta={"source": "d1", "chunk": i}) for i in range(5)]
    with pytest.raises(synth.SynthError, match="1 document.*at least 2"):
        synth.split_by_document(recs, synth.SynthConfig(kb="k", name="n"))
    recs += [make_record("Other?", "Yes.", meta={"source": "d2", "chunk": 9})]
    s = synth.split_by_document(recs, synth.SynthConfig(kb="k", name="n", test_docs=0.9))
    assert len({r["meta"]["source"] for r in s["test"]}) == 1 and s["train"]  # never every document
    chunks = [{"chunk_id": i, "doc_id": f"d{i // 10}"} for i in range(40)]  # 4 documents of 10 chunks
    picked = synth.sample_chunks(chunks, 4, seed=1)
    assert len({c["doc_id"] for c in picked}) == 4 and picked == synth.sample_chunks(chunks, 4, seed=1)
    assert synth.parse_pairs("no json here") == ([], 1)
    assert synth.parse_pairs('[{"Question": "Q?", "Answer": "A."}, 3]') == ([{"question": "Q?", "answer": "A."}], 1)


def test_labelled_lines_parse_when_there_is_no_json():
    """Small models rarely write JSON: ``Question:``/``Answer:`` lines (numbered or not, continued on
    unlabelled lines) parse too; a label with nothing after it is no pair; JSON still wins when present."""
    text = "Here you go.\nQuestion 1: What does json.dumps do?\nAnswer 1: It serialises an object\nto a JSON string.\n" \
           "- Q2) How are keys sorted?\n- A2) With sort_keys=True.\nQ3: Unanswered?\n"
    assert synth.parse_pairs(text) == ([
        {"question": "What does json.dumps do?", "answer": "It serialises an object to a JSON string."},
        {"question": "How are keys sorted?", "answer": "With sort_keys=True."}], 0)
    assert synth.parse_pairs('Question:\n"""\nQuestion:\n') == ([], 1)  # what the 135M model wrote
    assert synth.parse_pairs('Q: x\nA: y\n[{"question": "J?", "answer": "K."}]')[0] == [{"question": "J?", "answer": "K."}]
    # linear in the reply's length: 1 MB of one letter, or one endless label, parses in time proportional to
    # a plain scan of it. A Python loop per line costs ~1-2 us against ~0.05 us per line for splitlines (x40),
    # so 200x + 0.5 s of fixed cost is a safe ceiling; a backtracking or quadratic parse of 1 MB takes minutes
    import time
    for big in ("Q" * 1_000_000, "Question: " + "a" * 1_000_000, "Q1:\n" * 200_000):
        t = time.perf_counter()
        synth.parse_pairs(big)
        took = time.perf_counter() - t
        t = time.perf_counter()
        big.splitlines(), big.count("Q")
        scan = time.perf_counter() - t
        assert took < 200 * scan + 0.5, (len(big), took, scan)
