"""LLM-as-judge over any OpenAI-compatible endpoint, or the local engine.

* Pairwise: the judge sees the question, the reference and answers A and B, in both orders
  (position swap). Consistent verdicts count; a verdict that flips with the order (or that cannot
  be parsed) is recorded as ``inconsistent``, and ties as ``tie`` — nothing is dropped.
* Rubric: a 1-5 score for each (row, system) answer against the reference (``None`` when the
  judge's reply has no digit 1-5; counted as ``unparsed``, never as a score).

Where the judge runs (``cfg["judge"]`` of an eval, ``sft-studio eval --judge [ENDPOINT]``):
``"local"`` = the serving engine on the eval's base model (started if the eval has none, e.g. when
every system is ``openai:*``); a URL = any OpenAI-compatible endpoint, model ``--judge-model`` (default:
the first one its ``/models`` lists), key from ``SFT_STUDIO_JUDGE_API_KEY`` or ``OPENAI_API_KEY``.

Output, beside the eval's outputs:

    judge.jsonl         {"row_id","system_a","system_b","winner":"a"|"b"|"tie"|"inconsistent","raw":[first,second]}
    judge_rubric.jsonl  {"row_id","system","score":1-5|null,"raw"}
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sft_core import StudioError
from sft_core.config import DecodingConfig
from sft_core.db import evals as eval_rows
from sft_core.store import Store, loads, open_store
from sft_core.workspace import Workspace, atomic_write_json, read_jsonl, write_jsonl

PAIRWISE = ("You are judging two answers to a question. Use the reference answer as the ground truth.\n\n"
            "Question: {q}\n\nReference answer: {ref}\n\nAnswer A: {a}\n\nAnswer B: {b}\n\n"
            "Which answer is more correct and helpful? Reply with exactly one letter: A, B, or T for a tie.")
RUBRIC = ("Score the answer from 1 (wrong) to 5 (fully correct and concise) against the reference.\n\n"
          "Question: {q}\n\nReference answer: {ref}\n\nAnswer: {a}\n\nReply with one digit, 1-5.")
RUBRIC_FILE = "judge_rubric.jsonl"
MAX_TOKENS = 8
URL_WORKERS = 4     # concurrent requests to an external judge endpoint


class JudgeError(StudioError):
    pass


def judge_api_key() -> str:
    return os.environ.get("SFT_STUDIO_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY") or "none"


def judge_target(judge) -> str | None:
    """Normalise an eval's judge setting: None (no judge), ``"local"`` or an endpoint URL."""
    if judge in (None, False, "", "none"):
        return None
    if judge is True or judge == "local":
        return "local"
    if isinstance(judge, str) and re.match(r"^https?://[^\s/]+", judge):
        return judge.rstrip("/")
    raise JudgeError(f"--judge takes an OpenAI-compatible endpoint URL (http://host:port/v1), or nothing for the "
                     f"local engine; got {judge!r}", "judge")


def check_endpoint_for_judge(url: str) -> list[str]:
    """Pre-flight ``GET {url}/models`` for a judge endpoint (a clear error before anything is stored)."""
    from evals.systems import check_endpoint
    return check_endpoint(url, judge_api_key(), "the judge")


def parse_choice(text: str) -> str | None:
    """'a' | 'b' | 'tie' | None. A bare reply ("A", "b.", "Tie") first; else a capital A/B/T standing
    alone in the text ("Answer B is better"), so the article "a" is not read as a vote."""
    t = (text or "").strip()
    bare = re.fullmatch(r"[\s\W]*(a|b|t|tie)[\s\W]*", t, re.IGNORECASE)
    if bare:
        c = bare.group(1).lower()
        return "tie" if c in ("t", "tie") else c
    if re.search(r"\btie\b", t, re.IGNORECASE):
        return "tie"
    m = re.search(r"\b([ABT])\b", t)
    if not m:
        return None
    return "tie" if m.group(1) == "T" else m.group(1).lower()


def parse_score(text: str) -> int | None:
    """The first digit 1-5 standing alone ("4", "Score: 4/5", "4."), else None."""
    m = re.search(r"(?<!\d)([1-5])(?!\d)", text or "")
    return int(m.group(1)) if m else None


def combine(first: str, second: str) -> str:
    """Winner from the verdict on (A=a, B=b) and the one on the swapped order (A=b, B=a)."""
    c1, c2 = parse_choice(first), parse_choice(second)
    swapped = {"a": "b", "b": "a", "tie": "tie", None: None}[c2]
    if c1 is None or swapped is None or c1 != swapped:
        return "inconsistent"
    return c1


class Judge:
    """Asks a model; ``url`` (OpenAI-compatible) or a local engine."""

    def __init__(self, engine=None, url: str | None = None, model: str | None = None, api_key: str | None = None):
        if engine is None and not url:
            raise JudgeError("the judge needs an engine or an endpoint URL", "judge")
        self.engine, self.url, self.model, self.api_key = engine, (url or "").rstrip("/") or None, model, api_key
        self._client = None

    def _endpoint(self):
        """The endpoint's ``openai`` client, from the project's one client (``sft_core.serving.client``)."""
        if self._client is None:
            from sft_core.serving.client import Endpoint
            self._client = Endpoint(self.url, self.api_key or judge_api_key(), timeout=120, max_retries=1)
            if not self.model:
                try:
                    ids = self._client.model_ids()
                except Exception:
                    ids = []
                self.model = ids[0] if ids else "default"
        return self._client.openai

    def client(self):
        """The endpoint itself (``sft_core.serving.client.Endpoint``), for callers that ask it other things
        than a verdict (the synth job's generator); its model resolved as the judge's."""
        self._endpoint()
        return self._client

    def _ask_url(self, prompt: str) -> str:
        self._endpoint()
        try:
            r = self._client.complete(self.model, [{"role": "user", "content": prompt}],
                                      DecodingConfig(temperature=0.0, max_new_tokens=MAX_TOKENS))
        except Exception as e:
            raise JudgeError(f"judge endpoint {self.url} (model {self.model}) failed: {type(e).__name__}: {e}",
                             "judge") from None
        return r.text

    def ask(self, prompts: list[str]) -> list[str]:
        """One reply per prompt, in order (greedy, a few tokens)."""
        if not prompts:
            return []
        if self.url:
            self._endpoint()
            pool = ThreadPoolExecutor(max_workers=min(URL_WORKERS, len(prompts)))
            try:
                return list(pool.map(self._ask_url, prompts))
            finally:  # on the first failure, do not wait out every queued request's timeout
                pool.shutdown(wait=True, cancel_futures=True)
        # the local engine: the eval's sliding window (generate_stream), kept full at the engine's capacity
        from sft_core.serving.base import GenRequest, generate_stream
        decoding = DecodingConfig(temperature=0.0, max_new_tokens=MAX_TOKENS)
        out: list[str | None] = [None] * len(prompts)
        error = None
        stream = generate_stream(self.engine, [GenRequest([{"role": "user", "content": p}], None, decoding)
                                               for p in prompts])
        with contextlib.closing(stream):
            for i, g in stream:  # after an error nothing new is sent; the requests in flight drain
                if g.error:
                    error = error or g.error
                out[i] = g.text
        if error:
            raise JudgeError(f"local judge engine failed: {error}", "judge")
        return out  # type: ignore[return-value]

    def pairwise(self, q: str, ref: str, a: str, b: str) -> dict:
        return self.pairwise_many([(q, ref, a, b)])[0]

    def pairwise_many(self, items: list[tuple[str, str, str, str]]) -> list[dict]:
        """Each (question, reference, answer a, answer b) asked in both orders."""
        prompts = []
        for q, ref, a, b in items:
            prompts += [PAIRWISE.format(q=q, ref=ref, a=a, b=b), PAIRWISE.format(q=q, ref=ref, a=b, b=a)]
        replies = self.ask(prompts)
        return [{"winner": combine(replies[2 * i], replies[2 * i + 1]), "raw": [replies[2 * i], replies[2 * i + 1]]}
                for i in range(len(items))]

    def rubric(self, q: str, ref: str, a: str) -> int | None:
        return self.rubric_many([(q, ref, a)])[0]["score"]

    def rubric_many(self, items: list[tuple[str, str, str]]) -> list[dict]:
        replies = self.ask([RUBRIC.format(q=q, ref=ref, a=a) for q, ref, a in items])
        return [{"score": parse_score(r), "raw": r} for r in replies]


def judge_eval(eval_id: str, engine=None, url: str | None = None, model: str | None = None, *,
               ws: Workspace, store: Store | None = None, limit: int | None = None,
               api_key: str | None = None) -> Path:
    """Pairwise judgements for every pair of systems and a rubric score for every system, on every
    domain row (or the first ``limit`` when one is configured: the eval's ``judge_limit``) ->
    judge.jsonl and judge_rubric.jsonl. The summary and the report state how many rows were judged.
    Returns judge.jsonl's path."""
    store = store or open_store(ws.db_url)
    row = eval_rows.get(store, eval_id)
    if row is None:
        raise JudgeError(f"unknown eval {eval_id!r}", "eval")
    path, cfg = Path(row["path"]), loads(row["config"])
    by_row: dict[str, dict] = {}
    for o in read_jsonl(path / "outputs.jsonl"):
        if o["set"] == "domain":
            by_row.setdefault(o["row_id"], {})[o["system"]] = o
    judge = Judge(engine=engine, url=url, model=model, api_key=api_key)
    # outputs.jsonl is in completion order (the eval's sliding window): judge rows in split order, so
    # a judge_limit takes the split's first rows and the files read the same on every run
    try:
        from evals.runner import eval_sets
        pos = {r["id"]: (0, i) for i, r in enumerate(eval_sets(cfg, ws, store)["domain"])}
    except Exception:  # noqa: BLE001 - the split is gone: a stable order all the same
        pos = {}
    rows = sorted(by_row.items(), key=lambda kv: pos.get(kv[0], (1, str(kv[0]))))
    if limit:
        rows = rows[:int(limit)]
    atomic_write_json(path / "judge_meta.json", {"rows_judged": len(rows), "rows_total": len(by_row),
                                                 "limit": int(limit) if limit else None})
    pairs, rub = [], []
    for rid, answers in rows:
        present = [s for s in cfg["systems"] if s in answers]
        for sa, sb in itertools.combinations(present, 2):
            pairs.append((rid, sa, sb))
        rub += [(rid, s) for s in present]
    verdicts = judge.pairwise_many([(by_row[r][a]["instruction"], by_row[r][a]["reference"], by_row[r][a]["output"],
                                     by_row[r][b]["output"]) for r, a, b in pairs])
    scores = judge.rubric_many([(by_row[r][s]["instruction"], by_row[r][s]["reference"], by_row[r][s]["output"])
                                for r, s in rub])
    write_jsonl(path / RUBRIC_FILE, [{"row_id": r, "system": s, **sc} for (r, s), sc in zip(rub, scores)])
    return write_jsonl(path / "judge.jsonl", [{"row_id": r, "system_a": a, "system_b": b, **v}
                                               for (r, a, b), v in zip(pairs, verdicts)])


def summarize_judge(path: str | Path, systems: list[str] | None = None, seed: int = 0) -> dict | None:
    """From an eval directory's judge files: pairwise counts per pair and the mean rubric per system
    (95% BCa bootstrap CI over rows; unparsed replies are counted, not scored). None if never judged."""
    from evals import stats
    path = Path(path)
    verdicts = [j for j in read_jsonl(path / "judge.jsonl") if "winner" in j]
    rubric = read_jsonl(path / RUBRIC_FILE)
    if not verdicts and not rubric and not (path / "judge.jsonl").exists():
        return None
    order = list(systems or [])
    for s in [j["system"] for j in rubric] + [x for j in verdicts for x in (j["system_a"], j["system_b"])]:
        if s not in order:
            order.append(s)
    pw: dict = {"n": len(verdicts), "ties": 0, "inconsistent": 0, "wins": {s: 0 for s in order}, "pairs": []}
    by_pair: dict[tuple[str, str], dict] = {}
    for j in verdicts:
        p = by_pair.setdefault((j["system_a"], j["system_b"]), {"a": j["system_a"], "b": j["system_b"], "a_wins": 0,
                                                                 "b_wins": 0, "ties": 0, "inconsistent": 0, "n": 0})
        p["n"] += 1
        w = j["winner"]
        if w == "a":
            p["a_wins"] += 1
            pw["wins"][j["system_a"]] += 1
        elif w == "b":
            p["b_wins"] += 1
            pw["wins"][j["system_b"]] += 1
        elif w == "tie":
            p["ties"] += 1
            pw["ties"] += 1
        else:
            p["inconsistent"] += 1
            pw["inconsistent"] += 1
    pw["pairs"] = list(by_pair.values())
    rub: dict = {}
    for s in order:
        vals = [j["score"] for j in rubric if j["system"] == s]
        if not vals:
            continue
        got = [float(v) for v in vals if v is not None]
        mean, lo, hi = stats.bootstrap_ci(got, seed=seed) if got else (None, None, None)
        rub[s] = {"mean": mean, "low": lo, "high": hi, "n": len(got), "unparsed": len(vals) - len(got)}
    meta = {}
    if (path / "judge_meta.json").exists():
        meta = json.loads((path / "judge_meta.json").read_text())
    rows = meta.get("rows_judged", len({j["row_id"] for j in rubric} | {j["row_id"] for j in verdicts}))
    return {"pairwise": pw, "rubric": rub, "rows_judged": rows, "rows_total": meta.get("rows_total", rows),
            "limit": meta.get("limit")}
