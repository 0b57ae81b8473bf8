"""Votes out of a campaign, with the systems revealed: CSV (no cell can start a spreadsheet formula),
JSONL, or DPO pairs (TRL's prompt/chosen/rejected) for preference training."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from evals.rating.common import RatingError, campaign_row, ctx
from sft_core.safety import csv_cell
from sft_core.store import Store
from sft_core.workspace import Workspace, atomic_write_text


def export_votes(campaign_id: str, fmt: str, out_path: str | Path, ws: Workspace | None = None,
                 store: Store | None = None) -> Path:
    """csv / jsonl: every vote with its systems revealed; dpo: TRL's prompt/chosen/rejected (ties, both_bad out)."""
    ws, store = ctx(ws, store)
    campaign_row(store, campaign_id)
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
