"""The web app in a real browser (Debian's Chromium via Playwright) and through gradio_client.

The app runs as its own process on the tiny random Llama with the transformers engine, exactly as
`python app.py` starts it. Screenshots of each tab go to test-artifacts/ (not committed).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
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
    page.locator("#data-name input, #data-name textarea").first.fill("broken")
    page.locator("#data-save").click()
    page.get_by_text("invalid data, nothing stored").first.wait_for(timeout=60000)
    shot(page, "data-errors")
    assert sorted(p.name for p in (home / "datasets").iterdir()) == before


def test_train_loss_chart_survives_reload(app, browser):
    url, home = app
    page = browser.new_page(viewport={"width": 1300, "height": 1100})
    open_tab(page, url, "Train")
    pick(page, "train-dataset", "pydocs")
    page.get_by_text("LoRA and training options").click()
    page.get_by_label("max steps").fill("400")
    page.get_by_label("max length").fill("96")
    page.get_by_label("batch size").fill("2")
    page.get_by_label("save steps").fill("20")
    page.get_by_label("run name").fill("ui-run")
    page.locator("#train-start").click()
    page.get_by_text("Queued run").wait_for(timeout=60000)
    progress = page.locator("#train-progress")
    progress.get_by_text("step").wait_for(timeout=120000)
    page.wait_for_function("() => document.querySelector('#train-loss') && "
                           "document.querySelector('#train-loss').querySelectorAll('path, line, circle').length > 0",
                           timeout=120000)
    shot(page, "train")
    # reload mid-training: progress is read from the store and events.jsonl, not from the page
    page.reload()
    page.get_by_role("tab", name="Train").click()
    pick(page, "train-run", "ui-run")
    page.locator("#train-progress").get_by_text("running").wait_for(timeout=60000)
    page.locator("#train-progress").get_by_text("step").wait_for(timeout=60000)
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
        page.locator(f"#chat-bot-{i} .message.bot, #chat-bot-{i} [data-testid='bot']").first.wait_for(timeout=120000)
    page.get_by_text("json.dumps").first.wait_for(timeout=60000)  # a retrieved passage under the RAG answer
    page.wait_for_timeout(3000)
    shot(page, "chat")
    texts = [page.locator(f"#chat-bot-{i}").inner_text() for i in (0, 1)]
    assert all(len(t.strip()) > len("What does json.dumps do?") for t in texts), texts


def test_eval_then_blind_vote_moves_leaderboard(app, browser):
    url, home = app
    page = browser.new_page(viewport={"width": 1300, "height": 1100})
    open_tab(page, url, "Evaluate")
    pick(page, "eval-dataset", "pydocs")
    pick(page, "eval-kb", "pydocs")
    page.get_by_label("Rows (limit)").fill("2")
    page.locator("#eval-start").click()
    page.get_by_text("Queued eval").wait_for(timeout=60000)
    page.locator("#eval-summary").get_by_text("succeeded").wait_for(timeout=300000)
    page.locator("#eval-table").get_by_text("token_f1").first.wait_for(timeout=30000)
    shot(page, "evaluate")
    eval_id = page.locator("#eval-msg").inner_text().split("**")[-1].strip().split()[-1].strip(".*")

    page.get_by_role("tab", name="Rate").click()
    page.get_by_text("New campaign (admin)").click()
    page.locator("#rate-new-eval input").click()
    page.get_by_role("option").first.click()
    page.locator("#rate-create").click()
    page.get_by_text("Campaign").get_by_text("created").first.wait_for(timeout=30000)
    page.locator("#rate-rater input, #rate-rater textarea").first.fill("tester")
    page.locator("#rate-next").click()
    page.locator("#rate-prompt").get_by_text("Prompt").wait_for(timeout=30000)
    body = page.locator("#rate-left").inner_text() + page.locator("#rate-right").inner_text()
    assert "prompt" not in body.lower().split() and "rag" not in body.lower().split()
    shot(page, "rate")
    page.keyboard.press("1")  # keyboard shortcut: left is better
    page.locator("#rate-progress").get_by_text("1 rated").wait_for(timeout=30000)

    page.get_by_role("tab", name="Results").click()
    page.locator("#results-refresh").click()
    page.locator("#results-summary").get_by_text("1 votes").wait_for(timeout=30000)
    page.locator("#results-board").get_by_text("bt_score").wait_for(timeout=30000)
    shot(page, "results")
    assert eval_id


def test_gradio_client_drives_the_same_functions(app, tmp_path):
    from gradio_client import Client, handle_file
    url, home = app
    client = Client(url + "/", verbose=False)
    p = tmp_path / "api.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"c{i}"}) + "\n" for i in range(8)))
    report, errors = client.predict(handle_file(str(p)), "auto", "", api_name="/data_check")
    assert "api.jsonl — ✅ valid" in report and "prompt_completion" in report
    hits = client.predict("pydocs", "json.dumps serialize", 3, "hybrid", api_name="/kb_search")
    assert "json.dumps" in hits


def test_admin_password_gates_writes_not_chat_or_rating(tmp_path_factory, tiny_model_dir, browser):
    from gradio_client import Client, handle_file
    home = tmp_path_factory.mktemp("locked") / "home"
    proc, url = start_app(home, tiny_model_dir, SFT_STUDIO_ADMIN_PASSWORD="s3cret", SFT_STUDIO_DEMO="1",
                          SFT_STUDIO_SKIP_EXAMPLE="1")
    try:
        client = Client(url + "/", verbose=False)
        p = tmp_path_factory.mktemp("f") / "d.jsonl"
        p.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(8)))
        with pytest.raises(Exception, match="admin login"):
            client.predict(handle_file(str(p)), "auto", "", "locked", api_name="/data_import")
        assert not (home / "datasets").exists()
        page = browser.new_page()
        open_tab(page, url, "Train")
        page.locator("#train-start").click()
        page.get_by_text("admin login").first.wait_for(timeout=30000)
        assert (home / "runs").exists() is False
        # chat stays public in demo mode: the gate does not fire (an engine answer or engine error, not a login error)
        out = client.predict("hello", "prompt", None, None, None, None, 0.0, 16, [], [], [], [],
                             api_name="/chat_send")
        assert "admin login" not in json.dumps(out)
        # rating stays public: an anonymous rater gets a clear campaign error, not a login error
        with pytest.raises(Exception, match="unknown campaign"):
            client.predict("nope", "anon", api_name="/rate_next")
    finally:
        stop_app(proc)
