"""Uncertainty: bootstrap confidence intervals and paired tests between systems (all seeded).

* ``bootstrap_ci``: BCa (bias-corrected and accelerated) bootstrap CI of the mean; the plain
  percentile interval under-covers at n=50, BCa is closer to nominal.
* ``paired_test``: paired bootstrap of the mean difference on the same rows; two-sided p-value
  (``summarize`` adds Holm-corrected p-values across the pairs of each metric: ``p_holm``)
  (share of resampled differences on the other side of zero, doubled) and Cohen's d_z effect size.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm


def bootstrap_ci(values, confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) with a BCa bootstrap interval."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return (float("nan"),) * 3
    mean = float(x.mean())
    if n == 1 or np.all(x == x[0]):
        return mean, mean, mean
    rng = np.random.default_rng(seed)
    boots = x[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    prop = np.clip((boots < mean).mean() + 0.5 * (boots == mean).mean(), 1e-6, 1 - 1e-6)
    z0 = norm.ppf(prop)
    jack = (x.sum() - x) / (n - 1)
    d = jack.mean() - jack
    denom = 6.0 * (np.sum(d ** 2) ** 1.5)
    a = float(np.sum(d ** 3) / denom) if denom > 0 else 0.0
    lo_q, hi_q = [norm.cdf(z0 + (z0 + norm.ppf(q)) / (1 - a * (z0 + norm.ppf(q)))) for q in (alpha, 1 - alpha)]
    lo, hi = np.quantile(boots, [lo_q, hi_q])
    return mean, float(lo), float(hi)


def paired_test(a, b, n_boot: int = 5000, seed: int = 0) -> dict:
    """Is mean(a) different from mean(b) on the same rows? Paired bootstrap of the difference."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b):
        raise ValueError("paired test needs the same rows for both systems")
    diff = a - b
    n = len(diff)
    if n == 0:
        return {"diff": float("nan"), "p_value": float("nan"), "effect_size": float("nan"), "ci": (float("nan"),) * 2}
    mean = float(diff.mean())
    sd = float(diff.std(ddof=1)) if n > 1 else 0.0
    if sd == 0:
        return {"diff": mean, "p_value": 1.0 if mean == 0 else 0.0, "effect_size": 0.0 if mean == 0 else math.inf * np.sign(mean),
                "ci": (mean, mean), "n": n}
    rng = np.random.default_rng(seed)
    boots = diff[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    # shift to the null (mean 0) and count resamples at least as extreme as observed
    p = float(min(1.0, (np.sum(np.abs(boots - mean) >= abs(mean)) + 1) / (n_boot + 1)))
    lo, hi = np.quantile(boots, [0.025, 0.975])
    return {"diff": mean, "p_value": p, "effect_size": mean / sd, "ci": (float(lo), float(hi)), "n": n}


def summarize(scores: dict[str, dict[str, list[float]]], seed: int = 0) -> dict:
    """scores[system][metric] = per-row values (same row order for every system).

    Returns {"systems": {sys: {metric: {mean, low, high, n}}}, "pairs": {metric: [{a, b, diff, p_value, effect_size}]}}."""
    systems = list(scores)
    metrics = sorted({m for s in systems for m in scores[s]})
    out = {"systems": {}, "pairs": {}}
    for s in systems:
        out["systems"][s] = {}
        for m in metrics:
            if m in scores[s]:
                mean, lo, hi = bootstrap_ci(scores[s][m], seed=seed)
                out["systems"][s][m] = {"mean": mean, "low": lo, "high": hi, "n": len(scores[s][m])}
    for m in metrics:
        have = [s for s in systems if m in scores[s]]
        pairs = []
        for i, a in enumerate(have):
            for b in have[i + 1:]:
                t = paired_test(scores[a][m], scores[b][m], seed=seed)
                pairs.append({"a": a, "b": b, **t})
        holm_adjust(pairs)
        out["pairs"][m] = pairs
    return out


def holm_adjust(pairs: list[dict]) -> list[dict]:
    """Add ``p_holm`` to each pair: Holm's step-down correction across the pairs of one metric
    (statsmodels' ``multipletests``), so "p < 0.05" keeps its meaning when 4–5 systems give 6–10 pairs.
    A pair without a p-value (NaN: too few rows) keeps NaN and does not count as a test."""
    from statsmodels.stats.multitest import multipletests
    idx = [i for i, p in enumerate(pairs) if p.get("p_value") is not None and not math.isnan(p["p_value"])]
    adjusted = multipletests([pairs[i]["p_value"] for i in idx], method="holm")[1] if idx else []
    for p in pairs:
        p["p_holm"], p["n_tests"] = float("nan"), len(idx)
    for i, q in zip(idx, adjusted):
        pairs[i]["p_holm"] = float(q)
    return pairs
