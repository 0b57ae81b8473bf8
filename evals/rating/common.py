"""What every part of the rating package shares: its error, the vote choices and limits, the
workspace/store pair, the campaign lookup and the input checks."""
from __future__ import annotations

from sft_core import StudioError
from sft_core.db import ratings as rating_rows
from sft_core.store import Store, open_store
from sft_core.workspace import Workspace

CHOICES = ("left", "right", "tie", "both_bad")
MAX_COMMENT = 2000
MAX_GUIDELINES = 4000


class RatingError(StudioError):
    pass


def ctx(ws: Workspace, store: Store | None) -> tuple[Workspace, Store]:
    return ws, store or open_store(ws.db_url)  # opening the store brings an older database's tables up to date


def campaign_row(store: Store, campaign_id: str) -> dict:
    c = rating_rows.get_campaign(store, campaign_id)
    if c is None:
        raise RatingError(f"unknown campaign {campaign_id!r}", "campaign")
    return c


def check_rating_open(camp: dict) -> None:
    if camp["published_at"] is not None:
        raise RatingError(f"the results of campaign {camp['id']} are published, so its rating is over", "campaign")
    if camp["closed_at"] is not None:
        raise RatingError(f"campaign {camp['id']} is closed", "campaign")


def check_rater(rater: str) -> str:
    rater = (rater or "").strip()
    if not rater:
        raise RatingError("enter a rater name", "rater")
    if len(rater) > 100 or any(ord(c) < 32 for c in rater):
        raise RatingError("rater names are up to 100 printable characters", "rater")
    return rater


def check_vote(choice: str, comment: str | None) -> str:
    if choice not in CHOICES:
        raise RatingError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}", "choice")
    comment = comment or ""
    if len(comment) > MAX_COMMENT:
        raise RatingError(f"comment is {len(comment)} characters; the limit is {MAX_COMMENT}", "comment")
    return comment
