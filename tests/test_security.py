"""Hardening for a public Space: login, CSV export, Markdown without remote resources, concurrent visitors.

The app-level tests start the real app (transformers engine on the tiny model, admin password set, demo
mode on) and talk to it over Gradio's HTTP API, as an anonymous visitor of a hosted demo would.
"""
from __future__ import annotations

import csv
import io
import json
import threading
import time

import pytest

from sft_core.db import evals as evals_db
from sft_core.safety import AdminSessions, csv_cell, safe_markdown
from tests.test_app import start_app, stop_app


# ------------------------------------------------------------------------------------------------
# CSV formula injection (OWASP)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,expected", [
    ("=HYPERLINK(\"http://x\",\"y\")", "'=HYPERLINK(\"http://x\",\"y\")"),
    ("+1+cmd|' /C calc'!A0", "'+1+cmd|' /C calc'!A0"),
    ("-2+3", "'-2+3"), ("@SUM(A1)", "'@SUM(A1)"), ("\tx", "'\tx"), ("\rx", "'\rx"),
    ("plain answer", "plain answer"), ("a=b", "a=b"), ("", ""), (None, None), (-3, -3), (2.5, 2.5),
])
def test_csv_cell_neutralises_formulas(value, expected):
    assert csv_cell(value) == expected


# ------------------------------------------------------------------------------------------------
# Markdown without remote resources
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,gone", [
    ("look ![cat](http://evil.example/p.png) here", "![cat]("),
    ('![x](<http://evil.example/a b.png> "t")', "!["),
    ("![](http://evil.example/p.png)", "!["),
    ("![a](http://evil.example/a_(b).png)", "!["),
    ('<div style="background:url(http://evil.example/p.png)">x</div>', "<div"),
    ("![ref][1]\n\n[1]: http://evil.example/p.png", "![ref]"),
    ('<img src="http://evil.example/p.png">', "<img"),
    ('<IFRAME src="http://evil.example/">', "<IFRAME"),
    ("<video><source src=http://evil.example/v.mp4></video>", "<video"),
    ("< script>alert(1)</script>", "< script"),
])
def test_safe_markdown_drops_remote_resources(text, gone):
    out = safe_markdown(text)
    assert gone not in out, out
    if "evil.example/p.png" in text and "<" not in text:
        assert "evil.example/p.png" in out  # still there as a link the reader may follow


def test_safe_markdown_keeps_ordinary_text_and_is_linear():
    text = "**bold** [a link](http://x.example) `code` a < b and c > d\n\n> quote"
    assert safe_markdown(text) == text
    # adversarial shapes cost linear time. Relative bound, measured in this run: 10x the input must
    # cost < 40x the time (linear: ~10x; quadratic: ~100x; the 4x slack absorbs noise on a busy machine,
    # the 50 ms floor timer resolution on a fast one).
    for unit in ("![", "![a](", "<img ", "!" * 7, "[" * 3, "![" + "a" * 999):
        small, big = unit * (100_000 // len(unit)), unit * (1_000_000 // len(unit))
        t0 = time.perf_counter()
        safe_markdown(small)
        t_small = time.perf_counter() - t0
        t0 = time.perf_counter()
        safe_markdown(big)
        t_big = time.perf_counter() - t0
        assert t_big < 40 * t_small + 0.05, (unit, t_small, t_big)


# ------------------------------------------------------------------------------------------------
# Admin login: constant-time compare, signed token, backoff
# ------------------------------------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_admin_sessions_backoff_and_tokens():
    clock, wall = FakeClock(), FakeClock()
    a = AdminSessions("s3cret", ttl_s=60, free_attempts=3, base_delay_s=2.0, max_delay_s=10.0, clock=clock, wall=wall)
    for _ in range(3):
        assert a.login("nope", "c1") == (None, "Wrong password.")
    token, msg = a.login("s3cret", "c1")  # 3 failures, the 4th attempt at once: refused unchecked
    assert token is None and "try again in 2 s" in msg
    assert a.login("s3cret", "c2")[0]  # another client is not affected
    clock.t += 2.0
    assert a.login("nope", "c1")[0] is None  # allowed again, wrong: the next wait doubles
    clock.t += 3.9
    assert "try again" in a.login("s3cret", "c1")[1]
    clock.t += 0.1
    token, msg = a.login("s3cret", "c1")
    assert msg == "Logged in as admin." and a.valid(token) and "s3cret" not in token
    assert a.wait_s("c1") == 0  # a success clears the count
    # tokens: forged, edited, bool or expired tokens are refused
    body, mac = token.rsplit(".", 1)
    _, exp, nonce = body.split(".")
    for bad in (True, "admin", "", None, f"admin.{int(exp) + 999}.{nonce}.{mac}", body + "." + "0" * 64,
                AdminSessions("s3cret").issue()):
        assert not a.valid(bad), bad
    wall.t += 61
    assert not a.valid(token)
    # the backoff is capped
    for _ in range(20):
        clock.t += 1000
        a.login("nope", "c3")
    assert a.wait_s("c3") == pytest.approx(10.0)


def test_admin_password_compared_in_constant_time():
    """The comparison goes through hmac.compare_digest on fixed-length digests (a plain == returns at the
    first differing character; timing it over the network is the attack)."""
    import hmac
    seen = []
    real = hmac.compare_digest

    def spy(x, y):
        seen.append((len(x), len(y)))
        return real(x, y)

    a = AdminSessions("a-longer-secret")
    hmac.compare_digest, saved = spy, hmac.compare_digest
    try:
        a.login("x", "c")
        a.login("a-longer-secret-but-longer", "c")
    finally:
        hmac.compare_digest = saved
    assert seen == [(32, 32), (32, 32)]


# ------------------------------------------------------------------------------------------------
# The app, as an anonymous visitor of a hosted demo
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def locked_app(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("secure") / "home"
    # a long backoff base, so the lockout below cannot expire between two API calls on a slow machine
    proc, url = start_app(home, tiny_model_dir, SFT_STUDIO_ADMIN_PASSWORD="s3cret", SFT_STUDIO_DEMO="1",
                          SFT_STUDIO_SKIP_EXAMPLE="1", SFT_STUDIO_LOGIN_BACKOFF_S="120")
    yield url, home
    stop_app(proc)


def test_login_clears_password_and_backs_off(locked_app):
    from gradio_client import Client
    url, home = locked_app
    admin = Client(url + "/", verbose=False)
    attacker = Client(url + "/", verbose=False)
    try:
        msg, box = admin.predict("s3cret", api_name="/login")
        assert msg == "Logged in as admin." and box == ""
        # the admin session works; its state is a signed token, not a flag an API caller could set
        with pytest.raises(Exception, match="admin login"):
            attacker.predict("x", api_name="/dataset_delete_ask")
        with pytest.raises(Exception, match="unknown dataset 'x'"):  # past the gate: the dataset is checked
            admin.predict("x", api_name="/dataset_delete_ask")
        for _ in range(5):
            assert attacker.predict("guess", api_name="/login")[0] == "Wrong password."
        msg, _ = attacker.predict("guess", api_name="/login")
        assert msg.startswith("Too many wrong passwords")
        msg, _ = attacker.predict("s3cret", api_name="/login")  # the right one is not even checked now
        assert msg.startswith("Too many wrong passwords")
        with pytest.raises(Exception, match="admin login"):
            attacker.predict("x", api_name="/dataset_delete_ask")
    finally:
        admin.close()
        attacker.close()


def test_chat_visitors_are_served_at_once(locked_app):
    """Two visitors chat: the second one's first update arrives while the first one is still generating.

    Under Gradio's default (one event at a time) the second event cannot start before the first ends,
    so this is an ordering check, not a timing bound: the tiny model cannot emit its end-of-turn token
    (tests/memorise.py), so the first chat runs to its 1024 tokens."""
    from gradio_client import Client
    url, _ = locked_app
    a, b = Client(url + "/", verbose=False), Client(url + "/", verbose=False)
    args = ("prompt", None, None, None, None, 0.0, 1024, [], [], [], [])
    try:
        job_a = a.submit("tell me a long story", *args, api_name="/chat_send")
        end = time.time() + 120
        while not job_a.outputs() and time.time() < end:
            time.sleep(0.05)
        assert job_a.outputs(), "the first chat produced nothing"
        assert not job_a.done()
        job_b = b.submit("hello", *args[:6], 16, *args[7:], api_name="/chat_send")
        first_b = None
        while first_b is None and time.time() < end:
            if job_b.outputs():
                first_b = job_a.done()
            time.sleep(0.02)
        assert first_b is False, "the second visitor waited for the first one's whole answer"
        job_b.result(timeout=120)
        job_a.result(timeout=300)
    finally:
        a.close()
        b.close()


def test_export_csv_neutralises_formulas(ws, store):
    """Through the real export: a model output, a comment and a rater name that start with formula
    characters come out quoted in CSV; JSONL and DPO keep the text exactly."""
    from evals import rating
    path = ws.evals_dir("eval-csv")
    path.mkdir(parents=True)
    outs = [{"set": "domain", "row_id": "r1", "system": s, "instruction": "=cmd|' /C calc'!A0",
             "reference": "ref", "output": out} for s, out in (("prompt", "=HYPERLINK(\"http://x\")"), ("rag", "@SUM(1)"))]
    (path / "outputs.jsonl").write_text("".join(json.dumps(o) + "\n" for o in outs))
    evals_db.insert_eval(store, "eval-csv", "d", "v", "test", ["prompt", "rag"], str(path), {}, status="succeeded")
    campaign = rating.create_campaign("eval-csv", ws=ws, store=store, seed=0)
    inv = rating.create_invites(campaign, ["+rater"], ws=ws, store=store)[0]
    task = rating.next_task(campaign, inv["rater"], ws=ws, store=store)
    rating.vote(campaign, task["task_id"], inv["rater"], "left", "-1 bad", ws=ws, store=store)
    rows = list(csv.DictReader(io.StringIO(rating.export_votes(campaign, "csv", ws.root / "v.csv", ws=ws,
                                                               store=store).read_text())))
    assert len(rows) == 1
    for value in rows[0].values():
        assert not value.startswith(("=", "+", "-", "@")), rows[0]
    assert {rows[0]["output_left"], rows[0]["output_right"]} == {"'=HYPERLINK(\"http://x\")", "'@SUM(1)"}
    assert rows[0]["comment"] == "'-1 bad" and rows[0]["rater_name"] == "'+rater"
    jl = json.loads(rating.export_votes(campaign, "jsonl", ws.root / "v.jsonl", ws=ws, store=store).read_text())
    assert jl["comment"] == "-1 bad" and jl["prompt"] == "=cmd|' /C calc'!A0"
    dpo = json.loads(rating.export_votes(campaign, "dpo", ws.root / "v.dpo.jsonl", ws=ws, store=store).read_text())
    assert dpo["chosen"] in ("=HYPERLINK(\"http://x\")", "@SUM(1)")
