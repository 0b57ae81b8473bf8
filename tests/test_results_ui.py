"""What the browser shows on the Train chart, the Evaluate card, the Rate tab and the Results tab (issue 16).

Each browser test asserts on what is painted or visible, not on the data behind it: the loss chart's
SVG paths must carry a stroke and have a length, the Results tab must show the vote just cast without
re-picking the campaign. The app runs as `python app.py` on a seeded workspace (a run whose
events.jsonl the test appends to as the train worker would, a scored eval, a campaign with known
votes): no model is loaded, so the tests take seconds, not minutes.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
import types
from pathlib import Path

import pytest

from tests.test_app import ARTIFACTS, browser, pick, start_app, stop_app  # noqa: F401 (browser: fixture)

SYSTEMS = ["prompt", "rag", "sft:run-abc"]
# The seeded rater's rule, by unordered pair: who wins ("tie" for a tie). Hand-computed win rates
# (row beats column, ties half): prompt-rag 1.0, rag-prompt 0.0, sft-prompt 0.5, rag-sft 1.0, sft-rag 0.0.
RULE = {frozenset(("prompt", "rag")): "prompt", frozenset(("prompt", "sft:run-abc")): "tie",
        frozenset(("rag", "sft:run-abc")): "rag"}


def seed_eval(ws, store, eval_id: str = "eval-ui", n_rows: int = 6) -> str:
    """An eval of three systems as evals/runner.py leaves it (outputs.jsonl, scores.json via score_eval).

    sft answers with the reference (token F1 1.0), rag with half of it, prompt with none of it; sft is
    the slowest on latency (0.9 s vs 0.3/0.5 s) and the shortest (6 tokens vs 14/20)."""
    from evals import runner
    from sft_core.db import evals as eval_rows
    from sft_core.workspace import write_jsonl
    path = ws.evals_dir(eval_id)
    path.mkdir(parents=True)
    rows = []
    for set_name, n in (("domain", n_rows), ("general", 3)):
        for i in range(n):
            ref = f"the answer {i} is blue and round"
            outs = {"prompt": ("I do not know that", 0.3, 14), "rag": (f"the answer {i} is green", 0.5, 20),
                    "sft:run-abc": (ref, 0.9, 6)}
            for system, (out, lat, tok) in outs.items():
                rows.append({"set": set_name, "row_id": f"{set_name[0]}{i}", "system": system,
                             "instruction": f"What is {i}?", "context": None, "reference": ref, "output": out,
                             "latency_s": lat + 0.01 * i, "prompt_tokens": 9, "completion_tokens": tok + i % 2,
                             "passages": []})
    write_jsonl(path / "outputs.jsonl", rows)
    cfg = {"dataset": "d", "dataset_version": "v", "split": "test", "systems": SYSTEMS, "metrics": ["token_f1"],
           "kb": None, "base_model": "m", "judge": None, "decoding": {"max_new_tokens": 64}}
    eval_rows.insert_eval(store, eval_id, "d", "v", "test", SYSTEMS, str(path), cfg, status="succeeded")
    runner.score_eval(eval_id, ws, store)
    return eval_id


def seed_votes(ws, store, campaign: str, rater: str, n: int) -> list[dict]:
    """``n`` votes by one rater following RULE; returns what was voted (pair, winner) for hand counts."""
    from evals import rating
    from sft_core.db import ratings as rating_rows
    done = []
    for _ in range(n):
        t = rating.next_task(campaign, rater, ws=ws, store=store)
        task = rating_rows.get_task(store, t["task_id"])
        row = {"system_left": task["system_left"], "system_right": task["system_right"]}
        winner = RULE[frozenset((row["system_left"], row["system_right"]))]
        choice = "tie" if winner == "tie" else "left" if row["system_left"] == winner else "right"
        rating.vote(campaign, t["task_id"], rater, choice, ws=ws, store=store)
        done.append({**row, "winner": winner})
    return done


def hand_win_rates(votes: list[dict]) -> dict:
    """Row beats column, ties half, computed from the votes themselves."""
    wins, games = {}, {}
    for v in votes:
        a, b = v["system_left"], v["system_right"]
        for s, t in ((a, b), (b, a)):
            games[s, t] = games.get((s, t), 0) + 1
            wins[s, t] = wins.get((s, t), 0) + (0.5 if v["winner"] == "tie" else float(v["winner"] == s))
    return {k: wins[k] / games[k] for k in games}


# ------------------------------------------------------------------------------------------------
# The win-rate matrix (no browser: the Results tab's handler, fed hand-counted votes)
# ------------------------------------------------------------------------------------------------
def test_win_rate_matrix_reads_row_beats_column(monkeypatch, ws, store):
    from evals import rating
    from ui import common, results
    monkeypatch.setattr(common, "_studio", types.SimpleNamespace(ws=ws, store=store, settings=types.SimpleNamespace(
        admin_password="")))  # no password: the caller is the admin and sees the results
    cid = rating.create_campaign(seed_eval(ws, store), ws=ws, store=store, seed=1)
    votes = seed_votes(ws, store, cid, "seed-rater", 6)
    expected = hand_win_rates(votes)
    assert {(s, t) for s, t in expected} == {(s, t) for s in SYSTEMS for t in SYSTEMS if s != t}  # every pair voted
    out = results.results_show(cid, None)
    winrate = out[2]
    header = list(winrate.columns)
    seen = {}
    for _, r in winrate.iterrows():
        row_name = r.iloc[0]
        for col in header[1:]:
            cell = r[col]
            if isinstance(cell, str) and "%" in cell:  # "67% of 3" (today's code showed bare floats)
                seen[_full(row_name), _full(col)] = float(cell.split("%")[0]) / 100
            elif isinstance(cell, (int, float)) and not math.isnan(cell):
                seen[_full(row_name), _full(col)] = float(cell)
    # shown as whole percents: within half a percent point of the hand count
    assert seen == pytest.approx(expected, abs=0.005), (winrate, expected)
    assert expected["prompt", "rag"] == 1.0 and expected["rag", "prompt"] == 0.0  # the votes are one-sided
    games = {}
    for v in votes:
        games[frozenset((v["system_left"], v["system_right"]))] = games.get(frozenset((v["system_left"], v["system_right"])), 0) + 1
    cell = winrate.set_index(header[0]).loc["prompt", "rag"]
    assert cell == f"100% of {games[frozenset(('prompt', 'rag'))]}", cell


def _full(name: str) -> str:
    """The system behind a (possibly shortened) name in a table."""
    return {"sft": "sft:run-abc"}.get(str(name).lstrip("★ ").strip(), str(name).lstrip("★ ").strip())


def test_empty_tables_have_named_columns(monkeypatch, ws, store):
    """Nothing chosen yet: tables show what they will hold, not Gradio's "1 2 3" placeholder headers."""
    from ui import common, evaluate, results
    monkeypatch.setattr(common, "_studio", types.SimpleNamespace(ws=ws, store=store, settings=types.SimpleNamespace(
        admin_password="")))
    summary, board, winrate = results.results_show(None, None)
    assert list(board.columns)[:3] == ["system", "rating", "95% interval"] and list(winrate.columns) == ["row beats column"]
    summary, table, examples, report, card = evaluate.eval_poll(None, None)
    assert list(table.columns)[:2] == ["set", "system"] and list(examples.columns)[:2] == ["system", "question"]
    assert "appears here once the eval is scored" in card and "Recommendation" not in card


def test_short_names():
    from evals.report import short_names
    assert short_names(["prompt", "rag", "sft:run-abc", "sft+rag:run-abc", "openai:gpt-4o-mini"]) == {
        "prompt": "prompt", "rag": "rag", "sft:run-abc": "sft", "sft+rag:run-abc": "sft+rag",
        "openai:gpt-4o-mini": "gpt-4o-mini"}
    # two runs would both read "sft": each keeps its full name
    assert short_names(["sft:a", "sft:b", "rag"]) == {"sft:a": "sft:a", "sft:b": "sft:b", "rag": "rag"}


def test_verdict_card_and_table_from_scores(ws, store):
    """The card says what scores.json says. Seeded token F1 (SQuAD-style: lower case, articles
    dropped): sft = the reference, 1.0; rag "answer i is green" vs "answer i is blue and round": 3
    shared tokens of 4 and 6, F1 = 2*(3/4)*(3/6)/(3/4+3/6) = 0.6; prompt 0. Latency per answer:
    0.9/0.5 s + 0.01*mean(0..5) = 0.925/0.525 s; tokens 6/20 + mean(i % 2) = 6.5/20.5."""
    from evals import report
    scores = report.eval_scores(seed_eval(ws, store), ws=ws, store=store)
    v = report.verdict(scores)
    assert (v["metric"], v["best"], v["runner_up"], v["ranking"]) == ("token_f1", "sft:run-abc", "rag",
                                                                     ["sft:run-abc", "rag", "prompt"])
    assert v["mean"] == pytest.approx(1.0) and v["runner_up_mean"] == pytest.approx(0.6)
    assert v["margin"] == pytest.approx(0.4) and v["margin_ci"] == pytest.approx((0.4, 0.4))  # the same gap on every row
    assert v["clear"] and v["p"] < 0.05  # 6 rows, every one +0.4: no resample crosses 0
    assert v["cost"]["latency_s"] == pytest.approx((0.925, 0.525)) and v["cost"]["completion_tokens"] == pytest.approx((6.5, 20.5))
    card = report.card_markdown(scores)
    assert "Recommendation: **sft**" in card and "sft:run-abc" not in card
    assert "**+0.400** over rag (0.600)" in card and "✅ clear" in card
    assert "0.93 s vs 0.53 s per answer (+0.40 s)" in card and "tokens per answer (-14)" in card
    assert "*general* set" in card  # the general-ability rows are explained where they appear
    cols, rows = report.score_table(scores)
    assert cols == ["set", "system", "token_f1", "latency_s", "completion_tokens"]
    assert [r[:2] for r in rows] == [["domain", "★ sft"], ["domain", "rag"], ["domain", "prompt"],
                                     ["general", "sft"], ["general", "rag"], ["general", "prompt"]]
    assert report.recommendation(scores).startswith("**Recommendation: sft:run-abc.** On the domain test set")


def test_training_curves_from_events():
    from sft_core.curves import LOSS_SERIES, smooth, training_curves
    # TensorBoard's debiased EMA, weight 0.6, by hand: 1; (0.24+0.8)/0.64 = 1.625; (0.624+1.2)/0.784
    assert smooth([1.0, 2.0, 3.0]) == pytest.approx([1.0, 1.625, 1.824 / 0.784])
    empty = training_curves([])
    # one empty row per series even before the first event: the chart's colour scale knows them all
    assert list(empty["loss"]["series"]) == list(LOSS_SERIES) and empty["loss"]["step"].isna().all()
    assert len(empty["lr"]) == 0 and len(empty["speed"]) == 0
    events = [{"event": "train_begin", "step": 0, "max_steps": 4}]
    events += [{"step": s, "loss": 2.0 / s, "learning_rate": 1e-4, "tokens_per_s": 500.0 + s} for s in (1, 2, 3, 4)]
    events += [{"step": 4, "eval_loss": 0.9}, {"step": 4, "loss": float("nan")}]  # a NaN loss is not drawn
    c = training_curves(events)
    loss = c["loss"].dropna()
    assert list(loss[loss.series == "train"].loss) == [2.0, 1.0, 2 / 3, 0.5]
    assert list(loss[loss.series == "train (smoothed)"].loss) == pytest.approx(smooth([2.0, 1.0, 2 / 3, 0.5]))
    assert list(loss[loss.series == "eval"].itertuples(index=False)) == [(4.0, 0.9, "eval")]
    assert list(c["lr"].step) == [1, 2, 3, 4] and list(c["speed"].tokens_per_s) == [501, 502, 503, 504]


# ------------------------------------------------------------------------------------------------
# The app in a browser, on a seeded workspace
# ------------------------------------------------------------------------------------------------
GUIDELINES = "Prefer the **correct** answer; length does not matter."


def seed_home(home: Path) -> dict:
    from evals import rating
    from sft_core.db import runs as run_rows
    from sft_core.store import Store
    from sft_core.workspace import Workspace
    ws = Workspace.at(home)
    st = Store(ws.db_url)
    try:
        run_dir = ws.runs_dir("live-run")
        run_dir.mkdir(parents=True)
        (run_dir / "events.jsonl").write_text("")  # the worker has not logged yet
        run_rows.insert_run(st, "live-run", "d", "v", "m", str(run_dir), {}, status="running")
        eval_id = seed_eval(ws, st)
        cid = rating.create_campaign(eval_id, ws=ws, store=st, seed=1, open_rating=True, name="ui campaign",
                                     guidelines=GUIDELINES)
        votes = seed_votes(ws, st, cid, "seed-rater", 6)
    finally:
        st.close()
    return {"run_dir": run_dir, "eval": eval_id, "campaign": cid, "votes": votes}


@pytest.fixture(scope="module")
def face(tmp_path_factory):
    home = tmp_path_factory.mktemp("face") / "home"
    seeded = seed_home(home)
    proc, url = start_app(home, home / "no-model-needed", SFT_STUDIO_SKIP_EXAMPLE="1")
    yield url, home, seeded
    stop_app(proc)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


# The lines a chart paints: each line mark's path with its computed stroke and drawn length. A path
# with stroke "none" (or fully transparent) draws nothing, whatever its data.
PAINTED_JS = """(id) => {
  const el = document.querySelector('#' + id);
  if (!el) return null;
  return Array.from(el.querySelectorAll('g.mark-line path')).map(p => {
    const s = getComputedStyle(p);
    return {stroke: s.stroke, opacity: parseFloat(s.strokeOpacity), width: parseFloat(s.strokeWidth),
            length: p.getTotalLength(), vertices: ((p.getAttribute('d') || '').match(/[ML]/g) || []).length};
  });
}"""


def painted(lines) -> list[dict]:
    return [ln for ln in lines or [] if ln["stroke"] not in ("none", "") and ln["opacity"] > 0 and ln["width"] > 0
            and ln["length"] > 40]  # 40 px: more than a dot or a tick, far less than a 12-step line across the plot


def append_events(run_dir: Path, steps: range, eval_every: int = 4) -> None:
    """What the train worker's callback appends (sft_core/train.py EventsCallback.on_log)."""
    with open(run_dir / "events.jsonl", "a") as f:
        for s in steps:
            f.write(json.dumps({"time": time.time(), "step": s, "max_steps": 12, "epoch": s / 12,
                                "loss": 2.4 * math.exp(-s / 5) + 0.15 * (s % 2), "learning_rate": 2e-4 * (1 - s / 12),
                                "tokens": 900.0 * s, "tokens_per_s": 850.0 + 10 * (s % 3)}) + "\n")
            if s % eval_every == 0:
                f.write(json.dumps({"time": time.time(), "step": s, "max_steps": 12, "epoch": s / 12,
                                    "eval_loss": 2.0 * math.exp(-s / 8)}) + "\n")


def wait_for(page, fn, ok, timeout: float, what: str):
    end = time.time() + timeout
    while True:
        out = fn()
        if ok(out):
            return out
        if time.time() > end:
            shot(page, "failure-" + what.replace(" ", "-"))
            raise AssertionError(f"{what}: gave up; last seen {out}")
        page.wait_for_timeout(400)


@pytest.mark.browser
def test_loss_chart_paints_its_lines_while_the_run_logs(face, browser):
    """The chart is open before the first event (as when a run is started from the tab), then the
    worker logs: train loss raw and smoothed, then eval loss. Every series must be painted."""
    url, home, seeded = face
    page = browser.new_page(viewport={"width": 1280, "height": 1400})
    page.goto(url)
    page.get_by_role("tab", name="Train").click()
    pick(page, "train-run", "live-run")
    page.locator("#train-progress").get_by_text("live-run").wait_for(timeout=30000)
    page.wait_for_timeout(2500)  # a poll or two with no events: the chart is built empty
    append_events(seeded["run_dir"], range(1, 5))
    wait_for(page, lambda: page.evaluate(PAINTED_JS, "train-loss"),
             lambda lines: lines and max(ln["vertices"] for ln in lines) >= 4, 30, "first loss points")
    append_events(seeded["run_dir"], range(5, 13))
    # 12 train points on the raw line; then every line must be painted: train raw, train smoothed, eval
    lines = wait_for(page, lambda: page.evaluate(PAINTED_JS, "train-loss"),
                     lambda lines: lines and max(ln["vertices"] for ln in lines) >= 12, 30, "all loss points")
    page.wait_for_timeout(1000)
    lines = page.evaluate(PAINTED_JS, "train-loss")
    shot(page, "train-chart")
    assert len(painted(lines)) >= 3, lines
    legend = page.evaluate("() => Array.from(document.querySelectorAll('#train-loss .role-legend text'))"
                           ".filter(t => t.getBoundingClientRect().height > 0).map(t => t.textContent)")
    assert {"train", "train (smoothed)", "eval"} <= set(legend), legend
    # the learning rate and the throughput have their own charts (their scales are not the loss's)
    for chart in ("train-lr", "train-speed"):
        lines = wait_for(page, lambda: page.evaluate(PAINTED_JS, chart), lambda ls: len(painted(ls)) >= 1, 20,
                         f"{chart} line")
        assert painted(lines)[0]["vertices"] >= 10, lines


@pytest.mark.browser
def test_results_follow_votes_without_repicking(face, browser):
    """Results show when the tab opens and again after a vote on the Rate tab, without Refresh or
    re-picking the campaign (it used to stay empty, then stale, until the campaign was picked again)."""
    url, home, seeded = face
    page = browser.new_page(viewport={"width": 1280, "height": 1200})
    page.goto(url)
    page.get_by_role("tab", name="Results").click()
    pick(page, "results-campaign", seeded["campaign"])
    summary = page.locator("#results-summary")
    n0 = len(seeded["votes"]) + _votes_since_seed(home, seeded)
    summary.get_by_text(f"{n0} votes").wait_for(timeout=30000)
    # the vote: an open campaign, so a name is enough; the button, not a shortcut
    page.get_by_role("tab", name="Rate").click()
    pick(page, "rate-campaign", seeded["campaign"])
    page.locator("#rate-rater input, #rate-rater textarea").first.fill("fresh-rater")
    page.locator("#rate-next").click()
    page.locator("#rate-progress").get_by_text("fresh-rater").wait_for(timeout=30000)
    page.locator("#vote-right").click()
    page.locator("#rate-progress").get_by_text("1 rated").wait_for(timeout=30000)
    page.get_by_role("tab", name="Results").click()
    try:
        summary.get_by_text(f"{n0 + 1} votes").wait_for(timeout=15000)
    except Exception:
        shot(page, "failure-results-stale")
        raise AssertionError(f"the Results tab still shows {summary.inner_text()!r} after the vote")
    shot(page, "results")


def _votes_since_seed(home: Path, seeded: dict) -> int:
    """Votes other tests of this module cast on the campaign (they share the app)."""
    from sft_core.db import ratings as rating_rows
    with _db(home) as st:
        n = rating_rows.count_votes(st, campaign_id=seeded["campaign"])
    return n - len(seeded["votes"])


@contextlib.contextmanager
def _db(home: Path):
    """A Store of its own on the database the app (another process) writes."""
    from sft_core.store import Store
    from sft_core.workspace import Workspace
    st = Store(Workspace.at(home).db_url)
    try:
        yield st
    finally:
        st.close()


def _votes_by(st, name: str, campaign_id: str | None = None) -> list[dict]:
    """The votes (with their task's systems) of the raters named ``name`` (of one campaign), in the order cast."""
    from sft_core.db import ratings as rating_rows
    ids = {r["id"] for r in rating_rows.list_raters(st, name=name)}
    if campaign_id is not None:
        return [v for v in rating_rows.votes_with_tasks(st, campaign_id) if v["rater"] in ids]
    return sorted((v for rid in ids for v in rating_rows.votes(st, rater=rid)), key=lambda v: v["id"])


@pytest.mark.browser
def test_rate_tab_a_b_guidelines_progress_undo_and_keys(face, browser):
    url, home, seeded = face
    page = browser.new_page(viewport={"width": 1280, "height": 1300})
    page.goto(url)
    page.get_by_role("tab", name="Rate").click()
    pick(page, "rate-campaign", seeded["campaign"])
    page.locator("#rate-guidelines").get_by_text("correct").wait_for(timeout=30000)  # the campaign's guidelines
    page.locator("#rate-rater input, #rate-rater textarea").first.fill("keys-rater")
    page.locator("#rate-next").click()
    progress = page.locator("#rate-progress")
    progress.get_by_text("keys-rater").wait_for(timeout=30000)
    from sft_core.db import ratings as rating_rows
    with _db(home) as st:
        total = rating_rows.count_tasks(st, seeded["campaign"])
    assert f"task 1 of {total}" in progress.inner_text(), progress.inner_text()
    assert page.locator("#rate-a-title").inner_text().strip() == "A" and page.locator("#rate-b-title").inner_text().strip() == "B"
    assert "A is better (1)" in page.locator("#vote-left").inner_text()
    first_prompt = page.locator("#rate-prompt").inner_text()
    shot(page, "rate")

    # "2" votes for B with the focus in the campaign dropdown once its list is closed (nothing is being
    # typed there); the old handler ignored every <input>
    page.locator("#rate-campaign input").focus()
    page.keyboard.press("Escape")
    # the list closes on Gradio's next render, not synchronously with the key press
    page.wait_for_function("() => document.activeElement.getAttribute('aria-expanded') === 'false'", timeout=10000)
    page.keyboard.press("2")
    page.locator("#rate-saved").get_by_text("B is better").wait_for(timeout=30000)
    progress.get_by_text("1 rated").wait_for(timeout=30000)
    assert f"task 2 of {total}" in progress.inner_text()

    def my_votes():
        with _db(home) as st:
            return [(v["task_id"], v["choice"]) for v in _votes_by(st, "keys-rater")]
    (task_id, choice), = my_votes()
    assert choice == "right"

    # undo: the same task comes back with the vote named; the next choice replaces it
    page.locator("#rate-undo").click()
    page.locator("#rate-saved").get_by_text("Your vote was").wait_for(timeout=30000)
    assert page.locator("#rate-prompt").inner_text() == first_prompt
    assert "changing your last vote" in progress.inner_text() and "task 1 of" in progress.inner_text()
    # typing "3" into the comment types it (a text field), it does not vote
    comment = page.locator("#rate-comment textarea")
    comment.click()
    page.keyboard.press("3")
    page.wait_for_timeout(1500)
    assert comment.input_value() == "3" and my_votes() == [(task_id, "right")]
    comment.fill("")
    page.locator("#rate-a-title").click()  # focus off the text box, anywhere on the page
    page.keyboard.press("1")
    page.locator("#rate-saved").get_by_text("Vote changed").wait_for(timeout=30000)
    assert my_votes() == [(task_id, "left")]  # replaced, not added
    with _db(home) as st:
        history = [h["choice"] for v in rating_rows.votes(st, task_id=task_id)
                   for h in rating_rows.history(st, vote_id=v["id"])]
    assert history == ["right"]
    assert "1 rated" in progress.inner_text() and "task 2 of" in progress.inner_text()
    shot(page, "rate-after-undo")


@pytest.mark.browser
def test_evaluate_card_and_table(face, browser):
    """The recommendation as a card (verdict, margin, confidence, cost), the main metric first, the
    winner marked, short system names."""
    url, home, seeded = face
    page = browser.new_page(viewport={"width": 1280, "height": 1300})
    page.goto(url)
    page.get_by_role("tab", name="Evaluate").click()
    pick(page, "eval-pick", seeded["eval"])
    card = page.locator("#eval-card")
    card.get_by_text("Recommendation: sft").wait_for(timeout=30000)
    text = card.inner_text()
    # seeded: sft answers with the reference (token F1 1.0), rag half of it, prompt none; sft takes
    # 0.9 s and 6-7 tokens per answer, rag 0.5 s and 20-21
    assert "Recommendation: sft" in text and "sft:run-abc" not in text, text
    for part in ("token_f1", "Margin", "over rag", "Confidence", "Cost", "s per answer", "tokens per answer"):
        assert part in text, (part, text)
    table = page.locator("#eval-table")
    table.get_by_text("★ sft").first.wait_for(timeout=30000)
    headers = [h.strip() for h in table.locator("thead th").all_inner_texts() if h.strip()]
    assert headers[:3] == ["set", "system", "token_f1"] and headers[-2:] == ["latency_s", "completion_tokens"], headers
    shot(page, "evaluate")
