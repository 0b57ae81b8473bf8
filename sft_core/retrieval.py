"""Knowledge bases: ingest documents, chunk by tokens, index (BM25 + dense), hybrid search, RAG prompts.

Index on disk, ``kb/<name>/``::

    manifest.json     sources (path, sha256, doc ids, chunk count), chunking, embedder
    chunks.jsonl      one chunk per line: chunk_id, doc_id, title, source, start, end, index, text
    embeddings.npy    float32, L2-normalised, one row per chunk

BM25 (bm25s) is rebuilt from ``chunks.jsonl`` on load (milliseconds at this scale); embeddings are
the expensive part and are reused for unchanged source files. A build writes a complete new
index beside the old one and swaps it in, so a failed build leaves the previous index intact.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sft_core import StudioError
from sft_core.config import RetrievalConfig, load_config
from sft_core.store import Store, open_store
from sft_core.workspace import Workspace, atomic_write_json, safe_name, sha256_file, write_jsonl

logging.getLogger("bm25s").setLevel(logging.WARNING)

SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm", ".pdf", ".jsonl")
MODES = ("hybrid", "bm25", "dense")


class RetrievalError(StudioError):
    pass


@dataclass
class Hit:
    text: str
    source: str
    position: str
    score: float
    doc_id: str
    chunk_id: int
    title: str = ""
    start: int = 0
    end: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BuildResult:
    name: str
    n_docs: int
    n_chunks: int
    embedded_chunks: int  # chunks embedded in this build (0 when nothing changed)
    reused_sources: int
    indexed_sources: list[str] = field(default_factory=list)
    removed_sources: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        s = (f"{self.n_docs} documents, {self.n_chunks} chunks; indexed {len(self.indexed_sources)} file(s), "
             f"reused {self.reused_sources}, embedded {self.embedded_chunks} chunk(s)")
        if self.removed_sources:
            s += f"; dropped {len(self.removed_sources)} missing file(s)"
        if self.problems:
            s += "; problems: " + "; ".join(self.problems)
        return s


# ------------------------------------------------------------------------------------------------
# Reading documents
# ------------------------------------------------------------------------------------------------
def _decode(raw: bytes, path: Path) -> str:
    if b"\x00" in raw[:4096]:
        raise RetrievalError("binary content, not text", path.name)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RetrievalError(f"not valid UTF-8 (byte {e.start})", path.name) from None


def _html_text(html: str) -> str:
    from bs4 import BeautifulSoup
    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "noscript", "head"]):
        tag.decompose()
    text = soup.get_text("\n")
    return re.sub(r"\n\s*\n+", "\n\n", text).strip()


def _pdf_text(path: Path) -> str:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError
    try:
        reader = PdfReader(str(path))
        return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages).strip()
    except (PdfReadError, ValueError, KeyError, OSError) as e:
        raise RetrievalError(f"unreadable PDF ({type(e).__name__}: {e})", path.name) from None


def read_documents(path: Path, text_field: str = "text") -> list[dict]:
    """Documents in one file: [{doc_id, title, text}]; raises RetrievalError naming the file."""
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        docs = [{"doc_id": path.name, "title": path.stem, "text": _pdf_text(path)}]
    elif suffix == ".jsonl":
        docs = []
        text = _decode(path.read_bytes(), path)
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RetrievalError(f"line {n}: invalid JSON ({e.msg})", path.name) from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise RetrievalError(f"line {n}: no text field {text_field!r}", path.name)
            doc_id = str(obj.get("id") or f"{path.name}:{n}")
            docs.append({"doc_id": doc_id, "title": str(obj.get("title") or doc_id), "text": obj[text_field]})
    else:
        text = _decode(path.read_bytes(), path)
        if suffix in (".html", ".htm"):
            text = _html_text(text)
        docs = [{"doc_id": path.name, "title": path.stem, "text": text}]
    docs = [d for d in docs if d["text"].strip()]
    if not docs:
        raise RetrievalError("no text in this file", path.name)
    return docs


def collect_files(paths: list[str | Path]) -> tuple[list[Path], list[str]]:
    files, problems = [], []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        elif p.is_file():
            if p.suffix.lower() in SUFFIXES:
                files.append(p)
            else:
                problems.append(f"{p.name}: unsupported type (use {', '.join(SUFFIXES)})")
        else:
            problems.append(f"{p}: not found")
    return [f.resolve() for f in files], problems


# ------------------------------------------------------------------------------------------------
# Embedder and chunking
# ------------------------------------------------------------------------------------------------
_EMBEDDERS: dict[str, object] = {}
_LOCK = threading.Lock()


def embedder(name: str):
    from sentence_transformers import SentenceTransformer
    from sft_core.models import EMBEDDED_EMBEDDER, embedder_path
    with _LOCK:
        if name not in _EMBEDDERS:
            where = str(embedder_path()) if name in (EMBEDDED_EMBEDDER, "") else name
            try:
                _EMBEDDERS[name] = SentenceTransformer(where, device="cpu")
            except Exception as e:
                raise RetrievalError(f"cannot load embedder {name!r} ({type(e).__name__}); offline, use the embedded "
                                     "all-minilm-l6-v2 or a local model directory", "embedder") from None
        return _EMBEDDERS[name]


def chunk_text(text: str, tokenizer, size: int, overlap: int) -> list[tuple[int, int]]:
    """Token windows of ``size`` with ``overlap``, as (start, end) character offsets into ``text``."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
    offsets = enc["offset_mapping"]
    if not offsets:
        return [(0, len(text))] if text.strip() else []
    out, step, i = [], size - overlap, 0
    while True:
        window = offsets[i:i + size]
        out.append((window[0][0], window[-1][1]))
        if i + size >= len(offsets):
            break
        i += step
    return out


_TOKEN = re.compile(r"[a-z0-9_]+(?:\.[a-z0-9_]+)*")


def lexical_tokens(text: str) -> list[str]:
    """Words, plus dotted identifiers whole and in parts (json.dumps -> json.dumps, json, dumps)."""
    out = []
    for m in _TOKEN.finditer(text.lower()):
        tok = m.group()
        out.append(tok)
        if "." in tok:
            out += tok.split(".")
    return out


# ------------------------------------------------------------------------------------------------
# The knowledge base
# ------------------------------------------------------------------------------------------------
class KnowledgeBase:
    def __init__(self, name: str, path: Path, manifest: dict, chunks: list[dict], embeddings: np.ndarray):
        import bm25s
        self.name, self.path, self.manifest, self.chunks, self.embeddings = name, path, manifest, chunks, embeddings
        self.cfg = RetrievalConfig(**manifest["config"])
        self.bm25 = bm25s.BM25()
        self.bm25.index([lexical_tokens(c["title"] + " " + c["text"]) or ["_"] for c in chunks], show_progress=False)
        self._rerankers: dict[str, object] = {}

    @classmethod
    def load(cls, name: str, ws: Workspace) -> "KnowledgeBase":
        return open_kb(name, ws)

    # -- searching ---------------------------------------------------------------------------
    def _bm25(self, query: str, n: int) -> list[tuple[int, float]]:
        toks = lexical_tokens(query)
        if not toks or not self.chunks:
            return []
        n = min(n, len(self.chunks))
        docs, scores = self.bm25.retrieve([toks], k=n, show_progress=False)
        return [(int(d), float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]

    def _dense(self, query: str, n: int) -> list[tuple[int, float]]:
        if not self.chunks:
            return []
        q = embedder(self.cfg.embedder).encode([query], normalize_embeddings=True, convert_to_numpy=True)[0]
        sims = self.embeddings @ q.astype(np.float32)
        n = min(n, len(sims))
        top = np.argpartition(-sims, n - 1)[:n]
        top = top[np.argsort(-sims[top])]
        return [(int(i), float(sims[i])) for i in top]

    def search(self, query: str, k: int | None = None, mode: str = "hybrid", reranker: str | None = None) -> list[Hit]:
        """Top-k passages. ``reranker`` (a cross-encoder dir or hub id; "" for none) overrides the
        knowledge base's own setting for this query; reranking applies to the hybrid mode."""
        if mode not in MODES:
            raise RetrievalError(f"unknown mode {mode!r}; choose {', '.join(MODES)}", "mode")
        k = k or self.cfg.top_k
        reranker = self.cfg.reranker if reranker is None else reranker
        if mode == "bm25":
            ranked = self._bm25(query, k)
        elif mode == "dense":
            ranked = self._dense(query, k)
        else:
            depth = max(50, 4 * k)
            fused: dict[int, float] = {}
            for ranking in (self._bm25(query, depth), self._dense(query, depth)):
                for rank, (i, _) in enumerate(ranking, 1):
                    fused[i] = fused.get(i, 0.0) + 1.0 / (self.cfg.rrf_k + rank)
            ranked = sorted(fused.items(), key=lambda x: -x[1])[:max(k, 20) if reranker else k]
            if reranker:
                ranked = self._rerank(query, ranked, reranker)[:k]
        return [self._hit(i, s) for i, s in ranked[:k]]

    def _rerank(self, query: str, ranked: list[tuple[int, float]], name: str) -> list[tuple[int, float]]:
        from sentence_transformers import CrossEncoder
        if name not in self._rerankers:
            try:
                self._rerankers[name] = CrossEncoder(name, device="cpu")
            except Exception as e:
                raise RetrievalError(f"cannot load reranker {name!r} ({type(e).__name__}); offline, give a local "
                                     "cross-encoder directory", "reranker") from None
        scores = self._rerankers[name].predict([(query, self.chunks[i]["text"]) for i, _ in ranked])
        return sorted(((i, float(s)) for (i, _), s in zip(ranked, scores)), key=lambda x: -x[1])

    def _hit(self, i: int, score: float) -> Hit:
        c = self.chunks[i]
        return Hit(text=c["text"], source=c["source"], position=f"chunk {c['index']}, chars {c['start']}-{c['end']}",
                   score=score, doc_id=c["doc_id"], chunk_id=i, title=c["title"], start=c["start"], end=c["end"])

    @property
    def n_docs(self) -> int:
        return len({c["doc_id"] for c in self.chunks})


INDEX_FIELDS = ("chunk_tokens", "chunk_overlap", "embedder", "text_field")  # RetrievalConfig fields stored in the index

_KBS: dict[str, tuple[float, KnowledgeBase]] = {}


def open_kb(name: str, ws: Workspace) -> KnowledgeBase:
    """Load a knowledge base (cached per process until its manifest changes)."""
    path = ws.kb_dir(safe_name(name, "knowledge base"))
    mf = path / "manifest.json"
    if not mf.exists():
        known = sorted(p.name for p in ws.kb_dir().iterdir() if (p / "manifest.json").exists()) if ws.kb_dir().exists() else []
        raise RetrievalError(f"unknown knowledge base {name!r}; known: {', '.join(known) or 'none (build one first)'}",
                             "knowledge base")
    mtime = mf.stat().st_mtime_ns
    with _LOCK:
        cached = _KBS.get(str(path))
        if cached and cached[0] == mtime:
            return cached[1]
    manifest = json.loads(mf.read_text())
    chunks = [json.loads(line) for line in (path / "chunks.jsonl").read_text(encoding="utf-8").splitlines() if line]
    emb = np.load(path / "embeddings.npy") if chunks else np.zeros((0, 1), np.float32)
    kb = KnowledgeBase(name, path, manifest, chunks, emb)
    with _LOCK:
        _KBS[str(path)] = (mtime, kb)
    return kb


def build_kb(paths: list[str | Path], name: str, cfg: RetrievalConfig | None = None, *, ws: Workspace,
             store: Store | None = None) -> BuildResult:
    """Create or update a knowledge base from files/folders. Unchanged files are not re-embedded."""
    safe_name(name, "name")
    store = store or open_store(ws.db_url)
    final = ws.kb_dir(name)
    old_manifest = json.loads((final / "manifest.json").read_text()) if (final / "manifest.json").exists() else None
    if cfg is None:
        cfg = RetrievalConfig(**old_manifest["config"]) if old_manifest else RetrievalConfig()
    cfg.validate()
    files, problems = collect_files(paths)
    old_chunks, old_emb = [], None
    # only what shapes the stored chunks and vectors decides whether they can be reused; search-time
    # options (top_k, rrf_k, reranker) change without re-embedding anything
    compatible = bool(old_manifest) and all(old_manifest["config"].get(f) == getattr(cfg, f) for f in INDEX_FIELDS)
    if old_manifest and compatible:
        old_chunks = [json.loads(line) for line in (final / "chunks.jsonl").read_text(encoding="utf-8").splitlines() if line]
        old_emb = np.load(final / "embeddings.npy") if old_chunks else None
    old_sources = old_manifest["sources"] if compatible else {}
    # the KB's sources: those it had (still on disk) plus the ones given now
    wanted = {str(f): f for f in files}
    removed = []
    for src in old_sources:
        if src not in wanted:
            if Path(src).exists():
                wanted[src] = Path(src)
            else:
                removed.append(src)
    model = embedder(cfg.embedder)
    tok = model.tokenizer
    new_chunks: list[dict] = []
    rows: list[np.ndarray] = []
    sources: dict[str, dict] = {}
    to_embed: list[int] = []
    reused, indexed = 0, []
    for src, f in sorted(wanted.items()):
        digest = sha256_file(f)
        prev = old_sources.get(src)
        if prev and prev["sha256"] == digest and old_emb is not None:
            idx = [i for i, c in enumerate(old_chunks) if c["source"] == src]
            for i in idx:
                new_chunks.append(old_chunks[i])
                rows.append(old_emb[i])
            sources[src] = prev
            reused += 1
            continue
        try:
            docs = read_documents(f, cfg.text_field)
        except RetrievalError as e:
            problems.append(str(e))
            continue
        n_before = len(new_chunks)
        for d in docs:
            for ci, (a, b) in enumerate(chunk_text(d["text"], tok, cfg.chunk_tokens, cfg.chunk_overlap)):
                new_chunks.append({"doc_id": d["doc_id"], "title": d["title"], "source": src, "start": a, "end": b,
                                   "index": ci, "text": d["text"][a:b]})
                rows.append(None)  # type: ignore[arg-type]
                to_embed.append(len(new_chunks) - 1)
        sources[src] = {"sha256": digest, "n_chunks": len(new_chunks) - n_before, "n_docs": len(docs),
                        "indexed_at": time.time()}
        indexed.append(f.name)
    if to_embed:
        vecs = model.encode([new_chunks[i]["title"] + "\n" + new_chunks[i]["text"] for i in to_embed],
                            batch_size=64, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        for i, v in zip(to_embed, vecs):
            rows[i] = v
    if not new_chunks and not old_manifest:
        raise RetrievalError("no indexable text in the given files: " + ("; ".join(problems) or "none given"), name)
    for i, c in enumerate(new_chunks):
        c["chunk_id"] = i
    dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") else model.get_sentence_embedding_dimension()
    emb = np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
    manifest = {"name": name, "config": asdict(cfg), "sources": sources, "embedder": cfg.embedder,
                "n_chunks": len(new_chunks), "updated_at": time.time(),
                "created_at": old_manifest["created_at"] if old_manifest else time.time()}
    # write the complete new index beside the old one, then swap
    tmp = final.parent / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        write_jsonl(tmp / "chunks.jsonl", new_chunks)
        np.save(tmp / "embeddings.npy", emb)
        atomic_write_json(tmp / "manifest.json", manifest)
        old = final.parent / f".{name}.{uuid.uuid4().hex[:8]}.old"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_docs = len({c["doc_id"] for c in new_chunks})
    from sft_core.db import kbs as kb_rows
    kb_rows.upsert(store, name, str(final), n_docs, len(new_chunks), cfg.embedder, created_at=manifest["created_at"])
    return BuildResult(name, n_docs, len(new_chunks), len(to_embed), reused, indexed, removed, problems)


def list_kbs(ws: Workspace, store: Store | None = None) -> list[dict]:
    from sft_core.db import kbs as kb_rows
    return kb_rows.list_kbs(store or open_store(ws.db_url))


# ------------------------------------------------------------------------------------------------
# RAG prompts
# ------------------------------------------------------------------------------------------------
RAG_INSTRUCTION = ("Answer the question using the context passages below. If they do not contain the answer, "
                   "say so briefly.")


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_rag_messages(question: str, hits: list[Hit], tokenizer, max_context_tokens: int,
                       system: str | None = None) -> tuple[list[dict], list[Hit]]:
    """Chat messages with the passages (and their sources) before the question, within the budget.

    The question is never truncated; passages are added in rank order and the last one that does
    not fit whole is cut at a token boundary. Returns (messages, passages actually used)."""
    head = RAG_INSTRUCTION + "\n\nContext:\n"
    tail = f"\n\nQuestion: {question}"
    budget = max_context_tokens - _n_tokens(tokenizer, head + tail) - (_n_tokens(tokenizer, system) if system else 0)
    parts, used = [], []
    for i, h in enumerate(hits, 1):
        label = f"[{i}] ({Path(h.source).name} · {h.doc_id}) "
        text = label + h.text.strip() + "\n"
        need = _n_tokens(tokenizer, text)
        if need <= budget:
            parts.append(text)
            used.append(h)
            budget -= need
            continue
        room = budget - _n_tokens(tokenizer, label) - 2
        if room >= 16:  # a useful fragment fits: cut the passage at a token boundary
            ids = tokenizer(h.text.strip(), add_special_tokens=False)["input_ids"][:room]
            parts.append(label + tokenizer.decode(ids) + " …\n")
            used.append(h)
        break
    content = (head + "".join(parts) + tail) if parts else question
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return msgs, used


# ------------------------------------------------------------------------------------------------
# Retrieval quality
# ------------------------------------------------------------------------------------------------
def evaluate_retrieval(kb: KnowledgeBase, records: list[dict], ks: tuple[int, ...] = (1, 5, 10),
                       modes: tuple[str, ...] = MODES) -> dict[str, dict]:
    """recall@k and MRR per mode, for records whose meta.source names their document."""
    rows = [r for r in records if (r.get("meta") or {}).get("source")]
    if not rows:
        raise RetrievalError("no rows carry meta.source (the document they came from)", "dataset")
    depth = max(ks)
    out = {}
    for mode in modes:
        hits_at = {k: 0 for k in ks}
        rr = 0.0
        for r in rows:
            ranked = [h.doc_id for h in kb.search(r["instruction"], k=depth, mode=mode)]
            # several chunks of one document: its rank is its first chunk's
            seen, docs = set(), []
            for d in ranked:
                if d not in seen:
                    seen.add(d)
                    docs.append(d)
            target = r["meta"]["source"]
            if target in docs:
                rank = docs.index(target) + 1
                rr += 1.0 / rank
                for k in ks:
                    hits_at[k] += rank <= k
        out[mode] = {**{f"recall@{k}": hits_at[k] / len(rows) for k in ks}, "mrr": rr / len(rows), "n": len(rows)}
    return out


# ------------------------------------------------------------------------------------------------
# Index builds as jobs (light: they declare no accelerator, so they may run beside a training run)
# ------------------------------------------------------------------------------------------------
def submit_build(paths: list[str | Path], name: str, ws: Workspace, store: Store | None = None,
                 stage: bool = True, config: dict | None = None) -> str:
    """Queue a ``kb_build`` job. With ``stage`` (the app) the documents are first copied into the
    workspace, because uploads are temporary files of the web server; the CLI indexes them in place.
    ``config`` is a RetrievalConfig as a dict (None: the knowledge base's own or the defaults). Bad names,
    bad options and missing files are refused before anything is queued."""
    import shutil
    import uuid
    from sft_core import jobs
    safe_name(name, "name")
    store = store or open_store(ws.db_url)
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise RetrievalError(f"no such file: {', '.join(missing)}", "files")
    if config is not None:
        load_config(RetrievalConfig, overrides=config)  # validates: a bad option fails here, not in the worker
    if not stage:
        return jobs.submit("kb_build", name, {"paths": [str(Path(p).resolve()) for p in paths], "config": config},
                           ws=ws, store=store)
    staged = ws.root / "uploads" / f"kb-{name}-{uuid.uuid4().hex[:8]}"
    staged.mkdir(parents=True)
    copies = []
    for i, p in enumerate(paths):
        src = Path(p)
        dst = staged / f"{i:03d}-{src.name}"
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        copies.append(str(dst))
    return jobs.submit("kb_build", name, {"paths": copies, "staged": str(staged)}, ws=ws, store=store)


def job_entry(ctx, payload: dict) -> None:
    import shutil
    name = ctx.job["ref"]
    ctx.progress(0, 1, force=True, unit="index", step="indexing")
    cfg = load_config(RetrievalConfig, overrides=payload["config"]) if payload.get("config") else None
    try:
        info = build_kb(payload["paths"], name, cfg, ws=ctx.ws, store=ctx.store)
    finally:
        if payload.get("staged") and ctx.ws.contains(payload["staged"]):
            shutil.rmtree(payload["staged"], ignore_errors=True)
    ctx.progress(1, 1, force=True, unit="index", result=str(info),
                 empty=bool(info.problems and not info.indexed_sources and not info.reused_sources))
