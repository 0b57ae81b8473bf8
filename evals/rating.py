"""Blind pairwise human rating: campaigns, balanced task assignment, votes, Bradley-Terry, agreement, export.

A campaign is made from an eval run and a set of its systems. A *task* is one test row with two
systems' outputs in a random, recorded left/right order. ``next_task`` hands a rater a task payload
with the prompt and the two texts only — no system names, no ids that encode them. Votes:
``left | right | tie | both_bad``; one per rater per task (UNIQUE), changes keep history.

Bradley-Terry: maximum likelihood with ties counted as half a win for each side (the common
"ties as half-wins" treatment, e.g. as in Chatbot Arena's analysis); both_bad votes carry no
preference and are left out of the fit. Fitted by Newton's method on the log-strengths with a
tiny ridge (1e-6) for identifiability; CIs from a seeded bootstrap over votes.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import random
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from sft_core import StudioError
from sft_core.store import Store, dumps, loads, open_store
from sft_core.workspace import Workspace, atomic_write_text, read_jsonl

CHOICES = ("left", "right", "tie", "both_bad")
MAX_COMMENT = 2000



class RatingError(StudioError):
    pass


def _ctx(ws, store):
    ws = ws or Workspace.from_env()
    return ws, store or open_store(ws.db_url)


def _campaign(store: Store, campaign_id: str) -> dict:
    c = store.query_one("SELECT * FROM campaigns WHERE id=?", (campaign_id,))
    if c is None:
        raise RatingError(f"unknown campaign {campaign_id!r}", "campaign")
    return c


def create_campaign(eval_id: str, systems: list[str] | None = None, ws: Workspace | None = None,
                    store: Store | None = None, show_reference: bool = True, seed: int = 0) -> str:
    """Tasks for every domain row and every pair of the chosen systems, left/right randomised."""
    ws, store = _ctx(ws, store)
    ev = store.query_one("SELECT * FROM evals WHERE id=?", (eval_id,))
    if ev is None:
        raise RatingError(f"unknown eval {eval_id!r}", "eval")
    have = loads(ev["systems"])
    systems = list(systems or have)
    unknown = [s for s in systems if s not in have]
    if unknown:
        raise RatingError(f"system(s) {', '.join(unknown)} are not in eval {eval_id} (it has {', '.join(have)})", "systems")
    if len(systems) < 2:
        raise RatingError("a campaign compares at least two systems", "systems")
    outputs = [o for o in read_jsonl(Path(ev["path"]) / "outputs.jsonl") if o.get("set", "domain") == "domain"]
    by_row: dict[str, dict] = defaultdict(dict)
    for o in outputs:
        by_row[o["row_id"]][o["system"]] = o
    rng = random.Random(seed)
    cid = f"camp-{uuid.uuid4().hex[:8]}"
    tasks = []
    for rid in sorted(by_row):
        answers = by_row[rid]
        for a, b in itertools.combinations(systems, 2):
            if a not in answers or b not in answers:
                continue
            left, right = (a, b) if rng.random() < 0.5 else (b, a)
            o = answers[a]
            prompt = o["instruction"] + (f"\n\nContext:\n{o['context']}" if o.get("context") else "")
            tasks.append((uuid.uuid4().hex, cid, rid, left, right, prompt, o.get("reference"),
                          answers[left]["output"], answers[right]["output"]))
    if not tasks:
        raise RatingError(f"eval {eval_id} has no rows answered by all of {', '.join(systems)}", "eval")
    with store.tx() as con:
        con.execute("INSERT INTO campaigns (id, eval_id, systems, show_reference, created_at) VALUES (?,?,?,?,?)",
                    (cid, eval_id, dumps(systems), int(show_reference), time.time()))
        con.executemany("INSERT INTO rating_tasks (id, campaign_id, row_id, system_left, system_right, prompt, reference,"
                        " output_left, output_right) VALUES (?,?,?,?,?,?,?,?,?)", tasks)
    return cid


def list_campaigns(ws: Workspace | None = None, store: Store | None = None) -> list[dict]:
    ws, store = _ctx(ws, store)
    return store.query("SELECT c.*, (SELECT COUNT(*) FROM rating_tasks t WHERE t.campaign_id=c.id) AS n_tasks,"
                       " (SELECT COUNT(*) FROM votes v WHERE v.campaign_id=c.id) AS n_votes"
                       " FROM campaigns c ORDER BY created_at DESC")


def _check_rater(rater: str) -> str:
    rater = (rater or "").strip()
    if not rater:
        raise RatingError("enter a rater name", "rater")
    if len(rater) > 100 or any(ord(c) < 32 for c in rater):
        raise RatingError("rater names are up to 100 printable characters", "rater")
    return rater


def _check_vote(choice: str, comment: str | None) -> str:
    if choice not in CHOICES:
        raise RatingError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}", "choice")
    comment = comment or ""
    if len(comment) > MAX_COMMENT:
        raise RatingError(f"comment is {len(comment)} characters; the limit is {MAX_COMMENT}", "comment")
    return comment


def next_task(campaign_id: str, rater: str, ws: Workspace | None = None, store: Store | None = None) -> dict | None:
    """A blind task for this rater: a pending assignment if one exists, else the least-covered task
    (fewest votes, then the least-covered system pair and prompt) the rater has not seen."""
    ws, store = _ctx(ws, store)
    rater = _check_rater(rater)
    camp = _campaign(store, campaign_id)
    with store.tx() as con:
        pending = con.execute(
            "SELECT t.* FROM rating_tasks t JOIN rating_assignments a ON a.task_id=t.id AND a.rater=? "
            "LEFT JOIN votes v ON v.task_id=t.id AND v.rater=? WHERE t.campaign_id=? AND v.id IS NULL "
            "ORDER BY a.assigned_at LIMIT 1", (rater, rater, campaign_id)).fetchone()
        task = dict(pending) if pending else None
        if task is None:
            rows = con.execute(
                "SELECT t.*, (SELECT COUNT(*) FROM votes v WHERE v.task_id=t.id) AS n_votes FROM rating_tasks t "
                "WHERE t.campaign_id=? AND t.id NOT IN (SELECT task_id FROM rating_assignments WHERE rater=?)",
                (campaign_id, rater)).fetchall()
            if not rows:
                return None
            pair_cov, row_cov = Counter(), Counter()
            for r in con.execute("SELECT t.system_left, t.system_right, t.row_id FROM votes v JOIN rating_tasks t "
                                 "ON t.id=v.task_id WHERE v.campaign_id=?", (campaign_id,)):
                pair_cov[frozenset((r[0], r[1]))] += 1
                row_cov[r[2]] += 1
            rng = random.Random(f"{campaign_id}:{rater}:{len(rows)}")
            task = dict(min(rows, key=lambda r: (r["n_votes"], pair_cov[frozenset((r["system_left"], r["system_right"]))],
                                                 row_cov[r["row_id"]], rng.random())))
            con.execute("INSERT INTO rating_assignments (task_id, rater, assigned_at) VALUES (?,?,?)",
                        (task["id"], rater, time.time()))
        done = con.execute("SELECT COUNT(*) FROM votes WHERE campaign_id=? AND rater=?", (campaign_id, rater)).fetchone()[0]
        total = con.execute("SELECT COUNT(*) FROM rating_tasks WHERE campaign_id=?", (campaign_id,)).fetchone()[0]
    return {"task_id": task["id"], "prompt": task["prompt"],
            "reference": task["reference"] if camp["show_reference"] else None,
            "left": task["output_left"], "right": task["output_right"],
            "progress": {"done": done, "remaining": total - done}}


def vote(campaign_id: str, task_id: str, rater: str, choice: str, comment: str = "",
         ws: Workspace | None = None, store: Store | None = None) -> None:
    ws, store = _ctx(ws, store)
    rater, comment = _check_rater(rater), _check_vote(choice, comment)
    _campaign(store, campaign_id)
    with store.tx() as con:
        task = con.execute("SELECT id FROM rating_tasks WHERE id=? AND campaign_id=?", (task_id, campaign_id)).fetchone()
        if task is None:
            raise RatingError(f"task {task_id!r} is not part of campaign {campaign_id}", "task")
        if not con.execute("SELECT 1 FROM rating_assignments WHERE task_id=? AND rater=?", (task_id, rater)).fetchone():
            raise RatingError("this task was not assigned to you; press Next to get one", "task")
        if con.execute("SELECT 1 FROM votes WHERE task_id=? AND rater=?", (task_id, rater)).fetchone():
            raise RatingError("you already voted on this task; use change_vote to change it", "task")
        now = time.time()
        con.execute("INSERT INTO votes (campaign_id, task_id, rater, choice, comment, created_at, updated_at)"
                    " VALUES (?,?,?,?,?,?,?)", (campaign_id, task_id, rater, choice, comment, now, now))


def change_vote(campaign_id: str, task_id: str, rater: str, choice: str, comment: str = "",
                ws: Workspace | None = None, store: Store | None = None) -> None:
    """Replace a rater's vote; the previous one is kept in vote_history."""
    ws, store = _ctx(ws, store)
    rater, comment = _check_rater(rater), _check_vote(choice, comment)
    with store.tx() as con:
        old = con.execute("SELECT * FROM votes WHERE task_id=? AND rater=? AND campaign_id=?",
                          (task_id, rater, campaign_id)).fetchone()
        if old is None:
            raise RatingError("no earlier vote to change", "task")
        con.execute("INSERT INTO vote_history (vote_id, choice, comment, changed_at) VALUES (?,?,?,?)",
                    (old["id"], old["choice"], old["comment"], time.time()))
        con.execute("UPDATE votes SET choice=?, comment=?, updated_at=? WHERE id=?",
                    (choice, comment, time.time(), old["id"]))


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------
def fit_bradley_terry(n_items: int, i_idx, j_idx, w_ij, ridge: float = 1e-6, iters: int = 100) -> np.ndarray:
    """MLE of log-strengths theta (mean 0) for comparisons i vs j where i won with weight w (1, 0, or 0.5).

    Log-likelihood: sum w*log s(ti-tj) + (1-w)*log s(tj-ti), Newton steps on the full Hessian."""
    i_idx, j_idx, w = np.asarray(i_idx), np.asarray(j_idx), np.asarray(w_ij, dtype=float)
    theta = np.zeros(n_items)
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(theta[i_idx] - theta[j_idx])))
        g = np.zeros(n_items)
        np.add.at(g, i_idx, w - p)
        np.add.at(g, j_idx, p - w)
        g -= ridge * theta
        h = np.zeros((n_items, n_items))
        q = p * (1 - p)
        np.add.at(h, (i_idx, i_idx), q)
        np.add.at(h, (j_idx, j_idx), q)
        np.add.at(h, (i_idx, j_idx), -q)
        np.add.at(h, (j_idx, i_idx), -q)
        h += ridge * np.eye(n_items)
        step = np.linalg.solve(h, g)
        theta += step
        if np.max(np.abs(step)) < 1e-10:
            break
    return theta - theta.mean()


def elo(matches: list[tuple[int, int, float]], n_items: int, k: float = 16.0, seed: int = 0) -> np.ndarray:
    """Online Elo over the votes in a seeded random order (for comparison with Bradley-Terry)."""
    r = np.full(n_items, 1000.0)
    order = list(matches)
    random.Random(seed).shuffle(order)
    for i, j, w in order:
        e = 1 / (1 + 10 ** ((r[j] - r[i]) / 400))
        r[i] += k * (w - e)
        r[j] -= k * (w - e)
    return r


def cohen_kappa(a: list[str], b: list[str]) -> float:
    n = len(a)
    if n == 0:
        return float("nan")
    po = sum(x == y for x, y in zip(a, b)) / n
    ca, cb = Counter(a), Counter(b)
    pe = sum(ca[c] * cb[c] for c in set(ca) | set(cb)) / (n * n)
    return 1.0 if pe == 1 else (po - pe) / (1 - pe)


def krippendorff_alpha(units: list[list[str]]) -> float:
    """Nominal alpha; units = the labels given to each item (items with < 2 labels are skipped)."""
    units = [u for u in units if len(u) >= 2]
    if not units:
        return float("nan")
    o = Counter()
    for u in units:
        m = len(u)
        for x, y in itertools.permutations(range(m), 2):
            o[(u[x], u[y])] += 1 / (m - 1)
    n_c = Counter()
    for (c, _), v in o.items():
        n_c[c] += v
    n = sum(n_c.values())
    d_o = sum(v for (c, k), v in o.items() if c != k) / n
    d_e = sum(n_c[c] * n_c[k] for c in n_c for k in n_c if c != k) / (n * (n - 1))
    return 1.0 if d_e == 0 else 1 - d_o / d_e


def _matches(votes: list[dict], systems: list[str]) -> list[tuple[int, int, float]]:
    idx = {s: i for i, s in enumerate(systems)}
    out = []
    for v in votes:
        if v["choice"] == "both_bad":
            continue
        w = {"left": 1.0, "right": 0.0, "tie": 0.5}[v["choice"]]
        out.append((idx[v["system_left"]], idx[v["system_right"]], w))
    return out


def results(campaign_id: str, ws: Workspace | None = None, store: Store | None = None, n_boot: int = 500,
            seed: int = 0) -> dict:
    ws, store = _ctx(ws, store)
    camp = _campaign(store, campaign_id)
    systems = loads(camp["systems"])
    votes = store.query("SELECT v.*, t.system_left, t.system_right, t.row_id FROM votes v JOIN rating_tasks t "
                        "ON t.id=v.task_id WHERE v.campaign_id=? ORDER BY v.id", (campaign_id,))
    matches = _matches(votes, systems)
    n = len(systems)
    board = []
    if matches:
        i, j, w = (np.array(x) for x in zip(*matches))
        theta = fit_bradley_terry(n, i, j, w)
        rng = np.random.default_rng(seed)
        boots = np.array([fit_bradley_terry(n, i[s], j[s], w[s]) for s in
                          (rng.integers(0, len(i), len(i)) for _ in range(n_boot))])
        lo, hi = np.quantile(boots, [0.025, 0.975], axis=0)
        el = elo(matches, n, seed=seed)
        for k, s in enumerate(systems):
            board.append({"system": s, "bt_score": float(theta[k]), "ci_low": float(lo[k]), "ci_high": float(hi[k]),
                          "elo": float(el[k]), "votes": int(sum(1 for v in votes if s in (v["system_left"], v["system_right"])))})
        board.sort(key=lambda r: -r["bt_score"])
    wins = defaultdict(lambda: defaultdict(float))
    games = defaultdict(lambda: defaultdict(int))
    for a, b, w in matches:
        sa, sb = systems[a], systems[b]
        wins[sa][sb] += w
        wins[sb][sa] += 1 - w
        games[sa][sb] += 1
        games[sb][sa] += 1
    win_rate = {s: {t: (wins[s][t] / games[s][t] if games[s][t] else None) for t in systems if t != s} for s in systems}
    # agreement on tasks rated by several people
    per_task = defaultdict(dict)
    for v in votes:
        per_task[v["task_id"]][v["rater"]] = v["choice"]
    raters = sorted({v["rater"] for v in votes})
    agreement = {}
    multi = [t for t in per_task.values() if len(t) >= 2]
    if multi and len(raters) == 2:
        a, b = raters
        both = [t for t in multi if a in t and b in t]
        agreement["cohen_kappa"] = cohen_kappa([t[a] for t in both], [t[b] for t in both])
    if multi:
        agreement["krippendorff_alpha"] = krippendorff_alpha([list(t.values()) for t in multi])
    agreement["tasks_with_several_raters"] = len(multi)
    judge = _judge_agreement(store, camp, votes)
    if judge is not None:
        agreement["judge_vs_human"] = judge
    return {"campaign": campaign_id, "systems": systems, "n_votes": len(votes), "n_raters": len(raters),
            "leaderboard": board, "win_rate": win_rate, "agreement": agreement,
            "method": "Bradley-Terry MLE, ties = half a win each, both_bad excluded; 95% bootstrap CIs"}


def _judge_agreement(store: Store, camp: dict, votes: list[dict]) -> float | None:
    ev = store.query_one("SELECT path FROM evals WHERE id=?", (camp["eval_id"],))
    judged = read_jsonl(Path(ev["path"]) / "judge.jsonl") if ev else []
    if not judged:
        return None
    verdict = {}
    for j in judged:
        if j["winner"] in ("a", "b", "tie"):
            win = {"a": j["system_a"], "b": j["system_b"], "tie": "tie"}[j["winner"]]
            verdict[(j["row_id"], frozenset((j["system_a"], j["system_b"])))] = win
    same = total = 0
    for v in votes:
        if v["choice"] == "both_bad":
            continue
        key = (v["row_id"], frozenset((v["system_left"], v["system_right"])))
        if key in verdict:
            human = {"left": v["system_left"], "right": v["system_right"], "tie": "tie"}[v["choice"]]
            same += human == verdict[key]
            total += 1
    return same / total if total else None


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------
def export_votes(campaign_id: str, fmt: str, out_path: str | Path, ws: Workspace | None = None,
                 store: Store | None = None) -> Path:
    """csv / jsonl: every vote with its systems revealed; dpo: TRL's prompt/chosen/rejected (ties, both_bad out)."""
    ws, store = _ctx(ws, store)
    _campaign(store, campaign_id)
    if fmt not in ("csv", "jsonl", "dpo"):
        raise RatingError(f"format must be csv, jsonl or dpo, got {fmt!r}", "format")
    rows = store.query("SELECT v.rater, v.choice, v.comment, v.created_at, v.updated_at, t.id AS task_id, t.row_id, "
                       "t.system_left, t.system_right, t.prompt, t.reference, t.output_left, t.output_right "
                       "FROM votes v JOIN rating_tasks t ON t.id=v.task_id WHERE v.campaign_id=? ORDER BY v.id",
                       (campaign_id,))
    out_path = Path(out_path)
    if fmt == "dpo":
        lines = []
        for r in rows:
            if r["choice"] not in ("left", "right"):
                continue
            chosen, rejected = ((r["output_left"], r["output_right"]) if r["choice"] == "left"
                                else (r["output_right"], r["output_left"]))
            lines.append(json.dumps({"prompt": r["prompt"], "chosen": chosen, "rejected": rejected}, ensure_ascii=False))
        return atomic_write_text(out_path, "".join(line + "\n" for line in lines))
    if fmt == "jsonl":
        return atomic_write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    buf = io.StringIO()
    fields = ["task_id", "row_id", "rater", "choice", "comment", "system_left", "system_right", "prompt", "reference",
              "output_left", "output_right", "created_at", "updated_at"]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({k: r[k] for k in fields})
    return atomic_write_text(out_path, buf.getvalue())
