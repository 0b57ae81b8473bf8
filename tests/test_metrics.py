"""Each metric equals its reference library (or the reference algorithm written out here) on fixed inputs."""
from __future__ import annotations

import re
import string
from collections import Counter

import pytest

from evals import metrics

PRED = ["The cat sat on the mat.", "Paris is the capital of France", "forty two", "", "Serialize obj to a JSON str."]
REF = ["A cat was sitting on the mat.", "The capital of France is Paris.", "42", "nothing", "Serialize obj to a JSON formatted str."]


# ---- an independent copy of the official SQuAD v1.1 evaluation script (evaluate-v1.1.py) ---------
def squad_normalize(s):  # normalize_answer, as in the script
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def squad_f1(prediction, ground_truth):  # f1_score
    prediction_tokens = squad_normalize(prediction).split()
    ground_truth_tokens = squad_normalize(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def squad_exact(prediction, ground_truth):  # exact_match_score
    return squad_normalize(prediction) == squad_normalize(ground_truth)


# rows that stress the normalisation: punctuation, articles, case, whitespace, repeated tokens, an empty
# prediction (row 3 of PRED), a reference that normalises to nothing, and an exact match
SQUAD_PRED = PRED + ["  The   Cat!! ", "the the cat cat", "An apple a day.", "Paris", "", "yes", "Python 3.12"]
SQUAD_REF = REF + ["cat", "a cat", "apple day", "paris.", "", "The.", "python 3.12"]


def test_token_f1_and_exact_match_equal_squad_v11():
    f1 = metrics.compute("token_f1", SQUAD_PRED, SQUAD_REF)
    em = metrics.compute("exact_match", SQUAD_PRED, SQUAD_REF)
    both_empty = [not squad_normalize(p) and not squad_normalize(r) for p, r in zip(SQUAD_PRED, SQUAD_REF)]
    assert sum(both_empty) == 1 and SQUAD_PRED.index("") == 3  # the empty prediction (row 3) has a reference
    for i, (p, r) in enumerate(zip(SQUAD_PRED, SQUAD_REF)):
        assert em[i] == float(squad_exact(p, r)), (p, r)
        if both_empty[i]:
            # documented deviation (core.token_f1): empty-vs-empty is 1.0 (SQuAD v2.0 rule, agrees with
            # exact match); the v1.1 script's f1_score gives 0 there
            assert squad_f1(p, r) == 0 and f1[i] == 1.0 and em[i] == 1.0
        else:
            assert f1[i] == pytest.approx(squad_f1(p, r)), (p, r)
    assert f1[3] == 0.0 and em[3] == 0.0  # empty prediction vs a real reference
    from evals.metrics import core
    assert "both empty -> 1.0" in core.token_f1.__doc__ and "Empty-vs-empty" in core.exact_match.__doc__


def test_rouge_l_equals_rouge_score():
    from rouge_score import rouge_scorer
    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    assert metrics.compute("rouge_l", PRED, REF) == pytest.approx([sc.score(r, p)["rougeL"].fmeasure for p, r in zip(PRED, REF)])


def test_bleu_and_chrf_equal_sacrebleu():
    import sacrebleu
    assert metrics.compute("bleu", PRED, REF) == pytest.approx(
        [sacrebleu.sentence_bleu(p, [r], use_effective_order=True).score for p, r in zip(PRED, REF)])
    assert metrics.compute("chrf", PRED, REF) == pytest.approx([sacrebleu.sentence_chrf(p, [r]).score for p, r in zip(PRED, REF)])


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
