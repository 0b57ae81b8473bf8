"""Blind rating through the HTTP API of a running app (admin password set, demo mode on, as the
public demo runs): raters get their identity from the server, results stay hidden until published.

Issue 15 item 1: an anonymous client could ask for a task, vote, then read the public results (the
one changed count named the system behind each side), and one machine voted as 10 made-up raters.
These drive the app through gradio_client exactly as such a client would.
"""
from __future__ import annotations

import contextlib
import json
import re

import pytest
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError

from sft_core.db import evals as eval_rows, ratings as rating_rows, write
from sft_core.db.schema import votes as votes_table
from tests.test_app import start_app, stop_app

PW = "s3cret"


def seed(home) -> dict:
    """An eval of 3 rows x 2 systems (answers that name their system) and campaigns over it."""
    from evals import rating
    from sft_core.store import Store
    from sft_core.workspace import Workspace
    ws = Workspace.at(home)
    st = Store(ws.db_url)
    try:
        path = ws.evals_dir("eval-r")
        path.mkdir(parents=True)
        outputs = [{"set": "domain", "row_id": r, "system": s, "instruction": f"question {r}", "reference": "ref",
                    "output": f"answer {r} #{k}"} for r in ("r1", "r2", "r3") for k, s in enumerate(("prompt", "rag"))]
        (path / "outputs.jsonl").write_text("".join(json.dumps(o) + "\n" for o in outputs))
        eval_rows.insert_eval(st, "eval-r", "d", "v0", "test", ["prompt", "rag"], str(path), {}, status="succeeded")
        out = {k: rating.create_campaign("eval-r", ws=ws, store=st, name=k, seed=i)
               for i, k in enumerate(("votes", "blind", "fakes"))}
        out["open"] = rating.create_campaign("eval-r", ws=ws, store=st, name="open", open_rating=True)
        out["reveal"] = rating.create_campaign("eval-r", ws=ws, store=st, name="reveal", seed=7, reveal_after_vote=True)
        # model outputs and a dataset question that would load remote resources in the rater's browser
        path = ws.evals_dir("eval-img")
        path.mkdir(parents=True)
        evil = [{"set": "domain", "row_id": "r1", "system": s, "instruction": "see ![q](http://evil.example/q.png)",
                 "reference": '<img src="http://evil.example/r.png">', "output": out}
                for s, out in (("prompt", "look ![cat](http://evil.example/cat.png) here"),
                               ("rag", '<iframe src="http://evil.example/"></iframe> and ![x][1]\n\n[1]: http://evil.example/x.png'))]
        (path / "outputs.jsonl").write_text("".join(json.dumps(o) + "\n" for o in evil))
        eval_rows.insert_eval(st, "eval-img", "d", "v0", "test", ["prompt", "rag"], str(path), {},
                              status="succeeded")
        out["images"] = rating.create_campaign("eval-img", ws=ws, store=st, name="images", seed=0)
    finally:
        st.close()
    return out


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    home = tmp_path_factory.mktemp("rating-app") / "home"
    camps = seed(home)
    proc, url = start_app(home, home / "no-model-needed", SFT_STUDIO_ADMIN_PASSWORD=PW, SFT_STUDIO_DEMO="1",
                          SFT_STUDIO_SKIP_EXAMPLE="1")
    yield url, home, camps
    stop_app(proc)


@pytest.fixture
def client(locked):
    """A factory of gradio_client sessions (each its own browser tab, as far as the app can tell)."""
    from gradio_client import Client
    made = []

    def make(admin: bool = False) -> Client:
        made.append(Client(locked[0] + "/", verbose=False))
        if admin:
            assert "Logged in" in str(made[-1].predict(PW, api_name="/login"))
        return made[-1]
    yield make
    for c in made:
        c.close()


@contextlib.contextmanager
def db(home):
    """The app's store, opened beside the running app (as another process would)."""
    from sft_core.store import Store
    from sft_core.workspace import Workspace
    st = Store(Workspace.at(home).db_url)
    try:
        yield st
    finally:
        st.close()


def invites(admin, campaign: str, *names: str) -> dict[str, str]:
    msg = admin.predict(campaign, "\n".join(names), api_name="/campaign_invite")
    found = re.findall(r"- (\w+): `[^`]*/\?invite=([\w-]+)`", msg)
    assert [n for n, _ in found] == list(names), msg
    return dict(found)


def raters_of(home, campaign: str) -> list[str]:
    with db(home) as st:
        return list(dict.fromkeys(v["rater"] for v in rating_rows.votes(st, campaign)))


def test_anonymous_client_gets_no_task_and_cannot_vote(locked, client):
    url, home, camps = locked
    anon = client()
    for invite, name, msg in [("", "mallory", "by invitation only"), ("", "", "by invitation only"),
                              ("forged-token", "", "invite is not valid")]:
        with pytest.raises(Exception, match=msg):
            anon.predict(camps["votes"], invite, name, None, api_name="/rate_next")
        with pytest.raises(Exception, match=msg):
            anon.predict(camps["votes"], invite, name, None, "", api_name="/vote_left")
    with pytest.raises(Exception, match="unknown campaign"):
        anon.predict("nope", "", "anon", None, api_name="/rate_next")
    # only the admin makes invites
    with pytest.raises(Exception, match="admin login"):
        anon.predict(camps["votes"], "mallory", api_name="/campaign_invite")
    # an invite for another campaign does not open this one
    other = invites(client(admin=True), camps["fakes"], "olga")["olga"]
    with pytest.raises(Exception, match="invite is for campaign"):
        anon.predict(camps["votes"], other, "", None, api_name="/rate_next")
    with db(home) as st:
        assert rating_rows.assignments(st) == []
        assert rating_rows.count_votes(st) == 0


def test_invited_rater_votes_once_per_task(locked, client):
    url, home, camps = locked
    token = invites(client(admin=True), camps["votes"], "alice")["alice"]
    tab1, tab2 = client(), client()  # the same invite open in two tabs
    prompt, left, right, progress, key = tab1.predict(camps["votes"], token, "", None, api_name="/rate_next")
    assert "Prompt" in prompt and left.strip() and right.strip() and "Rating as **alice**" in progress
    assert "prompt" not in (left + right) and "rag" not in (left + right)
    # the second tab gets the same pending task; after tab 1 votes on it, tab 2's vote is refused
    assert tab2.predict(camps["votes"], token, "", None, api_name="/rate_next")[0] == prompt
    out = tab1.predict(camps["votes"], token, "", None, "", api_name="/vote_left")
    assert "0 rated" not in out[3] and "1 rated" in out[3]
    with pytest.raises(Exception, match="already voted on this task"):
        tab2.predict(camps["votes"], token, "", None, "", api_name="/vote_right")
    # the rest of the campaign, then nothing left
    for _ in range(2):
        tab1.predict(camps["votes"], token, "", None, "", api_name="/vote_tie")
    assert "Nothing left" in tab1.predict(camps["votes"], token, "", None, api_name="/rate_next")[0]
    with db(home) as st:
        rows = rating_rows.votes(st, camps["votes"])
        assert len(rows) == 3 and len({r["task_id"] for r in rows}) == 3
        (alice,) = rating_rows.list_raters(st, name="alice")
        assert {r["rater"] for r in rows} == {alice["id"]}
        # the schema refuses a second vote by the same rater on the same task, whatever the code does
        with pytest.raises(IntegrityError, match="(?i)unique"):
            write(st, insert(votes_table).values(campaign_id=camps["votes"], task_id=rows[0]["task_id"],
                                                 rater=rows[0]["rater"], choice="right", comment="", created_at=0,
                                                 updated_at=0))


def test_vote_then_read_results_reveals_nothing_until_published(locked, client):
    """The un-blinding attack: vote, then read the results to see which system's count moved."""
    url, home, camps = locked
    admin = client(admin=True)
    token = invites(admin, camps["blind"], "bob")["bob"]
    bob = client()
    bob.predict(camps["blind"], token, "", None, api_name="/rate_next")
    bob.predict(camps["blind"], token, "", None, "", api_name="/vote_left")
    for who in (bob, client()):
        summary, board, winrate = who.predict(camps["blind"], api_name="/results_show")
        assert "hidden until the admin publishes" in summary, summary
        assert not board["data"] and not winrate["data"]
        text = json.dumps([summary, board, winrate])
        assert "prompt" not in text and "rag" not in text and "votes" not in text and "1" not in summary
        with pytest.raises(Exception, match="admin login"):
            who.predict(camps["blind"], "csv", api_name="/results_export")
        with pytest.raises(Exception, match="admin login"):
            who.predict(camps["blind"], api_name="/campaign_publish")
    # the admin sees the count all along
    summary, board, _ = admin.predict(camps["blind"], api_name="/results_show")
    assert "1 votes" in summary and board["data"]
    # published: everyone sees the results, and the rating is over (no vote to trace any more)
    assert "published" in admin.predict(camps["blind"], api_name="/campaign_publish")
    summary, board, _ = client().predict(camps["blind"], api_name="/results_show")
    assert "1 votes" in summary and {"prompt", "rag"} <= {row[0] for row in board["data"]}
    with pytest.raises(Exception, match="rating is over"):
        bob.predict(camps["blind"], token, "", None, api_name="/rate_next")
    # closing does the same for another campaign
    assert "hidden" in client().predict(camps["votes"], api_name="/results_show")[0]
    assert "closed" in admin.predict(camps["votes"], api_name="/campaign_close")
    summary, board, _ = client().predict(camps["votes"], api_name="/results_show")
    assert "3 votes" in summary and board["data"]


def test_typing_other_names_makes_no_new_raters(locked, client):
    """The 10-fake-raters attack: one client, ten names."""
    url, home, camps = locked
    token = invites(client(admin=True), camps["fakes"], "carl")["carl"]
    c = client()
    for i in range(3):
        out = c.predict(camps["fakes"], token, f"fake{i}", None, "", api_name="/vote_left") if i else \
            c.predict(camps["fakes"], token, f"fake{i}", None, api_name="/rate_next")
        assert "Rating as **carl**" in out[3] or "Nothing left" in out[0]
    c.predict(camps["fakes"], token, "fake9", None, "", api_name="/vote_left")
    assert len(raters_of(home, camps["fakes"])) == 1
    with pytest.raises(Exception, match="by invitation only"):  # a name without the invite is nobody
        client().predict(camps["fakes"], "", "fake10", None, api_name="/rate_next")

    # an open campaign: the first name binds to a signed key the browser keeps; other names change nothing
    eve = client()
    _, _, _, progress, key = eve.predict(camps["open"], "", "eve", None, api_name="/rate_next")
    assert "Rating as **eve**" in progress and key
    for i in range(3):
        out = eve.predict(camps["open"], "", f"fake{i}", key, "", api_name="/vote_left")
        assert out[4] == key and ("Rating as **eve**" in out[3] or "Nothing left" in out[0])
    assert len(raters_of(home, camps["open"])) == 1
    with db(home) as st:
        assert len(rating_rows.list_raters(st, kind="open")) == 1
    # a key whose signature does not check out is no key at all
    forged = key.split(".")[0] + "." + "0" * 64
    with pytest.raises(Exception, match="enter your name"):
        eve.predict(camps["open"], "", "", forged, api_name="/rate_next")


def test_invite_link_query_parameter_is_enough(locked, client):
    """The browser sends the page's query (``?invite=...``) with each call: no textbox needed."""
    import urllib.request
    url, home, camps = locked
    token = invites(client(admin=True), camps["open"], "dora")["dora"]
    req = urllib.request.Request(f"{url}/gradio_api/call/rate_next?invite={token}",
                                 json.dumps({"data": [camps["open"], "", "not dora", None]}).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        event_id = json.loads(r.read())["event_id"]
    with urllib.request.urlopen(f"{url}/gradio_api/call/rate_next/{event_id}?invite={token}", timeout=60) as r:
        answer = r.read().decode()
    assert "event: complete" in answer and "Rating as **dora**" in answer, answer


# ---- Hugging Face sign-in (unit level: a real Space cannot be reached from here) ------------------
def test_hf_sign_in_counts_only_on_a_real_space(monkeypatch, ws, store):
    """Outside a Space, Gradio mocks OAuth with the server owner's account, so the app shows no
    LoginButton (no OAuth routes) and ignores any profile; on a Space the account is the rater."""
    import types

    import app
    from evals import rating
    from sft_core import StudioError
    from ui import common, rate
    assert not app.demo.expects_oauth  # not a Space here: no LoginButton, no mocked login route
    for env in ({"SPACE_ID": "me/studio"}, {"SPACE_ID": "me/studio", "SYSTEM": "spaces"},
                {"SPACE_ID": "me/studio", "SYSTEM": "spaces", "OAUTH_CLIENT_ID": "x"}):  # gradio[oauth] missing here
        for k in ("SPACE_ID", "SYSTEM", "OAUTH_CLIENT_ID"):
            monkeypatch.delenv(k, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        try:
            import authlib  # noqa: F401
            import itsdangerous  # noqa: F401
            has_oauth_deps = True
        except ImportError:
            has_oauth_deps = False
        assert rate._hf_oauth_available() is (len(env) == 3 and has_oauth_deps)

    monkeypatch.setattr(common, "_studio", types.SimpleNamespace(ws=ws, store=store))
    from tests.test_rating import make_eval
    cid = rating.create_campaign(make_eval(ws, store, 2), ws=ws, store=store)
    profile = {"sub": "42", "name": "Ada L.", "preferred_username": "ada", "profile": "", "picture": ""}
    import gradio as gr
    prof = gr.OAuthProfile(profile)
    monkeypatch.setattr(rate, "HF_OAUTH", False)
    with pytest.raises(StudioError, match="by invitation only"):
        rate._identify(cid, "", "ada", None, None, prof)
    monkeypatch.setattr(rate, "HF_OAUTH", True)
    assert rate._identify(cid, "", "someone", None, None, prof)[:2] == ("hf:ada", "Ada L.")
    mocked = gr.OAuthProfile({**profile, "sub": rate.MOCK_OAUTH_SUB})
    with pytest.raises(StudioError, match="by invitation only.*Hugging Face"):
        rate._identify(cid, "", "ada", None, None, mocked)


def test_invite_link_prefills_the_rate_tab(monkeypatch, ws, store):
    """Page load with ``?invite=``: the invite box, the campaign and the Rate tab (no browser needed)."""
    import types

    from evals import rating
    from tests.test_rating import make_eval
    from ui import common, rate
    monkeypatch.setattr(common, "_studio", types.SimpleNamespace(ws=ws, store=store))
    cid = rating.create_campaign(make_eval(ws, store, 2), ws=ws, store=store)
    token = rating.create_invites(cid, ["ann"], ws=ws, store=store)[0]["token"]
    box, camp, msg, tab = rate.rate_link(types.SimpleNamespace(query_params={"invite": token}))
    assert box == token and camp["value"] == cid and "Invited as **ann**" in msg and tab.selected == "rate"
    box, camp, msg, tab = rate.rate_link(types.SimpleNamespace(query_params={"invite": "forged"}))
    assert "not valid" in msg and camp == {"__type__": "update"}
    assert all(u == {"__type__": "update"} for u in rate.rate_link(types.SimpleNamespace(query_params={})))


def test_rated_texts_load_nothing_remote(locked, client):
    """Model outputs, the question and the reference reach the rater's browser with every image turned
    into a plain link and resource-loading HTML escaped: nothing names a host the browser would fetch."""
    url, home, camps = locked
    token = invites(client(admin=True), camps["images"], "ivan")["ivan"]
    prompt, left, right, progress, key = client().predict(camps["images"], token, "", None, api_name="/rate_next")
    shown = prompt + left + right
    assert "![" not in shown and "<img" not in shown.lower() and "<iframe" not in shown.lower(), shown
    assert "[image: cat](<http://evil.example/cat.png>)" in left + right  # still there, as a link to follow


# ---- identities revealed after a vote, only where the campaign allows it (issue 16 item 8) --------
def test_reveal_after_vote_only_where_allowed_and_only_own_voted_tasks(ws, store, tmp_path, capsys, monkeypatch):
    from evals import rating
    from sft_core import cli
    from sft_core.store import Store
    from tests.test_rating import make_eval, old_campaigns_db
    ev = make_eval(ws, store, 3)
    blind = rating.create_campaign(ev, ["prompt", "rag"], ws=ws, store=store, seed=1)
    shown = rating.create_campaign(ev, ["prompt", "rag"], ws=ws, store=store, seed=2, reveal_after_vote=True)
    assert rating.get_campaign(blind, ws=ws, store=store)["reveal_after_vote"] == 0  # off by default
    tasks = {}
    for cid in (blind, shown):
        t = rating.next_task(cid, "ann", ws=ws, store=store)
        assert set(t) == {"task_id", "prompt", "reference", "left", "right", "progress"}  # blind payload either way
        assert rating.reveal(cid, t["task_id"], "ann", ws=ws, store=store) is None  # not before the vote
        rating.vote(cid, t["task_id"], "ann", "left", ws=ws, store=store)
        tasks[cid] = t["task_id"]
    assert rating.reveal(blind, tasks[blind], "ann", ws=ws, store=store) is None  # the campaign keeps them hidden
    row = rating_rows.get_task(store, tasks[shown])
    assert rating.reveal(shown, tasks[shown], "ann", ws=ws, store=store) == {"left": row["system_left"],
                                                                           "right": row["system_right"]}
    # a task id alone reveals nothing: not to another rater, not for a task of another campaign
    assert rating.reveal(shown, tasks[shown], "bob", ws=ws, store=store) is None
    assert rating.reveal(shown, tasks[blind], "ann", ws=ws, store=store) is None
    bob_task = rating.next_task(shown, "bob", ws=ws, store=store)["task_id"]
    assert rating.reveal(shown, bob_task, "ann", ws=ws, store=store) is None
    # a revealed vote stays as cast; in a blind campaign it can still be changed
    with pytest.raises(rating.RatingError, match="cannot be changed"):
        rating.change_vote(shown, tasks[shown], "ann", "right", ws=ws, store=store)
    rating.change_vote(blind, tasks[blind], "ann", "right", ws=ws, store=store)
    # the CLI flag
    monkeypatch.setenv("SFT_STUDIO_HOME", str(ws.root))
    assert cli.main(["rate", "campaign", "create", "--eval", ev, "--reveal-after-vote"]) == 0
    cid = capsys.readouterr().out.strip()
    assert rating.get_campaign(cid, ws=ws, store=store)["reveal_after_vote"] == 1
    assert cli.main(["rate", "campaign", "list"]) == 0
    listing = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()}
    assert "reveals systems after each vote" in listing[cid] and "reveals" not in listing[blind]
    # an older database gets the column, off
    st = Store(old_campaigns_db(tmp_path / "old.db", "name", "open_rating", "published_at", "closed_at", "guidelines"))
    assert rating.get_campaign("camp-old", ws=ws, store=st)["reveal_after_vote"] == 0
    st.close()


def test_vote_reveals_systems_over_the_api_only_where_allowed(locked, client):
    """What a rater can call: the vote's confirmation names the systems only in a reveal-after-vote
    campaign, for the task just voted on; a blind campaign's confirmation names none, and the revealed
    vote cannot be reopened with Undo."""
    url, home, camps = locked
    admin = client(admin=True)
    tokens = {c: invites(admin, camps[c], "rita")["rita"] for c in ("reveal", "fakes")}
    rita = client()
    for cid_key, reveals in (("reveal", True), ("fakes", False)):
        cid, token = camps[cid_key], tokens[cid_key]
        prompt, left, right, progress, key = rita.predict(cid, token, "", None, api_name="/rate_next")
        assert "prompt" not in (left + right + progress) and "rag" not in (left + right + progress)
        with db(home) as st:  # the task on screen: the one assigned to rita (this campaign's invite), not voted on
            (rita_id,) = (r["id"] for r in rating_rows.list_raters(st, name="rita", campaign_id=cid))
            task = rating_rows.pending_task(st, cid, rita_id)
        out = rita.predict(cid, token, "", None, "", api_name="/vote_right")
        saved = out[6]
        assert "Saved: **B is better**" in saved, out
        if reveals:
            assert f"A was **{task['system_left']}**, B was **{task['system_right']}**" in saved, saved
            with pytest.raises(Exception, match="votes cannot be changed"):
                rita.predict(cid, token, "", None, api_name="/rate_undo")
        else:
            assert "prompt" not in saved and "rag" not in saved and " was " not in saved, saved
            # nor does anything else the rater is shown after the vote
            assert "prompt" not in json.dumps(out[:5]).replace('"Prompt', "") and "rag" not in json.dumps(out[:5])
