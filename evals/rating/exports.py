"""Votes out of a campaign, with the systems revealed: CSV (no cell can start a spreadsheet formula),
JSONL, or DPO pairs (TRL's prompt/chosen/rejected) for preference training."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from evals.rating.common import RatingError, campaign_row, ctx
from sft_core.db import ratings as rating_rows
from sft_core.safety import csv_cell
from sft_core.store import Store
from sft_core.workspace import Workspace, atomic_write_text

FIELDS = ("rater", "choice", "comment", "created_at", "updated_at", "task_id", "row_id", "system_left", "system_right",
          "prompt", "reference", "output_left", "output_right", "rater_name")  # a JSONL line's keys, in order
CSV_FIELDS = ["task_id", "row_id", "rater", "choice", "comment", "system_left", "system_right", "prompt", "reference",
              "output_left", "output_right", "created_at", "updated_at", "rater_name"]


def export_votes(campaign_id: str, fmt: str, out_path: str | Path, ws: Workspace,
                 store: Store | None = None) -> Path:
    """csv / jsonl: every vote with its systems revealed; dpo: TRL's prompt/chosen/rejected (ties, both_bad out)."""
    ws, store = ctx(ws, store)
    campaign_row(store, campaign_id)
    if fmt not in ("csv", "jsonl", "dpo"):
        raise RatingError(f"format must be csv, jsonl or dpo, got {fmt!r}", "format")
    rows = [{k: v[k] for k in FIELDS} for v in rating_rows.votes_with_tasks(store, campaign_id, texts=True)]
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
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for r in rows:
        w.writerow({k: csv_cell(r[k]) for k in CSV_FIELDS})  # OWASP: no cell starts a formula
    return atomic_write_text(out_path, buf.getvalue())
