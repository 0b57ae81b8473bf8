"""The verdict: which system wins, by how much and how sure — the numbers the Evaluate tab's card, its score
table and the decision report (evals/report.py) all read, and the rounding rule they share.

``decimals``/``fmt_ci``: a number gets as many decimals as its 95% CI half-width has down to the first
significant digit (0.6234 ± 0.041 → 0.62 [0.58, 0.66]). ``verdict`` decides on the main metric's paired,
Holm-corrected test; ``card_markdown`` and ``score_table`` render it for the app.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from sft_core.db import evals as eval_rows
from sft_core.store import Store, open_store
from sft_core.workspace import Workspace

PRIMARY = ("token_f1", "rouge_l", "semantic_similarity", "chrf", "exact_match")
LOWER_IS_BETTER = ("latency_s", "completion_tokens", "answer_length")


# ------------------------------------------------------------------------------------------------
# Rounding: as many decimals as the CI's half-width has before its first significant digit
# ------------------------------------------------------------------------------------------------
def decimals(low: float, high: float, default: int = 3, most: int = 4) -> int:
    """Decimals a value with this 95% CI deserves: those down to the half-width's first significant digit
    (±0.041 -> 2, ±0.004 -> 3, ±2.3 -> 0). A zero-width or unknown CI says nothing: ``default``."""
    half = (high - low) / 2 if all(map(math.isfinite, (low, high))) else 0.0
    if half <= 0:
        return default
    return max(0, min(most, -math.floor(math.log10(half))))


def fmt_point(x: float | None, low: float | None = None, high: float | None = None, default: int = 3,
              sign: bool = False) -> str:
    """The value alone, with the decimals its CI (low, high) supports; without a CI, ``default`` decimals."""
    if x is None or not math.isfinite(x):
        return "–"
    d = default if low is None or high is None else decimals(low, high, default)
    return f"{x:{'+' if sign else ''}.{d}f}"


def fmt_ci(mean: float | None, low: float | None = None, high: float | None = None, default: int = 3,
           sign: bool = False) -> str:
    """``0.6234, 0.5824, 0.6644`` -> ``0.62 [0.58, 0.66]`` (``decimals``); without a CI the mean alone."""
    point = fmt_point(mean, low, high, default, sign)
    if point == "–" or low is None or high is None:
        return point
    return f"{point} [{fmt_point(low, low, high, default, sign)}, {fmt_point(high, low, high, default, sign)}]"


def _p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _signed(x: float, unit: str, digits: int) -> str:
    return f"{x:+.{digits}f}{unit}"


# ------------------------------------------------------------------------------------------------
# The verdict (the app's recommendation card and the report's opening use it)
# ------------------------------------------------------------------------------------------------
def _primary(summary: dict) -> str | None:
    have = {m for s in summary["systems"].values() for m in s}
    return next((m for m in PRIMARY if m in have), None)


def short_names(systems) -> dict[str, str]:
    """Names for people: ``sft:run-abc`` -> ``sft``, ``sft+rag:run-abc`` -> ``sft+rag``, ``openai:MODEL``
    -> ``MODEL``; systems that would read the same (two runs) keep their full names."""
    def short(s: str) -> str:
        kind, _, arg = s.partition(":")
        return arg if kind == "openai" and arg else kind
    base = {s: short(s) for s in systems}
    taken = Counter(base.values())
    return {s: b if taken[b] == 1 else s for s, b in base.items()}


def _p(pair: dict) -> float:
    """The p-value decisions use: Holm-corrected across the pairs shown (older scores: the raw one)."""
    return pair.get("p_holm", pair["p_value"])


def verdict(scores: dict) -> dict | None:
    """The decision in numbers, from the domain set's summary (what the report's opening sentence
    and the Evaluate tab's card say): the ``metric`` (PRIMARY order), the ``best`` system and its mean
    with 95% CI and n, and against the ``runner_up`` (its mean and ``runner_up_ci``): the ``margin`` (with
    the paired-bootstrap CI of the difference when scores.json has it), ``p`` (Holm-corrected when
    available, as decisions use), ``clear`` (p < 0.05), and ``cost``: {latency_s, completion_tokens:
    (best, runner-up) means}. None when there is no domain result or no quality metric."""
    dom = scores.get("sets", {}).get("domain")
    if not dom:
        return None
    summary = dom["summary"]
    metric = _primary(summary)
    if metric is None:
        return None
    ranked = sorted(((s, v) for s, v in summary["systems"].items() if metric in v), key=lambda kv: -kv[1][metric]["mean"])
    best, bv = ranked[0]
    out = {"metric": metric, "best": best, "mean": bv[metric]["mean"], "low": bv[metric]["low"],
           "high": bv[metric]["high"], "n": bv[metric]["n"], "runner_up": None, "ranking": [s for s, _ in ranked]}
    if len(ranked) > 1:
        second, sv = ranked[1]
        pair = next((p for p in summary["pairs"].get(metric, []) if {p["a"], p["b"]} == {best, second}), None)
        out.update(runner_up=second, runner_up_mean=sv[metric]["mean"], margin=bv[metric]["mean"] - sv[metric]["mean"],
                   runner_up_ci=(sv[metric]["low"], sv[metric]["high"]),
                   margin_ci=None, p=None, clear=False, held="uncorrected", effect_size=None)
        if pair:
            p = _p(pair)
            ci = pair.get("ci")
            if ci and len(ci) == 2:
                out["margin_ci"] = tuple(ci) if pair["a"] == best else (-ci[1], -ci[0])
            d = pair.get("effect_size")  # of a - b: the best system's side up
            out.update(p=p, clear=p is not None and p < 0.05, effect_size=d if d is None or pair["a"] == best else -d,
                       held=f"Holm-corrected over {pair.get('n_tests', 1)} pairs" if "p_holm" in pair else "uncorrected")
        out["cost"] = {m: (bv[m]["mean"], sv[m]["mean"]) for m in ("latency_s", "completion_tokens")
                       if m in bv and m in sv}
    return out


def _margin_text(v: dict) -> str:
    """The margin over the runner-up, with the decimals of its own CI (else of the best system's)."""
    return fmt_point(v["margin"], *(v.get("margin_ci") or (v["low"], v["high"])), sign=True)


def recommendation(scores: dict) -> str:
    v = verdict(scores)
    if v is None:
        return "No domain results yet." if not scores.get("sets", {}).get("domain") else "No quality metric was computed."
    d = decimals(v["low"], v["high"])
    text = (f"**Recommendation: {v['best']}.** On the domain test set it scores {v['metric']} "
            f"{v['mean']:.{d}f} (95% CI {v['low']:.{d}f}–{v['high']:.{d}f}, n={v['n']})")
    if v["runner_up"]:
        p, held = v["p"], v["held"]
        text += (f", {_margin_text(v)} over the runner-up {v['runner_up']} "
                 f"({fmt_point(v['runner_up_mean'], *v['runner_up_ci'])}); "
                 + (f"the difference is statistically clear (paired bootstrap p={p:.3f}, {held}; "
                    f"effect size d={v['effect_size']:.2f})." if v["clear"] else
                    f"the difference is **not** statistically clear (p={p:.3f}, {held}) — "
                    "collect more test rows or human ratings before deciding." if p is not None else "."))
    else:
        text += "."
    gen = scores["sets"].get("general")
    if gen:
        gm = _primary(gen["summary"])
        if gm:
            parts = [f"{s} {fmt_point(val[gm]['mean'], val[gm]['low'], val[gm]['high'])}" for s, val in gen["summary"]["systems"].items() if gm in val]
            text += f" General-ability check ({gm}): " + ", ".join(parts) + "."
    return text


GENERAL_NOTE = ("Rows of the *general* set are a fixed list of everyday questions (evals/data/general.jsonl), "
                "the same in every eval: a fine-tuned adapter should not do worse there than the base model.")


def _card_lines(scores: dict | None) -> list[str]:
    v = verdict(scores) if scores else None
    if v is None:
        return ["_The verdict (which system to use, by how much, how sure) appears here once the eval is scored._"]
    names = short_names(v["ranking"])
    best, d = names[v["best"]], decimals(v["low"], v["high"])
    lines = [f"### 🏆 Recommendation: **{best}**",
             f"Main metric **{v['metric']}** on the domain test set: **{v['mean']:.{d}f}** "
             f"(95% CI {v['low']:.{d}f}–{v['high']:.{d}f}, {v['n']} rows)."]
    if v["runner_up"]:
        second = names[v["runner_up"]]
        margin = (f"**{_margin_text(v)}** over {second} "
                  f"({fmt_point(v['runner_up_mean'], *v['runner_up_ci'])})")
        if v["margin_ci"]:
            md = decimals(*v["margin_ci"])
            margin += f", 95% CI of the difference {v['margin_ci'][0]:+.{md}f} to {v['margin_ci'][1]:+.{md}f}"
        lines.append(f"**Margin:** {margin}.")
        if v["p"] is None:
            lines.append("**Confidence:** not measurable (too few rows for a paired test).")
        elif v["clear"]:
            lines.append(f"**Confidence:** ✅ clear: paired bootstrap {_p_text(v['p'])} ({v['held']}).")
        else:
            lines.append(f"**Confidence:** ⚠️ not clear ({_p_text(v['p'])}, {v['held']}): collect more test rows or "
                         "human ratings (Rate tab) before deciding.")
        cost = v.get("cost") or {}
        parts = []
        if "latency_s" in cost:
            a, b = cost["latency_s"]
            parts.append(f"{a:.2f} s vs {b:.2f} s per answer ({_signed(a - b, ' s', 2)})")
        if "completion_tokens" in cost:
            a, b = cost["completion_tokens"]
            parts.append(f"{a:.0f} vs {b:.0f} tokens per answer ({_signed(a - b, '', 0)})")
        if parts:
            lines.append(f"**Cost** ({best} vs {second}): " + "; ".join(parts) + ".")
    if scores.get("sets", {}).get("general"):
        lines.append(f"_{GENERAL_NOTE}_")
    return lines


def card_markdown(scores: dict | None) -> str:
    """The Evaluate tab's recommendation card: the verdict, the margin, the confidence and the cost
    difference (latency and tokens per answer), with short system names (also the report's first block)."""
    return "\n\n".join(_card_lines(scores))


def eval_scores(eval_id: str, ws: Workspace, store: Store | None = None) -> dict | None:
    """The eval's scores.json, or None while it is not scored (or for an unknown eval)."""
    store = store or open_store(ws.db_url)
    row = eval_rows.get(store, eval_id)
    path = Path(row["path"]) / "scores.json" if row else None
    return json.loads(path.read_text()) if path and path.exists() else None


def _metric_order(metrics, main: str | None) -> list[str]:
    """The main metric first, other quality metrics next (by name), cost last."""
    quality = sorted(m for m in metrics if m not in LOWER_IS_BETTER and m != main)
    return ([main] if main else []) + quality + [m for m in LOWER_IS_BETTER if m in metrics]


def score_table(scores: dict | None) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) for the Evaluate tab: one row per (set, system), domain first, best first; the
    main metric right after the system, other quality metrics next, cost last; the winner marked ★."""
    cols = ["set", "system"]
    if not scores or not scores.get("sets"):
        return cols + ["score (mean, 95% CI)"], []
    metrics = {m for s in scores["sets"].values() for v in s["summary"]["systems"].values() for m in v}
    v = verdict(scores)
    main = v["metric"] if v else None
    order = _metric_order(metrics, main)
    judged = (scores.get("judge") or {}).get("rubric") or {}
    cols += order + (["judge_rubric"] if judged else [])
    names = short_names([s for st in scores["sets"].values() for s in st["summary"]["systems"]])
    rows = []
    for set_name in sorted(scores["sets"], key=lambda n: (n != "domain", n)):
        systems = scores["sets"][set_name]["summary"]["systems"]
        ranked = sorted(systems, key=lambda s: -systems[s][main]["mean"] if main in systems[s] else math.inf)
        for s in ranked:
            ms = systems[s]
            star = "★ " if v and set_name == "domain" and s == v["best"] else ""
            row = [set_name, star + names[s]]
            for m in order:
                row.append(f"{ms[m]['mean']:.3f} [{ms[m]['low']:.3f}, {ms[m]['high']:.3f}]" if m in ms else "–")
            if judged:
                rub = judged.get(s) if set_name == "domain" else None
                row.append(f"{rub['mean']:.2f} [{rub['low']:.2f}, {rub['high']:.2f}]" if rub and rub["mean"] is not None
                           else "–")
            rows.append(row)
    return cols, rows
