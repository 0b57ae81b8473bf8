"""Retrieval-aware fine-tuning (RAFT): training prompts with passages from a knowledge base.

One function, :func:`prompt_messages`, turns a row and its passages into the chat prompt. The trainer
(``sft_core/train.py``, ``mode: raft``) and the adapter-with-retrieval systems at inference
(``raft:RUN`` and ``sft+rag:RUN`` in ``evals/systems.py``) both call it, so for the same row and the
same passages the adapter sees the same bytes in training and at inference. It is the rag systems'
prompt (``retrieval.build_rag_messages``) with the row's own system message, as adapters are prompted.

How each training row gets its passages (:func:`build_row`):

* **The oracle** is the knowledge-base chunk the row came from. Rows made from a knowledge base carry
  ``meta.chunk`` (the KB's ``chunk_id``) and ``meta.source`` (the document's ``doc_id``); that chunk is
  the oracle when it exists and belongs to that document (chunk ids are positions in ``chunks.jsonl``,
  renumbered by a rebuild, so a stale id is not trusted). Otherwise the oracle is the top hit of a KB
  search for the row's **reference answer** -- the first hit from the row's ``meta.source`` document
  within the top ``ORACLE_DEPTH`` when the row names one and a hit from it is there, else the top hit.
* **Distractors**: the top hits of a KB search for the question, the oracle removed (by chunk id), the
  first ``k`` kept. Only the oracle chunk is excluded: an overlapping neighbour of it may stay.
* **Oracle dropped** for a share ``p`` of rows: one Bernoulli(p) draw per row from a generator seeded by
  (seed, row id), so a row gets the same prompt in every run with the same seed, whatever the order or
  the other rows, and the dropped count is Binomial(n, p).
* **Shuffled** passages (the same generator): the oracle's position carries no signal.
* **Cite**: the trained answer ends `` [n]``, ``n`` the oracle's label in the prompt, when it is there.

The rag systems ask the question (``instruction``) alone: a row's ``context`` field and the earlier
turns of a multi-turn row are not part of a RAFT prompt, exactly as at inference.

At inference ``raft:RUN`` retrieves ``k + 1`` passages for the question (no oracle knowledge) and builds
the prompt with the run's own budget (:func:`run_settings`).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from sft_core import StudioError

ORACLE_DEPTH = 50  # hits searched for the reference answer when looking for the row's own document
PLAN_FILE = "raft_plan.jsonl"  # in the run directory: each row's oracle, passages and draw


class RaftError(StudioError):
    pass


@dataclass(frozen=True)
class RaftSettings:
    """What shapes a RAFT prompt: from a TrainConfig at training time, from the run's config at inference."""
    kb: str
    distractors: int = 3
    oracle_drop: float = 0.2
    cite: bool = False
    context_tokens: int = 1024
    seed: int = 42

    @property
    def top_k(self) -> int:
        """Passages a raft:RUN system retrieves at inference: as many as a training prompt with its oracle."""
        return self.distractors + 1

    @classmethod
    def from_config(cls, cfg) -> "RaftSettings":
        """From a TrainConfig or its dict (a run's stored config)."""
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        return cls(kb=get("kb", ""), distractors=int(get("raft_distractors", 3)),
                   oracle_drop=float(get("raft_oracle_drop", 0.2)), cite=bool(get("raft_cite", False)),
                   context_tokens=int(get("raft_context_tokens", 1024)), seed=int(get("seed", 42)))

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------------
# The one prompt builder (training and inference)
# ------------------------------------------------------------------------------------------------
def prompt_messages(record: dict, passages: list, tokenizer, max_context_tokens: int) -> tuple[list[dict], list]:
    """(chat messages, passages actually used) for one row: the row's system message (adapters are
    prompted as they were trained), the numbered passages in the given order within the token budget,
    then the question. Training and the systems both call this; nothing else builds these prompts."""
    from sft_core.retrieval import build_rag_messages
    return build_rag_messages(record["instruction"], passages, tokenizer, max_context_tokens,
                              system=record.get("system"))


def cite(answer: str, label: int) -> str:
    """The answer citing passage ``label`` (its number in the prompt)."""
    return f"{answer.rstrip()} [{label}]"


# ------------------------------------------------------------------------------------------------
# Passages of a training row
# ------------------------------------------------------------------------------------------------
def _chunk_hit(kb, chunk_id: int):
    return kb._hit(chunk_id, 1.0)


def find_oracle(record: dict, kb) -> tuple[int, str]:
    """(chunk id, rule) of the row's oracle; rule "meta" (its meta.chunk) or "answer" (the answer's top hit)."""
    meta = record.get("meta") or {}
    source, chunk = meta.get("source"), meta.get("chunk")
    if isinstance(chunk, dict):  # {"chunk_id": ...} as well as the bare id
        chunk = chunk.get("chunk_id")
    if isinstance(chunk, str) and chunk.strip().isdigit():
        chunk = int(chunk)
    if isinstance(chunk, int) and not isinstance(chunk, bool) and 0 <= chunk < len(kb.chunks):
        if not source or kb.chunks[chunk]["doc_id"] == str(source):
            return chunk, "meta"
    hits = kb.search(record["response"], k=min(ORACLE_DEPTH, len(kb.chunks)))
    if not hits:
        raise RaftError(f"row {record.get('id')}: no passage of knowledge base {kb.name} matches its answer",
                        "kb")
    if source:
        own = next((h for h in hits if h.doc_id == str(source)), None)
        if own is not None:
            return own.chunk_id, "answer"
    return hits[0].chunk_id, "answer"


def distractors(question: str, kb, oracle: int, k: int) -> list:
    """The top ``k`` hits for the question, never the oracle chunk."""
    if k <= 0:
        return []
    return [h for h in kb.search(question, k=k + 1) if h.chunk_id != oracle][:k]


def draw(seed: int, row_id: str, oracle_drop: float) -> tuple[bool, random.Random]:
    """(oracle dropped?, the generator that then shuffles the passages) of one row: its own generator,
    seeded by (seed, row id) only (str seeds hash with SHA-512), so the draw is one Bernoulli(oracle_drop)
    independent of the other rows and of their order."""
    rng = random.Random(f"raft:{seed}:{row_id}")
    return rng.random() < oracle_drop, rng


def build_row(record: dict, kb, tokenizer, s: RaftSettings) -> tuple[dict, dict]:
    """({"prompt": messages, "completion": [assistant]}, plan) for one row; the plan records what was drawn."""
    oracle, rule = find_oracle(record, kb)
    passages = distractors(record["instruction"], kb, oracle, s.distractors)
    dropped, rng = draw(s.seed, record["id"], s.oracle_drop)
    if not dropped:
        passages.append(_chunk_hit(kb, oracle))
    rng.shuffle(passages)
    msgs, used = prompt_messages(record, passages, tokenizer, s.context_tokens)
    used_ids = [h.chunk_id for h in used]
    answer = record["response"]
    in_prompt = oracle in used_ids
    if s.cite and in_prompt:
        answer = cite(answer, used_ids.index(oracle) + 1)
    plan = {"row_id": record["id"], "oracle": oracle, "oracle_rule": rule, "dropped": dropped,
            "passages": [h.chunk_id for h in passages], "used": len(used), "oracle_in_prompt": in_prompt}
    return {"prompt": msgs, "completion": [{"role": "assistant", "content": answer}]}, plan


def build_rows(records: list[dict], kb, tokenizer, s: RaftSettings) -> tuple[list[dict], list[dict], dict]:
    """(prompt/completion rows, plans, counts) for a split."""
    rows, plans = [], []
    for r in records:
        row, plan = build_row(r, kb, tokenizer, s)
        rows.append(row)
        plans.append(plan)
    n = len(plans)
    stats = {"rows": n, "oracle_from_meta": sum(p["oracle_rule"] == "meta" for p in plans),
             "oracle_from_answer": sum(p["oracle_rule"] == "answer" for p in plans),
             "oracle_dropped": sum(p["dropped"] for p in plans),
             # kept but cut by the token budget: raise raft_context_tokens (and max_length) if this is large
             "oracle_cut_by_budget": sum(not p["dropped"] and not p["oracle_in_prompt"] for p in plans),
             "mean_passages": (sum(p["used"] for p in plans) / n) if n else 0.0}
    return rows, plans, stats


# ------------------------------------------------------------------------------------------------
# A run's settings at inference
# ------------------------------------------------------------------------------------------------
def run_settings(run_id: str, store) -> RaftSettings:
    """The RAFT settings a run was trained with; refused for a run that was not trained in raft mode
    (an adapter trained without passages is compared with retrieval as ``sft+rag:RUN``)."""
    from sft_core.store import loads
    from sft_core.db import runs as run_rows
    run = run_rows.get(store, run_id)
    if run is None:
        raise RaftError(f"unknown run {run_id!r}", "systems")
    cfg = loads(run["config"], {}) or {}
    mode = cfg.get("mode") or "sft"
    if mode != "raft":
        raise RaftError(f"run {run_id} was trained in {mode} mode, not raft: raft:{run_id} would be sft+rag:{run_id} "
                        f"under another name; compare it as sft+rag:{run_id}, or train with --mode raft --kb NAME",
                        "systems")
    return RaftSettings.from_config(cfg)
