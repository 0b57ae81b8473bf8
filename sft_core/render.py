"""Presentation: a data check's :class:`~sft_core.data.Report` as Markdown, for the UI and the CLI.

The data layer (:mod:`sft_core.data`) produces reports and never renders them; whoever shows a report
to a person imports this module.
"""
from __future__ import annotations

from pathlib import Path

from sft_core.data.issues import Report

ERRORS_SHOWN = 50  # the rest are counted ("… and N more"); the JSON report keeps MAX_REPORTED
WARNINGS_SHOWN = 20
PII_EXAMPLES_SHOWN = 5
BAR_WIDTH = 30  # characters of the longest histogram bar


def format_report(report: Report) -> str:
    """Markdown rendering of a report (CLI and UI)."""
    name = Path(report.file).name
    head = "✅ valid" if report.ok else f"❌ {len(report.errors)} error(s)"
    lines = [f"### {name} — {head}", "",
             f"- format: **{report.format or 'unknown'}** · rows read: **{report.n_rows}** · valid: **{report.n_valid}**"]
    if report.stats:
        lines += _stats_lines(report.stats)
    if report.errors:
        lines += ["", f"**Errors** ({len(report.errors)}):"]
        lines += [f"- {i}" for i in report.errors[:ERRORS_SHOWN]]
        if len(report.errors) > ERRORS_SHOWN:
            lines.append(f"- … and {len(report.errors) - ERRORS_SHOWN} more")
    if report.warnings:
        lines += ["", f"**Warnings** ({len(report.warnings)}):"]
        lines += [f"- {i}" for i in report.warnings[:WARNINGS_SHOWN]]
    return "\n".join(lines)


def _stats_lines(st: dict) -> list[str]:
    lines = ["- split: " + ", ".join(f"{k} {v}" for k, v in st.get("splits", {}).items()),
             f"- duplicates: {st.get('duplicates_exact', 0)} exact, {st.get('duplicates_normalised', 0)} "
             "after normalising case/punctuation/space"]
    if "tokens" in st:
        t = st["tokens"]
        lines.append(f"- tokens ({t['model']}): min {t['min']} · mean {t['mean']} · p50 {t['p50']} · "
                     f"p95 {t['p95']} · max {t['max']} · over max_tokens: {st.get('over_long', 0)}")
        lines += ["", "```", *_histogram_lines(t["histogram"]), "```"]
    leak = st.get("leakage", {})
    lines.append("- train/test overlap (leakage): " + (", ".join(f"{k} {v}" for k, v in leak.items()) or "n/a"))
    pii = st.get("pii", {})
    lines.append("- likely PII: " + (", ".join(f"{k} {v}" for k, v in pii.items()) if pii else "none found"))
    lines += [f"  - line {ex['line']}: {ex['kind']} `{ex['masked']}`"
              for ex in st.get("pii_examples", [])[:PII_EXAMPLES_SHOWN]]
    return lines


def _histogram_lines(histogram: list[dict]) -> list[str]:
    """One text bar per bin, the fullest bin BAR_WIDTH characters long."""
    peak = max(b["count"] for b in histogram) or 1
    return [f"{b['from']:>6}-{b['to']:<6} {'█' * max(0, round(BAR_WIDTH * b['count'] / peak)):<{BAR_WIDTH}} {b['count']}"
            for b in histogram]
