"""A new user's walkthrough in Chromium, as issue #16 asks: from a fresh workspace with the example
domain, follow the guided path (the button at the top) to the recommendation card and a leaderboard,
counting clicks; then the same app at 1280 px and 390 px, one screenshot per tab in test-artifacts/
(walk-*.png), asserting on what is visible: no horizontal overflow, every tab reachable, the chat
composer in view, the Rate buttons on screen. A second test uploads a question/answer CSV as a new
user would.

The app runs as its own process on the tiny random Llama with the transformers engine (as in
tests/test_app.py), so answers are noise: the test checks the path and what the page shows, not
which system wins.
"""
from __future__ import annotations

import json
import time

import pytest

from tests.test_app import ARTIFACTS, browser, start_app, stop_app, wait_example  # noqa: F401 (browser: a fixture)

pytestmark = pytest.mark.browser

TABS = ("Data", "Knowledge", "Train", "Chat", "Evaluate", "Rate", "Results")


@pytest.fixture(scope="module")
def fresh_app(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("walk") / "home"
    proc, url = start_app(home, tiny_model_dir)
    wait_example(url)
    yield url, home
    stop_app(proc)


class Clicks:
    """Counts what the user does: clicks and key presses (typing into a field is counted apart)."""

    def __init__(self, page):
        self.page, self.n, self.log = page, 0, []

    def click(self, selector: str, why: str) -> None:
        self.page.locator(selector).click()
        self.n += 1
        self.log.append(why)

    def key(self, key: str, why: str) -> None:
        self.page.keyboard.press(key)
        self.n += 1
        self.log.append(why)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def no_horizontal_overflow(page) -> tuple[int, int]:
    return page.evaluate("() => [document.scrollingElement.scrollWidth, window.innerWidth]")


def selected_tab(page) -> str:
    return page.locator("[role=tab][aria-selected=true]").first.inner_text().strip()


def guide_label(page) -> str:
    return page.locator("#guide-next").inner_text().strip()


def wait_label(page, text: str, timeout: float) -> None:
    end = time.time() + timeout
    while text not in guide_label(page):
        if time.time() > end:
            shot(page, "walk-failure")
            raise AssertionError(f"the guide's button never read {text!r}; it reads {guide_label(page)!r}; steps: "
                                 f"{page.locator('#guide-steps').inner_text()!r}")
        page.wait_for_timeout(500)


# Visible mutations of the chart, the progress line and the guide while nothing changes: a poll that
# re-sends unchanged values redraws them, and one with a loading overlay shows Gradio's status tracker
# (a ".wrap" without the "hide" class). Gradio keeps a hidden tracker ticking even for a hidden-progress
# event; changes inside a hidden tracker are invisible and not counted.
WATCH_JS = """(ids) => { window.__mutations = []; for (const id of ids) { const el = document.getElementById(id);
  new MutationObserver((ms) => { for (const m of ms) {
    const t = m.target.nodeType === 1 ? m.target : m.target.parentElement;
    const tracker = t && t.closest('.wrap');
    if (tracker && tracker.classList.contains('hide')) continue;
    window.__mutations.push(id + ' ' + m.type + ' ' + (t ? t.className : '')); } }).observe(el,
    {subtree: true, childList: true, attributes: true, characterData: true}); } }"""


def test_new_user_reaches_the_answer_by_the_guided_path(fresh_app, browser):
    url, home = fresh_app
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    user = Clicks(page)
    page.goto(url)
    # the first screen: five steps, the example ready, one next action
    wait_label(page, "Train on pydocs (quick test)", 60)
    steps = page.locator("#guide-steps").inner_text()
    for title in ("Data", "Knowledge", "Train", "Evaluate", "Rate"):
        assert title in steps, steps
    assert "pydocs (example)" in steps and steps.count("✓") == 2, steps
    assert selected_tab(page) == "Data"
    shot(page, "walk-01-start")

    # click 1: train on the example with the quick-test preset; the Train tab follows the run's phases
    user.click("#guide-next", "train on the example (guide)")
    page.locator("#train-msg").get_by_text("Queued run").wait_for(timeout=60000)
    assert selected_tab(page) == "Train"
    run_id = page.locator("#train-msg").inner_text().split("Queued run")[1].split()[0].strip("*.")
    seen, bars, end = set(), 0, time.time() + 600
    while "Compare the systems" not in guide_label(page):
        text = page.locator("#train-progress").inner_text()
        seen.add(text.split("·", 2)[-1].strip()[:40])
        bars += page.locator("#train-progress progress").count()
        assert time.time() < end, f"training did not finish; progress {text!r}"
        page.wait_for_timeout(400)
    assert bars > 0, f"no progress bar while the run was live; lines seen: {seen}"
    assert any("step" in s or s.endswith("…") for s in seen), seen
    page.locator("#train-progress").get_by_text("succeeded").wait_for(timeout=30000)
    assert page.locator("#train-run input").input_value() == run_id
    shot(page, "walk-02-train")
    # the worker wrote the phases the page shows, in order
    phases = [e["phase"] for e in map(json.loads, (home / "runs" / run_id / "events.jsonl").read_text().splitlines())
              if e.get("event") == "phase"]
    assert phases[:3] == ["loading data", "loading model", "tokenising"] and phases[-1] == "saving adapter", phases

    # nothing changes on a finished run: three timer ticks redraw nothing (no flicker)
    page.evaluate(WATCH_JS, ["train-progress", "train-loss", "guide-steps", "guide-next"])
    page.wait_for_timeout(7000)
    assert page.evaluate("() => window.__mutations") == []

    # click 2: compare prompt, RAG, fine-tuned and fine-tuned + RAG; the recommendation card is the answer
    user.click("#guide-next", "compare the systems (guide)")
    page.locator("#eval-msg").get_by_text("Queued eval").wait_for(timeout=60000)
    assert selected_tab(page) == "Evaluate"
    card = page.locator("#eval-card")
    card.get_by_text("Recommendation").first.wait_for(timeout=900000)
    clicks_to_answer = user.n
    assert clicks_to_answer == 2, user.log
    verdict = card.inner_text()
    assert any(name in verdict for name in ("prompt", "rag", "sft", "sft+rag")), verdict
    wait_label(page, "Rate answers yourself", 30)
    assert "best is" in page.locator("#guide-steps").inner_text()
    shot(page, "walk-03-evaluate")

    # click 3: a blind campaign with an invite for this user; Next, then two votes (button, key)
    user.click("#guide-next", "start rating (guide)")
    page.locator("#guide-msg").get_by_text("created with an invite for you").wait_for(timeout=60000)
    assert selected_tab(page) == "Rate"
    user.click("#rate-next", "next task")
    page.locator("#rate-prompt").get_by_text("Prompt").wait_for(timeout=60000)
    user.click("#vote-left", "vote A")
    page.locator("#rate-progress").get_by_text("1 rated").wait_for(timeout=60000)
    user.key("2", "vote B (key 2)")
    page.locator("#rate-progress").get_by_text("2 rated").wait_for(timeout=60000)
    shot(page, "walk-04-rate")

    # last click: the leaderboard
    wait_label(page, "See the leaderboard", 30)
    user.click("#guide-next", "see the leaderboard (guide)")
    page.locator("#results-summary").get_by_text("2 votes").wait_for(timeout=60000)
    assert selected_tab(page) == "Results"
    board = page.locator("#results-board").inner_text()
    assert "prompt" in board and "sft" in board, board
    shot(page, "walk-05-results")
    assert user.n == 7, user.log
    # for the note: the click count and what was clicked
    print(f"\nwalkthrough: {clicks_to_answer} clicks to the recommendation card, {user.n} to the leaderboard: "
          + " → ".join(user.log))

    # a reload starts where the user left off: the run, the eval, the campaign, the knowledge base
    eval_id = page.locator("#eval-pick input").input_value()
    campaign = page.locator("#results-campaign input").input_value()
    page.reload()
    wait_label(page, "See the leaderboard", 60)
    page.wait_for_timeout(1500)

    def on_tab(tab: str, elem_id: str) -> str:  # a tab's content is drawn when the tab is opened
        page.get_by_role("tab", name=tab).click()
        page.locator(f"#{elem_id} input").first.wait_for(timeout=30000)
        return page.locator(f"#{elem_id} input").first.input_value()
    assert on_tab("Train", "train-run") == run_id
    assert on_tab("Evaluate", "eval-pick") == eval_id
    assert on_tab("Results", "results-campaign") == campaign
    assert on_tab("Chat", "chat-kb") == "pydocs"
    assert [page.locator(f"#chat-sys-{i} input").input_value() for i in range(4)] == [
        "prompt", "rag", f"sft:{run_id}", f"sft+rag:{run_id}"]
    page.close()

    # every tab at desktop and phone width: a screenshot each, nothing wider than the screen
    for width in (1280, 390):
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(url)
        wait_label(page, "See the leaderboard", 60)
        for tab in TABS:
            btn = page.get_by_role("tab", name=tab)
            box = btn.bounding_box()  # reachable: a visible tab button on screen, not behind a "…" menu
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= width, (tab, width, box)
            btn.click()
            page.wait_for_timeout(1200)
            shot(page, f"walk-{tab.lower()}-{width}")
            scroll_w, inner_w = no_horizontal_overflow(page)
            assert scroll_w <= inner_w, f"{tab} at {width} px is {scroll_w} px wide"
            if tab == "Chat":  # the composer stays in view however far the panes go
                page.evaluate("window.scrollTo(0, document.scrollingElement.scrollHeight)")
                page.wait_for_timeout(300)
                top = page.locator("#chat-composer").bounding_box()["y"]
                assert 0 <= top < 900, f"the message box is off screen at {width} px (y={top})"
                assert page.locator("#chat-send").is_visible()
                page.evaluate("window.scrollTo(0, 0)")
            if tab == "Rate":
                for vid in ("vote-left", "vote-right", "vote-tie", "vote-bad"):
                    b = page.locator(f"#{vid}").bounding_box()
                    assert b and b["x"] >= 0 and b["x"] + b["width"] <= width, (vid, width, b)
        page.close()


def test_question_answer_csv_is_mapped_checked_then_saved(fresh_app, browser, tmp_path):
    """The support-desk CSV from issue #16: detected and mapped by its headers, previewed, Save only
    after a passing Check; a broken file is answered in words with its own name and the versions
    table stays."""
    url, home = fresh_app
    csv_file = tmp_path / "support.csv"
    csv_file.write_text("question,answer\n" + "".join(f"How do I reset password {i}?,Use the link {i}.\n"
                                                      for i in range(12)))
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    page.locator("#data-file input[type=file]").set_input_files(str(csv_file))
    page.locator("#data-msg").get_by_text("columns matched by their names").wait_for(timeout=60000)
    assert page.locator("#data-col-instruction input").input_value() == "question"
    assert page.locator("#data-col-response input").input_value() == "answer"
    assert "How do I reset password 0?" in page.locator("#data-preview").inner_text()
    assert page.locator("#data-name input, #data-name textarea").first.input_value() == "support"
    assert page.locator("#data-save").is_disabled()
    page.locator("#data-check").click()
    page.locator("#data-report").get_by_text("rows read: 12").wait_for(timeout=60000)
    page.locator("#data-save:not([disabled])").wait_for(timeout=30000)
    page.locator("#data-save").click()
    page.locator("#data-msg").get_by_text("saved new version: support@").wait_for(timeout=60000)
    assert "support.csv" in page.locator("#data-versions").inner_text()
    shot(page, "walk-data-csv")

    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"instruction": "ok", "output": "fine"}) + "\n{not json\n")
    page.reload()
    page.locator("#data-file input[type=file]").set_input_files(str(broken))
    page.locator("#data-msg").get_by_text("broken.jsonl").wait_for(timeout=60000)
    page.locator("#data-check").click()
    page.locator("#data-report").get_by_text("broken.jsonl:2: invalid JSON").first.wait_for(timeout=60000)
    assert page.locator("#data-save").is_disabled()
    shown = " ".join(page.locator(f"#{i}").inner_text() for i in ("data-msg", "data-report", "data-errors"))
    assert "/tmp" not in shown and "gradio" not in shown and "--format" not in shown and "--map" not in shown, shown
    versions = page.locator("#data-versions").inner_text()
    assert "support" in versions and "pydocs" in versions and "Error" not in versions, versions
    shot(page, "walk-data-broken")
    page.close()
