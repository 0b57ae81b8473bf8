"""Each metric equals its reference library (or the reference algorithm written out here) on fixed inputs."""
from __future__ import annotations

import re
import string
from collections import Counter

import pytest

from evals import metrics

PRED = ["The cat sat on the mat.", "Paris is the capital of France", "forty two", "", "Serialize obj to a JSON str."]
REF = ["A cat was sitting on the mat.", "The capital of France is Paris.", "42", "nothing", "Serialize obj to a JSON formatted str."]


def squad_normalize(s):  # the official SQuAD v1.1 evaluation script's normalize_answer, verbatim logic
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def squad_f1(prediction, ground_truth):
    p, g = squad_normalize(prediction).split(), squad_normalize(ground_truth).split()
    common = Counter(p) & Counter(g)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(p), num_same / len(g)
    return 2 * precision * recall / (precision + recall)


def test_rouge_l_equals_rouge_score():
    from rouge_score import rouge_scorer
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert metrics.compute("rouge_l", PRED, REF) == pytest.approx([sc.score(r, p)["rougeL"].fmeasure for p, r in zip(PRED, REF)])


def test_bleu_and_chrf_equal_sacrebleu():
    import sacrebleu
    assert metrics.compute("bleu", PRED, REF) == pytest.approx(
        [sacrebleu.sentence_bleu(p, [r], use_effective_order=True).score for p, r in zip(PRED, REF)])
    assert metrics.compute("chrf", PRED, REF) == pytest.approx([sacrebleu.sentence_chrf(p, [r]).score for p, r in zip(PRED, REF)])


def test_token_f1_and_exact_match_equal_squad():
    got = metrics.compute("token_f1", PRED[:3] + PRED[4:], REF[:3] + REF[4:])
    assert got == pytest.approx([squad_f1(p, r) for p, r in zip(PRED[:3] + PRED[4:], REF[:3] + REF[4:])])
    assert metrics.compute("exact_match", ["The Cat!", "dog"], ["cat", "a cat"]) == [1.0, 0.0]


def test_semantic_similarity_is_minilm_cosine():
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from sft_core.models import embedder_path
    m = SentenceTransformer(str(embedder_path()), device="cpu")
    a, b = m.encode(PRED[:2]), m.encode(REF[:2])
    ref = [float(np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in zip(a, b)]
    assert metrics.compute("semantic_similarity", PRED[:2], REF[:2]) == pytest.approx(ref, abs=1e-5)


def test_groundedness_and_length():
    g = metrics.compute("groundedness", ["Etna is in Sicily.", "Etna is on Mars."], passages=["Mount Etna, Sicily", "Mount Etna, Sicily"])
    assert g == [1.0, 0.5]
    assert metrics.compute("answer_length", ["one two three"], ["x"]) == [3.0]


def test_unknown_metric():
    from sft_core import StudioError
    with pytest.raises(StudioError, match="unknown metric"):
        metrics.load("bertscore")
