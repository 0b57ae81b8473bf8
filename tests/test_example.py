"""The example domain: deterministic, four splits, held-out objects, new phrasings, citations resolve."""
from __future__ import annotations

import json

from sft_core import data
from sft_core.example import build_example


def _objects(rows):
    return {r["meta"]["source"] for r in rows}


def test_example_domain(ws, store):
    ex = build_example(ws, store)
    v = ex["dataset"]
    assert set(v.splits) == {"train", "eval", "test", "test_seen"}
    assert 300 <= v.n_rows <= 1500, v.splits
    again = build_example(ws, store)
    assert again["dataset"].version == v.version and not again["dataset"].created  # deterministic

    splits = {s: data.load_split("pydocs", s, ws=ws, store=store) for s in v.splits}
    train, test, seen = _objects(splits["train"]), _objects(splits["test"]), _objects(splits["test_seen"])
    assert test and not (test & train), "held-out objects must not appear in training"
    assert seen and seen <= train
    train_questions = {r["instruction"] for r in splits["train"]}
    assert not any(r["instruction"] in train_questions for r in splits["test_seen"]), "test_seen uses new phrasings"
    assert _objects(splits["eval"]) <= train

    corpus = [json.loads(line) for line in ex["corpus"].read_text().splitlines()]
    ids = {d["id"] for d in corpus}
    assert len(ids) == len(corpus) == ex["n_objects"]
    assert all(r["meta"]["source"] in ids for rs in splits.values() for r in rs)
    doc = next(d for d in corpus if d["id"] == "json.dumps")
    assert "Serialize" in doc["text"]
    answers = {r["meta"]["source"]: r["response"] for rs in splits.values() for r in rs}
    assert answers["json.dumps"].startswith("Serialize")
