"""LLM-as-judge over any OpenAI-compatible endpoint, or the local engine.

* Pairwise: the judge sees the question, the reference and answers A and B, in both orders
  (position swap). Consistent verdicts count; a verdict that flips with the order is recorded as
  ``inconsistent``, and ties as ``tie`` — nothing is dropped.
* Rubric: a 1-5 score for one answer against the reference.
"""
from __future__ import annotations

import itertools
import re
from pathlib import Path

from sft_core.config import DecodingConfig
from sft_core.store import Store, loads, open_store
from sft_core.workspace import Workspace, read_jsonl, write_jsonl

PAIRWISE = ("You are judging two answers to a question. Use the reference answer as the ground truth.\n\n"
            "Question: {q}\n\nReference answer: {ref}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
            "Which answer is more correct and helpful? Reply with exactly one letter: A, B, or T for a tie.")
RUBRIC = ("Score the answer from 1 (wrong) to 5 (fully correct and concise) against the reference.\n\n"
          "Question: {q}\n\nReference answer: {ref}\n\nAnswer: {a}\n\nReply with one digit, 1-5.")


def parse_choice(text: str) -> str | None:
    m = re.search(r"\b(A|B|T|tie)\b", text.strip(), re.IGNORECASE)
    if not m:
        return None
    c = m.group(1).upper()
    return "tie" if c in ("T", "TIE") else c.lower()


def parse_score(text: str) -> int | None:
    m = re.search(r"[1-5]", text)
    return int(m.group()) if m else None


class Judge:
    """Asks a model; ``url`` (OpenAI-compatible) or a local engine."""

    def __init__(self, engine=None, url: str | None = None, model: str | None = None, api_key: str | None = None):
        self.engine, self.url, self.model, self.api_key = engine, url, model, api_key

    def ask(self, prompts: list[str]) -> list[str]:
        decoding = DecodingConfig(temperature=0.0, max_new_tokens=4)
        msgs = [[{"role": "user", "content": p}] for p in prompts]
        if self.url:
            from openai import OpenAI
            client = OpenAI(base_url=self.url, api_key=self.api_key or "none", timeout=120)
            return [client.chat.completions.create(model=self.model or "default", messages=m, temperature=0,
                                                   max_tokens=4).choices[0].message.content or "" for m in msgs]
        from sft_core.serving.base import GenRequest
        return [r.text for r in self.engine.generate_batch([GenRequest(m, None, decoding) for m in msgs])]

    def pairwise(self, q: str, ref: str, a: str, b: str) -> dict:
        first, second = self.ask([PAIRWISE.format(q=q, ref=ref, a=a, b=b), PAIRWISE.format(q=q, ref=ref, a=b, b=a)])
        c1, c2 = parse_choice(first), parse_choice(second)
        swapped = {"a": "b", "b": "a", "tie": "tie", None: None}[c2]
        if c1 is None or swapped is None:
            winner = "inconsistent"
        elif c1 == swapped:
            winner = c1
        else:
            winner = "inconsistent"
        return {"winner": winner, "raw": [first, second]}

    def rubric(self, q: str, ref: str, a: str) -> int | None:
        return parse_score(self.ask([RUBRIC.format(q=q, ref=ref, a=a)])[0])


def judge_eval(eval_id: str, engine=None, url: str | None = None, model: str | None = None,
               ws: Workspace | None = None, store: Store | None = None, limit: int = 50) -> Path:
    """Pairwise judgements for every pair of systems on the domain rows -> judge.jsonl."""
    ws = ws or Workspace.from_env()
    store = store or open_store(ws.db_url)
    row = store.query_one("SELECT * FROM evals WHERE id=?", (eval_id,))
    path, cfg = Path(row["path"]), loads(row["config"])
    outputs = [o for o in read_jsonl(path / "outputs.jsonl") if o["set"] == "domain"]
    by_row: dict[str, dict] = {}
    for o in outputs:
        by_row.setdefault(o["row_id"], {})[o["system"]] = o
    judge = Judge(engine=engine, url=url, model=model)
    out = []
    for rid, answers in list(by_row.items())[:limit]:
        for sa, sb in itertools.combinations([s for s in cfg["systems"] if s in answers], 2):
            a, b = answers[sa], answers[sb]
            verdict = judge.pairwise(a["instruction"], a["reference"], a["output"], b["output"])
            out.append({"row_id": rid, "system_a": sa, "system_b": sb, **verdict})
    return write_jsonl(path / "judge.jsonl", out)
