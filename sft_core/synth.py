"""Synthetic Q&A from a knowledge base: a generator model writes question/answer pairs per chunk,
filters drop the bad ones (each with a count), and the rest is stored as a normal versioned dataset
whose test split is held out by document.

The story, top to bottom (``synthesize``):

1. sample chunks from the knowledge base (``n_chunks``, seeded, spread over documents; 0 = every chunk);
2. ask the generator for JSON pairs per chunk (``prompt_template``, a Jinja2 template run in a sandbox).
   The generator is the studio's engine (``local``: the base model, or a finished run's ``adapter``,
   through the engine's batched API ``generate_stream``) or any OpenAI-compatible endpoint URL (the
   judge's client: key from ``SFT_STUDIO_JUDGE_API_KEY`` or ``OPENAI_API_KEY``);
3. filters, in this order, each pair counted by the first one that drops it:
   * ``unparsable``: a generation with no JSON list of {question, answer} objects (or an item lacking one);
   * ``ungrounded``: groundedness of the answer by its chunk below ``min_groundedness``: the share of the
     answer's content words (SQuAD-normalised, stop words removed) found in the chunk (the same
     ``groundedness`` metric the evals report; deterministic, 1.0 = every content word is in the chunk);
   * ``leaked``: the question (normalised as ``data.normalised_key``) is in a non-train split of another
     dataset (eval, test, test_seen, ...), so training on it would contaminate that evaluation;
   * ``near_duplicate``: cosine similarity of the question's embedding (the knowledge base's embedder)
     to an earlier kept question of at least ``dedup_threshold``;
   * ``answerable_closed_book`` (optional, ``filter_closed_book``): the generator's model without the
     chunk (for ``local``, the base model) answers the question with token F1 >= ``closed_book_threshold``
     against the generated answer -- the pair would teach nothing the model does not know;
4. split by document: ``test`` holds every pair of ``test_docs`` of the documents (no test question's
   document is in train), ``test_seen`` and ``eval`` hold pairs of training documents, ``train`` the rest;
5. store through ``data.import_records`` (nothing is written before this point, so a failed or cancelled
   job leaves nothing behind); the filter counts go into the version's report.json under ``synth``.

Rows carry ``meta.source`` (the document id, as ``retrieval.evaluate_retrieval`` reads it), ``meta.chunk``
(the chunk id in the knowledge base), ``meta.title``, ``meta.file``, ``meta.kb`` and ``meta.groundedness``.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sft_core import StudioError
from sft_core.config import ConfigError, DecodingConfig, StudioSettings, opt
from sft_core.db import datasets as dataset_rows, jobs as job_rows, runs as run_rows
from sft_core.store import Store, loads, open_store
from sft_core.workspace import Workspace, read_jsonl, safe_name, sha256_json

STYLES = ("factual", "how-to", "paraphrase")
ANSWER_LENGTHS = {"short": "one sentence", "medium": "two or three sentences", "long": "one short paragraph"}
FILTERS = ("unparsable", "restates_question", "ungrounded", "leaked", "near_duplicate", "answerable_closed_book")
URL_WORKERS = 4  # concurrent requests to an external generator (as the judge)
PREVIEW_PAIRS = 10

DEFAULT_PROMPT = """\
You write training data for an assistant that answers questions about the material below.
Read the passage and write {{ n }} question-answer pair{{ "s" if n != 1 else "" }} a user of this material would ask.
Question styles, in turn: {{ styles | join(", ") }}.
- factual: asks for a fact the passage states;
- how-to: asks how to do something the passage explains;
- paraphrase: asks about the passage in other words than it uses.
Each answer must be supported by the passage alone, in {{ answer_length }}, and must not repeat the question.
Write each pair as two lines:
Question: ...
Answer: ...

Source: {{ title }}
Passage:
\"\"\"
{{ chunk }}
\"\"\"
"""


class SynthError(StudioError):
    pass


@dataclass
class SynthConfig:
    """Synthetic Q&A from a knowledge base (``sft-studio data synth``, the ``synth`` job)."""
    kb: str = opt("", "Knowledge base to generate from (`sft-studio kb list`).")
    name: str = opt("", "Dataset to store the pairs as (a new version when it exists).")
    n_chunks: int = opt(0, "Chunks to generate from: a seeded sample spread over the documents; 0 = every chunk.")
    questions_per_chunk: int = opt(2, "Question-answer pairs asked for per chunk (1-20).")
    styles: list = opt(list(STYLES), "Question styles asked for, in turn: factual, how-to, paraphrase.",
                       choices=list(STYLES))
    answer_length: str = opt("short", "Answer length asked for: short (one sentence), medium (two or three), long (a paragraph).",
                             choices=list(ANSWER_LENGTHS))
    generator: str = opt("local", "Who writes the pairs: local = the studio's engine, or an OpenAI-compatible endpoint URL "
                                  "(http://host:port/v1; key from SFT_STUDIO_JUDGE_API_KEY or OPENAI_API_KEY, as the judge).")
    model: str = opt("", "Model at the endpoint (default: the first its /models lists); unused for local.")
    base_model: str = opt("", "Local generator's base model; empty = the adapter's base, else the studio's (SFT_STUDIO_BASE_MODEL).")
    adapter: str = opt("", "Local generator: a finished run whose adapter writes the pairs; empty = the base model.")
    temperature: float = opt(0.7, "Sampling temperature of the generator (0 = greedy).")
    max_new_tokens: int = opt(512, "Most tokens per generation (all pairs of one chunk).")
    prompt_template: str = opt(DEFAULT_PROMPT, "Jinja2 template of the generation prompt; variables: chunk, title, source, "
                                               "n, styles, answer_length.")
    min_groundedness: float = opt(0.6, "Drop answers whose content words are less than this share in their chunk (0-1).")
    dedup_threshold: float = opt(0.95, "Drop a question whose embedding cosine to an earlier kept one is at least this (0-1].")
    filter_closed_book: bool = opt(False, "Also drop questions the generator's model (local: the base model) answers without the chunk.")
    closed_book_threshold: float = opt(0.6, "Closed-book answer's token F1 against the generated answer at which a question counts as answerable.")
    test_docs: float = opt(0.2, "Share of documents whose pairs form the held-out `test` split (at least one document).")
    test_seen: float = opt(0.1, "Share of the training documents' pairs held out as `test_seen` (memorisation).")
    eval_fraction: float = opt(0.1, "Share of the training documents' pairs held out as `eval` (loss during training).")
    seed: int = opt(42, "Seed of the chunk sample, the sampling and the splits.")

    def validate(self) -> None:
        if not self.kb:
            raise ConfigError("choose a knowledge base", "kb")
        safe_name(self.kb, "kb")
        if not self.name:
            raise ConfigError("name the dataset to create", "name")
        safe_name(self.name, "name")
        if self.n_chunks < 0:
            raise ConfigError(f"must be >= 0 (0 = every chunk), got {self.n_chunks}", "n_chunks")
        if not 1 <= self.questions_per_chunk <= 20:
            raise ConfigError(f"must be between 1 and 20, got {self.questions_per_chunk}", "questions_per_chunk")
        bad = [s for s in self.styles if s not in STYLES]
        if not self.styles or bad:
            raise ConfigError(f"choose from {', '.join(STYLES)}; got {', '.join(bad) or 'none'}", "styles")
        if self.answer_length not in ANSWER_LENGTHS:
            raise ConfigError(f"must be one of {', '.join(ANSWER_LENGTHS)}, got {self.answer_length!r}", "answer_length")
        if self.generator != "local" and not re.match(r"^https?://[^\s/]+", self.generator):
            raise ConfigError(f"must be local or an endpoint URL (http://host:port/v1), got {self.generator!r}", "generator")
        if self.adapter and self.generator != "local":
            raise ConfigError("an adapter runs on the local engine: use --generator local", "adapter")
        if self.temperature < 0:
            raise ConfigError(f"must be >= 0, got {self.temperature}", "temperature")
        if self.max_new_tokens <= 0:
            raise ConfigError(f"must be positive, got {self.max_new_tokens}", "max_new_tokens")
        for name in ("min_groundedness", "closed_book_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"must be in [0, 1], got {getattr(self, name)}", name)
        if not 0 < self.dedup_threshold <= 1:
            raise ConfigError(f"must be in (0, 1], got {self.dedup_threshold}", "dedup_threshold")
        if not 0 < self.test_docs < 1:
            raise ConfigError(f"must be in (0, 1), got {self.test_docs}", "test_docs")
        for name in ("test_seen", "eval_fraction"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"must be in [0, 1), got {getattr(self, name)}", name)
        if self.test_seen + self.eval_fraction >= 1:
            raise ConfigError("test_seen + eval_fraction must leave pairs for training", "eval_fraction")
        render_prompt(self, {"text": "passage", "title": "title", "source": "file.md"})  # a bad template fails here


# ------------------------------------------------------------------------------------------------
# Prompts and parsing
# ------------------------------------------------------------------------------------------------
def render_prompt(cfg: SynthConfig, chunk: dict) -> str:
    """The generation prompt for one chunk (a sandboxed Jinja2 template: a user's template cannot
    reach Python internals; an unknown variable is an error, not an empty string)."""
    import jinja2
    from jinja2.sandbox import SandboxedEnvironment
    env = SandboxedEnvironment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    try:
        return env.from_string(cfg.prompt_template).render(
            chunk=chunk["text"].strip(), title=chunk.get("title") or "", source=Path(chunk.get("source") or "").name,
            n=cfg.questions_per_chunk, styles=list(cfg.styles), answer_length=ANSWER_LENGTHS[cfg.answer_length])
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"template line {e.lineno}: {e.message}", "prompt_template") from None
    except jinja2.TemplateError as e:  # undefined variable, sandbox refusal
        raise ConfigError(f"{type(e).__name__}: {e} (variables: chunk, title, source, n, styles, answer_length)",
                          "prompt_template") from None


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def _loads_somewhere(text: str):
    """The JSON value in a reply: the whole text, a fenced block, or the outermost [...] / {...}."""
    candidates = [text.strip()] + [m.group(1).strip() for m in _FENCE.finditer(text)]
    for a, b in (("[", "]"), ("{", "}")):
        i, j = text.find(a), text.rfind(b)
        if 0 <= i < j:
            candidates.append(text[i:j + 1])
    for c in candidates:
        try:
            return json.loads(c)
        except (ValueError, RecursionError):
            continue
    return None


_LINE_LABEL = re.compile(r"(?i)(q|question|a|answer)\s*\d{0,3}\s*[:.)]\s*")


def _line_pairs(text: str) -> list[dict]:
    """Pairs written as labelled lines, for models that do not write JSON (small ones rarely do):
    ``Question: …`` / ``Q1: …`` then ``Answer: …`` / ``A1: …``; an unlabelled line continues the field
    before it. Line by line, so the work stays linear in the reply's length."""
    pairs, field, cur = [], None, {"question": [], "answer": []}

    def flush():
        q, a = " ".join(cur["question"]).strip(), " ".join(cur["answer"]).strip()
        if q and a:
            pairs.append({"question": q, "answer": a})
        cur["question"], cur["answer"] = [], []

    for raw in text.splitlines():
        line = raw.strip().lstrip("-*#> ").strip()
        m = _LINE_LABEL.match(line)
        label = m.group(1).lower()[0] if m else None
        if label == "q":
            flush()
            field = "question"
        elif label == "a" and field is not None:
            field = "answer"
        elif field is not None and line:
            cur[field].append(line)
            continue
        else:
            continue
        rest = line[m.end():].strip()
        if rest:
            cur[field].append(rest)
    flush()
    return pairs


def parse_pairs(text: str) -> tuple[list[dict], int]:
    """(pairs, malformed items) from one generation. A JSON list of {"question", "answer"} objects, or an
    object holding such a list (any key) or being one pair; question/answer are non-empty strings. Without
    JSON, labelled lines (``Question: … Answer: …``, see ``_line_pairs``). ([], 1) when the reply holds
    neither."""
    obj = _loads_somewhere(text or "")
    if obj is None:
        lines = _line_pairs(text or "")
        return (lines, 0) if lines else ([], 1)
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        obj = lists[0] if lists else [obj]
    if not isinstance(obj, list):
        return [], 1
    pairs, bad = [], 0
    for item in obj:
        low = {str(k).lower(): v for k, v in item.items()} if isinstance(item, dict) else {}
        q, a = low.get("question", low.get("q")), low.get("answer", low.get("a"))
        if isinstance(q, str) and isinstance(a, str) and q.strip() and a.strip():
            pairs.append({"question": q.strip(), "answer": a.strip()})
        else:
            bad += 1
    return pairs, (bad if pairs or bad else 1)


def groundedness(answer: str, chunk: str) -> float:
    """Share of the answer's content words that occur in the chunk (evals' ``groundedness`` metric)."""
    from evals.metrics.core import groundedness as g
    return g([answer], [chunk])[0]


def question_key(question: str) -> str:
    from sft_core.data import normalised_key
    return normalised_key({"instruction": question})


# ------------------------------------------------------------------------------------------------
# Choosing chunks
# ------------------------------------------------------------------------------------------------
def sample_chunks(chunks: list[dict], n: int, seed: int) -> list[dict]:
    """``n`` chunks (all when 0 or more than there are), spread over the documents: documents in a
    seeded order, one chunk of each in turn, so a small sample still covers many documents. Returned in
    the knowledge base's order."""
    if not n or n >= len(chunks):
        return list(chunks)
    rng = random.Random(seed)
    by_doc: dict[str, list[dict]] = {}
    for c in chunks:
        by_doc.setdefault(c["doc_id"], []).append(c)
    docs = sorted(by_doc)
    rng.shuffle(docs)
    for d in docs:
        rng.shuffle(by_doc[d])
    picked: list[dict] = []
    while len(picked) < n:
        for d in docs:
            if by_doc[d] and len(picked) < n:
                picked.append(by_doc[d].pop())
    return sorted(picked, key=lambda c: c["chunk_id"])


# ------------------------------------------------------------------------------------------------
# The generator: the local engine or one OpenAI-compatible endpoint
# ------------------------------------------------------------------------------------------------
class Generator:
    """Answers chat requests, in request order, through the studio's engine (``generate_stream``: the
    engine's sliding window) or an external endpoint (the judge's client, ``URL_WORKERS`` at a time)."""

    def __init__(self, cfg: SynthConfig, engine=None):
        self.cfg, self.engine = cfg, engine
        self.adapter = cfg.adapter or None
        self.model = cfg.model or None
        self._client = None
        if cfg.generator == "local" and engine is None:
            raise SynthError("the local generator needs the engine", "generator")

    @property
    def label(self) -> str:
        if self.cfg.generator == "local":
            return f"local:{self.adapter or getattr(self.engine, 'base_model', 'base')}"
        return f"{self.cfg.generator} ({self.model or 'default model'})"

    def _url_client(self):
        if self._client is None:
            from evals.judge import Judge
            judge = Judge(url=self.cfg.generator, model=self.model)
            self._client = judge.client()  # the judge's endpoint: the project's one client, key from the environment
            self.model = judge.model
        return self._client

    def generate(self, messages: list[list[dict]], decoding: DecodingConfig, adapter: str | None = None,
                 on_done: Callable[[int], None] | None = None) -> list[str]:
        if not messages:
            return []
        out: list[str | None] = [None] * len(messages)
        if self.cfg.generator == "local":
            from sft_core.serving.base import GenRequest, generate_stream
            stream = generate_stream(self.engine, (GenRequest(m, adapter, decoding) for m in messages))
            where = "engine"
        else:
            from sft_core.serving.base import run_window
            client = self._url_client()
            stream = run_window(lambda m: client.answer(self.model, m, decoding, f"generator {self.cfg.generator}"),
                                messages, URL_WORKERS, name="synth")
            where = "generator"
        error, n = None, 0
        with contextlib.closing(stream):
            for i, g in stream:  # after an error nothing new is sent; what is in flight drains
                if g.error:
                    error = error or g.error
                    continue
                out[i] = g.text
                n += 1
                if on_done:
                    on_done(n)
        if error:
            raise SynthError(f"the generator {self.label} failed: {error}", where)
        return out  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------------
@dataclass
class SynthResult:
    counts: dict                     # chunks, pairs, one count per filter, kept
    kept: list[dict]                 # records (before splitting)
    dropped: list[dict] = field(default_factory=list)  # {"question", "answer", "source", "reason", ...}
    splits: dict = field(default_factory=dict)         # split -> records (empty for a preview)
    version: str | None = None
    generator: str = ""

    def summary(self) -> str:
        c = self.counts
        dropped = ", ".join(f"{k.replace('_', ' ')} {c[k]}" for k in FILTERS if c.get(k))
        s = (f"{c['chunks']} chunks -> {c['pairs']} pairs, kept {c['kept']}"
             + (f" (dropped: {dropped})" if dropped else ""))
        if self.splits:
            s += "; " + ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        return s


def _leak_keys(exclude: str, ws: Workspace, store: Store) -> set[str]:
    """Normalised questions of every other dataset's non-train splits (latest and older versions)."""
    keys: set[str] = set()
    for row in dataset_rows.list_versions(store):
        if row["name"] == exclude:  # the dataset being rewritten: its older version is replaced, not evaluated
            continue
        for split in loads(row["splits"], {}) or {}:
            p = Path(row["path"]) / f"{split}.jsonl"
            if split != "train" and p.exists():
                keys |= {question_key(r.get("instruction") or "") for r in read_jsonl(p)}
    keys.discard("")
    return keys


def _near_duplicates(questions: list[str], embedder_name: str, threshold: float) -> list[int | None]:
    """For each question, the index of the earlier kept question it nearly repeats, else None (greedy in order)."""
    import numpy as np
    from sft_core.retrieval import embedder
    if not questions:
        return []
    vecs = embedder(embedder_name).encode(questions, normalize_embeddings=True, convert_to_numpy=True,
                                          show_progress_bar=False, batch_size=64)
    kept: list[int] = []
    out: list[int | None] = []
    for i, v in enumerate(vecs):
        hit = None
        if kept:
            sims = vecs[kept] @ v
            j = int(np.argmax(sims))
            if sims[j] >= threshold - 1e-6:  # float32 cosine of identical texts can read 0.9999999
                hit = kept[j]
        out.append(hit)
        if hit is None:
            kept.append(i)
    return out


def _closed_book_messages(question: str) -> list[dict]:
    from evals.systems import DEFAULT_SYSTEM_PROMPT  # what the `prompt` system asks, zero-shot
    return [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": question}]


def synthesize(cfg: SynthConfig, engine=None, *, ws: Workspace, store: Store | None = None,
               chunks: list[dict] | None = None, progress: Callable[..., None] | None = None) -> SynthResult:
    """Generate and filter (steps 1-3 of the module docstring); stores nothing. ``chunks`` overrides the
    sample (a preview takes the first few). ``progress(done, total, **extra)`` after each answer."""
    from sft_core.records import make_record
    from sft_core.retrieval import open_kb
    from evals.metrics.core import token_f1
    store = store or open_store(ws.db_url)
    kb = open_kb(cfg.kb, ws)
    chunks = chunks if chunks is not None else sample_chunks(kb.chunks, cfg.n_chunks, cfg.seed)
    gen = Generator(cfg, engine)
    decoding = DecodingConfig(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    say = progress or (lambda *a, **k: None)
    say(0, len(chunks), step="generating", unit="chunks")
    texts = gen.generate([[{"role": "user", "content": render_prompt(cfg, c)}] for c in chunks], decoding,
                         adapter=gen.adapter, on_done=lambda n: say(n, len(chunks), step="generating", unit="chunks"))
    counts = {"chunks": len(chunks), "pairs": 0, **{k: 0 for k in FILTERS}, "kept": 0}
    dropped: list[dict] = []
    candidates: list[dict] = []
    for c, text in zip(chunks, texts):
        pairs, bad = parse_pairs(text)
        counts["unparsable"] += bad
        if not pairs:
            dropped.append({"question": None, "answer": None, "source": c["doc_id"], "chunk": c["chunk_id"],
                            "reason": "unparsable", "raw": (text or "")[:300]})
        counts["pairs"] += len(pairs)
        for p in pairs:
            g = groundedness(p["answer"], c["text"])
            row = {**p, "source": c["doc_id"], "chunk": c["chunk_id"], "chunk_text": c["text"], "title": c["title"],
                   "file": Path(c["source"]).name, "groundedness": round(g, 4)}
            # an answer with no content word beyond its question's only restates it (small generators often
            # write the question again): "The capital of Zorbia is Quuxville." adds one and stays
            if groundedness(p["answer"], p["question"]) == 1.0:
                _drop(row, "restates_question", counts, dropped)
            elif g < cfg.min_groundedness:
                _drop(row, "ungrounded", counts, dropped)
            else:
                candidates.append(row)
    leak = _leak_keys(cfg.name, ws, store)
    rest = []
    for row in candidates:
        (_drop(row, "leaked", counts, dropped) if question_key(row["question"]) in leak else rest.append(row))
    dup_of = _near_duplicates([r["question"] for r in rest], kb.cfg.embedder, cfg.dedup_threshold)
    survivors = []
    for row, j in zip(rest, dup_of):
        if j is None:
            survivors.append(row)
        else:
            _drop(row, "near_duplicate", counts, dropped, of=rest[j]["question"])
    if cfg.filter_closed_book and survivors:
        n = len(survivors)
        say(0, n, step="closed-book check", unit="questions")
        closed = gen.generate([_closed_book_messages(r["question"]) for r in survivors],
                              DecodingConfig(temperature=0.0, max_new_tokens=min(cfg.max_new_tokens, 128)),
                              adapter=None, on_done=lambda k: say(k, n, step="closed-book check", unit="questions"))
        f1 = token_f1(closed, [r["answer"] for r in survivors])
        answered = []
        for row, text, score in zip(survivors, closed, f1):
            if score >= cfg.closed_book_threshold:
                _drop(row, "answerable_closed_book", counts, dropped, closed_book=text, f1=round(score, 4))
            else:
                answered.append(row)
        survivors = answered
    kept = [make_record(r["question"], r["answer"], meta={
        "source": r["source"], "chunk": r["chunk"], "title": r["title"], "file": r["file"], "kb": cfg.kb,
        "groundedness": r["groundedness"], "generator": gen.label}) for r in survivors]
    counts["kept"] = len(kept)
    return SynthResult(counts, kept, dropped, generator=gen.label)


def _drop(row: dict, reason: str, counts: dict, dropped: list[dict], **extra) -> None:
    counts[reason] += 1
    dropped.append({k: v for k, v in row.items() if k != "chunk_text"} | {"reason": reason, **extra})


def _rank(seed: int, key: str) -> str:
    return sha256_json([seed, key])


def split_by_document(records: list[dict], cfg: SynthConfig) -> dict[str, list[dict]]:
    """train / eval / test / test_seen. ``test``: every pair of ``test_docs`` of the documents (at least
    one, never all), in a seeded order; ``test_seen`` and ``eval``: seeded shares of the other documents'
    pairs; ``train``: the rest. Raises SynthError when fewer than two documents have pairs."""
    docs = sorted({r["meta"]["source"] for r in records}, key=lambda d: _rank(cfg.seed, d))
    if len(docs) < 2:
        raise SynthError(f"the kept pairs come from {len(docs)} document(s); holding out a test split by document "
                         "needs at least 2 (add documents to the knowledge base, raise n_chunks, or relax the filters)",
                         "kb")
    n_test = min(len(docs) - 1, max(1, round(len(docs) * cfg.test_docs)))
    held = set(docs[:n_test])
    test = [r for r in records if r["meta"]["source"] in held]
    seen = sorted((r for r in records if r["meta"]["source"] not in held), key=lambda r: _rank(cfg.seed, r["id"]))
    n_seen = round(len(seen) * cfg.test_seen)
    n_eval = round(len(seen) * cfg.eval_fraction)
    if len(seen) >= 3:  # a share asked for is at least one row, while train keeps one
        n_seen = max(n_seen, 1) if cfg.test_seen > 0 else 0
        n_eval = max(n_eval, 1) if cfg.eval_fraction > 0 else 0
    n_seen, n_eval = min(n_seen, max(0, len(seen) - 1)), min(n_eval, max(0, len(seen) - 1 - n_seen))
    order = {r["id"]: i for i, r in enumerate(records)}  # each split in the knowledge base's order
    pick = lambda rows: sorted(rows, key=lambda r: order[r["id"]])  # noqa: E731
    return {"train": pick(seen[n_seen + n_eval:]), "eval": pick(seen[n_seen:n_seen + n_eval]), "test": pick(test),
            "test_seen": pick(seen[:n_seen])}


def run_synth(cfg: SynthConfig, engine=None, *, ws: Workspace, store: Store | None = None,
              progress: Callable[..., None] | None = None) -> SynthResult:
    """Generate, filter, split and store a dataset version (the ``synth`` job's work). Nothing is stored
    unless every step succeeds."""
    from dataclasses import asdict

    from sft_core import data
    from sft_core.config import DataConfig
    store = store or open_store(ws.db_url)
    cfg.validate()
    res = synthesize(cfg, engine, ws=ws, store=store, progress=progress)
    if not res.kept:
        raise SynthError(f"no pair survived the filters ({res.summary()}); nothing stored", "generator")
    try:
        splits = split_by_document(res.kept, cfg)
    except SynthError as e:  # too few documents left: say what the filters took
        raise SynthError(f"{e}; {res.summary()}; nothing stored", e.where) from None
    dcfg = DataConfig(eval_fraction=0.0, test_fraction=0.0, seed=cfg.seed)
    stats, warns = data.quality(splits, dcfg, cfg.name, ws=ws)
    report = {"ok": True, "stats": stats, "warnings": [asdict(w) for w in warns[:data.MAX_REPORTED]],
              "synth": {"kb": cfg.kb, "generator": res.generator, "counts": res.counts,
                        "config": asdict(cfg), "dropped": res.dropped[:200], "created_at": time.time()}}
    v = data.import_records(splits, cfg.name, cfg=dcfg, ws=ws, store=store, source=f"synth:{cfg.kb}", report=report,
                            fmt="synth")
    res.splits, res.version = splits, v.version
    return res


# ------------------------------------------------------------------------------------------------
# Service functions (UI, CLI) and the job
# ------------------------------------------------------------------------------------------------
def _adapter_base(cfg: SynthConfig, store: Store) -> str | None:
    """The base model of the adapter's run (refusing an unfinished run or a mismatched base_model); None
    without an adapter."""
    if not cfg.adapter:
        return None
    run = run_rows.finished(store, cfg.adapter, SynthError, "adapter")
    if cfg.base_model and cfg.base_model != run["base_model"]:
        raise SynthError(f"run {cfg.adapter} was trained on {run['base_model']}, not {cfg.base_model}", "adapter")
    return run["base_model"]


def resolve_local_model(cfg: SynthConfig, store: Store, settings: StudioSettings | None = None) -> str:
    """The base model the local generator runs: the adapter's run's (refusing an unfinished run or a
    mismatched base_model), else base_model, else the studio's default (``settings.base_model``)."""
    base = _adapter_base(cfg, store) or cfg.base_model
    if base:
        return base
    if settings is None:
        raise SynthError("no base model for the local generator: set base_model (or give the studio settings, "
                         "whose default base model it then runs)", "base_model")
    return settings.base_model


def check(cfg: SynthConfig, ws: Workspace, store: Store):
    """Everything that can be refused before generating: options, the knowledge base (and that it has
    at least two documents to hold one out), the adapter's run, the endpoint (GET /models). Returns the KB."""
    from sft_core.retrieval import open_kb
    cfg.validate()
    kb = open_kb(cfg.kb, ws)
    if kb.n_docs < 2:
        raise SynthError(f"knowledge base {cfg.kb!r} has {kb.n_docs} document(s); a test split held out by document "
                         "needs at least 2", "kb")
    if cfg.generator == "local":
        _adapter_base(cfg, store)  # the adapter's run: finished, on the base model asked for
    else:
        from evals.judge import judge_api_key
        from evals.systems import check_endpoint
        models = check_endpoint(cfg.generator, judge_api_key(), "the synth generator")
        if cfg.model and models and cfg.model not in models:
            raise SynthError(f"the endpoint {cfg.generator} serves {', '.join(models[:10])}, not {cfg.model!r}", "model")
    return kb


def submit_synth(cfg: SynthConfig, ws: Workspace, store: Store | None = None) -> str:
    """Check ``cfg`` (see ``check``) and queue a ``synth`` job (ref = the dataset name); returns the job id.
    A local generator takes the accelerator slot; an external one does not."""
    from sft_core import jobs
    from sft_core.config import to_dict
    jobs.check_backend()
    store = store or open_store(ws.db_url)
    check(cfg, ws, store)
    with store.tx() as con:
        live = job_rows.live(con, ref=cfg.name, kind="synth")
        if live:
            raise SynthError(f"a synth job for {cfg.name!r} is queued or running already (job {live[0]['id']})", "name")
        return jobs._insert_job(con, "synth", cfg.name, {"config": to_dict(cfg),
                                                         "accelerator": cfg.generator == "local"})


def open_engine(cfg: SynthConfig, ws: Workspace, store: Store, settings: StudioSettings | None):
    """(engine, owned) for a local generator: the app's running engine when it serves the base model,
    else one started here from ``settings`` (owned: the caller closes it). (None, False) for an endpoint."""
    if cfg.generator != "local":
        return None, False
    from evals.runner import _attach_app_engine, _start_engine
    spec = {"base_model": resolve_local_model(cfg, store, settings)}
    engine = _attach_app_engine(spec, ws, store)
    if engine is None:
        engine = _start_engine(spec, ws, store, settings)
    try:
        if cfg.adapter:
            engine.load_adapter(cfg.adapter)
    except BaseException:
        engine.close()
        raise
    return engine, True


def preview(cfg: SynthConfig, engine=None, *, ws: Workspace, store: Store | None = None,
            n_pairs: int = PREVIEW_PAIRS, settings: StudioSettings | None = None) -> dict:
    """About ``n_pairs`` pairs from the first chunks of the sample, through every filter, stored nowhere:
    {"pairs": [record], "dropped": [{question, answer, source, reason, ...}], "counts": {...}, "summary": str}.
    ``engine``: the caller's (the app's) for a local generator; None starts one for the call (from
    ``settings``: the default base model, engine and engine_url)."""
    store = store or open_store(ws.db_url)
    kb = check(cfg, ws, store)
    chunks = sample_chunks(kb.chunks, cfg.n_chunks, cfg.seed)[:max(1, math.ceil(n_pairs / cfg.questions_per_chunk))]
    owned = False
    if engine is None and cfg.generator == "local":
        engine, owned = open_engine(cfg, ws, store, settings)
    elif engine is not None and cfg.adapter:
        engine.load_adapter(cfg.adapter)
    try:
        res = synthesize(cfg, engine, ws=ws, store=store, chunks=chunks)
    finally:
        if owned:
            engine.close()
    return {"pairs": res.kept[:n_pairs], "dropped": res.dropped, "counts": res.counts, "summary": res.summary()}


def job_entry(ctx, payload: dict) -> None:
    """The ``synth`` job in the worker process: generate, filter, split, store; progress per chunk."""
    from sft_core.config import load_config
    cfg = load_config(SynthConfig, overrides=payload["config"])

    def progress(done, total, **extra):
        ctx.check_cancel()
        ctx.progress(done, total, **extra)

    ctx.progress(0, 1, force=True, unit="chunks", step="starting the generator")
    engine, owned = open_engine(cfg, ctx.ws, ctx.store, ctx.settings)
    try:
        res = run_synth(cfg, engine, ws=ctx.ws, store=ctx.store, progress=progress)
    finally:
        if owned:
            engine.close()
    print(f"synth {cfg.name}@{res.version}: {res.summary()}", flush=True)
    ctx.progress(res.counts["chunks"], res.counts["chunks"], force=True, unit="chunks", step="done",
                 result=f"{cfg.name}@{res.version}: {res.summary()}", counts=res.counts, version=res.version)
