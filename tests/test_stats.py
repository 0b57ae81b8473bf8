"""Bootstrap CIs cover the truth at about the nominal rate; paired tests find real differences."""
from __future__ import annotations

import numpy as np

from evals import stats


def test_bca_ci_coverage_close_to_nominal():
    rng = np.random.default_rng(123)
    true_mean, hits, n_sets = 0.6, 0, 1000
    for seed in range(n_sets):
        x = rng.normal(true_mean, 0.25, size=50)
        _, lo, hi = stats.bootstrap_ci(x, n_boot=1000, seed=seed)
        hits += lo <= true_mean <= hi
    coverage = hits / n_sets
    assert 0.92 <= coverage <= 0.97, coverage


def test_ci_brackets_mean_and_degenerate_cases():
    m, lo, hi = stats.bootstrap_ci([1, 0, 1, 1, 0, 1, 1, 1], seed=1)
    assert lo <= m <= hi and 0 <= lo < hi <= 1
    assert stats.bootstrap_ci([0.5] * 10) == (0.5, 0.5, 0.5)


def test_paired_test_detects_difference_and_not_noise():
    rng = np.random.default_rng(0)
    base = rng.normal(0.5, 0.2, size=60)
    better = base + 0.1 + rng.normal(0, 0.05, size=60)
    t = stats.paired_test(better, base)
    assert t["diff"] > 0 and t["p_value"] < 0.01 and t["effect_size"] > 1
    same = stats.paired_test(base + rng.normal(0, 0.05, size=60), base)
    assert same["p_value"] > 0.05 or abs(same["diff"]) < 0.02
    # seeded: identical inputs, identical outputs
    assert stats.paired_test(better, base, seed=3) == stats.paired_test(better, base, seed=3)


def test_summarize_shapes():
    out = stats.summarize({"a": {"f1": [1, 0, 1]}, "b": {"f1": [0, 0, 1]}})
    assert set(out["systems"]) == {"a", "b"} and out["pairs"]["f1"][0]["a"] == "a"


def _holm_by_hand(ps):
    """Holm (1979), written out independently of statsmodels: sort ascending, multiply the k-th smallest
    by (m - k), take the running maximum, cap at 1."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, running = [0.0] * len(ps), 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - k) * ps[i]))
        out[i] = running
    return out


def test_pairs_are_holm_corrected():
    rng = np.random.default_rng(7)
    base = rng.normal(0.5, 0.2, size=40)
    scores = {"prompt": {"f1": list(base)}, "rag": {"f1": list(base + rng.normal(0.03, 0.1, size=40))},
              "sft": {"f1": list(base + rng.normal(0.05, 0.1, size=40))},
              "sft+rag": {"f1": list(base + rng.normal(0.2, 0.1, size=40))}}
    pairs = stats.summarize(scores, seed=0)["pairs"]["f1"]
    assert len(pairs) == 6 and all(p["n_tests"] == 6 for p in pairs)
    raw = [p["p_value"] for p in pairs]
    assert [p["p_holm"] for p in pairs] == __import__("pytest").approx(_holm_by_hand(raw))
    assert all(p["p_holm"] >= p["p_value"] for p in pairs)
    assert any(p["p_holm"] > p["p_value"] for p in pairs)  # the correction changed something here


def test_report_decides_on_the_corrected_p_value():
    """A runner-up difference with raw p < 0.05 but Holm p >= 0.05 is reported as not clear."""
    from evals import report
    pair = {"a": "sft", "b": "rag", "diff": 0.1, "p_value": 0.02, "p_holm": 0.08, "n_tests": 6, "effect_size": 0.4}
    summary = {"systems": {"sft": {"token_f1": {"mean": 0.6, "low": 0.5, "high": 0.7, "n": 40}},
                           "rag": {"token_f1": {"mean": 0.5, "low": 0.4, "high": 0.6, "n": 40}}},
               "pairs": {"token_f1": [pair]}}
    text = report.recommendation({"sets": {"domain": {"summary": summary}}})
    assert "**not** statistically clear (p=0.080, Holm-corrected over 6 pairs)" in text, text
    pair["p_holm"] = 0.03
    assert "statistically clear (paired bootstrap p=0.030, Holm-corrected" in report.recommendation(
        {"sets": {"domain": {"summary": summary}}})
