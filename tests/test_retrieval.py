"""Knowledge bases: every file type, chunk citations, incremental re-index, bad files, RAG budget."""
from __future__ import annotations

import json

import pytest

from sft_core import cli, retrieval
from sft_core.config import RetrievalConfig
from sft_core.db import kbs as kbs_db


def tiny_pdf(path, text: str) -> None:
    """A minimal valid one-page PDF with a text stream (byte offsets computed, xref exact)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
            b"/Resources << /Font << /F1 5 0 R >> >> >>",
            b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    path.write_bytes(bytes(out))


@pytest.fixture
def docs(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "llamas.txt").write_text("Llamas are domesticated South American camelids used as pack animals.")
    (d / "volcano.md").write_text("# Volcanoes\n\nMount Etna is an active stratovolcano on the east coast of Sicily.")
    (d / "tea.html").write_text("<html><head><style>p{}</style><script>var x=1;</script></head><body>"
                                "<p>Matcha is a finely ground powder of green tea leaves.</p></body></html>")
    tiny_pdf(d / "comet.pdf", "Halley's Comet returns to the inner solar system every 76 years.")
    (d / "faq.jsonl").write_text(json.dumps({"id": "refund", "title": "Refunds", "text": "Refunds are issued within 14 days."})
                                 + "\n" + json.dumps({"id": "shipping", "text": "Shipping to Norway takes five days."}) + "\n")
    return d


def test_ingest_every_type_and_search(ws, store, docs):
    res = retrieval.build_kb([docs], "kb1", ws=ws, store=store)
    assert res.n_docs == 6 and not res.problems, res
    kb = retrieval.open_kb("kb1", ws)
    cases = {"pack animals camelids": "llamas.txt", "active stratovolcano Sicily": "volcano.md",
             "green tea powder": "tea.html", "comet returns every 76 years": "comet.pdf",
             "how long do refunds take": "refund", "shipping time Norway": "shipping"}
    for mode in retrieval.MODES:
        for q, doc in cases.items():
            assert kb.search(q, k=1, mode=mode)[0].doc_id == doc, (mode, q)
    tea = next(c for c in kb.chunks if c["doc_id"] == "tea.html")
    assert "var x" not in tea["text"] and "Matcha" in tea["text"]  # HTML text only, no script/style
    assert kbs_db.get(store, "kb1")["n_docs"] == 6


def test_chunks_overlap_and_cite_positions(ws, store, tmp_path):
    text = " ".join(f"sentence{i} talks about topic{i}." for i in range(200))
    (tmp_path / "long.txt").write_text(text)
    cfg = RetrievalConfig(chunk_tokens=64, chunk_overlap=16)
    retrieval.build_kb([tmp_path / "long.txt"], "long", cfg, ws=ws, store=store)
    kb = retrieval.open_kb("long", ws)
    chunks = kb.chunks
    assert len(chunks) > 5
    for a, b in zip(chunks, chunks[1:]):
        assert text[a["start"]:a["end"]] == a["text"]     # positions point at the passage
        assert b["start"] < a["end"]                       # consecutive chunks overlap
    tok = retrieval.embedder(cfg.embedder).tokenizer
    assert all(len(tok(c["text"], add_special_tokens=False)["input_ids"]) <= 64 + 2 for c in chunks)
    hit = kb.search("sentence150 topic150", k=1, mode="bm25")[0]
    assert "sentence150" in hit.text and hit.source.endswith("long.txt") and "chars" in hit.position


def test_incremental_reindex(ws, store, docs):
    first = retrieval.build_kb([docs], "kb2", ws=ws, store=store)
    assert first.embedded_chunks == 6
    again = retrieval.build_kb([docs], "kb2", ws=ws, store=store)
    assert again.embedded_chunks == 0 and again.reused_sources == 5  # nothing changed: no work
    (docs / "llamas.txt").write_text("Alpacas are smaller than llamas and bred for their fibre.")
    changed = retrieval.build_kb([docs], "kb2", ws=ws, store=store)
    assert changed.embedded_chunks == 1 and changed.indexed_sources == ["llamas.txt"]
    assert retrieval.open_kb("kb2", ws).search("alpaca fibre", k=1)[0].doc_id == "llamas.txt"
    (docs / "tea.html").unlink()
    dropped = retrieval.build_kb([docs], "kb2", ws=ws, store=store)
    assert dropped.removed_sources and dropped.n_docs == 5


def test_bad_files_reported_by_name_others_indexed(ws, store, docs, capsys):
    (docs / "empty.txt").write_text("   \n")
    (docs / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (docs / "garbage.pdf").write_bytes(b"%PDF-1.4 this is not really a pdf")
    (docs / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    res = retrieval.build_kb([docs], "kb3", ws=ws, store=store)
    text = "; ".join(res.problems)
    for name in ("empty.txt", "latin1.txt", "garbage.pdf", "bad.jsonl"):
        assert name in text, text
    assert res.n_docs == 6
    rc = cli.main(["kb", "build", str(docs / "empty.txt"), "--name", "onlybad"])
    assert rc == 1 and "empty.txt" in capsys.readouterr().err
    assert not ws.kb_dir("onlybad").exists()


def test_failed_build_keeps_previous_index(ws, store, docs, monkeypatch):
    retrieval.build_kb([docs], "kb4", ws=ws, store=store)
    before = (ws.kb_dir("kb4") / "chunks.jsonl").read_text()
    (docs / "new.txt").write_text("Brand new document about zebras.")
    monkeypatch.setattr(retrieval.np, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        retrieval.build_kb([docs], "kb4", ws=ws, store=store)
    assert (ws.kb_dir("kb4") / "chunks.jsonl").read_text() == before
    assert [p.name for p in ws.kb_dir().iterdir()] == ["kb4"]


def test_rag_prompt_budget_never_cuts_the_question(ws, store, tmp_path):
    for i in range(5):
        (tmp_path / f"d{i}.txt").write_text(f"Fact {i}: " + "filler words about the topic " * 40)
    retrieval.build_kb([tmp_path], "kb5", ws=ws, store=store)
    kb = retrieval.open_kb("kb5", ws)
    hits = kb.search("fact topic", k=5)
    tok = retrieval.embedder("all-minilm-l6-v2").tokenizer
    question = "What is fact 3 about, exactly? " * 3
    for budget in (80, 200, 2000):
        msgs, used = retrieval.build_rag_messages(question, hits, tok, budget)
        content = msgs[-1]["content"]
        assert content.endswith(question)  # whole, never truncated (alone when no passage fits)
        assert len(tok(content, add_special_tokens=False)["input_ids"]) <= max(budget, len(tok(question)["input_ids"]))
        assert all(f"({h.source.split('/')[-1]} · {h.doc_id})" in content for h in used)
    assert len(retrieval.build_rag_messages(question, hits, tok, 2000)[1]) == 5
    assert len(retrieval.build_rag_messages(question, hits, tok, 200)[1]) < 5


def test_unknown_kb_and_cli(ws, store, docs, capsys):
    with pytest.raises(retrieval.RetrievalError, match="unknown knowledge base"):
        retrieval.open_kb("nope", ws)
    assert cli.main(["kb", "build", str(docs), "--name", "cli"]) == 0
    assert cli.main(["kb", "search", "cli", "green tea", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "#1" in out and "tea.html" in out and "score" in out and "chars" in out
    assert "finely ground powder of green tea" in out  # the passage itself, under its citation
    assert cli.main(["kb", "list"]) == 0 and "cli" in capsys.readouterr().out


def test_example_domain_retrieval_quality(ws, store, capsys):
    from sft_core import data
    from sft_core.example import build_example
    ex = build_example(ws, store)
    retrieval.build_kb([ex["corpus"]], "pydocs", ws=ws, store=store)
    res = retrieval.evaluate_retrieval(retrieval.open_kb("pydocs", ws), data.load_split("pydocs", "test", ws=ws, store=store))
    best_single = max(res["bm25"]["recall@5"], res["dense"]["recall@5"])
    assert res["hybrid"]["recall@5"] >= 0.8
    assert res["hybrid"]["recall@5"] >= best_single - 0.02, res
    # the CLI prints the same numbers as a table
    assert cli.main(["kb", "eval", "pydocs", "--dataset", "pydocs"]) == 0
    out = capsys.readouterr().out
    assert f"({res['hybrid']['n']} questions)" in out
    for mode in ("bm25", "dense", "hybrid"):
        line = next(ln for ln in out.splitlines() if ln.startswith(mode))
        assert line.split()[1:] == [f"{res[mode][k]:.3f}" for k in ("recall@1", "recall@5", "recall@10", "mrr")]
    assert cli.main(["kb", "eval", "pydocs", "--dataset", "nope"]) == 1
    assert "nope" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory):
    """A random 1-layer BERT cross-encoder (one relevance logit) with MiniLM's tokenizer, built here:
    no cross-encoder ships in a package, and the hub cannot be reached."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    from sft_core.models import embedder_path
    out = tmp_path_factory.mktemp("cross-encoder")
    tok = AutoTokenizer.from_pretrained(embedder_path())
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=1))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_cross_encoder_rerank(ws, store, docs, tiny_cross_encoder, capsys):
    from sentence_transformers import CrossEncoder
    retrieval.build_kb([docs], "rr", ws=ws, store=store)
    kb = retrieval.open_kb("rr", ws)
    query = "green tea powder"
    plain = kb.search(query, k=6)
    reranked = kb.search(query, k=6, reranker=tiny_cross_encoder)
    assert {h.chunk_id for h in reranked} == {h.chunk_id for h in plain}  # same candidates (all 6 chunks here)
    expected = CrossEncoder(tiny_cross_encoder, device="cpu").predict([(query, h.text) for h in reranked])
    assert [h.score for h in reranked] == pytest.approx(sorted(expected.tolist(), reverse=True), abs=1e-5)
    assert [h.score for h in reranked] != [h.score for h in plain]
    with pytest.raises(retrieval.RetrievalError, match="reranker"):
        kb.search(query, reranker=str(ws.root / "no-such-model"))
    # a reranker stored in the kb's config applies by default; changing only it re-embeds nothing
    res = retrieval.build_kb([docs], "rr", RetrievalConfig(reranker=tiny_cross_encoder), ws=ws, store=store)
    assert res.indexed_sources == [] and res.embedded_chunks == 0 and res.reused_sources == 5, res
    kb = retrieval.open_kb("rr", ws)
    assert [h.chunk_id for h in kb.search(query, k=6)] == [h.chunk_id for h in reranked]
    assert cli.main(["kb", "search", "rr", query, "--reranker", ""]) == 0  # turned off for one query
    assert [ln.split()[2] for ln in capsys.readouterr().out.splitlines() if ln.startswith("#")] == \
        [f"{h.score:.4f}" for h in plain[:5]]
