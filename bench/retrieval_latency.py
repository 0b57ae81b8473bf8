"""Search latency over the example-domain knowledge base (after loading), with an in-run baseline.

Baseline: the same dense search done naively per query (re-stacking all chunk embeddings and a
full argsort), and BM25 scored by brute force over every chunk's token list. Prints ms/query for
bm25, dense, hybrid and the baselines, and the ratios.

    python bench/retrieval_latency.py [--queries 200]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections import Counter

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    home = os.environ.get("SFT_STUDIO_HOME") or tempfile.mkdtemp(prefix="kb-bench-")
    os.environ["SFT_STUDIO_HOME"] = home
    from sft_core import data, retrieval
    from sft_core.example import build_example
    from sft_core.workspace import Workspace
    ws = Workspace.at(home)
    ex = build_example(ws)
    retrieval.build_kb([ex["corpus"]], "pydocs", ws=ws)
    kb = retrieval.open_kb("pydocs", ws)
    rows = [r for s in ("test", "test_seen", "train") for r in data.load_split("pydocs", s, ws=ws)]
    queries = [r["instruction"] for r in rows][: args.queries]
    kb.search(queries[0], k=5)  # warm: embedder loaded, caches built

    def timed(fn) -> float:
        t = time.perf_counter()
        for q in queries:
            fn(q)
        return (time.perf_counter() - t) / len(queries) * 1000

    results = {mode: timed(lambda q, m=mode: kb.search(q, k=5, mode=m)) for mode in retrieval.MODES}

    model = retrieval.embedder(kb.cfg.embedder)
    rows_list = [row for row in kb.embeddings]
    docs_tokens = [retrieval.lexical_tokens(c["title"] + " " + c["text"]) for c in kb.chunks]
    df = Counter(t for toks in docs_tokens for t in set(toks))
    avg = sum(map(len, docs_tokens)) / len(docs_tokens)

    def naive_dense(q):
        qv = model.encode([q], normalize_embeddings=True)[0]
        sims = np.stack(rows_list) @ qv
        return np.argsort(-sims)[:5]

    def naive_bm25(q, k1=1.5, b=0.75):
        qt = retrieval.lexical_tokens(q)
        n = len(docs_tokens)
        scores = []
        for toks in docs_tokens:
            tf = Counter(toks)
            s = sum(math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) * tf[t] * (k1 + 1)
                    / (tf[t] + k1 * (1 - b + b * len(toks) / avg)) for t in qt if t in tf)
            scores.append(s)
        return np.argsort(-np.array(scores))[:5]

    base_dense = timed(naive_dense)
    base_bm25 = timed(naive_bm25)
    print(f"example KB: {kb.n_docs} docs, {len(kb.chunks)} chunks, {len(queries)} queries, {os.cpu_count()} CPUs")
    for mode, ms in results.items():
        print(f"{mode:8s} {ms:8.2f} ms/query")
    print(f"baseline dense (naive)  {base_dense:8.2f} ms/query   ratio naive/ours {base_dense / results['dense']:.2f}x")
    print(f"baseline bm25 (naive)   {base_bm25:8.2f} ms/query   ratio naive/ours {base_bm25 / results['bm25']:.2f}x")
    ok = results["hybrid"] < 100
    print(f"hybrid under 100 ms/query: {'yes' if ok else 'NO'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
