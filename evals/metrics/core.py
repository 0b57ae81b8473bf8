"""Per-example metric functions; the `evaluate` modules beside this file are thin wrappers over them.

Every function takes lists (predictions, references[, passages]) and returns one score per example,
so the statistics can bootstrap over rows. Reference libraries: rouge_score (ROUGE-L), sacrebleu
(BLEU, chrF), the SQuAD v1.1 script's normalisation (token F1, exact match).
"""
from __future__ import annotations

import re
import string
from collections import Counter

# ---- SQuAD-style normalisation (as in the official v1.1 evaluation script) -----------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def token_f1(predictions: list[str], references: list[str]) -> list[float]:
    """SQuAD token F1 per example: harmonic mean of token precision and recall after
    ``normalize_answer`` (lower-case, ASCII punctuation and the articles a/an/the removed, whitespace
    collapsed), tokens split on whitespace, counted with multiplicity.

    Empty answers (after normalisation): one side empty -> 0.0; **both empty -> 1.0**. This is the
    SQuAD v2.0 script's rule; the v1.1 script returns 0.0 for empty-vs-empty (no common token), which
    would score a correct "no answer" as wrong and disagree with ``exact_match`` (1.0 there). On every
    other input the score equals the v1.1 script's ``f1_score``."""
    out = []
    for p, r in zip(predictions, references):
        pt, rt = normalize_answer(p).split(), normalize_answer(r).split()
        common = Counter(pt) & Counter(rt)
        same = sum(common.values())
        if not pt or not rt:
            out.append(float(pt == rt))
        elif same == 0:
            out.append(0.0)
        else:
            prec, rec = same / len(pt), same / len(rt)
            out.append(2 * prec * rec / (prec + rec))
    return out


def exact_match(predictions: list[str], references: list[str]) -> list[float]:
    """1.0 when ``normalize_answer(prediction) == normalize_answer(reference)``, else 0.0 (the SQuAD
    v1.1 script's ``exact_match_score``). Empty-vs-empty (after normalisation) is 1.0; one empty is 0.0."""
    return [float(normalize_answer(p) == normalize_answer(r)) for p, r in zip(predictions, references)]


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def bleu(predictions: list[str], references: list[str]) -> list[float]:
    """Sentence BLEU (sacrebleu, effective order), 0-100."""
    from sacrebleu.metrics import BLEU
    m = BLEU(effective_order=True)
    return [m.sentence_score(p, [r]).score for p, r in zip(predictions, references)]


def chrf(predictions: list[str], references: list[str]) -> list[float]:
    from sacrebleu.metrics import CHRF
    m = CHRF()
    return [m.sentence_score(p, [r]).score for p, r in zip(predictions, references)]


def answer_length(predictions: list[str], references: list[str] | None = None) -> list[float]:
    return [float(len(p.split())) for p in predictions]


_EMB = {}


def semantic_similarity(predictions: list[str], references: list[str]) -> list[float]:
    """Cosine similarity of all-MiniLM-L6-v2 embeddings (the embedded sentence-transformers model)."""
    import numpy as np
    if "m" not in _EMB:
        from sentence_transformers import SentenceTransformer
        from sft_core.models import embedder_path
        _EMB["m"] = SentenceTransformer(str(embedder_path()), device="cpu")
    m = _EMB["m"]
    a = m.encode(list(predictions), normalize_embeddings=True, convert_to_numpy=True)
    b = m.encode(list(references), normalize_embeddings=True, convert_to_numpy=True)
    return [float(x) for x in np.sum(a * b, axis=1)]


_STOP = set("a an the of to in on for and or is are was were be by with as at it this that from which can "
            "its into if not no but then than so such these those you your i we they he she".split())


def content_tokens(text: str) -> list[str]:
    return [t for t in normalize_answer(text).split() if t not in _STOP]


def groundedness(predictions: list[str], passages: list[str]) -> list[float]:
    """Share of the answer's content words that occur in the retrieved passages (1.0 = fully supported)."""
    out = []
    for p, ctx in zip(predictions, passages):
        toks = content_tokens(p)
        support = set(content_tokens(ctx))
        out.append(sum(t in support for t in toks) / len(toks) if toks else 0.0)
    return out
