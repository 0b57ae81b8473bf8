"""Blind pairwise human rating: campaigns, balanced task assignment, votes, Bradley-Terry, agreement, export.

A campaign is made from an eval run and a set of its systems; raters see two answers to one prompt,
left/right in a random recorded order, and vote without knowing which system wrote which. Results
stay hidden from raters until the admin publishes them (``publish``) or closes the campaign
(``close``); either also ends the rating, since a vote followed by a look at the counts would name
the system behind each side.

One module per concern; everything is importable from here, as ``from evals import rating``:

* ``campaigns``  create / list / get / publish / close a campaign, and its tasks
* ``raters``     who may vote: invite links, signed open-rating keys, Hugging Face accounts
* ``votes``      hand out a blind task, record / change / undo a vote, reveal after a vote
* ``assignment`` which task a rater gets next (a pure policy, tested without a database)
* ``statistics`` Bradley-Terry with a weak prior, Laplace intervals, Cohen's kappa, Krippendorff's alpha
* ``summary``    a campaign's results: leaderboard, win rates, agreement (also with the LLM judge)
* ``exports``    votes as CSV, JSONL or DPO pairs
"""
from __future__ import annotations

from evals.rating.campaigns import close, create_campaign, get_campaign, list_campaigns, publish, results_visible
from evals.rating.common import CHOICES, MAX_COMMENT, MAX_GUIDELINES, RatingError
from evals.rating.exports import export_votes
from evals.rating.raters import create_invites, hf_rater, invite_rater, open_key_rater, open_rater
from evals.rating.statistics import (PRIOR_SD, RATING_BASE, RATING_SCALE, Z95, cohen_kappa, fit_bradley_terry,
                                     krippendorff_alpha, mle_exists, posterior_cov, to_rating)
from evals.rating.summary import results
from evals.rating.votes import change_vote, last_vote, next_task, reveal, vote

__all__ = ["CHOICES", "MAX_COMMENT", "MAX_GUIDELINES", "PRIOR_SD", "RATING_BASE", "RATING_SCALE", "Z95",
           "RatingError", "change_vote", "close", "cohen_kappa", "create_campaign", "create_invites", "export_votes",
           "fit_bradley_terry", "get_campaign", "hf_rater", "invite_rater", "krippendorff_alpha", "last_vote",
           "list_campaigns", "mle_exists", "next_task", "open_key_rater", "open_rater", "posterior_cov", "publish",
           "results", "results_visible", "reveal", "to_rating", "vote"]
