"""Judge calibration: does the LLM judge agree with blind human votes on the same pairs?

For a rating campaign whose eval was also judged (``judge.jsonl``), per judge (model and prompt):

* **accuracy on decisive votes**: among the human ``left`` / ``right`` votes on pairs the judge saw, the
  share where the judge's verdict names the same system. A judge tie or an ``inconsistent`` verdict (it
  flipped with the order) counts as a miss: the question is whether the judge can stand in for the
  raters. Beside it: how many of those votes the judge was decisive on, and its accuracy there.
* **Cohen's kappa** (``sklearn.metrics.cohen_kappa_score``) over every comparable vote (``left``, ``right``,
  ``tie``; ``both_bad`` has no counterpart in a pairwise verdict and is left out), with labels in the
  left/right frame the rater saw, which is randomised per task so neither label is favoured; a judge's
  ``inconsistent`` counts as ``tie`` (no stable preference).
* **95% CIs**: percentile bootstrap over tasks (the votes of several raters on one task move together, so
  the task is the unit), seeded; every resample is computed at once from per-task confusion counts.

The judge's identity is the eval's judge setting (``local:<base model>`` or ``<model> @ <endpoint>``) and
the prompt a hash of the pairwise template, unless a verdict line names its own ``judge`` / ``prompt_id``
(several judges in one file are then kept apart).
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from sft_core.db import evals as eval_rows, ratings as rating_rows
from sft_core.store import Store, loads, open_store
from sft_core.workspace import Workspace, read_jsonl, sha256_bytes

LABELS = ("left", "right", "tie")
METHOD = ("accuracy = share of decisive human votes (left/right) whose system the judge also chose (judge tie or "
          "inconsistent = miss); Cohen's kappa over left/right/tie votes in the rater's frame (judge inconsistent = "
          "tie, both_bad left out); 95% percentile bootstrap CIs over tasks")


def _prompt_id() -> str:
    from evals.judge import PAIRWISE
    return sha256_bytes(PAIRWISE.encode())[:8]


def kappa_from_confusion(conf: np.ndarray) -> np.ndarray:
    """Cohen's kappa of (..., 3, 3) confusion counts (rows: human, columns: judge); nan where undefined."""
    n = conf.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        po = np.trace(conf, axis1=-2, axis2=-1) / n
        pe = (conf.sum(axis=-1) * conf.sum(axis=-2)).sum(axis=-1) / n ** 2
        return np.where(pe < 1, (po - pe) / (1 - pe), np.nan)


def _one_judge(items: list[tuple[str, str, str]], n_boot: int, seed: int) -> dict:
    """items: (task id, human label, judge label) -> the agreement numbers with CIs."""
    from sklearn.metrics import cohen_kappa_score
    tasks = sorted({t for t, _, _ in items})
    index = {t: k for k, t in enumerate(tasks)}
    conf = np.zeros((len(tasks), 3, 3))
    for t, h, j in items:
        conf[index[t], LABELS.index(h), LABELS.index(j)] += 1
    decisive = conf[:, :2, :].sum(axis=(1, 2))            # human left/right votes per task
    correct = conf[:, 0, 0] + conf[:, 1, 1]                # ... the judge chose the same side
    judged_decisive = conf[:, :2, :2].sum(axis=(1, 2))     # ... and the judge was decisive too
    human = [h for _, h, _ in items]
    judge = [j for _, _, j in items]
    kappa = float(cohen_kappa_score(human, judge, labels=list(LABELS))) if len(set(human) | set(judge)) > 1 else None
    out = {"n_votes": len(items), "n_tasks": len(tasks), "n_decisive": int(decisive.sum()),
           "n_judge_decisive": int(judged_decisive.sum()),
           "accuracy": float(correct.sum() / decisive.sum()) if decisive.sum() else None,
           "accuracy_when_judge_decisive": (float(correct.sum() / judged_decisive.sum())
                                            if judged_decisive.sum() else None),
           "kappa": None if kappa is None or np.isnan(kappa) else kappa, "accuracy_ci": None, "kappa_ci": None}
    draws = np.random.default_rng(seed).multinomial(len(tasks), np.full(len(tasks), 1 / len(tasks)), size=n_boot)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = (draws @ correct) / (draws @ decisive)
    kap = kappa_from_confusion(np.einsum("bt,tij->bij", draws, conf))
    for key, vals in (("accuracy_ci", acc), ("kappa_ci", kap)):
        vals = vals[np.isfinite(vals)]
        if out[key.removesuffix("_ci")] is not None and len(vals):
            out[key] = [float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))]
    return out


def judge_calibration(campaign_id: str, ws: Workspace, store: Store | None = None,
                      n_boot: int = 1000, seed: int = 0) -> dict | None:
    """Judge-vs-human agreement per judge for a campaign; None when no judged pair was voted on."""
    from evals import rating
    from sft_core.preference import judge_identity
    store = store or open_store(ws.db_url)
    camp = rating.get_campaign(campaign_id, ws=ws, store=store)
    if n_boot < 1:
        raise rating.RatingError(f"n_boot must be at least 1, got {n_boot}", "n_boot")
    ev = eval_rows.get(store, camp["eval_id"])
    if ev is None:
        return None
    verdicts = [j for j in read_jsonl(Path(ev["path"]) / "judge.jsonl") if "winner" in j]
    if not verdicts:
        return None
    default_judge, default_prompt = judge_identity(loads(ev["config"], {}) or {}), _prompt_id()
    by_pair: dict[tuple, dict[tuple, dict]] = defaultdict(dict)
    for j in verdicts:
        who = (j.get("judge") or default_judge, j.get("prompt_id") or default_prompt)
        by_pair[(j["row_id"], frozenset((j["system_a"], j["system_b"])))][who] = j
    votes = [v for v in rating_rows.votes_with_tasks(store, campaign_id) if v["choice"] != "both_bad"]
    items: dict[tuple, list] = defaultdict(list)
    for v in votes:
        for who, j in by_pair.get((v["row_id"], frozenset((v["system_left"], v["system_right"]))), {}).items():
            winner = {"a": j["system_a"], "b": j["system_b"]}.get(j["winner"])
            label = "left" if winner == v["system_left"] else "right" if winner == v["system_right"] else "tie"
            items[who].append((v["task_id"], v["choice"], label))
    if not items:
        return None
    judges = [{"judge": who[0], "prompt": who[1], **_one_judge(rows, n_boot, seed)}
              for who, rows in sorted(items.items())]
    return {"campaign": campaign_id, "campaign_name": camp["name"], "eval": camp["eval_id"], "judges": judges,
            "method": METHOD + f" ({n_boot} resamples)"}


def calibration_for_eval(eval_id: str, ws: Workspace, store: Store | None = None,
                         n_boot: int = 1000) -> list[dict]:
    """The calibration of every campaign on this eval that has judged, voted pairs (for the eval report)."""
    store = store or open_store(ws.db_url)  # opening it brings an older database's tables up to date
    out = []
    for cid in rating_rows.campaign_ids(store, eval_id):
        cal = judge_calibration(cid, ws, store, n_boot=n_boot)
        if cal:
            out.append(cal)
    return out


def _fmt(v, ci) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def format_markdown(cal: dict) -> list[str]:
    """Markdown lines: one row per judge (the eval report and the CLI)."""
    lines = [f"Judge vs human votes, campaign {cal['campaign']} ({cal['campaign_name']}):", "",
             "| judge | prompt | decisive votes | accuracy [95% CI] | judge decisive | accuracy when decisive | "
             "Cohen's κ [95% CI] | votes (with ties) |", "|---|---|---|---|---|---|---|---|"]
    for j in cal["judges"]:
        lines.append(f"| {j['judge']} | {j['prompt']} | {j['n_decisive']} | {_fmt(j['accuracy'], j['accuracy_ci'])} | "
                     f"{j['n_judge_decisive']} | {_fmt(j['accuracy_when_judge_decisive'], None)} | "
                     f"{_fmt(j['kappa'], j['kappa_ci'])} | {j['n_votes']} |")
    return lines + ["", f"Method: {cal['method']}.", ""]
