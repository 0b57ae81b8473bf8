"""Blind rating: Bradley-Terry recovers known strengths, concurrency loses nothing, payloads stay blind."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from evals import rating
from sft_core import cli
from sft_core.db import evals as eval_rows, ratings as rating_rows, rows as table_rows, write
from sft_core.db.schema import metadata, rating_tasks, votes as votes_table
from sft_core.store import Store, dumps
from sft_core.workspace import write_jsonl

SYSTEMS = ["prompt", "rag", "sft:r1"]


def make_eval(ws, store, n_rows: int = 40, eval_id: str = "ev1", judge: list | None = None,
              systems: list[str] = SYSTEMS) -> str:
    """An eval run on disk + its row, as evals/runner.py writes them."""
    path = ws.evals_dir(eval_id)
    path.mkdir(parents=True)
    rows = []
    for i in range(n_rows):
        for k, s in enumerate(systems):
            rows.append({"set": "domain", "row_id": f"r{i:03d}", "system": s, "instruction": f"Question {i}?",
                         "context": None, "reference": f"Answer {i}.", "output": f"[{k}] answer {i}",
                         "latency_s": 0.1, "prompt_tokens": 5, "completion_tokens": 4, "passages": []})
    write_jsonl(path / "outputs.jsonl", rows)
    if judge:
        write_jsonl(path / "judge.jsonl", judge)
    eval_rows.insert_eval(store, eval_id, "d", "v", "test", systems, str(path), {}, status="succeeded")
    return eval_id


def dump_database(store) -> str:
    """Every row of every table, as text (what a copy of the database would give away)."""
    return "\n".join(f"{t.name}: {r!r}" for t in metadata.sorted_tables for r in table_rows(store, select(t)))


# ---- Bradley-Terry -------------------------------------------------------------------------------
def simulate(theta, n_votes, rng):
    k = len(theta)
    i = rng.integers(0, k, n_votes)
    j = (i + rng.integers(1, k, n_votes)) % k
    p = 1 / (1 + np.exp(-(theta[i] - theta[j])))
    return i, j, (rng.random(n_votes) < p).astype(float)


def test_bt_recovers_order_and_matches_independent_fits():
    import math

    from scipy.optimize import minimize
    rng = np.random.default_rng(0)
    true = np.array([-1.0, -0.2, 0.4, 0.8])
    i, j, w = simulate(true, 3000, rng)
    w[:200] = 0.5  # some ties (half a win each)
    fit = rating.fit_bradley_terry(4, i, j, w)
    assert list(np.argsort(fit)) == list(np.argsort(true))
    # 3000 votes: each system is in ~1500, so the prior (worth ~4 games) shrinks by well under 1%
    assert np.max(np.abs(fit - (true - true.mean()))) < 0.15

    # independent 1: direct minimisation of the same penalised negative log-likelihood (the N(0, 1)
    # prior is |t|^2 / 2), vote by vote
    def nll(t):
        d = t[i] - t[j]
        return -np.sum(w * -np.logaddexp(0, -d) + (1 - w) * -np.logaddexp(0, d)) + 0.5 * np.sum(t ** 2)

    def grad(t):
        r = w - 1 / (1 + np.exp(-(t[i] - t[j])))  # d(loglik)/d(t_i - t_j) per vote
        return -(np.bincount(i, r, 4) - np.bincount(j, r, 4)) + t

    ref = minimize(nll, np.zeros(4), jac=grad, method="BFGS", options={"gtol": 1e-9, "maxiter": 10000}).x
    # stopped at |gradient| <= 1e-9; the curvature is >= 1 (the prior) in every direction, so every
    # coordinate is within ~1e-9 of the optimum, which is centred by itself (the likelihood sees differences)
    assert abs(ref.mean()) < 1e-8
    assert np.max(np.abs(fit - ref)) < 1e-8

    # independent 2: Hunter's (2004) MM algorithm for the plain MLE (no prior), ties as half-wins
    wins = np.zeros(4)
    games = np.zeros((4, 4))
    for a, b, s in zip(i, j, w):
        wins[a] += s
        wins[b] += 1 - s
        games[a, b] += 1
        games[b, a] += 1
    gamma = np.ones(4)
    for _ in range(5000):
        gamma = wins / (games / (gamma[:, None] + gamma[None, :])).sum(axis=1)
        gamma /= np.exp(np.log(gamma).mean())
    assert np.max(np.abs(rating.fit_bradley_terry(4, i, j, w, prior_sd=math.inf) - np.log(gamma))) < 1e-6


def laplace_interval(n, i, j, w, prior_sd=rating.PRIOR_SD):
    theta = rating.fit_bradley_terry(n, i, j, w, prior_sd=prior_sd)
    sd = np.sqrt(np.diag(rating.posterior_cov(n, i, j, w, theta, prior_sd=prior_sd)))
    return theta, theta - 1.959964 * sd, theta + 1.959964 * sd


def test_bt_laplace_interval_coverage():
    """Across 300 simulated campaigns of 500 votes the 95% intervals cover the true (centred)
    strengths ~95% of the time, and the check can fail: shifted values are rarely covered."""
    true = np.array([-0.6, -0.1, 0.2, 0.5])
    true -= true.mean()
    covered, shifted = [], []
    for seed in range(300):
        i, j, w = simulate(true, 500, np.random.default_rng(seed))
        _, lo, hi = laplace_interval(4, i, j, w)
        covered.append((lo <= true) & (true <= hi))
        shifted.append((lo <= true + 0.3) & (true + 0.3 <= hi))
    covered = np.array(covered)
    # 1200 intervals at a true rate of 0.95: the binomial sd of the mean is 0.0063, so +-0.025 is ~4 sd
    assert 0.925 <= covered.mean() <= 0.975, covered.mean(0)
    assert covered.mean(axis=0).min() >= 0.89, covered.mean(0)  # 300 per system: sd 0.0126, 0.89 is ~5 sd below
    assert np.mean(shifted) < 0.6


def test_bt_prior_keeps_twelve_straight_wins_finite_and_honest():
    """A beats B in all 12 votes. The plain MLE is infinite; the prior gives a finite rating whose
    interval matches what 12 votes can say. Derivation, with t = (a, -a) (the mode is centred) and
    g = 2a the gap: the log-posterior is 12*log s(g) - g^2/(4 sd^2) (the prior on two strengths of
    +-g/2), so the mode solves 12*s(-g) = g/(2 sd^2), and the Laplace variance of g is
    1/(12*p*(1-p) + 1/(2 sd^2)) with p = s(g); each rating is 1000 +- (400/ln10)*g/2."""
    import math

    from scipy.optimize import brentq, minimize
    assert not rating.mle_exists(2, [(0, 1, 1.0)] * 12)
    theta, lo, hi = laplace_interval(2, [0] * 12, [1] * 12, [1.0] * 12)
    assert np.all(np.isfinite(theta)) and np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))
    sd = rating.PRIOR_SD
    g = brentq(lambda g: 12 / (1 + math.exp(g)) - g / (2 * sd ** 2), 0, 50)
    p = 1 / (1 + math.exp(-g))
    half = 1.959964 * math.sqrt(1 / (12 * p * (1 - p) + 1 / (2 * sd ** 2))) / 2
    assert theta[0] - theta[1] == pytest.approx(g, abs=1e-9)
    assert (hi[0] - theta[0], theta[0] - lo[0]) == pytest.approx((half, half), abs=1e-9)
    # the same penalised likelihood, optimised and differentiated numerically by scipy (BFGS's inverse
    # Hessian estimate is rough, so the curvature is taken by central differences at its optimum)
    def nll(t):
        return 12 * np.logaddexp(0, -(t[0] - t[1])) + 0.5 * np.sum(t ** 2) / sd ** 2
    ref = minimize(nll, np.zeros(2), method="BFGS", options={"gtol": 1e-10}).x
    assert np.max(np.abs(theta - ref)) < 1e-5
    h = 1e-4
    curv = (nll(ref + [h, -h]) - 2 * nll(ref) + nll(ref - [h, -h])) / (2 * h) ** 2  # along the gap direction, per unit of g
    assert math.sqrt(1 / curv) == pytest.approx(math.sqrt(1 / (12 * p * (1 - p) + 1 / (2 * sd ** 2))), rel=1e-4)
    # what the numbers say: A wins with probability s(g) ~ 0.91, close to Laplace's rule of succession
    # (13/14 = 0.93); the rating gap is ~390 points, not the runaway ~2300 (6.6 log-strengths) of the
    # unregularised fit
    assert 0.88 < p < 0.93 and 300 < rating.RATING_SCALE * g < 450
    # honest: an exact sign test calls 12-0 clear (two-sided p = 2/2^12) and 3-0 not (p = 0.25); the
    # 95% interval of the gap must agree with both
    gap_sd = math.sqrt(1 / (12 * p * (1 - p) + 1 / (2 * sd ** 2)))
    assert g - 1.959964 * gap_sd > 0  # A's interval lies above the average, B's below: they do not overlap
    assert lo[0] > hi[1]
    theta3, lo3, hi3 = laplace_interval(2, [0] * 3, [1] * 3, [1.0] * 3)
    assert lo3[0] < hi3[1] and lo3[0] < 0 < hi3[0]  # 3-0 is not enough to tell them apart
    # more one-sided votes move the gap out, as they should, and it stays finite
    gaps = [np.diff(laplace_interval(2, [1] * n, [0] * n, [1.0] * n)[0])[0] for n in (3, 12, 48, 200)]
    assert all(a < b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 10
    assert rating.mle_exists(2, [(0, 1, 1.0)] * 30 + [(0, 1, 0.5)])  # a tie connects them
    assert not rating.mle_exists(3, [(0, 1, 1.0), (1, 0, 1.0)])  # system 2 never compared


def test_agreement_statistics():
    a = ["left", "right", "tie", "left", "left", "right"]
    assert rating.cohen_kappa(a, a) == 1.0
    assert rating.cohen_kappa(["left", "right"] * 5, ["right", "left"] * 5) < 0
    assert rating.krippendorff_alpha([["left", "left"], ["right", "right"], ["tie", "tie"]]) == 1.0
    # textbook example (Krippendorff 2011, nominal, 2 coders): alpha ~ 0.095
    c1 = [1, 2, 3, 3, 2, 1, 4, 1, 2]
    c2 = [1, 2, 3, 3, 2, 2, 4, 1, 2]
    alpha = rating.krippendorff_alpha([[str(x), str(y)] for x, y in zip(c1, c2)])
    assert 0.8 < alpha < 0.95


# ---- campaigns, blindness, errors ----------------------------------------------------------------
def test_blind_payload_and_balanced_assignment(ws, store):
    systems = ["base-prompted", "rag-bm25", "sft:run-7f3a"]
    cid = rating.create_campaign(make_eval(ws, store, 10, systems=systems), systems, ws=ws, store=store, seed=1)
    seen = set()
    pairs = []
    for _ in range(12):
        t = rating.next_task(cid, "alice", ws=ws, store=store)
        wire = json.dumps(t)  # exactly what an API client receives before voting, keys included
        for s in systems + ["base", "bm25", "sft", "7f3a"]:
            assert s not in wire
        assert set(t) == {"task_id", "prompt", "reference", "left", "right", "progress"}
        assert set(t["progress"]) == {"done", "remaining", "total"}
        # the only id is a random uuid4, not derived from the systems or the order
        assert len(t["task_id"]) == 32 and t["task_id"][12] == "4"
        row = rating_rows.get_task(store, t["task_id"])
        assert (t["left"], t["right"]) == (row["output_left"], row["output_right"])
        assert t["task_id"] not in seen
        seen.add(t["task_id"])
        pairs.append(frozenset((row["system_left"], row["system_right"])))
        rating.vote(cid, t["task_id"], "alice", "left", ws=ws, store=store)
    # coverage balanced across the 3 system pairs
    counts = [pairs.count(p) for p in set(pairs)]
    assert len(counts) == 3 and max(counts) - min(counts) <= 1
    # left/right order is random and recorded: every system appears on the left
    rows = rating_rows.tasks(store, cid)
    assert len({r["system_left"] for r in rows}) == 3


def test_left_right_draw_cannot_be_replayed(ws, store):
    """Default campaigns draw left/right from the OS: two campaigns on one eval differ, so knowing
    the code and the prompt order does not tell a rater which side is which system."""
    ev = make_eval(ws, store, 40)

    def order(cid):
        return [r["system_left"] for r in rating_rows.tasks(store, cid)]  # by row_id

    o1, o2 = (order(rating.create_campaign(ev, ["prompt", "rag"], ws=ws, store=store)) for _ in range(2))
    assert o1 != o2
    assert 8 <= o1.count("prompt") <= 32  # neither system sits on one side
    seeded = [order(rating.create_campaign(ev, ["prompt", "rag"], ws=ws, store=store, seed=7)) for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_pending_task_comes_back_and_concurrent_raters_spread_out(ws, store):
    cid = rating.create_campaign(make_eval(ws, store, 10), SYSTEMS, ws=ws, store=store, seed=0)  # 30 tasks
    first = rating.next_task(cid, "erin", ws=ws, store=store)
    assert rating.next_task(cid, "erin", ws=ws, store=store)["task_id"] == first["task_id"]  # a reload
    # six raters who each asked for a task before anyone voted get six different tasks
    ids = {rating.next_task(cid, f"r{k}", ws=ws, store=store)["task_id"] for k in range(6)}
    assert len(ids | {first["task_id"]}) == 7
    # a rater who rated everything gets None
    done = 0
    while (t := rating.next_task(cid, "frank", ws=ws, store=store)) is not None:
        rating.vote(cid, t["task_id"], "frank", "tie", ws=ws, store=store)
        done += 1
    assert done == 30


def test_vote_errors_store_nothing(ws, store):
    cid = rating.create_campaign(make_eval(ws, store, 3), SYSTEMS, ws=ws, store=store)
    t = rating.next_task(cid, "bob", ws=ws, store=store)
    other = next(r["id"] for r in rating_rows.tasks(store, cid) if r["id"] != t["task_id"])
    with pytest.raises(rating.RatingError, match="unknown campaign 'nope'"):
        rating.vote("nope", t["task_id"], "bob", "left", ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="unknown campaign"):
        rating.next_task("nope", "bob", ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="not assigned"):
        rating.vote(cid, other, "bob", "left", ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="not part of campaign"):
        rating.vote(cid, "no-such-task", "bob", "left", ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="limit is 2000"):
        rating.vote(cid, t["task_id"], "bob", "left", "x" * 2001, ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="choice"):
        rating.vote(cid, t["task_id"], "bob", "maybe", ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="rater"):
        rating.vote(cid, t["task_id"], "  ", "left", ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="no vote on task"):
        rating.change_vote(cid, t["task_id"], "bob", "left", ws=ws, store=store)
    assert rating_rows.votes(store) == [] and rating_rows.history(store) == []
    rating.vote(cid, t["task_id"], "bob", "right", "x" * 2000, ws=ws, store=store)  # exactly the limit is fine
    with pytest.raises(rating.RatingError, match="already voted"):
        rating.vote(cid, t["task_id"], "bob", "left", ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="unknown campaign"):
        rating.change_vote("nope", t["task_id"], "bob", "tie", ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="limit is 2000"):
        rating.change_vote(cid, t["task_id"], "bob", "tie", "y" * 2001, ws=ws, store=store)
    assert [(v["choice"], len(v["comment"])) for v in rating_rows.votes(store)] == [("right", 2000)]
    assert rating_rows.history(store) == []
    rating.change_vote(cid, t["task_id"], "bob", "tie", "changed my mind", ws=ws, store=store)
    rating.change_vote(cid, t["task_id"], "bob", "left", ws=ws, store=store)
    assert [v["choice"] for v in rating_rows.votes(store)] == ["left"]
    assert [h["choice"] for h in rating_rows.history(store)] == ["right", "tie"]  # oldest first


def test_database_constraints_make_duplicates_impossible(ws, store):
    """Even SQL that bypasses rating.py cannot store a double vote, an unassigned vote, a bad choice
    or a second task for the same pair and prompt (SQLite and PostgreSQL both name the constraint)."""
    cid = rating.create_campaign(make_eval(ws, store, 2), ["prompt", "rag"], ws=ws, store=store)
    t = rating.next_task(cid, "gus", ws=ws, store=store)
    rating.vote(cid, t["task_id"], "gus", "left", ws=ws, store=store)
    task = rating_rows.get_task(store, t["task_id"])
    other = next(r["id"] for r in rating_rows.tasks(store, cid) if r["id"] != t["task_id"])
    for (task_id, choice, comment), msg in [((t["task_id"], "right", ""), "(?i)unique"),
                                            ((other, "left", ""), "(?i)foreign key"),
                                            ((t["task_id"], "meh", ""), "votes_choice_check"),
                                            ((t["task_id"], "left", "z" * 2001), "votes_comment_length")]:
        with pytest.raises(IntegrityError, match=msg):
            write(store, insert(votes_table).values(campaign_id=cid, task_id=task_id, rater="gus", choice=choice,
                                                    comment=comment, created_at=0, updated_at=0))
    with pytest.raises(IntegrityError, match="rating_tasks_pair"):  # the same pair, sides swapped
        write(store, insert(rating_tasks).values(id="x", campaign_id=cid, row_id=task["row_id"],
                                                 system_left=task["system_right"], system_right=task["system_left"],
                                                 prompt="p", reference=None, output_left="a", output_right="b"))
    assert rating_rows.count_votes(store) == 1


def old_campaigns_db(path, *later_columns: str) -> str:
    """A database from before versioning holding one campaign, ``camp-old``: the first campaigns table,
    plus ``later_columns`` of those added since (name, open_rating, published_at, closed_at, guidelines)."""
    from sqlalchemy import Column, Float, Integer, MetaData, Table, Text, create_engine
    later = {"name": Column("name", Text, nullable=False, server_default=""),
             "open_rating": Column("open_rating", Integer, nullable=False, server_default="0"),
             "published_at": Column("published_at", Float), "closed_at": Column("closed_at", Float),
             "guidelines": Column("guidelines", Text, nullable=False, server_default="")}
    table = Table("campaigns", MetaData(), Column("id", Text, primary_key=True),
                  Column("eval_id", Text, nullable=False), Column("systems", Text, nullable=False),
                  Column("show_reference", Integer, nullable=False, server_default="1"),
                  Column("created_at", Float, nullable=False), *(later[c] for c in later_columns))
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    with engine.begin() as con:
        table.create(con)
        con.execute(insert(table).values(id="camp-old", eval_id="ev", systems='["a", "b"]', show_reference=1,
                                         created_at=0))
    engine.dispose()
    return url


def test_old_database_gets_the_name_column(tmp_path, ws):
    st = Store(old_campaigns_db(tmp_path / "old.db"))
    assert [c["id"] for c in rating.list_campaigns(ws, store=st)] == ["camp-old"]
    assert rating.list_campaigns(ws, store=st)[0]["name"] == ""
    # the later columns too: invite-only, results hidden, rating on; the raters table exists
    c = rating.list_campaigns(ws, store=st)[0]
    assert (c["open_rating"], c["published_at"], c["closed_at"], c["guidelines"]) == (0, None, None, "")
    assert not rating.results_visible("camp-old", ws, store=st)
    assert rating_rows.list_raters(st) == []
    st.close()


def test_campaign_creation_errors(ws, store):
    ev = make_eval(ws, store, 2)
    with pytest.raises(rating.RatingError, match="unknown eval 'nope'"):
        rating.create_campaign("nope", SYSTEMS, ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="ghost.*not in eval ev1"):
        rating.create_campaign(ev, ["prompt", "ghost"], ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="at least two"):
        rating.create_campaign(ev, ["prompt"], ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="twice"):
        rating.create_campaign(ev, ["prompt", "prompt"], ws=ws, store=store)
    assert rating.list_campaigns(ws=ws, store=store) == [] and table_rows(store, select(rating_tasks)) == []
    cid = rating.create_campaign(ev, None, ws=ws, store=store, name="  Pilot  ", show_reference=False)
    (c,) = rating.list_campaigns(ws=ws, store=store)
    assert (c["id"], c["name"], c["n_tasks"], c["n_votes"]) == (cid, "Pilot", 6, 0)
    assert rating.next_task(cid, "hana", ws=ws, store=store)["reference"] is None


# 20 processes × 50 votes each, on SQLite and on PostgreSQL: tests/test_store_backends.py.


def test_results_agreement_and_exports(ws, store, tmp_path, capsys):
    judge = [{"row_id": f"r{i:03d}", "system_a": "sft:r1", "system_b": "prompt", "winner": "a"} for i in range(30)]
    judge[0]["winner"] = "inconsistent"  # left out of the agreement
    cid = rating.create_campaign(make_eval(ws, store, 30, judge=judge), ["prompt", "sft:r1"], ws=ws, store=store)
    for k in range(30):  # carol prefers sft:r1 except on 6 tasks; dan agrees with her on 10 of the 12 they share
        t = rating.next_task(cid, "carol", ws=ws, store=store)
        row = rating_rows.get_task(store, t["task_id"])
        sft_side = "left" if row["system_left"] == "sft:r1" else "right"
        other_side = "right" if sft_side == "left" else "left"
        rating.vote(cid, t["task_id"], "carol", sft_side if k >= 6 else other_side, ws=ws, store=store)
    for k in range(12):
        t = rating.next_task(cid, "dan", ws=ws, store=store)
        carol = rating_rows.get_vote(store, t["task_id"], "carol")["choice"]
        flip = {"left": "right", "right": "left"}[carol]
        rating.vote(cid, t["task_id"], "dan", carol if k >= 2 else flip, ws=ws, store=store)
    res = rating.results(cid, ws=ws, store=store)
    assert [r["system"] for r in res["leaderboard"]] == ["sft:r1", "prompt"]
    top = res["leaderboard"][0]
    assert top["ci_low"] < top["rating"] < top["ci_high"] and top["rating"] > 1000 > res["leaderboard"][1]["rating"]
    sft_won = sum((v["choice"] == "left") == (v["system_left"] == "sft:r1")
                  for v in rating_rows.votes_with_tasks(store, cid))
    assert (top["wins"], top["losses"], top["ties"], top["votes"]) == (sft_won, 42 - sft_won, 0, 42)
    assert top["rating"] - 1000 == pytest.approx(rating.RATING_SCALE * top["strength"])
    assert res["votes_per_system"] == {"prompt": 42, "sft:r1": 42}
    wr = res["win_rate"]
    assert abs(wr["sft:r1"]["prompt"] + wr["prompt"]["sft:r1"] - 1) < 1e-12 and wr["sft:r1"]["prompt"] > 0.6
    assert res["agreement"]["tasks_with_several_raters"] == 12
    # kappa by hand: 12 shared tasks, 10 agreements; the marginals depend on the left/right draw
    dans = {v["task_id"]: v["choice"] for v in rating_rows.votes(store, cid, rater="dan")}
    shared = [{"c": v["choice"], "d": dans[v["task_id"]]} for v in rating_rows.votes(store, cid, rater="carol")
              if v["task_id"] in dans]
    po = sum(r["c"] == r["d"] for r in shared) / 12
    pe = sum(sum(r["c"] == x for r in shared) * sum(r["d"] == x for r in shared) for x in ("left", "right")) / 144
    assert po == 10 / 12 and abs(res["agreement"]["cohen_kappa"] - (po - pe) / (1 - pe)) < 1e-12
    # the judge prefers sft:r1 on 29 rows (r000 inconsistent: left out); agreement = share of human votes there
    # that also chose sft:r1
    human = rating_rows.votes_with_tasks(store, cid)
    judged = [h for h in human if h["row_id"] != "r000"]
    agree = sum((h["choice"] == "left") == (h["system_left"] == "sft:r1") for h in judged)
    assert res["agreement"]["judge_vs_human"] == pytest.approx(agree / len(judged))
    assert res["agreement"]["judge_votes_compared"] == len(judged)

    out = rating.export_votes(cid, "dpo", tmp_path / "dpo.jsonl", ws=ws, store=store)
    import datasets
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert set(ds.column_names) == {"prompt", "chosen", "rejected"} and len(ds) == 42
    sft_chosen = sum((h["choice"] == "left") == (h["system_left"] == "sft:r1") for h in human)
    assert sum(c.startswith("[2]") for c in ds["chosen"]) == sft_chosen  # "[2] ..." are sft:r1's outputs
    assert sum(c.startswith("[2]") for c in ds["rejected"]) == 42 - sft_chosen
    csv_text = rating.export_votes(cid, "csv", tmp_path / "v.csv", ws=ws, store=store).read_text()
    assert csv_text.count("\n") == 43 and csv_text.startswith("task_id,row_id,rater,choice")
    lines = rating.export_votes(cid, "jsonl", tmp_path / "v.jsonl", ws=ws, store=store).read_text().splitlines()
    assert len(lines) == 42 and {"system_left", "system_right", "choice", "rater"} <= set(json.loads(lines[0]))
    with pytest.raises(rating.RatingError, match="format"):
        rating.export_votes(cid, "xml", tmp_path / "v.xml", ws=ws, store=store)
    assert not (tmp_path / "v.xml").exists()


def test_ties_and_both_bad(ws, store, tmp_path):
    cid = rating.create_campaign(make_eval(ws, store, 4), ["prompt", "rag"], ws=ws, store=store)
    for choice in ("tie", "both_bad", "tie", "both_bad"):
        t = rating.next_task(cid, "ivy", ws=ws, store=store)
        rating.vote(cid, t["task_id"], "ivy", choice, ws=ws, store=store)
    res = rating.results(cid, ws=ws, store=store)
    assert res["votes_per_system"] == {"prompt": 4, "rag": 4}
    assert res["win_rate"]["prompt"]["rag"] == 0.5  # two ties = half a win each; both_bad left out
    assert [r["rating"] for r in res["leaderboard"]] == [1000.0, 1000.0] and res["warnings"] == []
    assert [(r["ties"], r["both_bad"]) for r in res["leaderboard"]] == [(2, 2), (2, 2)]
    out = rating.export_votes(cid, "dpo", tmp_path / "d.jsonl", ws=ws, store=store)
    assert out.read_text() == ""  # no preference to learn from


def test_left_vote_lands_as_chosen_left(ws, store, tmp_path):
    cid = rating.create_campaign(make_eval(ws, store, 1), ["prompt", "rag"], ws=ws, store=store)
    t = rating.next_task(cid, "dave", ws=ws, store=store)
    rating.vote(cid, t["task_id"], "dave", "left", ws=ws, store=store)
    rec = json.loads(rating.export_votes(cid, "dpo", tmp_path / "d.jsonl", ws=ws, store=store).read_text())
    assert rec == {"prompt": t["prompt"], "chosen": t["left"], "rejected": t["right"]}
    rating.change_vote(cid, t["task_id"], "dave", "right", ws=ws, store=store)
    rec = json.loads(rating.export_votes(cid, "dpo", tmp_path / "d.jsonl", ws=ws, store=store).read_text())
    assert rec["chosen"] == t["right"] and rec["rejected"] == t["left"]


# ---- CLI -------------------------------------------------------------------------------------------
def test_cli_create_results_export_and_errors(ws, store, capsys):
    ev = make_eval(ws, store, 5)
    assert cli.main(["rate", "campaign", "create", "--eval", ev, "--systems", "prompt, rag", "--name", "pilot",
                     "--seed", "3"]) == 0
    cid = capsys.readouterr().out.strip()
    camp = rating_rows.get_campaign(store, cid)
    assert (camp["name"], camp["systems"]) == ("pilot", dumps(["prompt", "rag"]))
    assert cli.main(["rate", "campaign", "list"]) == 0
    assert cid in capsys.readouterr().out
    for _ in range(5):
        t = rating.next_task(cid, "jo", ws=ws, store=store)
        rating.vote(cid, t["task_id"], "jo", "left", ws=ws, store=store)
    assert cli.main(["rate", "results", cid]) == 0
    out = capsys.readouterr().out
    assert "5 votes from 1 raters" in out and "prompt" in out and "rag" in out and "win rate" in out
    for fmt, ext in (("csv", "csv"), ("jsonl", "jsonl"), ("dpo", "jsonl")):
        assert cli.main(["rate", "export", cid, "--format", fmt]) == 0
        path = capsys.readouterr().out.strip()
        assert path == str(ws.root / "exports" / f"{cid}-{fmt}.{ext}")
    import datasets
    assert len(datasets.load_dataset("json", data_files=path, split="train")) == 5

    for argv, msg in [(["rate", "results", "nope"], "unknown campaign 'nope'"),
                      (["rate", "export", "nope", "--format", "dpo"], "unknown campaign 'nope'"),
                      (["rate", "campaign", "create", "--eval", "nope"], "unknown eval 'nope'"),
                      (["rate", "campaign", "create", "--eval", ev, "--systems", "prompt,zzz"], "zzz")]:
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
    assert len(rating_rows.campaign_ids(store)) == 1


# ---- rater identities, publish / close ------------------------------------------------------------
def test_invites_are_secret_per_campaign_and_stored_hashed(ws, store):
    import hashlib
    ev = make_eval(ws, store, 3)
    cid, other = (rating.create_campaign(ev, ws=ws, store=store, seed=s) for s in (0, 1))
    invs = rating.create_invites(cid, ["ann", "ann", "ben"], ws=ws, store=store)
    assert len({i["token"] for i in invs}) == 3 and len({i["rater"] for i in invs}) == 3  # same name, two raters
    for inv in invs:
        assert rating.invite_rater(inv["token"], ws=ws, store=store) == \
            {"id": inv["rater"], "name": inv["name"], "campaign_id": cid}
        row = rating_rows.get_rater(store, inv["rater"])
        assert row["token_sha256"] == hashlib.sha256(inv["token"].encode()).hexdigest() and row["kind"] == "invite"
    dump = dump_database(store)
    assert invs[0]["rater"] in dump and not any(i["token"] in dump for i in invs)  # only the hash is kept
    for bad in ("", "nope", invs[0]["token"][:-1], "x" * 500):
        assert rating.invite_rater(bad, ws=ws, store=store) is None
    rating_rows.revoke_rater(store, invs[2]["rater"], at=1)
    assert rating.invite_rater(invs[2]["token"], ws=ws, store=store) is None
    with pytest.raises(rating.RatingError, match="unknown campaign"):
        rating.create_invites("nope", ["x"], ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="at least one"):
        rating.create_invites(other, [], ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="printable"):
        rating.create_invites(other, ["a\nb"], ws=ws, store=store)


def test_open_rater_keys_are_signed_with_the_workspace_secret(ws, store, tmp_path):
    import os
    from sft_core.workspace import Workspace
    rid, key = rating.open_rater("eve", ws=ws, store=store)
    assert rating.open_key_rater(key, ws=ws, store=store) == {"id": rid, "name": "eve"}
    secret = ws.root / "secrets" / "rater-hmac.key"
    assert secret.exists() and os.stat(secret).st_mode & 0o077 == 0
    rid2, key2 = rating.open_rater("eve", ws=ws, store=store)  # the same name typed again: a new rater
    assert rid2 != rid and secret.read_text() == secret.read_text()
    sig = key.split(".")[1]
    for bad in (f"{rid}.{'0' * 64}", f"{rid2}.{sig}", f"open-{'a' * 16}.{sig}", rid, None, "", "a.b.c", 7):
        assert rating.open_key_rater(bad, ws=ws, store=store) is None, bad
    # another workspace (another secret) does not accept the key
    other = Workspace.at(tmp_path / "other")
    st2 = Store(other.db_url)
    try:
        rating_rows.add_rater(st2, rid, "open", "eve", created_at=0)
        assert rating.open_key_rater(key, ws=other, store=st2) is None
    finally:
        st2.close()
    # Hugging Face accounts: one rater per account
    assert rating.hf_rater("alice", "Alice A.", ws=ws, store=store) == rating.hf_rater("alice", ws=ws, store=store)
    alice = rating_rows.get_rater(store, "hf:alice")
    assert (alice["name"], alice["kind"]) == ("Alice A.", "hf")


def test_publish_and_close_end_the_rating_and_show_results(ws, store):
    ev = make_eval(ws, store, 3)
    cid, cid2 = (rating.create_campaign(ev, ["prompt", "rag"], ws=ws, store=store, seed=s) for s in (0, 1))
    t = rating.next_task(cid, "amy", ws=ws, store=store)
    assert not rating.results_visible(cid, ws=ws, store=store)
    rating.vote(cid, t["task_id"], "amy", "left", ws=ws, store=store)
    t2 = rating.next_task(cid, "amy", ws=ws, store=store)
    first = rating.publish(cid, ws=ws, store=store)["published_at"]
    assert rating.publish(cid, ws=ws, store=store)["published_at"] == first  # idempotent
    assert rating.results_visible(cid, ws=ws, store=store)
    for call in (lambda: rating.next_task(cid, "amy", ws=ws, store=store),
                 lambda: rating.vote(cid, t2["task_id"], "amy", "left", ws=ws, store=store),
                 lambda: rating.change_vote(cid, t["task_id"], "amy", "tie", ws=ws, store=store),
                 lambda: rating.create_invites(cid, ["late"], ws=ws, store=store)):
        with pytest.raises(rating.RatingError, match="published"):
            call()
    rating.close(cid2, ws=ws, store=store)
    assert rating.results_visible(cid2, ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="closed"):
        rating.next_task(cid2, "amy", ws=ws, store=store)
    assert rating.results(cid, ws=ws, store=store)["n_votes"] == 1


def test_cli_invite_publish_close(ws, store, capsys):
    ev = make_eval(ws, store, 3)
    assert cli.main(["rate", "campaign", "create", "--eval", ev, "--systems", "prompt,rag", "--seed", "1"]) == 0
    cid = capsys.readouterr().out.strip()
    assert cli.main(["rate", "campaign", "create", "--eval", ev, "--systems", "prompt,rag", "--open"]) == 0
    open_cid = capsys.readouterr().out.strip()
    assert rating_rows.get_campaign(store, open_cid)["open_rating"] == 1
    assert cli.main(["rate", "invite", "--campaign", cid, "--rater", "ann", "--rater", "ben",
                     "--base-url", "https://rate.example/"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["ann", "ben"]
    for line, name in zip(lines, ["ann", "ben"]):
        url = line.split("\t")[1]
        assert url.startswith("https://rate.example/?invite=")
        r = rating.invite_rater(url.split("invite=")[1], ws=ws, store=store)
        assert r["name"] == name and r["campaign_id"] == cid
    assert cli.main(["rate", "campaign", "list"]) == 0
    out = capsys.readouterr().out
    assert f"{cid}" in out and "invite-only  rating" in out and "open  rating" in out
    assert cli.main(["rate", "publish", cid]) == 0
    assert "published" in capsys.readouterr().out
    assert cli.main(["rate", "close", open_cid]) == 0
    assert "closed" in capsys.readouterr().out
    assert cli.main(["rate", "campaign", "list"]) == 0
    out = capsys.readouterr().out
    assert "invite-only  published" in out and "open  closed" in out
    assert rating.results_visible(cid, ws=ws, store=store) and rating.results_visible(open_cid, ws=ws, store=store)
    for argv, msg in [(["rate", "invite", "--campaign", "nope", "--rater", "x"], "unknown campaign 'nope'"),
                      (["rate", "invite", "--campaign", cid, "--rater", "x"], "published"),
                      (["rate", "publish", "nope"], "unknown campaign 'nope'"),
                      (["rate", "close", "nope"], "unknown campaign 'nope'")]:
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err


# ---- undo, guidelines, the leaderboard in words ------------------------------------------------------
def test_undo_brings_back_the_raters_own_last_vote(ws, store):
    cid = rating.create_campaign(make_eval(ws, store, 3), ["prompt", "rag"], ws=ws, store=store, seed=2)
    assert rating.last_vote(cid, "uma", ws=ws, store=store) is None  # nothing to undo yet
    first = rating.next_task(cid, "uma", ws=ws, store=store)
    rating.vote(cid, first["task_id"], "uma", "left", "too long", ws=ws, store=store)
    second = rating.next_task(cid, "uma", ws=ws, store=store)
    rating.vote(cid, second["task_id"], "uma", "tie", ws=ws, store=store)
    other = rating.next_task(cid, "vic", ws=ws, store=store)
    rating.vote(cid, other["task_id"], "vic", "right", ws=ws, store=store)  # someone else's, later
    last = rating.last_vote(cid, "uma", ws=ws, store=store)
    assert (last["task_id"], last["choice"], last["comment"]) == (second["task_id"], "tie", "")
    assert (last["left"], last["right"], last["prompt"]) == (second["left"], second["right"], second["prompt"])
    assert last["progress"] == {"done": 2, "remaining": 1, "total": 3}
    assert "system_left" not in last and "rag" not in json.dumps(last)  # still blind
    # the replacement goes through change_vote: one vote per task, the old choice in the history
    rating.change_vote(cid, last["task_id"], "uma", "right", ws=ws, store=store)
    assert [v["choice"] for v in rating_rows.votes(store, task_id=second["task_id"], rater="uma")] == ["right"]
    assert [h["choice"] for h in rating_rows.history(store)] == ["tie"]
    assert rating.last_vote(cid, "uma", ws=ws, store=store)["task_id"] == second["task_id"]  # changed = latest
    rating.close(cid, ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="closed"):
        rating.last_vote(cid, "uma", ws=ws, store=store)


def test_campaign_guidelines(ws, store):
    ev = make_eval(ws, store, 2)
    cid = rating.create_campaign(ev, ["prompt", "rag"], ws=ws, store=store, guidelines="  Prefer *correct* answers. ")
    assert rating.get_campaign(cid, ws=ws, store=store)["guidelines"] == "Prefer *correct* answers."
    with pytest.raises(rating.RatingError, match="guidelines are 4001 characters; the limit is 4000"):
        rating.create_campaign(ev, ["prompt", "rag"], ws=ws, store=store, guidelines="x" * 4001)
    assert len(rating.list_campaigns(ws=ws, store=store)) == 1  # nothing half-made


def test_cli_campaign_guidelines_from_text_or_file(ws, store, tmp_path, monkeypatch, capsys):
    from sft_core import cli
    monkeypatch.setenv("SFT_STUDIO_HOME", str(ws.root))
    ev = make_eval(ws, store, 2)
    (tmp_path / "g.md").write_text("Judge *facts* first.\n")
    assert cli.main(["rate", "campaign", "create", "--eval", ev, "--systems", "prompt,rag",
                     "--guidelines", "@" + str(tmp_path / "g.md")]) == 0
    cid = capsys.readouterr().out.strip()
    assert rating.get_campaign(cid, ws=ws, store=store)["guidelines"] == "Judge *facts* first."
    assert cli.main(["rate", "campaign", "create", "--eval", ev, "--guidelines", "@/nonexistent/g.md"]) == 1
    assert "/nonexistent/g.md" in capsys.readouterr().err
    assert len(rating.list_campaigns(ws=ws, store=store)) == 1  # the refused one made nothing


def test_leaderboard_tables_and_agreement_in_words(ws, store):
    """Row beats column from hand-counted votes; ratings rounded to their intervals; agreement in words."""
    from evals import leaderboard
    cid = rating.create_campaign(make_eval(ws, store, 6), SYSTEMS, ws=ws, store=store, seed=3)
    res = rating.results(cid, ws=ws, store=store)
    assert leaderboard.agreement_text(res) == "No votes yet."
    assert {r["rating"] for r in res["leaderboard"]} == {1000.0}  # no votes: the prior, for every system
    assert leaderboard.win_rate_table(res)[1] == [["prompt", "—", "no votes", "no votes"],
                                                  ["rag", "no votes", "—", "no votes"],
                                                  ["sft", "no votes", "no votes", "—"]]
    wins = {}  # (winner, loser) -> count, by hand
    for k in range(9):  # ann: sft beats prompt and rag, prompt beats rag
        t = rating.next_task(cid, "ann", ws=ws, store=store)
        row = rating_rows.get_task(store, t["task_id"])
        pair = {row["system_left"], row["system_right"]}
        winner = "sft:r1" if "sft:r1" in pair else "prompt"
        loser = (pair - {winner}).pop()
        wins[winner, loser] = wins.get((winner, loser), 0) + 1
        rating.vote(cid, t["task_id"], "ann", "left" if row["system_left"] == winner else "right", ws=ws, store=store)
    for _ in range(2):
        t = rating.next_task(cid, "bob", ws=ws, store=store)  # bob's tasks are not ann's (least assigned first)
        rating.vote(cid, t["task_id"], "bob", "tie", ws=ws, store=store)
    res = rating.results(cid, ws=ws, store=store)
    assert leaderboard.agreement_text(res) == "2 raters overlapped on 0 tasks: agreement not measurable yet."
    cols, rows = leaderboard.win_rate_table(res)
    assert cols == ["row beats column", "prompt", "rag", "sft"]
    cell = {(r[0], c): v for r in rows for c, v in zip(cols[1:], r[1:])}
    ties = {}
    for v in rating_rows.votes_with_tasks(store, cid, rater="bob"):
        key = frozenset((v["system_left"], v["system_right"]))
        ties[key] = ties.get(key, 0) + 1
    short = {"prompt": "prompt", "rag": "rag", "sft:r1": "sft"}
    for (w, lo), n in wins.items():
        t = ties.get(frozenset((w, lo)), 0)
        assert cell[short[w], short[lo]] == f"{(n + t / 2) / (n + t):.0%} of {n + t}"
        assert cell[short[lo], short[w]] == f"{(t / 2) / (n + t):.0%} of {n + t}"
    assert cell["sft", "sft"] == "—"
    cols, rows = leaderboard.board_table(res)
    assert cols[:3] == ["system", "rating", "95% interval"] and rows[0][0].lstrip("★ ") == "sft"
    top = res["leaderboard"][0]
    half = (top["ci_high"] - top["ci_low"]) / 2  # ~100-200 points here: shown to the nearest 10
    assert 50 < half < 500 and int(rows[0][1]) % 10 == 0 and abs(int(rows[0][1]) - top["rating"]) <= 5
    bar = rows[0][3]
    assert len(bar) == leaderboard.BAR_WIDTH and bar.count("●") == 1 and bar.index("├") < bar.index("●") < bar.index("┤")
    # agreement once two raters share tasks: Cohen's kappa by hand for 2 raters
    while (t := rating.next_task(cid, "bob", ws=ws, store=store)) is not None:  # bob rates the rest, ann's too
        ann = rating_rows.get_vote(store, t["task_id"], "ann")
        rating.vote(cid, t["task_id"], "bob", ann["choice"] if ann else "tie", ws=ws, store=store)
    res = rating.results(cid, ws=ws, store=store)
    assert res["agreement"]["tasks_with_several_raters"] == 9  # all of ann's
    text = leaderboard.agreement_text(res)
    assert text == (f"2 raters overlapped on 9 tasks: Cohen's κ = {res['agreement']['cohen_kappa']:.2f} "
                    "(almost perfect agreement, from few tasks)."), text
