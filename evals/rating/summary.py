"""A campaign's results: the Bradley-Terry leaderboard with 95% intervals, the win-rate matrix, and
agreement between raters and with the LLM judge (the statistics are ``evals.rating.statistics``;
``evals.leaderboard`` words and rounds them for people)."""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from evals.rating.common import campaign_row, ctx
from evals.rating.statistics import (PRIOR_SD, Z95, cohen_kappa, fit_bradley_terry, krippendorff_alpha, mle_exists,
                                     posterior_cov, to_rating)
from sft_core.db import evals as eval_rows, ratings as rating_rows
from sft_core.store import Store, loads
from sft_core.workspace import Workspace, read_jsonl

OUTCOME = {"left": ("wins", "losses"), "right": ("losses", "wins"), "tie": ("ties", "ties"),
           "both_bad": ("both_bad", "both_bad")}  # a vote's tally for (left system, right system)
NOT_IDENTIFIED = ("some system won (or lost) every comparison it was in, or some systems were never compared: "
                  "those ratings rest on the prior as much as on the votes, and their intervals are wide for "
                  "that reason; more votes will move them")


def results(campaign_id: str, ws: Workspace, store: Store | None = None,
            prior_sd: float = PRIOR_SD) -> dict:
    """Leaderboard (Bradley-Terry ratings with 95% intervals), win-rate matrix, votes, agreement.

    ``leaderboard``: one row per system, best first: ``rating`` (Elo-like scale, see
    ``evals.rating.statistics``), ``ci_low``/``ci_high`` (95%, Laplace), ``strength`` (the centred
    log-strength), ``wins``/``losses``/``ties``/``both_bad`` and ``votes`` (every vote it was in).
    ``win_rate[a][b]``: the share of a-vs-b votes that a won, ties counting half (None when never
    compared), with the number of those votes in ``games[a][b]``. Systems with no vote yet get the
    prior's rating (1000) and its interval, so a campaign's leaderboard always lists all its systems."""
    ws, store = ctx(ws, store)
    camp = campaign_row(store, campaign_id)
    systems = loads(camp["systems"])
    votes = rating_rows.votes_with_tasks(store, campaign_id)
    matches = _matches(votes, systems)
    votes_per_system = {s: sum(1 for v in votes if s in (v["system_left"], v["system_right"])) for s in systems}
    board, warnings = _leaderboard(systems, votes, votes_per_system, matches, prior_sd)
    win_rate, games = _win_rates(systems, matches)
    agreement = _rater_agreement(votes)
    judge = _judge_agreement(store, camp, votes)
    if judge is not None:
        agreement["judge_vs_human"], agreement["judge_votes_compared"] = judge
    return {"campaign": campaign_id, "name": camp["name"], "systems": systems, "n_votes": len(votes),
            "n_raters": len({v["rater"] for v in votes}), "leaderboard": board,
            "votes_per_system": votes_per_system,
            "win_rate": win_rate, "games": games, "agreement": agreement, "warnings": warnings,
            "method": f"Bradley-Terry, ties = half a win each, both_bad left out; Gaussian prior on log-strengths "
                      f"(sd {prior_sd:g}); rating = 1000 + 400/ln10 x log-strength (400 points = 10:1 odds); "
                      f"95% intervals: Laplace approximation"}


def _matches(votes: list[dict], systems: list[str]) -> list[tuple[int, int, float]]:
    """(left index, right index, left's score) per vote with a preference (both_bad has none)."""
    idx = {s: i for i, s in enumerate(systems)}
    out = []
    for v in votes:
        if v["choice"] == "both_bad":
            continue
        w = {"left": 1.0, "right": 0.0, "tie": 0.5}[v["choice"]]
        out.append((idx[v["system_left"]], idx[v["system_right"]], w))
    return out


def _leaderboard(systems: list[str], votes: list[dict], votes_per_system: dict[str, int],
                 matches: list[tuple[int, int, float]], prior_sd: float) -> tuple[list[dict], list[str]]:
    """(one row per system, best first; warnings about the fit)."""
    n = len(systems)
    warnings = []
    if matches:
        i, j, w = (np.array(x) for x in zip(*matches))
        theta = fit_bradley_terry(n, i, j, w, prior_sd=prior_sd)
        sd = np.sqrt(np.clip(np.diag(posterior_cov(n, i, j, w, theta, prior_sd=prior_sd)), 0, None))
        if not mle_exists(n, matches):
            warnings.append(NOT_IDENTIFIED)
    else:
        theta = np.zeros(n)
        sd = np.full(n, (prior_sd * math.sqrt((n - 1) / n)) if not math.isinf(prior_sd) else math.inf)
    tally = {s: Counter() for s in systems}
    for v in votes:
        outcome = OUTCOME[v["choice"]]
        tally[v["system_left"]][outcome[0]] += 1
        tally[v["system_right"]][outcome[1]] += 1
    board = []
    for k, s in enumerate(systems):
        board.append({"system": s, "rating": float(to_rating(theta[k])),
                      "ci_low": float(to_rating(theta[k] - Z95 * sd[k])),
                      "ci_high": float(to_rating(theta[k] + Z95 * sd[k])), "strength": float(theta[k]),
                      **{key: tally[s][key] for key in ("wins", "losses", "ties", "both_bad")},
                      "votes": votes_per_system[s]})
    board.sort(key=lambda r: (-r["rating"], r["system"]))
    return board, warnings


def _win_rates(systems: list[str], matches: list[tuple[int, int, float]]) -> tuple[dict, dict]:
    """(win_rate[a][b]: a's share of a-vs-b votes, ties half, None if never compared; games[a][b])."""
    wins = defaultdict(lambda: defaultdict(float))
    games = defaultdict(lambda: defaultdict(int))
    for a, b, w in matches:
        sa, sb = systems[a], systems[b]
        wins[sa][sb] += w
        wins[sb][sa] += 1 - w
        games[sa][sb] += 1
        games[sb][sa] += 1
    win_rate = {s: {t: (wins[s][t] / games[s][t] if games[s][t] else None) for t in systems if t != s} for s in systems}
    return win_rate, {s: {t: games[s][t] for t in systems if t != s} for s in systems}


def _rater_agreement(votes: list[dict]) -> dict:
    """Agreement on tasks rated by several people: Cohen's kappa (exactly two raters), Krippendorff's alpha."""
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
    return agreement


def _judge_agreement(store: Store, camp: dict, votes: list[dict]) -> tuple[float, int] | None:
    """(share of human left/right/tie votes on judged (row, pair)s that match the judge's verdict, how many)."""
    ev = eval_rows.get(store, camp["eval_id"])
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
