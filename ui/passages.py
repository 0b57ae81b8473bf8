"""Retrieved passages for people (Knowledge tab search, Chat's RAG panes): collapsible chips with the source,
the relevance and the score in words, the query's words highlighted."""
from __future__ import annotations

import re
from pathlib import Path

# What a passage's score is, per retriever (sft_core/retrieval.py KnowledgeBase.search): (short name, what it means).
SCORE_WORDS = {
    "hybrid": ("fused rank score", "hybrid score: reciprocal-rank fusion, 1/(k + rank) summed over the keyword (BM25) "
               "and the meaning (embedding) rankings; higher is better, the most is 2/(k + 1) for a passage both "
               "rank first"),
    "bm25": ("BM25 score", "BM25 score: keyword match, weighted by how rare each word is; higher is better, "
             "no fixed top"),
    "dense": ("cosine similarity", "cosine similarity of the question's and the passage's embeddings: -1 to 1, "
              "higher is better"),
    "rerank": ("reranker score", "the cross-encoder reranker's score for the question and passage together; "
               "higher is better"),
}


def _score_text(score: float, mode: str, rrf_k: int) -> str:
    """The score in words: for hybrid search against its most (both rankings put the passage first)."""
    name = SCORE_WORDS.get(mode, SCORE_WORDS["hybrid"])[0]
    if mode == "hybrid":
        return f"{name} {score:.3f} (most {2 / (rrf_k + 1):.3f})"
    return f"{name} {score:.3f}" if mode != "bm25" else f"{name} {score:.2f}"


HIGHLIGHT_SKIP = {"the", "and", "for", "with", "that", "this", "from", "what", "which", "when", "where", "who", "why",
                  "how", "does", "are", "was", "were", "you", "your", "can", "into", "about", "not", "any", "all"}


def _highlight(text: str, query: str | None) -> str:
    """HTML-escaped text with the query's words (3+ letters) marked."""
    import html
    words = sorted({w for w in re.findall(r"\w{3,}", query or "") if w.lower() not in HIGHLIGHT_SKIP},
                   key=len, reverse=True)
    out = html.escape(text)
    if words:
        pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(html.escape(w)) for w in words) + r")(?!\w)", re.I)
        out = pattern.sub(r"<mark>\1</mark>", out)
    return out.replace("\n", "<br>")


def _hits_markdown(hits, query: str | None = None, open_first: bool = False, mode: str = "hybrid",
                   rrf_k: int = 60) -> str:
    """Retrieved passages as collapsible chips (HTML <details>, one line each, so Markdown leaves it
    alone): the source file once (the document id only when it says more), the chunk's heading in small
    type, relevance and the score in words (``mode``: which retriever scored it), the position, then the
    passage as plain text with the query's words highlighted. Document text is escaped: it can neither
    format the page nor load anything."""
    import html
    hits = list(hits or [])
    if not hits:
        return ""
    get = (lambda h, k: h.get(k) if isinstance(h, dict) else getattr(h, k, None))
    top = max((float(get(h, "score") or 0.0) for h in hits), default=0.0)
    out = ['<div class="passages">']
    for i, h in enumerate(hits, 1):
        src = Path(str(get(h, "source") or "")).name
        doc = str(get(h, "doc_id") or "")
        label = src if doc in ("", src, Path(src).stem) else f"{src} · {doc}"
        score = float(get(h, "score") or 0.0)
        rel = f"relevance {score / top:.0%}" if top > 0 else "relevance n/a"
        title = str(get(h, "title") or "").strip().lstrip("#").strip()
        head = f' <span class="passage-title">{html.escape(title[:120])}</span>' if title and title != label else ""
        help_ = f"relevance: this passage's score as a share of the best passage's. {SCORE_WORDS.get(mode, SCORE_WORDS['hybrid'])[1]}"
        text = str(get(h, "text") or "")
        text = text if len(text) < 700 else text[:700] + " …"
        out.append(f'<details class="passage"{" open" if open_first and i == 1 else ""}><summary>'
                   f'<span class="passage-n">{i}</span> <span class="passage-src">{html.escape(label)}</span>{head} '
                   f'<span class="passage-rel" title="{html.escape(help_)}">{rel} · '
                   f'{html.escape(_score_text(score, mode, rrf_k))}</span>'
                   f'</summary><div class="passage-pos">{html.escape(str(get(h, "position") or ""))}</div>'
                   f'<div class="passage-text">{_highlight(text, query)}</div></details>')
    out.append("</div>")
    return "".join(out)
