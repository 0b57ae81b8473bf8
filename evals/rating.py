"""Blind pairwise human rating: campaigns, balanced task assignment, votes, Bradley-Terry, agreement, export.

A campaign is made from an eval run and a set of its systems. A *task* is one test row with two
systems' outputs in a random, recorded left/right order. ``next_task`` hands a rater a task payload
with the prompt and the two texts only — no system names, no ids that encode them. Votes:
``left | right | tie | both_bad``; one per rater per task (UNIQUE), changes keep history.

Raters (``raters`` table): the app never takes a rater's identity from free text. An *invite* is a
secret link for one campaign (``create_invites``; only the token's sha256 is stored); an *open*
campaign lets anyone join under a self-chosen name, which the server binds to an HMAC-signed key
(``open_rater``; secret in ``<workspace>/secrets/rater-hmac.key``) so retyping the name does not make
a new rater; a cleared browser does, so open campaigns are for trusted rooms. On a Hugging Face Space
the app also takes the signed-in account (``hf_rater``). ``votes.rater`` holds the rater's id.

Results stay hidden from raters until the admin publishes them (``publish``) or closes the campaign
(``close``); either also ends the rating, since a vote followed by a look at the counts would name
the system behind each side.

Reveal after vote (``reveal_after_vote``, off by default): a campaign may tell each rater which systems
answered a task once they have voted on it (``reveal``), as a training aid for raters or a demo. Only
for that rater's own voted tasks, never before the vote; and a revealed vote can no longer be changed
(``change_vote`` refuses), since the rater has seen the names.

Ratings: Bradley-Terry, P(i beats j) = s(t_i - t_j) with s the logistic function, ties counted as
half a win for each side (the common "ties as half-wins" treatment, as in Chatbot Arena's analysis;
not Rao-Kupper); both_bad votes carry no preference and are left out of the fit. The log-strengths t
get a weak Gaussian prior, t_k ~ N(0, PRIOR_SD^2) with PRIOR_SD = 1, and the rating is the posterior
mode on an Elo-like scale: 1000 + 400/ln(10) * t_k (the average system is 1000; 400 points = 10:1
odds). Why a prior: with a dozen votes one system often wins every comparison it is in, and the
plain maximum-likelihood fit is then infinite. What the prior is worth: its curvature 1/PRIOR_SD^2 = 1
equals that of four tied games against an average system (a tie's log-likelihood has curvature 1/4
at equal strengths), so it matters for a handful of votes and fades after a few dozen. A priori two
systems' win probability lies within 6%-94% with 95% probability (s(+-1.96*sqrt(2))). Twelve straight
wins of A over B give A a win probability of 0.91 (Laplace's rule of succession says 13/14 = 0.93).
95% intervals: the Laplace approximation (the inverse Hessian of the negative log-posterior at the
mode, centred), which stays honest where a bootstrap cannot: resampling twelve straight wins only
ever gives twelve straight wins, hence a zero-width interval.
"""
from __future__ import annotations

import csv
import hashlib
import hmac
import io
import itertools
import json
import math
import os
import random
import secrets
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from sft_core import StudioError
from sft_core.safety import csv_cell
from sft_core.store import Store, dumps, loads, open_store
from sft_core.workspace import Workspace, atomic_write_text, read_jsonl

CHOICES = ("left", "right", "tie", "both_bad")
MAX_COMMENT = 2000
MAX_GUIDELINES = 4000



class RatingError(StudioError):
    pass


def _ctx(ws, store):
    ws = ws or Workspace.from_env()
    return ws, store or open_store(ws.db_url)  # Store adds the later campaigns columns (store.LATER_COLUMNS)


def _campaign(store: Store, campaign_id: str) -> dict:
    c = store.query_one("SELECT * FROM campaigns WHERE id=?", (campaign_id,))
    if c is None:
        raise RatingError(f"unknown campaign {campaign_id!r}", "campaign")
    return c


def create_campaign(eval_id: str, systems: list[str] | None = None, ws: Workspace | None = None,
                    store: Store | None = None, name: str | None = None, show_reference: bool = True,
                    seed: int | None = None, open_rating: bool = False, guidelines: str = "",
                    reveal_after_vote: bool = False) -> str:
    """Tasks for every domain row and every pair of the chosen systems, left/right drawn at random.

    The order is recorded per task. ``seed=None`` (the default) draws it from the OS so nobody can
    replay the draw from the code; pass an int only for reproducible tests. ``open_rating``: anyone
    may join under a self-chosen name (trusted rooms); otherwise raters need an invite.
    ``guidelines``: what raters read before they vote (Markdown, up to MAX_GUIDELINES characters).
    ``reveal_after_vote``: a rater learns which systems were A and B on each task they have voted on."""
    ws, store = _ctx(ws, store)
    name = (name or "").strip()
    if len(name) > 200 or any(ord(c) < 32 for c in name):
        raise RatingError("campaign names are up to 200 printable characters", "name")
    guidelines = (guidelines or "").strip()
    if len(guidelines) > MAX_GUIDELINES:
        raise RatingError(f"guidelines are {len(guidelines)} characters; the limit is {MAX_GUIDELINES}", "guidelines")
    ev = store.query_one("SELECT * FROM evals WHERE id=?", (eval_id,))
    if ev is None:
        raise RatingError(f"unknown eval {eval_id!r}", "eval")
    have = loads(ev["systems"])
    systems = list(systems or have)
    unknown = [s for s in systems if s not in have]
    if unknown:
        raise RatingError(f"system(s) {', '.join(unknown)} are not in eval {eval_id} (it has {', '.join(have)})", "systems")
    if len(set(systems)) != len(systems):
        raise RatingError(f"systems are listed twice: {', '.join(systems)}", "systems")
    if len(systems) < 2:
        raise RatingError("a campaign compares at least two systems", "systems")
    outputs = [o for o in read_jsonl(Path(ev["path"]) / "outputs.jsonl") if o.get("set", "domain") == "domain"]
    by_row: dict[str, dict] = defaultdict(dict)
    for o in outputs:
        by_row[o["row_id"]][o["system"]] = o
    rng = random.SystemRandom() if seed is None else random.Random(seed)
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
        con.execute("INSERT INTO campaigns (id, eval_id, systems, show_reference, created_at, name, open_rating,"
                    " guidelines, reveal_after_vote) VALUES (?,?,?,?,?,?,?,?,?)",
                    (cid, eval_id, dumps(systems), int(show_reference), time.time(),
                     name or f"{eval_id}: {' vs '.join(systems)}", int(bool(open_rating)), guidelines,
                     int(bool(reveal_after_vote))))
        con.executemany("INSERT INTO rating_tasks (id, campaign_id, row_id, system_left, system_right, prompt, reference,"
                        " output_left, output_right) VALUES (?,?,?,?,?,?,?,?,?)", tasks)
    return cid


def list_campaigns(ws: Workspace | None = None, store: Store | None = None) -> list[dict]:
    ws, store = _ctx(ws, store)
    return store.query("SELECT c.*, (SELECT COUNT(*) FROM rating_tasks t WHERE t.campaign_id=c.id) AS n_tasks,"
                       " (SELECT COUNT(*) FROM votes v WHERE v.campaign_id=c.id) AS n_votes"
                       " FROM campaigns c ORDER BY created_at DESC")


def get_campaign(campaign_id: str, ws: Workspace | None = None, store: Store | None = None) -> dict:
    ws, store = _ctx(ws, store)
    return _campaign(store, campaign_id)


def results_visible(campaign_id: str, ws: Workspace | None = None, store: Store | None = None) -> bool:
    """Raters see results only once the admin published them or closed the campaign."""
    camp = get_campaign(campaign_id, ws=ws, store=store)
    return camp["published_at"] is not None or camp["closed_at"] is not None


def _check_rating_open(camp: dict) -> None:
    if camp["published_at"] is not None:
        raise RatingError(f"the results of campaign {camp['id']} are published, so its rating is over", "campaign")
    if camp["closed_at"] is not None:
        raise RatingError(f"campaign {camp['id']} is closed", "campaign")


def publish(campaign_id: str, ws: Workspace | None = None, store: Store | None = None) -> dict:
    """Show the results to everyone. Rating ends too: with results on view, a rater who votes and
    then reads the counts would learn which system is on which side."""
    ws, store = _ctx(ws, store)
    _campaign(store, campaign_id)
    store.execute("UPDATE campaigns SET published_at=? WHERE id=? AND published_at IS NULL", (time.time(), campaign_id))
    return _campaign(store, campaign_id)


def close(campaign_id: str, ws: Workspace | None = None, store: Store | None = None) -> dict:
    """End the rating: no new tasks or votes; the results become visible to raters."""
    ws, store = _ctx(ws, store)
    _campaign(store, campaign_id)
    store.execute("UPDATE campaigns SET closed_at=? WHERE id=? AND closed_at IS NULL", (time.time(), campaign_id))
    return _campaign(store, campaign_id)


# ---- rater identities ----------------------------------------------------------------------------
def _sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_invites(campaign_id: str, names: list[str], ws: Workspace | None = None,
                   store: Store | None = None) -> list[dict]:
    """One secret invite per name: [{"rater", "name", "token"}]. The token is shown only here; the
    database keeps its sha256. Each invite is its own rater, even when two share a display name."""
    ws, store = _ctx(ws, store)
    camp = _campaign(store, campaign_id)
    _check_rating_open(camp)
    names = [_check_rater(n) for n in names]
    if not names:
        raise RatingError("name at least one rater to invite", "rater")
    out = []
    with store.tx() as con:
        for n in names:
            token, rid = secrets.token_urlsafe(24), f"inv-{secrets.token_hex(8)}"
            con.execute("INSERT INTO raters (id, kind, name, campaign_id, token_sha256, created_at) VALUES (?,?,?,?,?,?)",
                        (rid, "invite", n, campaign_id, _sha256(token), time.time()))
            out.append({"rater": rid, "name": n, "token": token})
    return out


def invite_rater(token: str, ws: Workspace | None = None, store: Store | None = None) -> dict | None:
    """The rater an invite token stands for (id, name, campaign_id), or None for an unknown/revoked one."""
    ws, store = _ctx(ws, store)
    token = (token or "").strip()
    if not token or len(token) > 200:
        return None
    return store.query_one("SELECT id, name, campaign_id FROM raters WHERE token_sha256=? AND kind='invite'"
                           " AND revoked_at IS NULL", (_sha256(token),))


def _secret(ws: Workspace) -> bytes:
    """The workspace's HMAC key for open-rating keys, made once (first writer wins, 0600)."""
    path = ws.root / "secrets" / "rater-hmac.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        try:
            os.link(tmp, path)  # atomic, and refuses to replace a key another process made first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = path.read_text().strip()
    if len(key) < 32:
        raise RatingError(f"{path} is not a valid key (delete it to make a new one; open-rating keys then reset)", "secret")
    return key.encode()


def _sign(ws: Workspace, rater_id: str) -> str:
    return hmac.new(_secret(ws), f"open-rater:{rater_id}".encode(), hashlib.sha256).hexdigest()


def open_rater(name: str, ws: Workspace | None = None, store: Store | None = None) -> tuple[str, str]:
    """A new rater for open campaigns under a self-chosen name: (rater id, signed key for the browser)."""
    ws, store = _ctx(ws, store)
    name = _check_rater(name)
    rid = f"open-{secrets.token_hex(8)}"
    store.execute("INSERT INTO raters (id, kind, name, created_at) VALUES (?,?,?,?)", (rid, "open", name, time.time()))
    return rid, f"{rid}.{_sign(ws, rid)}"


def open_key_rater(key: str, ws: Workspace | None = None, store: Store | None = None) -> dict | None:
    """The rater a signed open-rating key stands for, or None if the signature does not check out."""
    ws, store = _ctx(ws, store)
    if not isinstance(key, str) or key.count(".") != 1 or len(key) > 200:
        return None
    rid, sig = key.split(".")
    if not hmac.compare_digest(sig, _sign(ws, rid)):
        return None
    return store.query_one("SELECT id, name FROM raters WHERE id=? AND kind='open' AND revoked_at IS NULL", (rid,))


def hf_rater(username: str, display_name: str | None = None, ws: Workspace | None = None,
             store: Store | None = None) -> str:
    """The rater for a Hugging Face account the app's OAuth session vouches for."""
    ws, store = _ctx(ws, store)
    username = _check_rater(username)
    rid = f"hf:{username}"
    store.execute("INSERT OR IGNORE INTO raters (id, kind, name, created_at) VALUES (?,?,?,?)",
                  (rid, "hf", (display_name or username).strip()[:100] or username, time.time()))
    return rid


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
    """A blind task for this rater, or None when they have seen every task of the campaign.

    A task handed out but not yet voted on comes back first (a page reload must not skip it). Else
    the rater gets the unseen task with the fewest assignments so far (assignments, not votes, so
    raters working at the same time spread out), then the least-covered system pair, then the
    least-covered prompt; the choice and the assignment are one transaction."""
    ws, store = _ctx(ws, store)
    rater = _check_rater(rater)
    camp = _campaign(store, campaign_id)
    _check_rating_open(camp)
    with store.tx() as con:
        pending = con.execute(
            "SELECT t.* FROM rating_tasks t JOIN rating_assignments a ON a.task_id=t.id AND a.rater=? "
            "LEFT JOIN votes v ON v.task_id=t.id AND v.rater=? WHERE t.campaign_id=? AND v.id IS NULL "
            "ORDER BY a.assigned_at LIMIT 1", (rater, rater, campaign_id)).fetchone()
        task = dict(pending) if pending else None
        if task is None:
            rows = con.execute(
                "SELECT t.id, t.row_id, t.system_left, t.system_right, COUNT(a.rater) AS n_assigned,"
                " SUM(a.rater = ?) AS mine FROM rating_tasks t LEFT JOIN rating_assignments a ON a.task_id=t.id"
                " WHERE t.campaign_id=? GROUP BY t.id", (rater, campaign_id)).fetchall()
            pair_cov, row_cov = Counter(), Counter()
            for r in rows:
                pair_cov[frozenset((r["system_left"], r["system_right"]))] += r["n_assigned"]
                row_cov[r["row_id"]] += r["n_assigned"]
            unseen = [r for r in rows if not r["mine"]]
            if not unseen:
                return None
            rng = random.Random(f"{campaign_id}:{rater}:{len(unseen)}")  # breaks exact ties only
            best = min(unseen, key=lambda r: (r["n_assigned"], pair_cov[frozenset((r["system_left"], r["system_right"]))],
                                              row_cov[r["row_id"]], rng.random()))
            task = dict(con.execute("SELECT * FROM rating_tasks WHERE id=?", (best["id"],)).fetchone())
            con.execute("INSERT INTO rating_assignments (task_id, rater, assigned_at) VALUES (?,?,?)",
                        (task["id"], rater, time.time()))
        return _payload(con, camp, task, rater)


def _payload(con, camp: dict, task: dict, rater: str) -> dict:
    """Only what the rater needs: the task id is a random uuid, the order is fixed per task.
    ``progress``: votes cast (``done``), tasks left (``remaining``), ``total`` in the campaign."""
    done = con.execute("SELECT COUNT(*) FROM votes WHERE campaign_id=? AND rater=?", (camp["id"], rater)).fetchone()[0]
    total = con.execute("SELECT COUNT(*) FROM rating_tasks WHERE campaign_id=?", (camp["id"],)).fetchone()[0]
    return {"task_id": task["id"], "prompt": task["prompt"],
            "reference": task["reference"] if camp["show_reference"] else None,
            "left": task["output_left"], "right": task["output_right"],
            "progress": {"done": done, "remaining": total - done, "total": total}}


def last_vote(campaign_id: str, rater: str, ws: Workspace | None = None, store: Store | None = None) -> dict | None:
    """The rater's own most recent vote, to undo it: the task's blind payload plus ``choice`` and
    ``comment`` (None when they have not voted). The app shows the task again; the rater's next
    choice replaces the vote through ``change_vote`` (the old one goes to vote_history)."""
    ws, store = _ctx(ws, store)
    rater = _check_rater(rater)
    camp = _campaign(store, campaign_id)
    _check_rating_open(camp)
    with store.tx() as con:
        row = con.execute("SELECT t.*, v.choice AS vote_choice, v.comment AS vote_comment FROM votes v "
                          "JOIN rating_tasks t ON t.id=v.task_id WHERE v.campaign_id=? AND v.rater=? "
                          "ORDER BY v.updated_at DESC, v.id DESC LIMIT 1", (campaign_id, rater)).fetchone()
        if row is None:
            return None
        return {**_payload(con, camp, dict(row), rater), "choice": row["vote_choice"], "comment": row["vote_comment"]}


def vote(campaign_id: str, task_id: str, rater: str, choice: str, comment: str = "",
         ws: Workspace | None = None, store: Store | None = None) -> None:
    ws, store = _ctx(ws, store)
    rater, comment = _check_rater(rater), _check_vote(choice, comment)
    _check_rating_open(_campaign(store, campaign_id))
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


def reveal(campaign_id: str, task_id: str, rater: str, ws: Workspace | None = None,
           store: Store | None = None) -> dict | None:
    """``{"left": system, "right": system}`` of a task this rater has voted on, when the campaign reveals
    identities after a vote; None otherwise (the campaign keeps them hidden, or the rater has not voted on
    that task: a task id alone reveals nothing)."""
    ws, store = _ctx(ws, store)
    rater = _check_rater(rater)
    if not _campaign(store, campaign_id)["reveal_after_vote"]:
        return None
    row = store.query_one("SELECT t.system_left, t.system_right FROM rating_tasks t JOIN votes v ON v.task_id=t.id "
                          "WHERE t.id=? AND t.campaign_id=? AND v.rater=?", (task_id, campaign_id, rater))
    return {"left": row["system_left"], "right": row["system_right"]} if row else None


def change_vote(campaign_id: str, task_id: str, rater: str, choice: str, comment: str = "",
                ws: Workspace | None = None, store: Store | None = None) -> None:
    """Replace a rater's vote; the previous one is kept in vote_history. Refused where the campaign
    revealed the systems after the vote: a changed vote would no longer be blind."""
    ws, store = _ctx(ws, store)
    rater, comment = _check_rater(rater), _check_vote(choice, comment)
    camp = _campaign(store, campaign_id)
    _check_rating_open(camp)
    if camp["reveal_after_vote"]:
        raise RatingError(f"campaign {campaign_id} shows the systems after each vote, so a vote cannot be changed "
                          "(it would no longer be blind)", "vote")
    with store.tx() as con:
        old = con.execute("SELECT * FROM votes WHERE task_id=? AND rater=? AND campaign_id=?",
                          (task_id, rater, campaign_id)).fetchone()
        if old is None:
            raise RatingError(f"you have no vote on task {task_id!r} to change; use vote", "task")
        con.execute("INSERT INTO vote_history (vote_id, choice, comment, changed_at) VALUES (?,?,?,?)",
                    (old["id"], old["choice"], old["comment"], time.time()))
        con.execute("UPDATE votes SET choice=?, comment=?, updated_at=? WHERE id=?",
                    (choice, comment, time.time(), old["id"]))


# ------------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------------
# Bradley-Terry with a weak Gaussian prior on the log-strengths (MAP), on an Elo-like scale.
PRIOR_SD = 1.0  # sd of each system's log-strength a priori: see the module docstring for what it is worth
RATING_SCALE = 400.0 / math.log(10.0)  # rating points per unit of log-strength: 400 points = 10:1 odds
RATING_BASE = 1000.0  # the rating of an average system (the log-strengths are centred)
Z95 = 1.959963984540054  # two-sided 95% normal quantile


def _pair_design(n_items: int, i_idx, j_idx, w_ij):
    """Per unordered pair (a<b): games and a's score (wins + half the ties).

    Returns (pairs (P,2), games (P,), wins of the first system of each pair (P,))."""
    i_idx, j_idx, w = np.asarray(i_idx, dtype=int), np.asarray(j_idx, dtype=int), np.asarray(w_ij, dtype=float)
    if np.any(i_idx == j_idx):
        raise RatingError("a comparison needs two different systems", "votes")
    a, b = np.minimum(i_idx, j_idx), np.maximum(i_idx, j_idx)
    score = np.where(i_idx == a, w, 1.0 - w)  # a's score in each comparison
    pairs, pair_of = np.unique(np.stack([a, b], axis=1), axis=0, return_inverse=True)
    pair_of = pair_of.reshape(-1)
    return pairs, np.bincount(pair_of, minlength=len(pairs)).astype(float), np.bincount(pair_of, weights=score,
                                                                                         minlength=len(pairs))


def _design_matrix(n_items: int, pairs) -> np.ndarray:
    d = np.zeros((len(pairs), n_items))
    d[np.arange(len(pairs)), pairs[:, 0]] = 1.0
    d[np.arange(len(pairs)), pairs[:, 1]] = -1.0
    return d


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # without overflow


def fit_bradley_terry(n_items: int, i_idx, j_idx, w_ij, prior_sd: float = PRIOR_SD,
                      iters: int = 100) -> np.ndarray:
    """Log-strengths theta (mean 0) maximising the penalised log-likelihood

        sum_votes  w*log s(t_i - t_j) + (1-w)*log s(t_j - t_i)   -   |theta|^2 / (2 prior_sd^2)

    for comparisons i vs j where i scored w (1 win, 0 loss, 0.5 tie); s is the logistic function.
    That is the posterior mode under independent N(0, prior_sd^2) priors (``prior_sd=math.inf``: the
    plain MLE, which is infinite when a system won or lost everything). The likelihood only sees
    differences and its gradient sums to zero, so the optimum is centred; Newton's method with steps
    capped at 2 (a log-strength of 2 is already 7:1 odds) and the Hessian's constant direction pinned."""
    pairs, games, wins = _pair_design(n_items, i_idx, j_idx, w_ij)
    d = _design_matrix(n_items, pairs)
    ridge = 0.0 if math.isinf(prior_sd) else 1.0 / prior_sd ** 2
    pin = np.ones((n_items, n_items)) / n_items  # fixes the mean (the likelihood is flat along it)
    theta = np.zeros(n_items)
    for _ in range(iters):
        p = _sigmoid(d @ theta)
        grad = (wins - games * p) @ d - ridge * theta
        hess = d.T @ ((games * p * (1 - p))[:, None] * d) + ridge * np.eye(n_items) + pin
        step = np.linalg.solve(hess, grad)
        step *= min(1.0, 2.0 / max(np.max(np.abs(step)), 1e-300))
        theta = theta + step
        if np.max(np.abs(step)) < 1e-12:
            break
    return theta - theta.mean()


def posterior_cov(n_items: int, i_idx, j_idx, w_ij, theta, prior_sd: float = PRIOR_SD) -> np.ndarray:
    """Laplace approximation: the covariance of the centred log-strengths around the mode ``theta``.

    The inverse of the negative log-posterior's Hessian, sum_pairs games*p*(1-p)*d d^T + I/prior_sd^2,
    restricted to centred vectors (the prior's own uncertainty about the common level, which no vote
    can inform and no comparison depends on, is projected out)."""
    pairs, games, _ = _pair_design(n_items, i_idx, j_idx, w_ij)
    d = _design_matrix(n_items, pairs)
    p = _sigmoid(d @ np.asarray(theta, dtype=float))
    ridge = 0.0 if math.isinf(prior_sd) else 1.0 / prior_sd ** 2
    hess = d.T @ ((games * p * (1 - p))[:, None] * d) + ridge * np.eye(n_items)
    centre = np.eye(n_items) - 1.0 / n_items
    cov = np.linalg.pinv(hess) if ridge == 0 else np.linalg.inv(hess)
    return centre @ cov @ centre


def to_rating(theta):
    """Log-strength -> the Elo-like rating scale (average system 1000, 400 points = 10:1 odds)."""
    return RATING_BASE + RATING_SCALE * np.asarray(theta, dtype=float)


def mle_exists(n_items: int, matches: list[tuple[int, int, float]]) -> bool:
    """Zermelo/Ford condition: the graph "a scored against b" is strongly connected."""
    beat = defaultdict(set)
    for i, j, w in matches:
        if w > 0:
            beat[i].add(j)
        if w < 1:
            beat[j].add(i)
    back = defaultdict(set)
    for a, bs in beat.items():
        for b in bs:
            back[b].add(a)

    def reach(graph) -> set:
        seen, todo = {0}, [0]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen
    return len(reach(beat)) == n_items and len(reach(back)) == n_items


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


def results(campaign_id: str, ws: Workspace | None = None, store: Store | None = None,
            prior_sd: float = PRIOR_SD) -> dict:
    """Leaderboard (Bradley-Terry ratings with 95% intervals), win-rate matrix, votes, agreement.

    ``leaderboard``: one row per system, best first: ``rating`` (Elo-like scale, see the module
    docstring), ``ci_low``/``ci_high`` (95%, Laplace), ``strength`` (the centred log-strength),
    ``wins``/``losses``/``ties``/``both_bad`` and ``votes`` (every vote it was in). ``win_rate[a][b]``:
    the share of a-vs-b votes that a won, ties counting half (None when never compared), with the
    number of those votes in ``games[a][b]``. Systems with no vote yet get the prior's rating (1000)
    and its interval, so a campaign's leaderboard always lists all its systems."""
    ws, store = _ctx(ws, store)
    camp = _campaign(store, campaign_id)
    systems = loads(camp["systems"])
    votes = store.query("SELECT v.*, t.system_left, t.system_right, t.row_id FROM votes v JOIN rating_tasks t "
                        "ON t.id=v.task_id WHERE v.campaign_id=? ORDER BY v.id", (campaign_id,))
    matches = _matches(votes, systems)
    n = len(systems)
    votes_per_system = {s: sum(1 for v in votes if s in (v["system_left"], v["system_right"])) for s in systems}
    tally = {s: Counter() for s in systems}
    for v in votes:
        left, right = v["system_left"], v["system_right"]
        outcome = {"left": ("wins", "losses"), "right": ("losses", "wins"), "tie": ("ties", "ties"),
                   "both_bad": ("both_bad", "both_bad")}[v["choice"]]
        tally[left][outcome[0]] += 1
        tally[right][outcome[1]] += 1
    warnings = []
    if matches:
        i, j, w = (np.array(x) for x in zip(*matches))
        theta = fit_bradley_terry(n, i, j, w, prior_sd=prior_sd)
        sd = np.sqrt(np.clip(np.diag(posterior_cov(n, i, j, w, theta, prior_sd=prior_sd)), 0, None))
        if not mle_exists(n, matches):
            warnings.append("some system won (or lost) every comparison it was in, or some systems were never "
                            "compared: those ratings rest on the prior as much as on the votes, and their "
                            "intervals are wide for that reason; more votes will move them")
    else:
        theta = np.zeros(n)
        sd = np.full(n, (prior_sd * math.sqrt((n - 1) / n)) if not math.isinf(prior_sd) else math.inf)
    board = []
    for k, s in enumerate(systems):
        board.append({"system": s, "rating": float(to_rating(theta[k])),
                      "ci_low": float(to_rating(theta[k] - Z95 * sd[k])),
                      "ci_high": float(to_rating(theta[k] + Z95 * sd[k])), "strength": float(theta[k]),
                      **{key: tally[s][key] for key in ("wins", "losses", "ties", "both_bad")},
                      "votes": votes_per_system[s]})
    board.sort(key=lambda r: (-r["rating"], r["system"]))
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
        agreement["judge_vs_human"], agreement["judge_votes_compared"] = judge
    return {"campaign": campaign_id, "name": camp["name"], "systems": systems, "n_votes": len(votes),
            "n_raters": len(raters), "leaderboard": board, "votes_per_system": votes_per_system,
            "win_rate": win_rate, "games": {s: {t: games[s][t] for t in systems if t != s} for s in systems},
            "agreement": agreement, "warnings": warnings,
            "method": f"Bradley-Terry, ties = half a win each, both_bad left out; Gaussian prior on log-strengths "
                      f"(sd {prior_sd:g}); rating = 1000 + 400/ln10 x log-strength (400 points = 10:1 odds); "
                      f"95% intervals: Laplace approximation"}


def _judge_agreement(store: Store, camp: dict, votes: list[dict]) -> tuple[float, int] | None:
    """(share of human left/right/tie votes on judged (row, pair)s that match the judge's verdict, how many)."""
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
    return (same / total, total) if total else None


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
                       "t.system_left, t.system_right, t.prompt, t.reference, t.output_left, t.output_right, "
                       "COALESCE(r.name, v.rater) AS rater_name "
                       "FROM votes v JOIN rating_tasks t ON t.id=v.task_id LEFT JOIN raters r ON r.id=v.rater "
                       "WHERE v.campaign_id=? ORDER BY v.id", (campaign_id,))
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
              "output_left", "output_right", "created_at", "updated_at", "rater_name"]
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        w.writerow({k: csv_cell(r[k]) for k in fields})  # OWASP: no cell starts a formula
    return atomic_write_text(out_path, buf.getvalue())
