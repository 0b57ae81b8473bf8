"""The decision report (evals/report.py + evals/templates): one data model, two templates, real charts.

A synthetic 5-system eval (``raft:run-1`` among them: the report must take any system the eval lists) is
written as evals/runner.py leaves one (outputs.jsonl, scores.json from ``stats.summarize``, the evals row),
without training or an engine; the report is rendered once per module and read back as a user would:
the Markdown and HTML tables cell by cell, the charts' SVG text and painted bar paths, every URL in the page.
"""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pytest

SYSTEMS = ["prompt", "rag", "sft:run-1", "sft+rag:run-1", "raft:run-1"]
SVG = "{http://www.w3.org/2000/svg}"


def seed_five_system_eval(ws, store, eval_id: str = "ev-five", n: int = 30) -> str:
    """token_f1 rises with the system's position in SYSTEMS (raft:run-1 best by 0.15 a row over sft+rag:run-1,
    far beyond the per-row noise of sd 0.05), so the verdict is raft:run-1, clearly."""
    from evals import stats
    from sft_core.db import evals as eval_rows
    from sft_core.workspace import write_jsonl
    rng = np.random.default_rng(0)
    path = ws.evals_dir(eval_id)
    path.mkdir(parents=True)
    outputs, sets = [], {}
    for set_name, rows in (("domain", n), ("general", 8)):
        per = {}
        for k, s in enumerate(SYSTEMS):
            f1 = np.clip(0.2 + 0.15 * k + rng.normal(0, 0.05, rows), 0, 1)
            per[s] = {"token_f1": f1.tolist(), "exact_match": (f1 > 0.6).astype(float).tolist(),
                      "latency_s": (0.3 + 0.1 * k + rng.gamma(2, 0.02, rows)).tolist(),
                      "completion_tokens": rng.integers(10, 40, rows).astype(float).tolist()}
            outputs += [{"set": set_name, "row_id": f"{set_name[0]}{i}", "system": s, "instruction": f"Q{i}?",
                         "context": None, "reference": f"R{i}.", "output": f"{s} says {i}",
                         "latency_s": per[s]["latency_s"][i], "prompt_tokens": 5,
                         "completion_tokens": int(per[s]["completion_tokens"][i]),
                         "passages": [{"doc_id": "kb.md", "text": "a passage"}] if "rag" in s else []}
                        for i in range(rows)]
        sets[set_name] = {"summary": stats.summarize(per), "rows": per, "row_ids": []}
    judge = {"pairwise": {"n": 4, "ties": 1, "inconsistent": 0, "wins": {"raft:run-1": 3, "sft+rag:run-1": 0},
                          "pairs": [{"a": "raft:run-1", "b": "sft+rag:run-1", "a_wins": 3, "b_wins": 0, "ties": 1,
                                     "inconsistent": 0, "n": 4}]},
             "rubric": {s: {"mean": 2.0 + k / 2, "low": 1.7 + k / 2, "high": 2.3 + k / 2, "n": n, "unparsed": 0}
                        for k, s in enumerate(SYSTEMS)}, "rows_judged": n, "rows_total": n, "limit": None}
    write_jsonl(path / "outputs.jsonl", outputs)
    (path / "scores.json").write_text(json.dumps({"sets": sets, "judge": judge}))
    cfg = {"dataset": "d", "dataset_version": "v", "split": "test", "systems": SYSTEMS, "metrics": ["token_f1"],
           "kb": "kb", "base_model": "m", "judge": "http://judge.example/v1", "judge_model": "j",
           "decoding": {"max_new_tokens": 64}}
    eval_rows.insert_eval(store, eval_id, "d", "v", "test", SYSTEMS, str(path), cfg, status="succeeded")
    return eval_id


@pytest.fixture(scope="module")
def rendered(module_home):
    from evals import report
    ws, store = module_home
    eval_id = seed_five_system_eval(ws, store)
    html_path, md_path = report.write_report(eval_id, ws, store)
    scores = json.loads((ws.evals_dir(eval_id) / "scores.json").read_text())
    return {"ws": ws, "store": store, "id": eval_id, "html": html_path.read_text(), "md": md_path.read_text(),
            "scores": scores}


class _Page(HTMLParser):
    """Tables (rows of cell texts), inline SVGs (source text), and every URL-bearing attribute of a page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables, self.urls, self.tags, self.winner_rows = [], [], [], []
        self._cell, self._row, self._svg_depth = None, None, 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [(tag, k, v) for k, v in attrs if k in ("src", "href", "xlink:href", "srcset", "data", "action")]
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
            if ("class", "winner") in attrs:
                self.winner_rows.append(len(self.tables) - 1)
        elif tag in ("td", "th"):
            self._cell = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(self._cell.strip())
            self._cell = None
        elif tag == "tr":
            self.tables[-1].append(self._row)

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def _page(html: str) -> _Page:
    p = _Page()
    p.feed(html)
    return p


def _md_tables(md: str) -> list[list[list[str]]]:
    tables, cur = [], None
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                cur = cur if cur is not None else []
                cur.append([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])])
        elif cur is not None:
            tables.append(cur)
            cur = None
    return tables


def _svgs(html: str) -> list[ET.Element]:
    return [ET.fromstring(s) for s in re.findall(r"<svg\b.*?</svg>", html, flags=re.S)]


# ------------------------------------------------------------------------------------------------
def test_rounding_rule():
    """Decimals down to the CI half-width's first significant digit, written once in report.decimals."""
    from evals.report import decimals, fmt_ci, fmt_point
    assert fmt_ci(0.6234, 0.6234 - 0.041, 0.6234 + 0.041) == "0.62 [0.58, 0.66]"
    assert fmt_ci(0.6234, 0.6234 - 0.004, 0.6234 + 0.004) == "0.623 [0.619, 0.627]"
    assert fmt_ci(37.6, 35.3, 39.9) == "38 [35, 40]"                  # ±2.3: whole numbers
    assert decimals(0.5, 0.5) == 3 and decimals(0.5, 0.5, default=2) == 2  # a zero-width CI says nothing
    assert decimals(0.0, 1e-9) == 4                                     # capped: never 10 decimals
    assert fmt_ci(0.11, 0.05, 0.17, sign=True) == "+0.11 [+0.05, +0.17]"
    assert fmt_point(float("nan")) == "–" and fmt_ci(None) == "–"


def test_five_systems_any_kind(rendered):
    """raft:run-1 (a kind the report does not know) is ranked, recommended and highlighted like any other."""
    from evals import report
    v = report.verdict(rendered["scores"])
    assert v["best"] == "raft:run-1" and v["runner_up"] == "sft+rag:run-1" and v["clear"]
    assert v["effect_size"] > 0  # of best minus runner-up, whatever the pair's stored order
    md, page = rendered["md"], _page(rendered["html"])
    assert md.startswith(f"# Decision report — {rendered['id']}\n")
    assert "Recommendation: **raft**" in md and "**Recommendation: raft:run-1.**" in md
    domain = page.tables[0]
    assert domain[0][:2] == ["system", "token_f1"]  # the main metric first
    assert [r[0] for r in domain[1:]] == ["★ raft:run-1", "sft+rag:run-1", "sft:run-1", "rag", "prompt"]
    assert page.winner_rows[0] == 0  # the first table's highlighted row ...
    assert re.search(r'<tr class="winner"><th scope="row">★ raft:run-1</th>', rendered["html"])  # ... is raft's
    # the verdict card comes before everything else in the page
    assert rendered["html"].index('class="card"') < rendered["html"].index("<h1>")
    assert "Recommendation: <strong>raft</strong>" in rendered["html"]


def test_tables_render_once_from_the_model(rendered):
    """Markdown and HTML show the same tables with the same cells (the HTML has one more: the examples)."""
    md_tables, html_tables = _md_tables(rendered["md"]), _page(rendered["html"]).tables
    # domain + its pairs, general + its pairs, judge pairwise, judge rubric
    assert len(md_tables) == 6 and len(html_tables) == 7
    assert md_tables == html_tables[:6]
    assert html_tables[6][0] == ["question", "reference"] + SYSTEMS


def test_numbers_rounded_to_their_ci(rendered):
    from evals.report import fmt_ci
    summary = rendered["scores"]["sets"]["domain"]["summary"]["systems"]
    domain = {r[0].lstrip("★ "): r for r in _md_tables(rendered["md"])[0][1:]}
    head = _md_tables(rendered["md"])[0][0]
    for s in SYSTEMS:
        for m in ("token_f1", "latency_s", "completion_tokens"):
            x = summary[s][m]
            assert domain[s][head.index(m)] == fmt_ci(x["mean"], x["low"], x["high"])
    # no cell carries more decimals than its CI supports: a domain token_f1 CI over 30 rows with sd 0.05 is about
    # ±0.02, so two decimals (never the old fixed three)
    assert all(re.fullmatch(r"\d\.\d\d \[\d\.\d\d, \d\.\d\d\]", domain[s][1]) for s in SYSTEMS), domain
    rubric = _md_tables(rendered["md"])[5]
    assert rubric[0] == ["system", "mean rubric [95% CI]", "n", "unparsed"]
    assert rubric[1] == ["prompt", "2.0 [1.7, 2.3]", "30", "0"]  # ±0.3: one decimal; counts as integers


def test_charts_have_full_labels_and_painted_bars(rendered):
    from evals.report import bar_chart
    svgs = _svgs(rendered["html"])
    assert len(svgs) == 6  # (token_f1, latency_s, completion_tokens) x (domain, general)
    for svg in svgs:
        texts = ["".join(t.itertext()) for t in svg.iter(f"{SVG}text")]
        assert set(SYSTEMS) <= set(texts), texts  # every label whole: sft:run-1 and sft+rag:run-1 both readable
        bars = [g for g in svg.iter(f"{SVG}g") if g.get("id", "").startswith("bar-")]
        assert len(bars) == len(SYSTEMS)
        for g in bars:
            path = g.find(f"{SVG}path")
            nums = [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", path.get("d"))]
            xs, ys = nums[0::2], nums[1::2]
            assert max(xs) - min(xs) > 1 and max(ys) - min(ys) > 1, path.get("d")  # a painted area, in points
            assert re.search(r"fill: #[0-9a-f]{6}", path.get("style")), path.get("style")
    # a long name wraps onto several lines: its pieces, in order, are the whole name
    long = "openai:a-very-long-model-name-that-goes-on-and-on"
    svg = ET.fromstring(bar_chart((("sft:run-1", 0.5, 0.4, 0.6), (long, 0.2, 0.1, 0.3)), "token_f1"))
    texts = ["".join(t.itertext()) for t in svg.iter(f"{SVG}text")]
    start = next(i for i, t in enumerate(texts) if long.startswith(t) and len(t) > 8)
    assert "".join(texts[start:start + 2]) == long


def test_self_contained_and_deterministic(rendered):
    """No remote resource (script, stylesheet, font, image); inside tags "http" appears only as SVG namespace names. Writing
    again gives the same bytes (the CLI's export is compared with the eval's own report)."""
    from evals import report
    html, page = rendered["html"], _page(rendered["html"])
    assert not {"script", "link", "iframe", "img", "object", "embed"} & set(page.tags)
    assert all(v.startswith("#") or (tag == "a" and v.startswith(("http://", "https://"))) for tag, k, v in page.urls), \
        page.urls
    assert "@import" not in html and "url(http" not in html and "url(//" not in html
    in_tags = [m for m in re.finditer(r"https?://", html) if html.rfind("<", 0, m.start()) > html.rfind(">", 0, m.start())]
    assert in_tags  # the SVG namespaces: the check below looks at something
    for m in in_tags:  # inside a tag, only namespace names (plain-text URLs, like the judge's endpoint, are text)
        assert re.search(r'xmlns(:xlink)?="$', html[max(0, m.start() - 13):m.start()]), html[m.start() - 40:m.end() + 40]
    assert "Judge: http://judge.example/v1 (model j)." in html
    assert "@media print" in html and "overflow-x:auto" in html and 'name="viewport"' in html
    out = rendered["ws"].root / "again"
    h2, m2 = report.write_report(rendered["id"], rendered["ws"], rendered["store"], out)
    assert h2.read_text() == html and m2.read_text() == rendered["md"]


def test_unknown_or_unscored_eval_is_a_clear_error(rendered, tmp_path):
    from evals import report
    from sft_core import StudioError
    from sft_core.db import evals as eval_rows
    with pytest.raises(StudioError, match="unknown eval 'ev-nope'"):
        report.write_report("ev-nope", rendered["ws"], rendered["store"], tmp_path)
    store = rendered["store"]
    eval_rows.insert_eval(store, "ev-running", "d", "v", "test", [], str(tmp_path / "ev-running"), {},
                          status="running")
    with pytest.raises(StudioError, match="eval ev-running has no scores yet"):
        report.write_report("ev-running", rendered["ws"], store, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written
