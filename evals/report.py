"""The decision report: report.md and a self-contained report.html, both rendered from one data model.

``build_report`` reads an eval once into a ``Report`` (the verdict card, one ``Table`` per result, charts,
judge, calibration, lineage, examples); ``evals/templates/report.md.j2`` and ``report.html.j2`` (Jinja2)
render the same objects, so a number reads the same in both. Numbers are rounded to what their 95% CI
supports (``decimals``); the charts are matplotlib SVG, inlined: the HTML loads nothing from anywhere.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
import textwrap
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from sft_core import StudioError
from sft_core.db import evals as eval_rows, runs as run_rows
from sft_core.store import Store, loads, open_store
from sft_core.workspace import Workspace, atomic_write_text, read_jsonl

from evals.judge import summarize_judge
# the verdict and the rounding rule live in evals/verdict.py; re-exported here for the report's callers
from evals.verdict import (GENERAL_NOTE, LOWER_IS_BETTER, PRIMARY, _card_lines, _metric_order, _p,  # noqa: F401
                           _primary, card_markdown, decimals, eval_scores, fmt_ci, fmt_point, recommendation,
                           score_table, short_names, verdict)

TEMPLATES = Path(__file__).with_name("templates")
MAX_EXAMPLES = 100

# ------------------------------------------------------------------------------------------------
# The data model both templates render
# ------------------------------------------------------------------------------------------------
@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]
    winner: int | None = None  # index of the highlighted row


@dataclass
class Chart:
    title: str
    svg: str


@dataclass
class SetSection:
    name: str
    main: str | None
    table: Table
    charts: list[Chart] = field(default_factory=list)
    pairs: Table | None = None
    note: str = ""


@dataclass
class Report:
    eval_id: str
    recommendation: str               # one paragraph, Markdown emphasis
    card: list[str]                   # the verdict card's lines (Markdown, as the app shows them)
    setup: dict
    sets: list[SetSection]
    judge: dict | None = None         # {where, cover, pairwise_line, pairwise: Table, rubric: Table}
    calibration: list[dict] = field(default_factory=list)  # {title, table: Table, method}
    lineage: list[str] = field(default_factory=list)
    systems: list[str] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)     # {question, reference, answers: [{text, passages}]}


def _p_cell(p: float | None) -> str:
    return "–" if p is None or math.isnan(p) else "< 0.001" if p < 0.001 else f"{p:.3f}"


def _pairs_table(pairs: list[dict]) -> Table:
    rows = []
    for p in pairs:
        ci = p.get("ci") or (None, None)
        diff = fmt_ci(p["diff"], *ci, sign=True) if len(ci) == 2 else fmt_ci(p["diff"], sign=True)
        pv, ph, d = p["p_value"], _p(p), p.get("effect_size")
        rows.append([p["a"], p["b"], diff, _p_cell(pv), _p_cell(ph),
                     "–" if d is None or math.isnan(d) else "∞" if math.isinf(d) else f"{d:.2f}"])
    return Table(["A", "B", "A−B [95% CI]", "p", "p (Holm)", "effect d"], rows)


def _set_section(name: str, summary: dict, main: str | None, best: str | None) -> SetSection:
    systems = summary["systems"]
    order = _metric_order({m for v in systems.values() for m in v}, main)
    ranked = sorted(systems, key=lambda s: -systems[s][main]["mean"] if main in systems[s] else math.inf)
    rows = [[s] + [fmt_ci(systems[s][m]["mean"], systems[s][m]["low"], systems[s][m]["high"]) if m in systems[s]
                   else "–" for m in order] for s in ranked]
    winner = ranked.index(best) if best in ranked else (0 if main and ranked and main in systems[ranked[0]] else None)
    sec = SetSection(name, main, Table(["system"] + order, rows, winner),
                     note=GENERAL_NOTE if name == "general" else "")
    for m in [m for m in (main, "latency_s", "completion_tokens") if m]:
        svg = bar_chart(tuple((s, systems[s][m]["mean"], systems[s][m]["low"], systems[s][m]["high"])
                              for s in ranked if m in systems[s]), m, ranked[winner] if winner is not None else None)
        if svg:
            sec.charts.append(Chart(f"{m} ({name})", svg))
    if main and summary.get("pairs", {}).get(main):
        sec.pairs = _pairs_table(summary["pairs"][main])
    return sec


def _judge_model(judged: dict, cfg: dict) -> dict:
    """LLM judge: pairwise wins/ties/inconsistent (both orders) and the mean 1-5 rubric per system."""
    where = cfg.get("judge")
    if where in (True, "local"):
        where = "the local engine (base model)"
    elif where:
        where = f"{where}" + (f" (model {cfg['judge_model']})" if cfg.get("judge_model") else "")
    else:
        where = "an LLM"
    rows, total = judged.get("rows_judged"), judged.get("rows_total")
    cover = ""
    if rows is not None:
        cover = (f" Judged {rows} of {total} domain rows"
                 + (f" (judge limit {judged['limit']})." if judged.get("limit") and rows < (total or 0) else "."))
    out = {"where": str(where), "cover": cover, "pairwise_line": "", "pairwise": None, "rubric": None}
    pw = judged.get("pairwise") or {}
    if pw.get("n"):
        wins = ", ".join(f"{s} {n}" for s, n in pw["wins"].items())
        out["pairwise_line"] = (f"Pairwise, both orders (position swap): {pw['n']} comparisons; wins: {wins}; "
                                f"ties {pw['ties']}; inconsistent after the swap {pw['inconsistent']}.")
        out["pairwise"] = Table(["A", "B", "A wins", "B wins", "ties", "inconsistent"],
                                [[p["a"], p["b"], str(p["a_wins"]), str(p["b_wins"]), str(p["ties"]),
                                  str(p["inconsistent"])] for p in pw["pairs"]])
    rub = judged.get("rubric") or {}
    if rub:
        out["rubric"] = Table(["system", "mean rubric [95% CI]", "n", "unparsed"],
                              [[s, fmt_ci(v["mean"], v.get("low"), v.get("high"), default=2), str(v["n"]),
                                str(v["unparsed"])] for s, v in rub.items()])
    return out


def _calibration(cal: dict) -> dict:
    """One campaign's judge-vs-votes agreement (evals/calibration.py) as a table."""
    def ci(v, c):
        return fmt_ci(v, *(c or (None, None)), default=2)
    rows = [[j["judge"], j["prompt"], str(j["n_decisive"]), ci(j["accuracy"], j["accuracy_ci"]),
             str(j["n_judge_decisive"]), ci(j["accuracy_when_judge_decisive"], None), ci(j["kappa"], j["kappa_ci"]),
             str(j["n_votes"])] for j in cal["judges"]]
    return {"title": f"Judge vs human votes, campaign {cal['campaign']} ({cal['campaign_name']})",
            "table": Table(["judge", "prompt", "decisive votes", "accuracy [95% CI]", "judge decisive",
                            "accuracy when decisive", "Cohen's κ [95% CI]", "votes (with ties)"], rows),
            "method": cal["method"]}


def _lineage(systems: list[str], ws: Workspace, store: Store) -> list[str]:
    """Where each preference-tuned adapter came from; any system whose argument names a preference run counts,
    whatever its kind (sft:, sft+rag:, or a kind added later)."""
    from sft_core.pref_train import MODE, format_lineage, lineage_of_run
    out = []
    for name in systems:
        run_id = name.partition(":")[2]
        run = run_rows.get(store, run_id) if run_id else None
        if run and loads(run["config"], {}).get("mode") == MODE:
            out.append(f"{name}: {format_lineage(lineage_of_run(run_id, ws, store))}")
    return out


def _examples(outputs: list[dict], systems: list[str]) -> list[dict]:
    by_row: dict[str, dict] = {}
    for o in outputs:
        if o["set"] == "domain":
            by_row.setdefault(o["row_id"], {"question": o["instruction"], "reference": o["reference"], "by": {}})[
                "by"][o["system"]] = o
    return [{"question": r["question"], "reference": r["reference"],
             "answers": [{"text": r["by"][s]["output"], "passages": [f"{p['doc_id']}: {p['text'][:200]}"
                                                                    for p in r["by"][s].get("passages") or []]}
                         if s in r["by"] else None for s in systems]}
            for r in list(by_row.values())[:MAX_EXAMPLES]]


def build_report(eval_id: str, ws: Workspace, store: Store | None = None) -> Report:
    """Everything the report shows, read once from the eval's directory and the store."""
    from evals.calibration import calibration_for_eval
    store = store or open_store(ws.db_url)
    row = eval_rows.get(store, eval_id)
    if row is None:
        raise StudioError(f"unknown eval {eval_id!r}", "eval")
    path, cfg = Path(row["path"]), loads(row["config"])
    if not (path / "scores.json").exists():
        raise StudioError(f"eval {eval_id} has no scores yet ({row['status']}): {path / 'scores.json'} is missing", "eval")
    scores = json.loads((path / "scores.json").read_text())
    v = verdict(scores)
    sets = []
    for set_name in sorted(scores["sets"], key=lambda n: (n != "domain", n)):
        summary = scores["sets"][set_name]["summary"]
        main = v["metric"] if v and set_name == "domain" else _primary(summary)
        sets.append(_set_section(set_name, summary, main, v["best"] if v and set_name == "domain" else None))
    judged = scores.get("judge") or summarize_judge(path, cfg["systems"])
    setup = {k: cfg.get(k) for k in ("dataset", "dataset_version", "split", "base_model")}
    setup["max_new_tokens"] = (cfg.get("decoding") or {}).get("max_new_tokens")
    return Report(eval_id, recommendation(scores), _card_lines(scores), setup, sets,
                  judge=_judge_model(judged, cfg) if judged else None,
                  calibration=[_calibration(c) for c in calibration_for_eval(eval_id, ws, store)],
                  lineage=_lineage(cfg["systems"], ws, store), systems=list(cfg["systems"]),
                  examples=_examples(read_jsonl(path / "outputs.jsonl"), cfg["systems"]))


# ------------------------------------------------------------------------------------------------
# Charts: matplotlib, horizontal bars (full system names fit), SVG with text kept as <text>
# ------------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)  # a report re-rendered (CLI export after the eval) reuses its charts
def bar_chart(items: tuple[tuple[str, float, float, float], ...], metric: str, winner: str | None = None) -> str:
    """Inline SVG: one horizontal bar per (system, mean, low, high) with its 95% CI as an error bar, the full
    system name as the label (long names wrap), the value rounded by ``decimals``; the winner in a darker blue."""
    if not items:
        return ""
    os.environ.setdefault("MPLCONFIGDIR", str(Path(tempfile.gettempdir()) / "sft-studio-matplotlib"))
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure
    labels = ["\n".join(textwrap.wrap(s, 28, break_on_hyphens=False)) or s for s, *_ in items]
    means = [m for _, m, _, _ in items]
    err = [[max(0.0, m - lo) for _, m, lo, _ in items], [max(0.0, hi - m) for _, m, _, hi in items]]
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "sft-studio", "font.size": 10}):
        fig = Figure(figsize=(7, 0.45 * len(items) + 1.0), layout="constrained")
        FigureCanvasSVG(fig)
        ax = fig.add_subplot()
        ys = range(len(items))
        bars = ax.barh(ys, means, xerr=err, capsize=4, error_kw={"elinewidth": 1.2, "ecolor": "#222"},
                       color=["#1f4e79" if s == winner else "#6f9bc6" for s, *_ in items])
        for i, b in enumerate(bars):
            b.set_gid(f"bar-{re.sub(r'[^a-z0-9]+', '-', metric.lower())}-{i}")
        ax.set_yticks(list(ys), labels)
        ax.invert_yaxis()  # best (first) on top
        ax.bar_label(bars, labels=[fmt_point(m, lo, hi) for _, m, lo, hi in items], padding=22, fontsize=9)
        ax.set_xlabel(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else "") + ", mean with 95% CI")
        ax.set_xlim(min(0.0, min(lo for *_, lo, _ in items)), max(hi for *_, hi in items) * 1.2 or 1.0)
        ax.spines[["top", "right"]].set_visible(False)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML prolog and DOCTYPE (it names a remote DTD)
    return re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
def _md_cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _inline_md(text: str):
    """The card's Markdown emphasis (**bold**, *em*, _em_) as HTML, everything else escaped."""
    from markupsafe import Markup, escape
    text = text.removeprefix("### ")
    whole = len(text) > 2 and text[0] == text[-1] == "_"  # a line in italics (the general-set note)
    out = str(escape(text[1:-1] if whole else text))
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"(?<![\w*])\*(.+?)\*(?![\w*])", r"<em>\1</em>", out)
    return Markup(f"<em>{out}</em>" if whole else out)


@lru_cache(maxsize=1)
def _env():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(("html.j2",)),
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True, undefined=StrictUndefined)
    env.filters.update(md_cell=_md_cell, inline_md=_inline_md)
    return env


def render_markdown(report: Report) -> str:
    return _env().get_template("report.md.j2").render(r=report)


def render_html(report: Report) -> str:
    return _env().get_template("report.html.j2").render(r=report)


def write_report(eval_id: str, ws: Workspace, store: Store | None = None,
                 out_dir: str | Path | None = None) -> tuple[Path, Path]:
    """Build the report once and write report.html and report.md (to the eval's directory, or ``out_dir``)."""
    store = store or open_store(ws.db_url)
    rep = build_report(eval_id, ws, store)
    html_doc, md = render_html(rep), render_markdown(rep)  # both rendered before anything is written
    row = eval_rows.get(store, eval_id)
    out = Path(out_dir) if out_dir else Path(row["path"])
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out / "report.html", html_doc), atomic_write_text(out / "report.md", md)
