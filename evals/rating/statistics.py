"""The numbers behind the human leaderboard: Bradley-Terry with a weak prior, its Laplace intervals,
and agreement between raters. Pure functions over arrays and label lists; no database.

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

import itertools
import math
from collections import Counter, defaultdict

import numpy as np

from evals.rating.common import RatingError

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
