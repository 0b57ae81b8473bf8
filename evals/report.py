"""The decision report: report.md and a self-contained report.html (inline SVG charts, no network).

The opening paragraph states the recommendation from the numbers: the best system on the primary
metric, by how much over the runner-up, and whether that gap is statistically clear.
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from sft_core.store import Store, loads, open_store
from sft_core.workspace import Workspace, atomic_write_text, read_jsonl

from evals.judge import summarize_judge

PRIMARY = ("token_f1", "rouge_l", "semantic_similarity", "chrf", "exact_match")
LOWER_IS_BETTER = ("latency_s", "completion_tokens", "answer_length")


def _primary(summary: dict) -> str | None:
    have = {m for s in summary["systems"].values() for m in s}
    return next((m for m in PRIMARY if m in have), None)


def recommendation(scores: dict) -> str:
    dom = scores["sets"].get("domain")
    if not dom:
        return "No domain results yet."
    summary = dom["summary"]
    metric = _primary(summary)
    if metric is None:
        return "No quality metric was computed."
    ranked = sorted(summary["systems"].items(), key=lambda kv: -kv[1][metric]["mean"])
    best, bv = ranked[0]
    text = (f"**Recommendation: {best}.** On the domain test set it scores {metric} "
            f"{bv[metric]['mean']:.3f} (95% CI {bv[metric]['low']:.3f}–{bv[metric]['high']:.3f}, n={bv[metric]['n']})")
    if len(ranked) > 1:
        second, sv = ranked[1]
        pair = next((p for p in summary["pairs"][metric] if {p["a"], p["b"]} == {best, second}), None)
        diff = bv[metric]["mean"] - sv[metric]["mean"]
        p = _p(pair) if pair else None
        sig = pair and p < 0.05
        held = f"Holm-corrected over {pair.get('n_tests', 1)} pairs" if pair and "p_holm" in pair else "uncorrected"
        text += (f", {diff:+.3f} over the runner-up {second} ({sv[metric]['mean']:.3f}); "
                 + (f"the difference is statistically clear (paired bootstrap p={p:.3f}, {held}; "
                    f"effect size d={pair['effect_size']:.2f})." if sig else
                    f"the difference is **not** statistically clear (p={p:.3f}, {held}) — "
                    "collect more test rows or human ratings before deciding." if pair else "."))
    else:
        text += "."
    gen = scores["sets"].get("general")
    if gen:
        gm = _primary(gen["summary"])
        if gm:
            parts = [f"{s} {v[gm]['mean']:.3f}" for s, v in gen["summary"]["systems"].items()]
            text += f" General-ability check ({gm}): " + ", ".join(parts) + "."
    return text


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
