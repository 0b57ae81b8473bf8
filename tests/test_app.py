"""The web app in a real browser (Debian's Chromium via Playwright) and through gradio_client.

The app runs as its own process on the tiny random Llama with the transformers engine, exactly as
`python app.py` starts it. Screenshots of each tab go to test-artifacts/ (not committed). The locked
app (admin password, demo mode) lives outside /tmp and the CWD, as under the Docker image's /data.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(home: Path, base_model: Path, **env) -> tuple[subprocess.Popen, str]:
    port = free_port()
    e = {**os.environ, "SFT_STUDIO_HOME": str(home), "SFT_STUDIO_BASE_MODEL": str(base_model),
         "SFT_STUDIO_ENGINE": "hf", "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), **env}
    log = open(home.parent / f"app-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=e, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.time() + 180
    while time.time() < end:
        if proc.poll() is not None:
            raise AssertionError(f"app exited: {(home.parent / f'app-{port}.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError("app did not become healthy in 180 s")


def stop_app(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
        return json.loads(r.read())


def wait_example(url: str, timeout: float = 240) -> None:
    end = time.time() + timeout
    while time.time() < end:
        st = health(url)["tasks"].get("example")
        if st == "done":
            return
        assert st != "failed", "example domain failed to build"
        time.sleep(1)
    raise AssertionError("example domain not ready")


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("app") / "home"
    proc, url = start_app(home, tiny_model_dir)
    wait_example(url)
    yield url, home
    stop_app(proc)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (make test installs it as root)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-sync"])
        yield b
        b.close()


def open_tab(page, url: str, tab: str):
    page.goto(url)
    page.get_by_role("tab", name=tab).click()
    page.wait_for_timeout(500)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def pick(page, elem_id: str, value: str) -> None:
    """Choose a value in a Gradio dropdown."""
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(value)
    page.get_by_role("option", name=value, exact=True).first.click()


def fill(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} input, #{elem_id} textarea").first.fill(value)


def close_toasts(page) -> None:
    for btn in page.locator("[data-testid='toast-close']").all():
        try:
            btn.click(timeout=2000)
        except Exception:  # noqa: BLE001 - it went away by itself
            pass
    page.wait_for_function("() => document.querySelectorAll('[data-testid=toast-body]').length === 0", timeout=15000)


def expect_error(page, action, text: str, timeout: float = 30000) -> None:
    """Run ``action`` and wait for a new error toast containing ``text`` (older toasts closed first)."""
    close_toasts(page)
    action()
    page.locator("[data-testid='toast-body']").filter(has_text=text).first.wait_for(timeout=timeout)


# How many loss points the chart draws: vertices of the line marks (Vega renders SVG), or the
# hover cells (one per point) while a line is being redrawn.
PLOT_POINTS_JS = """() => {
  const el = document.querySelector('#train-loss');
  if (!el) return 0;
  let n = 0;
  for (const p of el.querySelectorAll('g.mark-line path'))
    n += ((p.getAttribute('d') || '').match(/[ML]/g) || []).length;
  return Math.max(n, el.querySelectorAll('g.hover_voronoi path').length);
}"""


def wait_points(page, more_than: int, timeout: float = 120000) -> int:
    end = time.time() + timeout / 1000
    while True:
        n = page.evaluate(PLOT_POINTS_JS)
        if n > more_than:
            return n
        if time.time() > end:
            shot(page, "train-chart-failure")
            chart = page.evaluate("() => { const el = document.querySelector('#train-loss'); "
                                  "const g = el && el.querySelector('g.mark-line'); "
                                  "return g ? g.outerHTML.slice(0, 3000) : (el ? el.innerText.slice(0, 500) : 'no chart'); }")
            raise AssertionError(f"the loss chart shows {n} points, expected more than {more_than}; progress: "
                                 f"{page.locator('#train-progress').inner_text()!r}; chart: {chart}")
        page.wait_for_timeout(500)


def chat_answer(page, i: int) -> str:
    return page.locator(f"#chat-bot-{i} [data-testid='bot']").last.inner_text()


def test_upload_dataset_report_and_malformed_file(app, browser, tmp_path):
    url, home = app
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    open_tab(page, url, "Data")
    good = tmp_path / "support.jsonl"
    good.write_text("".join(json.dumps({"instruction": f"How do I reset password {i}?", "output": f"Use the link {i}."})
                            + "\n" for i in range(12)))
    page.locator("#data-file input[type=file]").set_input_files(str(good))
    page.locator("#data-check").click()
    page.get_by_text("support.jsonl — ✅ valid").wait_for(timeout=60000)
    page.locator("#data-name input, #data-name textarea").first.fill("support")
    page.locator("#data-save").click()
    page.get_by_text("saved new version").wait_for(timeout=60000)
    shot(page, "data")

    before = sorted(p.name for p in (home / "datasets").iterdir())
    bad = tmp_path / "broken.jsonl"
    bad.write_text(json.dumps({"instruction": "ok", "output": "fine"}) + "\n{not json\n"
                   + json.dumps({"instruction": "", "output": "x"}) + "\n")
    page.reload()
    page.locator("#data-file input[type=file]").set_input_files(str(bad))
    page.locator("#data-check").click()
    page.get_by_text("broken.jsonl:2: invalid JSON").first.wait_for(timeout=60000)
    page.get_by_text("broken.jsonl:3 [instruction]: empty").first.wait_for(timeout=10000)
    # Save is enabled only by a passing Check (issue #16), so nothing can be stored from here
    assert page.locator("#data-save").is_disabled()
    assert "support" in page.locator("#data-versions").inner_text()  # the versions table stays
    shot(page, "data-errors")
    assert sorted(p.name for p in (home / "datasets").iterdir()) == before


def test_knowledge_build_and_search(app, browser, tmp_path):
    url, home = app
    doc = tmp_path / "widgets.md"
    doc.write_text("# Frobnicator\n\nThe frobnicator widget recalibrates the flux capacitor every Tuesday at noon.\n\n"
                   "# Sprockets\n\nSprockets are lubricated with whale-free oil once a month.\n")
    page = browser.new_page(viewport={"width": 1300, "height": 1000})
    open_tab(page, url, "Knowledge")
    page.locator("#kb-files input[type=file]").set_input_files(str(doc))
    fill(page, "kb-name", "widgets")
    page.locator("#kb-build").click()
    # the build is a job: the message follows it (queued, running) until the index is updated
    page.locator("#kb-msg").get_by_text("updated").first.wait_for(timeout=120000)
    assert "Knowledge base widgets updated" in page.locator("#kb-msg").inner_text()
    # the list of knowledge bases shows the new one: its documents, chunks, embedder, when it was built
    page.wait_for_function("() => /\\bwidgets\\b/.test(document.querySelector('#kb-list').innerText)", timeout=30000)
    listing = page.locator("#kb-list").inner_text()
    assert "pydocs" in listing and "all-minilm" in listing.lower() and "built at" in listing, listing
    # building selects the new base for searching; the Search button searches (Enter too, below)
    fill(page, "kb-query", "how often is the flux capacitor recalibrated")
    page.locator("#kb-search").click()
    page.locator("#kb-hits").get_by_text("widgets.md").first.wait_for(timeout=60000)
    hits = page.locator("#kb-hits").inner_text()
    assert "frobnicator" in hits.lower() and "fused rank score" in hits and "(most 0.033)" in hits, hits
    assert hits.count("widgets.md") == len(page.locator("#kb-hits details").all()), hits  # the file once per hit
    fill(page, "kb-query", "whale-free oil")
    page.locator("#kb-query input, #kb-query textarea").first.press("Enter")
    page.locator("#kb-hits").get_by_text("whale-free").first.wait_for(timeout=60000)
    shot(page, "knowledge")


def test_train_loss_chart_survives_reload(app, browser):
    url, home = app
    page = browser.new_page(viewport={"width": 1300, "height": 1100})
    open_tab(page, url, "Train")
    pick(page, "train-dataset", "pydocs")
    page.get_by_text("LoRA and training options").click()
    fill(page, "train-opt-max-steps", "400")
    fill(page, "train-opt-max-length", "96")
    fill(page, "train-opt-batch-size", "2")
    fill(page, "train-opt-save-steps", "20")
    fill(page, "train-opt-run-name", "ui-run")
    page.locator("#train-start").click()
    page.get_by_text("Queued run").wait_for(timeout=60000)
    progress = page.locator("#train-progress")
    progress.get_by_text("step").wait_for(timeout=120000)
    # the chart grows while the run trains (the timer re-reads events.jsonl)
    first = wait_points(page, 1, timeout=120000)
    second = wait_points(page, first, timeout=90000)
    assert second > first >= 2
    shot(page, "train")
    # reload mid-training: progress is read from the store and events.jsonl, not from the page
    page.reload()
    page.get_by_role("tab", name="Train").click()
    pick(page, "train-run", "ui-run")
    page.locator("#train-progress").get_by_text("running").wait_for(timeout=60000)
    page.locator("#train-progress").get_by_text("step").wait_for(timeout=60000)
    assert wait_points(page, second - 1, timeout=60000) >= second  # the whole curve is back, not just new points
    page.locator("#train-cancel").click()
    page.get_by_text("Cancel requested").wait_for(timeout=30000)
    page.locator("#train-progress").get_by_text("cancelled").wait_for(timeout=120000)
    shot(page, "train-after-reload")


def test_chat_two_systems(app, browser):
    url, home = app
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    open_tab(page, url, "Chat")
    pick(page, "chat-kb", "pydocs")
    page.locator("#chat-msg textarea").fill("What does json.dumps do?")
    page.locator("#chat-send").click()
    for i in (0, 1):
        page.locator(f"#chat-bot-{i} [data-testid='bot']").first.wait_for(timeout=120000)
    # the RAG column (system 2) lists the retrieved passages with their source; the prompt column none
    page.locator("#chat-passages-1").get_by_text("corpus.jsonl").first.wait_for(timeout=60000)
    passages = page.locator("#chat-passages-1").inner_text()
    assert "json.dumps" in passages and "score" in passages, passages
    assert "corpus.jsonl" not in page.locator("#chat-passages-0").inner_text()
    answers, end = None, time.time() + 120
    while time.time() < end:  # streaming is over when both answers stop changing
        now = [chat_answer(page, i) for i in (0, 1)]
        if now == answers and all(a.strip() for a in now):
            break
        answers = now
        page.wait_for_timeout(1500)
    shot(page, "chat")
    message = "What does json.dumps do?"
    for a in answers:
        assert a.strip() and a.strip() != message and "⚠️" not in a, answers
    # under each answer: its latency and tokens; the tiny random model almost never ends an answer itself
    # (its end token is 1 of ~49k: about 0.3% over 128 tokens), so at the default 128-token limit both
    # answers are cut there and say so
    for i in (0, 1):
        page.locator(f"#chat-info-{i}").get_by_text("tokens").first.wait_for(timeout=30000)
        line = page.locator(f"#chat-info-{i}").inner_text()
        assert re.search(r"\d+\.\d s · 128 tokens", line), line  # the default limit, 128
        assert "truncated at 128 tokens" in line, line
    assert page.locator("#chat-info-2").inner_text().strip() == ""  # no system chosen: no line


def test_eval_then_blind_vote_moves_leaderboard(app, browser):
    url, home = app
    page = browser.new_page(viewport={"width": 1300, "height": 1100})
    open_tab(page, url, "Evaluate")
    pick(page, "eval-dataset", "pydocs")
    pick(page, "eval-kb", "pydocs")
    page.get_by_label("Rows (limit)").fill("2")
    page.locator("#eval-start").click()
    page.get_by_text("Queued eval").wait_for(timeout=60000)
    page.locator("#eval-summary").get_by_text("succeeded").first.wait_for(timeout=300000)
    page.locator("#eval-table").get_by_text("token_f1").first.wait_for(timeout=30000)
    shot(page, "evaluate")
    eval_id = page.locator("#eval-msg").inner_text().split("**")[-1].strip().split()[-1].strip(".*")

    page.get_by_role("tab", name="Rate").click()
    page.get_by_text("New campaign (admin)").click()
    page.locator("#rate-new-eval input").click()
    page.get_by_role("option").first.click()
    page.locator("#rate-create").click()
    page.get_by_text("Campaign").get_by_text("created").first.wait_for(timeout=30000)
    # the new campaign is selected on the Results tab too: read the leaderboard before any vote
    page.get_by_role("tab", name="Results").click()
    page.locator("#results-refresh").click()
    page.locator("#results-summary").get_by_text("0 votes").wait_for(timeout=30000)
    board_before = page.locator("#results-board").inner_text()
    # the rater comes in through an invite link, which opens the Rate tab with the campaign chosen
    page.locator("#results-admin").get_by_text("Campaign admin").click()
    fill(page, "results-invite-names", "tester")
    page.locator("#results-invite").click()
    link = page.locator("#results-admin-msg code").first
    link.wait_for(timeout=30000)
    invite_url = link.inner_text().strip()
    assert invite_url.startswith(url + "/?invite="), invite_url
    page.goto(invite_url)
    page.locator("#rate-progress").get_by_text("Invited as").wait_for(timeout=30000)
    page.locator("#rate-rater input, #rate-rater textarea").first.fill("someone else")  # a typed name changes nothing
    page.locator("#rate-next").click()
    page.locator("#rate-progress").get_by_text("tester").wait_for(timeout=30000)
    page.locator("#rate-prompt").get_by_text("Prompt").wait_for(timeout=30000)
    body = page.locator("#rate-left").inner_text() + page.locator("#rate-right").inner_text()
    assert "prompt" not in body.lower().split() and "rag" not in body.lower().split()
    shot(page, "rate")
    page.keyboard.press("1")  # keyboard shortcut: A (the left answer) is better
    page.locator("#rate-progress").get_by_text("1 rated").wait_for(timeout=30000)

    page.get_by_role("tab", name="Results").click()
    page.locator("#results-campaign input").click()  # the invite link opened a fresh page: choose it again
    page.get_by_role("option").first.click()
    page.locator("#results-refresh").click()
    page.locator("#results-summary").get_by_text("1 votes").wait_for(timeout=30000)
    page.locator("#results-board").get_by_text("95% interval", exact=True).wait_for(timeout=30000)
    shot(page, "results")
    board_after = page.locator("#results-board").inner_text()
    assert board_after != board_before, board_after
    assert "prompt" in board_after and "rag" in board_after, board_after
    assert eval_id.startswith("eval-"), eval_id


def train_values(**overrides) -> list:
    """The Train tab's option fields, in form order, as the API takes them (defaults + overrides)."""
    from ui.train_form import TRAIN_FORM_SKIP
    from sft_core.config import TrainConfig, fields_for_form
    out = []
    for f in fields_for_form(TrainConfig):
        if f["name"] in TRAIN_FORM_SKIP:
            continue
        v = overrides.pop(f["name"], f["default"])
        out.append(",".join(map(str, v or [])) if f["type"] == "list" and not isinstance(v, str) else
                   ("" if v is None else v))
    assert not overrides, f"unknown train fields {overrides}"
    return out


def poll(fn, ok, timeout: float, every: float = 1.0):
    end = time.time() + timeout
    while True:
        out = fn()
        if ok(out):
            return out
        if time.time() > end:
            raise AssertionError(f"gave up waiting; last result: {str(out)[:2000]}")
        time.sleep(every)


def message_text(msg: dict) -> str:
    c = msg.get("content")
    if isinstance(c, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in c)
    return str(c or "")


@pytest.fixture
def clients():
    """gradio_client.Client factory; closes each client (its heartbeat stream would hold up the app's shutdown)."""
    from gradio_client import Client
    made = []

    def make(url: str) -> Client:
        made.append(Client(url + "/", verbose=False))
        return made[-1]
    yield make
    for c in made:
        c.close()


def test_gradio_client_drives_the_same_functions(app, clients, tmp_path):
    from gradio_client import handle_file
    url, home = app
    client = clients(url)
    p = tmp_path / "api.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n" for i in range(8)))
    report, errors = client.predict(handle_file(str(p)), "auto", "", api_name="/data_check")
    assert "api.jsonl — ✅ valid" in report and "prompt_completion" in report
    hits = client.predict("pydocs", "json.dumps serialize", 3, "hybrid", api_name="/kb_search")
    assert "json.dumps" in hits

    # train: no admin password, so an anonymous client queues a job; then cancel and delete it
    msg, _ = client.predict("pydocs", "", *train_values(run_name="api-run", max_steps=3, max_length=64),
                            api_name="/train_start")
    assert "Queued run **api-run**" in msg
    jobs = client.predict("api-run", api_name="/train_poll")[2]  # progress, loss, jobs, runs, lr, tokens/s
    assert any("api-run" in row for row in jobs["data"]), jobs
    client.predict("api-run", api_name="/train_cancel")
    poll(lambda: client.predict("api-run", api_name="/train_poll")[3]["data"],
         lambda runs: ["api-run", "cancelled"] in [[r[0], r[3]] for r in runs], 120)
    assert "Deleted run" in client.predict("api-run", api_name="/run_delete")[0]
    assert not (home / "runs" / "api-run").exists()

    # chat: a reply comes back from both systems, the RAG one with its passages
    out = client.predict("What does json.dumps do?", "prompt", "rag", None, None, "pydocs", 0.0, 24, [], [], [], [],
                         api_name="/chat_send")
    for hist in out[:2]:
        assert hist[-1]["role"] == "assistant", hist
        reply = message_text(hist[-1])
        assert reply.strip() and "⚠️" not in reply, hist
    assert "json.dumps" in out[5]

    # rate: an eval of one row, a campaign over it, next task and a vote, all through the API
    msg, _ = client.predict("pydocs", "test", ["prompt", "rag"], "pydocs", 1, ["token_f1"], False,
                            api_name="/eval_start")
    eval_id = msg.split("**")[1]
    poll(lambda: client.predict(eval_id, api_name="/eval_poll")[0], lambda s: "succeeded" in s or "failed" in s, 300)
    assert "succeeded" in client.predict(eval_id, api_name="/eval_poll")[0]
    # picking the eval offers its systems (the checkbox group only takes offered choices)
    systems = client.predict(eval_id, api_name="/eval_systems")["value"]
    assert sorted(systems) == ["prompt", "rag"], systems
    msg, _, _ = client.predict(eval_id, systems, False, "", False, api_name="/create_campaign")
    campaign = msg.split("**")[1]
    # raters come in through an invite link (no admin password here, so anyone may make one)
    invite = client.predict(campaign, "api-rater", api_name="/campaign_invite").split("?invite=")[1].split("`")[0]
    prompt, left, right, progress, key = client.predict(campaign, invite, "", None, api_name="/rate_next")
    assert "Prompt" in prompt and left.strip() and right.strip() and "api-rater" in progress
    prompt, left, right, progress, key, comment, saved = client.predict(campaign, invite, "", None, "",
                                                                        api_name="/vote_left")
    assert "Saved: **A is better**" in saved and "Nothing left" in prompt  # the campaign's one task is done
    summary, board, _ = client.predict(campaign, api_name="/results_show")
    assert "1 votes" in summary and board["data"], (summary, board)


def call_raw(url: str, api: str, data: list) -> str:
    """Call an endpoint over plain HTTP (no client-side upload), return the event stream's text."""
    req = urllib.request.Request(f"{url}/gradio_api/call/{api}", json.dumps({"data": data}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        event_id = json.loads(r.read())["event_id"]
    with urllib.request.urlopen(f"{url}/gradio_api/call/{api}/{event_id}", timeout=120) as r:
        return r.read().decode()


def outside_tmp_and_cwd() -> Path:
    """A scratch folder outside the temp dir and the CWD, like the Docker image's /data."""
    forbidden = [Path(tempfile.gettempdir()).resolve(), REPO.resolve()]
    for base in (Path("/var/tmp"), REPO.parent, Path.home()):
        try:
            d = Path(tempfile.mkdtemp(prefix="sft-studio-test-", dir=base)).resolve()
        except OSError:
            continue
        if not any(d == f or f in d.parents for f in forbidden):
            return d
        shutil.rmtree(d, ignore_errors=True)
    pytest.skip("no writable folder outside the temp dir and the CWD")


def seed_locked_home(home: Path) -> dict:
    """Datasets, finished runs, a finished eval (with outputs naming their systems) and a campaign."""
    from evals import rating
    from sft_core import data
    from sft_core.db import evals as eval_rows, jobs as job_rows, runs as run_rows
    from sft_core.store import Store
    from sft_core.workspace import Workspace
    ws = Workspace.at(home)
    st = Store(ws.db_url)
    try:
        src = home.parent / "d.jsonl"
        src.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(10)))
        for name in ("api-ds", "ui-ds"):
            data.import_dataset(src, name, ws=ws, store=st)
        now = time.time()
        for run_id in ("api-old-run", "ui-old-run"):
            (ws.runs_dir(run_id, "adapter")).mkdir(parents=True)
            (ws.runs_dir(run_id, "adapter") / "adapter_config.json").write_text("{}")
            run_rows.insert_run(st, run_id, "api-ds", "v0", "m", str(ws.runs_dir(run_id)), {}, status="cancelled",
                                created_at=now)
            job_rows.insert_job(st, "train", run_id, {}, status="cancelled")
        eval_id, path = "eval-locked", ws.evals_dir("eval-locked")
        path.mkdir(parents=True)
        outputs = [{"set": "domain", "row_id": r, "system": s, "instruction": f"question {r}", "reference": "ref",
                    "output": f"ANSWER-{s}-{r}"} for r in ("r1", "r2") for s in ("prompt", "rag")]
        (path / "outputs.jsonl").write_text("".join(json.dumps(o) + "\n" for o in outputs))
        (path / "report.html").write_text("<html><body>REPORT eval-locked: prompt vs rag</body></html>")
        eval_rows.insert_eval(st, eval_id, "api-ds", "v0", "test", ["prompt", "rag"], str(path), {}, status="succeeded")
        campaign = rating.create_campaign(eval_id, ws=ws, store=st, seed=0)
    finally:
        st.close()
    return {"eval": eval_id, "campaign": campaign}


def test_admin_password_gates_writes_deletes_and_eval_outputs(tiny_model_dir, browser):
    from gradio_client import Client, handle_file
    made = []
    scratch = outside_tmp_and_cwd()
    home = scratch / "home"
    seeded = seed_locked_home(home)
    proc, url = start_app(home, tiny_model_dir, SFT_STUDIO_ADMIN_PASSWORD="s3cret", SFT_STUDIO_DEMO="1",
                          SFT_STUDIO_SKIP_EXAMPLE="1")
    try:
        anon = Client(url + "/", verbose=False)
        made.append(anon)
        p = scratch / "d.jsonl"
        with pytest.raises(Exception, match="admin login"):
            anon.predict(handle_file(str(p)), "auto", "", "locked", api_name="/data_import")
        assert not (home / "datasets" / "locked").exists()
        # blind rating: an anonymous client sees aggregate scores, never answers labelled with their system
        summary, table, examples, report, _ = anon.predict(seeded["eval"], api_name="/eval_poll")
        assert report is None and not examples["data"] and "admin login" in summary
        assert "ANSWER-" not in json.dumps([summary, table, examples])
        for api, args in [("/results_export", (seeded["campaign"], "csv")), ("/dataset_delete", ("api-ds",)),
                          ("/campaign_invite", (seeded["campaign"], "anon")), ("/campaign_publish", (seeded["campaign"],)),
                          ("/campaign_close", (seeded["campaign"],)),
                          ("/dataset_delete_ask", ("api-ds",)), ("/run_delete", ("api-old-run",))]:
            with pytest.raises(Exception, match="admin login"):
                anon.predict(*args, api_name=api)
        assert (home / "datasets" / "api-ds").exists() and (home / "runs" / "api-old-run").exists()
        assert not (home / "exports").exists()
        # an API call cannot pass a server path off as an upload (Gradio's rule, on for the mounted app)
        answer = call_raw(url, "data_check", [{"path": str(p), "meta": {"_type": "gradio.FileData"}}, "auto", ""])
        assert "event: error" in answer and "not uploaded" in answer and "valid" not in answer, answer
        # the workspace itself is not served: only the copies handed out to a caller are
        for f in (home / "studio.db", home / "evals" / "eval-locked" / "report.html"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"{url}/gradio_api/file={f}", timeout=10)
            assert e.value.code == 403

        # the admin (logged in on the same session) sees everything and downloads files from a workspace
        # outside /tmp and the CWD (Gradio refuses those unless they are under allowed_paths)
        admin = Client(url + "/", verbose=False)
        made.append(admin)
        msg, password_box = admin.predict("s3cret", api_name="/login")
        assert "Logged in" in msg and password_box == ""  # the password does not stay in the page's state
        summary, table, examples, report, _ = admin.predict(seeded["eval"], api_name="/eval_poll")
        assert "ANSWER-prompt-r1" in json.dumps(examples["data"])
        assert "REPORT eval-locked" in Path(report).read_text()
        # the report opens as a page in its own tab: served by its staged copy's unguessable key only, sandboxed
        key = re.search(r'href="report/([0-9a-f]{32})" target="_blank"', summary).group(1)
        with urllib.request.urlopen(f"{url}/report/{key}", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/html") and "REPORT eval-locked" in r.read().decode()
            assert "sandbox" in r.headers["Content-Security-Policy"] and "default-src 'none'" in r.headers[
                "Content-Security-Policy"]
        for bad in ("0" * 32, key[:-1], "..%2F..%2Fstudio.db"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"{url}/report/{bad}", timeout=10)
            assert e.value.code == 404
        export = admin.predict(seeded["campaign"], "csv", api_name="/results_export")
        assert Path(export).read_text().startswith("task_id,row_id,rater,choice")
        assert "Deleted dataset **api-ds**" in admin.predict("api-ds", api_name="/dataset_delete")[0]
        assert "Deleted run **api-old-run**" in admin.predict("api-old-run", api_name="/run_delete")[0]
        assert not (home / "datasets" / "api-ds").exists() and not (home / "runs" / "api-old-run").exists()

        # chat stays public in demo mode: the gate does not fire (an engine answer or engine error, not a login error)
        out = anon.predict("hello", "prompt", None, None, None, None, 0.0, 16, [], [], [], [], api_name="/chat_send")
        assert "admin login" not in json.dumps(out)
        # rating needs no admin login but an invite: a clear campaign or invite error, not a login error
        with pytest.raises(Exception, match="unknown campaign"):
            anon.predict("nope", "", "anon", None, api_name="/rate_next")
        with pytest.raises(Exception, match="by invitation only"):
            anon.predict(seeded["campaign"], "", "anon", None, api_name="/rate_next")

        # an anonymous browser can neither train nor delete; after logging in, deleting asks first, then works
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        open_tab(page, url, "Train")
        expect_error(page, lambda: page.locator("#train-start").click(), "admin login")
        pick(page, "train-run", "ui-old-run")
        expect_error(page, lambda: page.locator("#train-delete").click(), "admin login")
        assert not page.locator("#train-delete-yes").is_visible()
        page.get_by_role("tab", name="Data").click()
        pick(page, "data-delete-pick", "ui-ds")
        expect_error(page, lambda: page.locator("#data-delete").click(), "admin login")
        assert not page.locator("#data-delete-yes").is_visible()
        assert (home / "runs" / "ui-old-run").exists() and (home / "datasets" / "ui-ds").exists()

        page.get_by_text("Admin", exact=True).first.click()
        fill(page, "admin-password", "s3cret")
        page.locator("#admin-login").click()
        page.get_by_text("Logged in as admin.").wait_for(timeout=30000)
        page.locator("#data-delete").click()
        page.locator("#data-delete-question").get_by_text("ui-ds").wait_for(timeout=30000)
        assert (home / "datasets" / "ui-ds").exists()  # nothing goes before the confirmation
        close_toasts(page)
        shot(page, "data-delete-confirm")
        page.locator("#data-delete-yes").click()
        page.locator("#data-msg").get_by_text("Deleted dataset").wait_for(timeout=30000)
        assert not (home / "datasets" / "ui-ds").exists()
        page.get_by_role("tab", name="Train").click()
        pick(page, "train-run", "ui-old-run")
        page.locator("#train-delete").click()
        page.locator("#train-delete-question").get_by_text("ui-old-run").wait_for(timeout=30000)
        page.locator("#train-delete-yes").click()
        page.locator("#train-msg").get_by_text("Deleted run").wait_for(timeout=30000)
        assert not (home / "runs" / "ui-old-run").exists()
        # the logged-in admin's Evaluate tab links the report; clicking it opens the report in a new tab
        page.get_by_role("tab", name="Evaluate").click()
        pick(page, "eval-pick", seeded["eval"])
        link = page.locator("#eval-open-report")
        link.wait_for(timeout=30000)
        with page.context.expect_page(timeout=30000) as opened:
            link.click()
        tab = opened.value
        tab.wait_for_load_state()
        assert "/report/" in tab.url and "REPORT eval-locked" in tab.content()
        tab.close()
    finally:
        for c in made:
            c.close()
        stop_app(proc)
        shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# The delete operations behind the Data and Train tabs (library level, no app)
# ------------------------------------------------------------------------------------------------
def _dataset(ws, store, name: str, tmp: Path):
    from sft_core import data
    src = tmp / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(10)))
    return data.import_dataset(src, name, ws=ws, store=store)


def test_delete_dataset_refuses_while_a_job_uses_it(ws, store, tmp_path):
    from sft_core import StudioError, data
    from sft_core.db import datasets as dataset_rows, evals as eval_rows, jobs as job_rows, runs as run_rows
    from sft_core.studio import delete_dataset
    _dataset(ws, store, "ds", tmp_path)
    src2 = tmp_path / "ds2.jsonl"
    src2.write_text("".join(json.dumps({"instruction": f"other {i}", "output": f"b{i}"}) + "\n" for i in range(10)))
    data.import_dataset(src2, "ds", ws=ws, store=store)  # a second version of the same name
    _dataset(ws, store, "other", tmp_path)
    run_rows.insert_run(store, "r1", "ds", "v", "m", "x", {}, status="queued")
    j1 = job_rows.insert_job(store, "train", "r1", {})
    eval_rows.insert_eval(store, "e1", "other", "v", "test", [], "x", {}, status="running")
    for name, user in (("ds", "r1"), ("other", "e1")):
        with pytest.raises(StudioError, match=f"in use by {user}"):
            delete_dataset(name, ws, store)
    assert (ws.datasets_dir("ds")).exists() and len(dataset_rows.list_versions(store)) == 3
    job_rows.mark_running(store, j1, time.time())
    with pytest.raises(StudioError, match="in use"):
        delete_dataset("ds", ws, store)
    assert job_rows.finish(store, j1, "cancelled")
    assert delete_dataset("ds", ws, store) == 2
    assert not ws.datasets_dir("ds").exists()
    assert [d["name"] for d in data.list_datasets(ws, store)] == ["other"]
    assert run_rows.exists(store, "r1")  # runs made from it stay
    with pytest.raises(StudioError, match="unknown dataset"):
        delete_dataset("ds", ws, store)
    with pytest.raises(StudioError):
        delete_dataset("../other", ws, store)


def test_delete_run_only_when_finished(ws, store):
    from sft_core import StudioError
    from sft_core.db import evals as eval_rows, jobs as job_rows, runs as run_rows
    from sft_core.studio import delete_run
    now = time.time()
    for run_id, status in (("r-run", "running"), ("r-done", "succeeded"), ("r-queued", "queued")):
        ws.runs_dir(run_id, "adapter").mkdir(parents=True)
        run_rows.insert_run(store, run_id, "d", "v", "m", str(ws.runs_dir(run_id)), {}, status=status, created_at=now)
        job_rows.insert_job(store, "train", run_id, {}, status=status)
    for run_id in ("r-run", "r-queued"):
        with pytest.raises(StudioError, match="cancel it first"):
            delete_run(run_id, ws, store)
        assert ws.runs_dir(run_id).exists()
    # a resume queued for a failed run counts as active too
    run_rows.set_status(store, "r-queued", "failed")
    with pytest.raises(StudioError, match="queued"):
        delete_run("r-queued", ws, store)
    eval_rows.insert_eval(store, "e1", "d", "v", "test", ["prompt", "sft:r-done"], "x", {}, status="running")
    with pytest.raises(StudioError, match="in use by e1"):
        delete_run("r-done", ws, store)
    eval_rows.set_status(store, "e1", "succeeded")
    delete_run("r-done", ws, store)
    assert not ws.runs_dir("r-done").exists()
    assert not run_rows.exists(store, "r-done")
    assert job_rows.latest(store, "r-done") is None
    with pytest.raises(StudioError, match="unknown run"):
        delete_run("r-done", ws, store)
    with pytest.raises(StudioError):
        delete_run("../r-run", ws, store)
