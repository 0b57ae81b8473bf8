"""The human leaderboard as people read it (the Results tab, ``sft-studio rate results``).

``evals.rating.results`` computes; this module words and rounds: one rating scale with its 95%
interval, rounded to what the interval supports; the win-rate matrix as *row beats column* with the
number of votes behind each cell; rater agreement in plain words; the method in one paragraph.
"""
from __future__ import annotations

import math

from evals.rating.statistics import PRIOR_SD, RATING_SCALE
from evals.report import short_names

METHOD_HELP = f"""**How the ratings are computed.** Each vote is a comparison of two answers; a tie counts as half a
win for each side and "both bad" is left out. The ratings come from a Bradley-Terry model, where the
chance that A beats B depends only on the rating gap: 400 points = 10:1 odds, 200 points = 3:1,
0 = even. The average system is at 1000.

A dozen votes often leave one system unbeaten, and a plain fit would then put it infinitely far
ahead. So every system starts with a weak prior: its log-strength is normal with mean 0 and
sd {PRIOR_SD:g} (±{RATING_SCALE * PRIOR_SD:.0f} points). That is worth about four tied games against an
average system: it matters for a handful of votes and fades after a few dozen. Twelve straight wins
of A over B then put A about 390 points ahead (a 91% win chance), with an interval that says how
little twelve votes can tell.

**95% interval**: the Laplace approximation of the posterior (its curvature at the best fit). Two
systems whose intervals do not overlap differ clearly; overlapping ones may still differ, so collect
more votes before you decide."""

KAPPA_WORDS = ((0.0, "worse than chance"), (0.2, "slight"), (0.4, "fair"), (0.6, "moderate"), (0.8, "substantial"),
               (math.inf, "almost perfect"))  # Landis & Koch (1977)


def _round_to_interval(x: float, half_width: float) -> float:
    """Round to two significant digits of the interval's half-width, never finer than 1 point."""
    if not math.isfinite(half_width) or half_width <= 0:
        return float(round(x))
    step = max(1.0, 10 ** (math.floor(math.log10(half_width)) - 1))
    return round(x / step) * step


def _points(x: float) -> str:
    return f"{x:.0f}"


BAR_WIDTH = 25


def interval_bar(low: float, mid: float, high: float, lo_all: float, hi_all: float, width: int = BAR_WIDTH) -> str:
    """A text drawing of one interval on the common scale [lo_all, hi_all]: ├──●──┤ (blank elsewhere)."""
    span = max(hi_all - lo_all, 1e-9)

    def col(x: float) -> int:
        return min(width - 1, max(0, round((x - lo_all) / span * (width - 1))))
    a, m, b = col(low), col(mid), col(high)
    cells = [" "] * width
    for k in range(a, b + 1):
        cells[k] = "─"
    cells[a], cells[b] = "├", "┤"
    cells[m] = "●"
    return "".join(cells).replace(" ", "\u2007")  # figure spaces: blanks as wide as the drawing characters


def board_table(res: dict) -> tuple[list[str], list[list]]:
    """(columns, rows) of the leaderboard, best first: system (short name), rating, 95% interval (as
    numbers and as a bar on a scale common to all rows), won-lost-tied, votes. The first system is
    marked ★ when its interval clears everyone else's."""
    board = res.get("leaderboard") or []
    names = short_names(res.get("systems") or [r["system"] for r in board])
    cols = ["system", "rating", "95% interval", "interval", "won–lost–tied", "votes"]
    lo_all = min((r["ci_low"] for r in board), default=0.0)
    hi_all = max((r["ci_high"] for r in board), default=1.0)
    rows = []
    for k, r in enumerate(board):
        half = (r["ci_high"] - r["ci_low"]) / 2
        clear = k == 0 and len(board) > 1 and all(r["ci_low"] > o["ci_high"] for o in board[1:])
        rows.append([("★ " if clear else "") + names[r["system"]], _points(_round_to_interval(r["rating"], half)),
                     f"{_points(_round_to_interval(r['ci_low'], half))} – {_points(_round_to_interval(r['ci_high'], half))}",
                     interval_bar(r["ci_low"], r["rating"], r["ci_high"], lo_all, hi_all),
                     f"{r['wins']}–{r['losses']}–{r['ties']}", r["votes"]])
    return cols, rows


def win_rate_table(res: dict) -> tuple[list[str], list[list]]:
    """(columns, rows): the cell in row A, column B is the share of A-vs-B votes that A won (ties
    half), with the number of votes; the first column names the row's system."""
    systems = res.get("systems") or []
    if not systems:
        return ["row beats column"], []
    names = short_names(systems)
    games = res.get("games") or {}
    rows = []
    for s in systems:
        row = [names[s]]
        for t in systems:
            rate = None if s == t else res["win_rate"][s][t]
            n = games.get(s, {}).get(t, 0)
            row.append("—" if s == t else "no votes" if rate is None else f"{rate:.0%} of {n}")
        rows.append(row)
    return ["row beats column"] + [names[t] for t in systems], rows


def _kappa_words(k: float) -> str:
    return next(w for bound, w in KAPPA_WORDS if k <= bound)


def agreement_text(res: dict) -> str:
    """Agreement between raters (and with the LLM judge) in one or two plain sentences."""
    agree = res.get("agreement") or {}
    n_raters, overlap = res.get("n_raters", 0), agree.get("tasks_with_several_raters", 0)
    if n_raters == 0:
        out = "No votes yet."
    elif n_raters == 1:
        out = "One rater so far: agreement needs two raters on the same task."
    elif overlap == 0:
        out = f"{n_raters} raters overlapped on 0 tasks: agreement not measurable yet."
    else:
        stat = agree.get("cohen_kappa")
        name = "Cohen's κ"
        if stat is None or n_raters > 2:
            stat, name = agree.get("krippendorff_alpha"), "Krippendorff's α"
        tasks = "task" if overlap == 1 else "tasks"
        if stat is None or not math.isfinite(stat):
            out = f"{n_raters} raters overlapped on {overlap} {tasks}: agreement not measurable yet."
        else:
            out = (f"{n_raters} raters overlapped on {overlap} {tasks}: {name} = {stat:.2f} "
                   f"({_kappa_words(stat)} agreement" + (", from few tasks" if overlap < 10 else "") + ").")
    if agree.get("judge_vs_human") is not None:
        n = agree.get("judge_votes_compared")
        out += (f" The LLM judge picked the same answer as the raters in {agree['judge_vs_human']:.0%} of the "
                f"{n} votes it also judged." if n else "")
    return out


def summary_markdown(res: dict) -> str:
    """The line above the tables: votes, raters, agreement, and any warning."""
    n_votes, n_raters = res.get("n_votes", 0), res.get("n_raters", 0)
    lines = [f"**{n_votes} votes** from {n_raters} rater{'s' if n_raters != 1 else ''} · "
             f"{len(res.get('systems') or [])} systems.  \n" + agreement_text(res)]
    lines += [f"⚠️ {w}" for w in res.get("warnings") or []]
    return "\n\n".join(lines)
