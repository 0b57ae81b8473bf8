"""The decision report: report.md and a self-contained report.html (inline SVG charts, no network).

The opening paragraph states the recommendation from the numbers: the best system on the primary
metric, by how much over the runner-up, and whether that gap is statistically clear.
"""
from __future__ import annotations

import html
import json
import math
from collections import Counter
from pathlib import Path

from sft_core.store import Store, loads, open_store
from sft_core.workspace import Workspace, atomic_write_text, read_jsonl

from evals.judge import summarize_judge

PRIMARY = ("token_f1", "rouge_l", "semantic_similarity", "chrf", "exact_match")
LOWER_IS_BETTER = ("latency_s", "completion_tokens", "answer_length")


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


def verdict(scores: dict) -> dict | None:
    """The decision in numbers, from the domain set's summary (what the report's opening sentence
    and the Evaluate tab's card say): the ``metric`` (PRIMARY order), the ``best`` system and its mean
    with 95% CI and n, and against the ``runner_up``: the ``margin`` (with the paired-bootstrap CI
    of the difference when scores.json has it), ``p`` (Holm-corrected when available, as decisions
    use), ``clear`` (p < 0.05), and ``cost``: {latency_s, completion_tokens: (best, runner-up) means}.
    None when there is no domain result or no quality metric."""
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
                   margin_ci=None, p=None, clear=False, held="uncorrected", effect_size=None)
        if pair:
            p = _p(pair)
            ci = pair.get("ci")
            if ci and len(ci) == 2:
                out["margin_ci"] = tuple(ci) if pair["a"] == best else (-ci[1], -ci[0])
            out.update(p=p, clear=p is not None and p < 0.05, effect_size=pair.get("effect_size"),
                       held=f"Holm-corrected over {pair.get('n_tests', 1)} pairs" if "p_holm" in pair else "uncorrected")
        out["cost"] = {m: (bv[m]["mean"], sv[m]["mean"]) for m in ("latency_s", "completion_tokens")
                       if m in bv and m in sv}
    return out


def recommendation(scores: dict) -> str:
    v = verdict(scores)
    if v is None:
        return "No domain results yet." if not scores.get("sets", {}).get("domain") else "No quality metric was computed."
    metric, best = v["metric"], v["best"]
    text = (f"**Recommendation: {best}.** On the domain test set it scores {metric} "
            f"{v['mean']:.3f} (95% CI {v['low']:.3f}–{v['high']:.3f}, n={v['n']})")
    if v["runner_up"]:
        p, held = v["p"], v["held"]
        text += (f", {v['margin']:+.3f} over the runner-up {v['runner_up']} ({v['runner_up_mean']:.3f}); "
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
            parts = [f"{s} {val[gm]['mean']:.3f}" for s, val in gen["summary"]["systems"].items()]
            text += f" General-ability check ({gm}): " + ", ".join(parts) + "."
    return text


GENERAL_NOTE = ("Rows of the *general* set are a fixed list of everyday questions (evals/data/general.jsonl), "
                "the same in every eval: a fine-tuned adapter should not do worse there than the base model.")


def _p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _signed(x: float, unit: str, digits: int) -> str:
    return f"{x:+.{digits}f}{unit}"


def card_markdown(scores: dict | None) -> str:
    """The Evaluate tab's recommendation card: the verdict, the margin, the confidence and the cost
    difference (latency and tokens per answer), with short system names."""
    v = verdict(scores) if scores else None
    if v is None:
        return "_The verdict (which system to use, by how much, how sure) appears here once the eval is scored._"
    names = short_names(v["ranking"])
    best = names[v["best"]]
    lines = [f"### 🏆 Recommendation: **{best}**",
             f"Main metric **{v['metric']}** on the domain test set: **{v['mean']:.3f}** "
             f"(95% CI {v['low']:.3f}–{v['high']:.3f}, {v['n']} rows)."]
    if v["runner_up"]:
        second = names[v["runner_up"]]
        margin = f"**{v['margin']:+.3f}** over {second} ({v['runner_up_mean']:.3f})"
        if v["margin_ci"]:
            margin += f", 95% CI of the difference {v['margin_ci'][0]:+.3f} to {v['margin_ci'][1]:+.3f}"
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
    return "\n\n".join(lines)


def eval_scores(eval_id: str, ws: Workspace | None = None, store: Store | None = None) -> dict | None:
    """The eval's scores.json, or None while it is not scored (or for an unknown eval)."""
    ws = ws or Workspace.from_env()
    store = store or open_store(ws.db_url)
    row = store.query_one("SELECT path FROM evals WHERE id=?", (eval_id,))
    path = Path(row["path"]) / "scores.json" if row else None
    return json.loads(path.read_text()) if path and path.exists() else None


def score_table(scores: dict | None) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) for the Evaluate tab: one row per (set, system), domain first, best first; the
    main metric right after the system, other quality metrics next, cost last; the winner marked ★."""
    cols = ["set", "system"]
    if not scores or not scores.get("sets"):
        return cols + ["score (mean, 95% CI)"], []
    metrics = {m for s in scores["sets"].values() for v in s["summary"]["systems"].values() for m in v}
    v = verdict(scores)
    main = v["metric"] if v else None
    quality = sorted(m for m in metrics if m not in LOWER_IS_BETTER and m != main)
    cost = [m for m in LOWER_IS_BETTER if m in metrics]
    order = ([main] if main else []) + quality + cost
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


def _p(pair: dict) -> float:
    """The p-value decisions use: Holm-corrected across the pairs shown (older scores: the raw one)."""
    return pair.get("p_holm", pair["p_value"])


def _svg_bars(summary: dict, metric: str) -> str:
    items = [(s, v[metric]) for s, v in summary["systems"].items() if metric in v]
    if not items:
        return ""
    top = max(max(v["high"] for _, v in items), 1e-9)
    w, bh, gap, left = 520, 22, 10, 150
    h = len(items) * (bh + gap) + 20
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" aria-label="{metric}">']
    for i, (s, v) in enumerate(items):
        y = 10 + i * (bh + gap)
        scale = (w - left - 60) / top
        parts.append(f'<text x="{left - 6}" y="{y + bh - 6}" text-anchor="end" font-size="12">{html.escape(s)}</text>')
        parts.append(f'<rect x="{left}" y="{y}" width="{max(0, v["mean"]) * scale:.1f}" height="{bh}" fill="#4f7cac"/>')
        lo, hi = left + max(0, v["low"]) * scale, left + max(0, v["high"]) * scale
        mid = y + bh / 2
        parts.append(f'<line x1="{lo:.1f}" x2="{hi:.1f}" y1="{mid}" y2="{mid}" stroke="#222" stroke-width="2"/>')
        for x in (lo, hi):
            parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y + 4}" y2="{y + bh - 4}" stroke="#222" stroke-width="2"/>')
        parts.append(f'<text x="{hi + 6:.1f}" y="{y + bh - 6}" font-size="12">{v["mean"]:.3f}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _table(summary: dict) -> tuple[list[str], list[list[str]]]:
    metrics = sorted({m for s in summary["systems"].values() for m in s})
    rows = []
    for s, v in summary["systems"].items():
        rows.append([s] + [f"{v[m]['mean']:.3f} [{v[m]['low']:.3f}, {v[m]['high']:.3f}]" if m in v else "–"
                           for m in metrics])
    return ["system"] + metrics, rows


def _judge_section(judged: dict, cfg: dict) -> tuple[list[str], str]:
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
    md = ["## LLM judge", "", f"Judge: {where}.{cover}", ""]
    parts = [f"<h2>LLM judge</h2><p>Judge: {html.escape(str(where))}.{html.escape(cover)}</p>"]
    pw = judged.get("pairwise") or {}
    if pw.get("n"):
        wins = ", ".join(f"{s} {n}" for s, n in pw["wins"].items())
        line = (f"Pairwise, both orders (position swap): {pw['n']} comparisons; wins: {wins}; ties {pw['ties']}; "
                f"inconsistent after the swap {pw['inconsistent']}.")
        md += [line, "", "| A | B | A wins | B wins | ties | inconsistent |", "|---|---|---|---|---|---|"]
        md += [f"| {p['a']} | {p['b']} | {p['a_wins']} | {p['b_wins']} | {p['ties']} | {p['inconsistent']} |"
               for p in pw["pairs"]]
        md.append("")
        parts.append(f"<p>{html.escape(line)}</p><table><tr><th>A</th><th>B</th><th>A wins</th><th>B wins</th>"
                     "<th>ties</th><th>inconsistent</th></tr>" + "".join(
                         f"<tr><td>{html.escape(p['a'])}</td><td>{html.escape(p['b'])}</td><td>{p['a_wins']}</td>"
                         f"<td>{p['b_wins']}</td><td>{p['ties']}</td><td>{p['inconsistent']}</td></tr>"
                         for p in pw["pairs"]) + "</table>")
    rub = judged.get("rubric") or {}
    if rub:
        def fmt(v):
            return "–" if v["mean"] is None else f"{v['mean']:.2f} [{v['low']:.2f}, {v['high']:.2f}]"
        md += ["Rubric score (1-5, mean with 95% CI):", "", "| system | mean rubric | n | unparsed |", "|---|---|---|---|"]
        md += [f"| {s} | {fmt(v)} | {v['n']} | {v['unparsed']} |" for s, v in rub.items()]
        md.append("")
        parts.append("<h3>Rubric score (1-5)</h3><table><tr><th>system</th><th>mean rubric [95% CI]</th><th>n</th>"
                     "<th>unparsed</th></tr>" + "".join(
                         f"<tr><td>{html.escape(s)}</td><td>{fmt(v)}</td><td>{v['n']}</td><td>{v['unparsed']}</td></tr>"
                         for s, v in rub.items()) + "</table>")
    return md, "".join(parts)


def _provenance_section(eval_id: str, cfg: dict, ws: Workspace, store: Store) -> list[str]:
    """Where preference-tuned adapters came from (base -> SFT run -> preference dataset -> run), and how well the
    judge agrees with the human votes of this eval's campaigns (evals/calibration.py)."""
    from evals.calibration import calibration_for_eval, format_markdown
    from sft_core.pref_train import MODE, format_lineage, lineage_of_run
    md = []
    for name in cfg["systems"]:
        run_id = name.split(":", 1)[1] if name.startswith(("sft:", "sft+rag:")) else None
        run = store.query_one("SELECT config FROM runs WHERE id=?", (run_id,)) if run_id else None
        if run and loads(run["config"], {}).get("mode") == MODE:
            md.append(f"- {name}: {format_lineage(lineage_of_run(run_id, ws, store))}")
    if md:
        md = ["## Lineage of preference-tuned systems", ""] + md + [""]
    cals = calibration_for_eval(eval_id, ws, store)
    if cals:
        md += ["## Judge calibration against human votes", ""]
        for cal in cals:
            md += format_markdown(cal)
    return md


def _md_to_html(lines: list[str]) -> str:
    """The few markdown shapes _provenance_section writes (headings, bullets, tables, text) as HTML."""
    out, table = [], []
    for line in lines + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                table.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|"))
                             + "</tr>")
            continue
        if table:
            out.append("<table>" + "".join(table) + "</table>")
            table = []
        if line.startswith("## "):
            out.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("- "):
            out.append(f"<p>{html.escape(line[2:])}</p>")
        elif line:
            out.append(f"<p>{html.escape(line)}</p>")
    return "".join(out)


def write_report(eval_id: str, ws: Workspace | None = None, store: Store | None = None,
                 out_dir: str | Path | None = None) -> tuple[Path, Path]:
    ws = ws or Workspace.from_env()
    store = store or open_store(ws.db_url)
    row = store.query_one("SELECT * FROM evals WHERE id=?", (eval_id,))
    path = Path(row["path"])
    cfg = loads(row["config"])
    scores = json.loads((path / "scores.json").read_text())
    outputs = read_jsonl(path / "outputs.jsonl")
    out = Path(out_dir) if out_dir else path
    rec = recommendation(scores)

    md = [f"# Decision report — {eval_id}", "", rec.replace("**", "**"), "",
          f"Dataset `{cfg['dataset']}@{cfg['dataset_version']}` split `{cfg['split']}`, base model "
          f"`{cfg['base_model']}`, systems: {', '.join(cfg['systems'])}; greedy decoding, "
          f"max {cfg['decoding']['max_new_tokens']} new tokens. Means with 95% BCa bootstrap CIs.", ""]
    body = [f"<h1>Decision report — {html.escape(eval_id)}</h1>",
            f"<p class='rec'>{html.escape(rec).replace('**', '')}</p>",
            f"<p>Dataset <code>{html.escape(cfg['dataset'])}@{cfg['dataset_version']}</code>, split "
            f"<code>{cfg['split']}</code>, base model <code>{html.escape(cfg['base_model'])}</code>. "
            "Means with 95% BCa bootstrap confidence intervals; pairwise paired-bootstrap tests.</p>"]
    for set_name, s in scores["sets"].items():
        summary = s["summary"]
        head, rows = _table(summary)
        md += [f"## {set_name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        md += ["| " + " | ".join(r) + " |" for r in rows]
        body.append(f"<h2>{set_name}</h2><table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
                    + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
                    + "</table>")
        for metric in [m for m in (_primary(summary), "latency_s", "completion_tokens") if m]:
            body.append(f"<h3>{metric}</h3>" + _svg_bars(summary, metric))
        metric = _primary(summary)
        if metric and summary["pairs"].get(metric):
            pairs = summary["pairs"][metric]
            note = (f"p is the paired-bootstrap p-value; p (Holm) is Holm-corrected across the {len(pairs)} pairs "
                    "shown, and decisions use it.")
            md += ["", f"Significance ({metric}, paired bootstrap):", "", note, "",
                   "| A | B | A−B | p | p (Holm) | effect d |", "|---|---|---|---|---|---|"]
            md += [f"| {p['a']} | {p['b']} | {p['diff']:+.3f} | {p['p_value']:.3f} | {_p(p):.3f} | {p['effect_size']:.2f} |"
                   for p in pairs]
            body.append(f"<h3>Significance matrix ({metric})</h3><p>{html.escape(note)}</p><table><tr><th>A</th>"
                        "<th>B</th><th>A−B</th><th>p</th><th>p (Holm)</th><th>d</th></tr>" + "".join(
                            f"<tr><td>{html.escape(p['a'])}</td><td>{html.escape(p['b'])}</td><td>{p['diff']:+.3f}</td>"
                            f"<td>{p['p_value']:.3f}</td><td>{_p(p):.3f}</td><td>{p['effect_size']:.2f}</td></tr>"
                            for p in pairs) + "</table>")
        md.append("")
    judged = scores.get("judge") or summarize_judge(path, cfg["systems"])
    if judged:
        jmd, jhtml = _judge_section(judged, cfg)
        md += jmd
        body.append(jhtml)
    pmd = _provenance_section(eval_id, cfg, ws, store)
    if pmd:
        md += pmd
        body.append(_md_to_html(pmd))
    # per-example side by side
    by_row: dict[str, dict] = {}
    for o in outputs:
        if o["set"] != "domain":
            continue
        by_row.setdefault(o["row_id"], {"q": o["instruction"], "ref": o["reference"], "ans": {}})["ans"][o["system"]] = o
    systems = cfg["systems"]
    ex = ["<h2>Examples</h2><table><tr><th>question</th><th>reference</th>"
          + "".join(f"<th>{html.escape(s)}</th>" for s in systems) + "</tr>"]
    for rid, r in list(by_row.items())[:100]:
        cells = []
        for s in systems:
            o = r["ans"].get(s)
            if not o:
                cells.append("<td></td>")
                continue
            psg = "".join(f"<li><small>{html.escape(p['doc_id'])}: {html.escape(p['text'][:200])}</small></li>"
                          for p in o.get("passages") or [])
            cells.append(f"<td>{html.escape(o['output'])}" + (f"<ul>{psg}</ul>" if psg else "") + "</td>")
        ex.append(f"<tr><td>{html.escape(r['q'])}</td><td>{html.escape(r['ref'])}</td>{''.join(cells)}</tr>")
    body.append("".join(ex) + "</table>")
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}"
             ".rec{font-size:1.15em;background:#eef4fa;padding:1em;border-left:4px solid #4f7cac}")
    html_doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>SFT Studio — {html.escape(eval_id)}</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    out.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(out / "report.html", html_doc), atomic_write_text(out / "report.md", "\n".join(md) + "\n")
