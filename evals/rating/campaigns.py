"""Campaigns: made from an eval run and a set of its systems, listed, published and closed.

A *task* is one test row with two systems' outputs in a random, recorded left/right order; a
campaign holds a task for every domain row and every pair of its systems."""
from __future__ import annotations

import itertools
import random
import uuid
from collections import defaultdict
from pathlib import Path

from evals.rating.common import MAX_GUIDELINES, RatingError, campaign_row, ctx
from sft_core.db import evals as eval_rows, ratings as rating_rows
from sft_core.store import Store, loads
from sft_core.workspace import Workspace, read_jsonl


def create_campaign(eval_id: str, systems: list[str] | None = None, *, ws: Workspace,
                    store: Store | None = None, name: str | None = None, show_reference: bool = True,
                    seed: int | None = None, open_rating: bool = False, guidelines: str = "",
                    reveal_after_vote: bool = False) -> str:
    """Tasks for every domain row and every pair of the chosen systems, left/right drawn at random.

    The order is recorded per task. ``seed=None`` (the default) draws it from the OS so nobody can
    replay the draw from the code; pass an int only for reproducible tests. ``open_rating``: anyone
    may join under a self-chosen name (trusted rooms); otherwise raters need an invite.
    ``guidelines``: what raters read before they vote (Markdown, up to MAX_GUIDELINES characters).
    ``reveal_after_vote``: a rater learns which systems were A and B on each task they have voted on."""
    ws, store = ctx(ws, store)
    name = (name or "").strip()
    if len(name) > 200 or any(ord(c) < 32 for c in name):
        raise RatingError("campaign names are up to 200 printable characters", "name")
    guidelines = (guidelines or "").strip()
    if len(guidelines) > MAX_GUIDELINES:
        raise RatingError(f"guidelines are {len(guidelines)} characters; the limit is {MAX_GUIDELINES}", "guidelines")
    ev = eval_rows.get(store, eval_id)
    if ev is None:
        raise RatingError(f"unknown eval {eval_id!r}", "eval")
    systems = _check_systems(eval_id, loads(ev["systems"]), systems)
    rng = random.SystemRandom() if seed is None else random.Random(seed)
    cid = f"camp-{uuid.uuid4().hex[:8]}"
    tasks = _draw_tasks(cid, Path(ev["path"]), systems, rng)
    if not tasks:
        raise RatingError(f"eval {eval_id} has no rows answered by all of {', '.join(systems)}", "eval")
    rating_rows.add_campaign(store, cid, eval_id, systems, name or f"{eval_id}: {' vs '.join(systems)}",
                             show_reference=show_reference, open_rating=open_rating, guidelines=guidelines,
                             reveal_after_vote=reveal_after_vote, tasks=tasks)  # one transaction
    return cid


def _check_systems(eval_id: str, have: list[str], systems: list[str] | None) -> list[str]:
    """The chosen systems (all of the eval's by default): known, listed once, at least two."""
    systems = list(systems or have)
    unknown = [s for s in systems if s not in have]
    if unknown:
        raise RatingError(f"system(s) {', '.join(unknown)} are not in eval {eval_id} (it has {', '.join(have)})", "systems")
    if len(set(systems)) != len(systems):
        raise RatingError(f"systems are listed twice: {', '.join(systems)}", "systems")
    if len(systems) < 2:
        raise RatingError("a campaign compares at least two systems", "systems")
    return systems


def _draw_tasks(cid: str, eval_dir: Path, systems: list[str], rng: random.Random) -> list[dict]:
    """rating_tasks rows of campaign ``cid``: each domain row answered by both systems of a pair, sides
    drawn from ``rng``."""
    outputs = [o for o in read_jsonl(eval_dir / "outputs.jsonl") if o.get("set", "domain") == "domain"]
    by_row: dict[str, dict] = defaultdict(dict)
    for o in outputs:
        by_row[o["row_id"]][o["system"]] = o
    tasks = []
    for rid in sorted(by_row):
        answers = by_row[rid]
        for a, b in itertools.combinations(systems, 2):
            if a not in answers or b not in answers:
                continue
            left, right = (a, b) if rng.random() < 0.5 else (b, a)
            o = answers[a]
            prompt = o["instruction"] + (f"\n\nContext:\n{o['context']}" if o.get("context") else "")
            tasks.append({"id": uuid.uuid4().hex, "campaign_id": cid, "row_id": rid, "system_left": left,
                          "system_right": right, "prompt": prompt, "reference": o.get("reference"),
                          "output_left": answers[left]["output"], "output_right": answers[right]["output"]})
    return tasks


def list_campaigns(ws: Workspace, store: Store | None = None) -> list[dict]:
    ws, store = ctx(ws, store)
    return rating_rows.list_campaigns(store)


def get_campaign(campaign_id: str, ws: Workspace, store: Store | None = None) -> dict:
    ws, store = ctx(ws, store)
    return campaign_row(store, campaign_id)


def results_visible(campaign_id: str, ws: Workspace, store: Store | None = None) -> bool:
    """Raters see results only once the admin published them or closed the campaign."""
    camp = get_campaign(campaign_id, ws=ws, store=store)
    return camp["published_at"] is not None or camp["closed_at"] is not None


def publish(campaign_id: str, ws: Workspace, store: Store | None = None) -> dict:
    """Show the results to everyone. Rating ends too: with results on view, a rater who votes and
    then reads the counts would learn which system is on which side."""
    ws, store = ctx(ws, store)
    campaign_row(store, campaign_id)
    rating_rows.publish(store, campaign_id)
    return campaign_row(store, campaign_id)


def close(campaign_id: str, ws: Workspace, store: Store | None = None) -> dict:
    """End the rating: no new tasks or votes; the results become visible to raters."""
    ws, store = ctx(ws, store)
    campaign_row(store, campaign_id)
    rating_rows.close(store, campaign_id)
    return campaign_row(store, campaign_id)
