"""Blind rating: Bradley-Terry recovers known strengths, concurrency loses nothing, payloads stay blind."""
from __future__ import annotations

import json
import multiprocessing as mp
import time

import numpy as np
import pytest
from scipy.optimize import minimize

from evals import rating
from sft_core import cli
from sft_core.store import Store, dumps
from sft_core.workspace import write_jsonl

SYSTEMS = ["prompt", "rag", "sft:r1"]


def make_eval(ws, store, n_rows: int = 40, eval_id: str = "ev1", judge: list | None = None) -> str:
    """An eval run on disk + its row, as evals/runner.py writes them."""
    path = ws.evals_dir(eval_id)
    path.mkdir(parents=True)
    rows = []
    for i in range(n_rows):
        for k, s in enumerate(SYSTEMS):
            rows.append({"set": "domain", "row_id": f"r{i:03d}", "system": s, "instruction": f"Question {i}?",
                         "context": None, "reference": f"Answer {i}.", "output": f"[{k}] answer {i}",
                         "latency_s": 0.1, "prompt_tokens": 5, "completion_tokens": 4, "passages": []})
    write_jsonl(path / "outputs.jsonl", rows)
    if judge:
        write_jsonl(path / "judge.jsonl", judge)
    store.execute("INSERT INTO evals (id, dataset, dataset_version, split, systems, status, created_at, path, config)"
                  " VALUES (?,?,?,?,?,?,?,?,?)", (eval_id, "d", "v", "test", dumps(SYSTEMS), "succeeded", time.time(),
                                                  str(path), "{}"))
    return eval_id


# ---- Bradley-Terry -------------------------------------------------------------------------------
def simulate(theta, n_votes, rng):
    k = len(theta)
    i = rng.integers(0, k, n_votes)
    j = (i + rng.integers(1, k, n_votes)) % k
    p = 1 / (1 + np.exp(-(theta[i] - theta[j])))
    return i, j, (rng.random(n_votes) < p).astype(float)


def test_bt_recovers_order_and_matches_independent_fit():
    rng = np.random.default_rng(0)
    true = np.array([-1.0, -0.2, 0.4, 0.8])
    i, j, w = simulate(true, 3000, rng)
    w[:200] = 0.5  # some ties
    fit = rating.fit_bradley_terry(4, i, j, w)
    assert list(np.argsort(fit)) == list(np.argsort(true))

    # independent implementation: direct minimisation of the same penalised negative log-likelihood
    def nll(t):
        d = t[i] - t[j]
        return -np.sum(w * -np.logaddexp(0, -d) + (1 - w) * -np.logaddexp(0, d)) + 0.5e-6 * np.sum(t ** 2)

    ref = minimize(nll, np.zeros(4), method="BFGS", options={"gtol": 1e-12, "maxiter": 10000}).x
    ref -= ref.mean()
    assert np.max(np.abs(fit - ref)) < 1e-6


def test_bt_bootstrap_ci_coverage():
    """Across seeds, the 95% bootstrap CI of the strength gap covers the true gap about 95% of the time."""
    true = np.array([0.0, 0.5, 1.0])
    covered, n_seeds = 0, 100
    for seed in range(n_seeds):
        rng = np.random.default_rng(seed)
        i, j, w = simulate(true, 300, rng)
        boots = []
        for _ in range(100):
            s = rng.integers(0, len(i), len(i))
            t = rating.fit_bradley_terry(3, i[s], j[s], w[s])
            boots.append(t[2] - t[0])
        lo, hi = np.quantile(boots, [0.025, 0.975])
        covered += lo <= 1.0 <= hi
    assert 0.88 <= covered / n_seeds <= 0.99, covered / n_seeds


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
    cid = rating.create_campaign(make_eval(ws, store, 10), SYSTEMS, ws=ws, store=store)
    seen = set()
    pairs = []
    for _ in range(12):
        t = rating.next_task(cid, "alice", ws=ws, store=store)
        values = json.dumps(list(t.values()))  # what an API client receives, keys aside
        for s in SYSTEMS:
            assert s not in values
        assert set(t) == {"task_id", "prompt", "reference", "left", "right", "progress"}
        row = store.query_one("SELECT * FROM rating_tasks WHERE id=?", (t["task_id"],))
        assert t["task_id"] not in seen
        seen.add(t["task_id"])
        pairs.append(frozenset((row["system_left"], row["system_right"])))
        rating.vote(cid, t["task_id"], "alice", "left", ws=ws, store=store)
    # coverage balanced across the 3 system pairs
    counts = [pairs.count(p) for p in set(pairs)]
    assert len(counts) == 3 and max(counts) - min(counts) <= 1
    # left/right order is random and recorded: both orders occur
    rows = store.query("SELECT system_left FROM rating_tasks WHERE campaign_id=?", (cid,))
    assert len({r["system_left"] for r in rows}) == 3


def test_vote_errors_store_nothing(ws, store):
    cid = rating.create_campaign(make_eval(ws, store, 3), SYSTEMS, ws=ws, store=store)
    t = rating.next_task(cid, "bob", ws=ws, store=store)
    other = store.query_one("SELECT id FROM rating_tasks WHERE campaign_id=? AND id<>?", (cid, t["task_id"]))["id"]
    with pytest.raises(rating.RatingError, match="unknown campaign"):
        rating.vote("nope", t["task_id"], "bob", "left", ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="not assigned"):
        rating.vote(cid, other, "bob", "left", ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="limit is 2000"):
        rating.vote(cid, t["task_id"], "bob", "left", "x" * 2001, ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="choice"):
        rating.vote(cid, t["task_id"], "bob", "maybe", ws=ws, store=store)
    assert store.query("SELECT * FROM votes") == []
    rating.vote(cid, t["task_id"], "bob", "right", "ok", ws=ws, store=store)
    with pytest.raises(rating.RatingError, match="already voted"):
        rating.vote(cid, t["task_id"], "bob", "left", ws=ws, store=store)
    rating.change_vote(cid, t["task_id"], "bob", "tie", "changed my mind", ws=ws, store=store)
    assert [v["choice"] for v in store.query("SELECT choice FROM votes")] == ["tie"]
    assert [h["choice"] for h in store.query("SELECT choice FROM vote_history")] == ["right"]


def _voter(args):
    db_url, cid, rater = args
    st = Store(db_url)
    n = 0
    for _ in range(50):
        t = rating.next_task(cid, rater, store=st)
        rating.vote(cid, t["task_id"], rater, "left" if n % 3 else "tie", store=st)
        n += 1
    return n


def test_twenty_processes_fifty_votes_each(ws, store):
    cid = rating.create_campaign(make_eval(ws, store, 20), SYSTEMS, ws=ws, store=store)  # 60 tasks
    ctx = mp.get_context("spawn")
    with ctx.Pool(20) as pool:
        counts = pool.map(_voter, [(ws.db_url, cid, f"rater{i}") for i in range(20)])
    assert sum(counts) == 1000
    assert store.query_one("SELECT COUNT(*) AS n FROM votes")["n"] == 1000
    dup = store.query("SELECT task_id, rater, COUNT(*) c FROM votes GROUP BY task_id, rater HAVING c > 1")
    assert dup == []
    res = rating.results(cid, ws=ws, store=store, n_boot=50)
    assert res["n_votes"] == 1000 and res["n_raters"] == 20
    assert sum(r["votes"] for r in res["leaderboard"]) == 2 * 1000  # each vote counts for two systems
    assert res["agreement"]["tasks_with_several_raters"] > 0


def test_results_and_exports(ws, store, tmp_path, capsys):
    judge = [{"row_id": f"r{i:03d}", "system_a": "sft:r1", "system_b": "prompt", "winner": "a"} for i in range(30)]
    cid = rating.create_campaign(make_eval(ws, store, 30, judge=judge), ["prompt", "sft:r1"], ws=ws, store=store)
    for _ in range(30):  # a rater who always prefers sft:r1
        t = rating.next_task(cid, "carol", ws=ws, store=store)
        row = store.query_one("SELECT * FROM rating_tasks WHERE id=?", (t["task_id"],))
        rating.vote(cid, t["task_id"], "carol", "left" if row["system_left"] == "sft:r1" else "right", ws=ws, store=store)
    res = rating.results(cid, ws=ws, store=store, n_boot=100)
    assert res["leaderboard"][0]["system"] == "sft:r1"
    assert res["win_rate"]["sft:r1"]["prompt"] == 1.0
    assert res["agreement"]["judge_vs_human"] == 1.0

    out = rating.export_votes(cid, "dpo", tmp_path / "dpo.jsonl", ws=ws, store=store)
    import datasets
    ds = datasets.load_dataset("json", data_files=str(out), split="train")
    assert set(ds.column_names) == {"prompt", "chosen", "rejected"} and len(ds) == 30
    assert all(c.startswith("[2]") for c in ds["chosen"])  # sft:r1's outputs
    assert rating.export_votes(cid, "csv", tmp_path / "v.csv", ws=ws, store=store).read_text().count("\n") == 31
    assert cli.main(["rate", "results", cid]) == 0
    assert "sft:r1" in capsys.readouterr().out
    assert cli.main(["rate", "results", "nope"]) == 1


def test_left_vote_lands_as_chosen_left(ws, store, tmp_path):
    cid = rating.create_campaign(make_eval(ws, store, 1), ["prompt", "rag"], ws=ws, store=store)
    t = rating.next_task(cid, "dave", ws=ws, store=store)
    rating.vote(cid, t["task_id"], "dave", "left", ws=ws, store=store)
    rec = json.loads(rating.export_votes(cid, "dpo", tmp_path / "d.jsonl", ws=ws, store=store).read_text())
    assert rec["chosen"] == t["left"] and rec["rejected"] == t["right"]
