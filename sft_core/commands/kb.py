"""`sft-studio kb build|search|list|eval`."""
from __future__ import annotations

from pathlib import Path

from sft_core import retrieval
from sft_core.config import RetrievalConfig, add_arguments, load_config, overrides_from_args
from sft_core.workspace import Workspace


def cmd_build(args) -> int:
    """Index the files as a ``kb_build`` job (the same job the app queues), followed here unless --detach."""
    from sft_core.commands.follow import run_job
    from sft_core.config import to_dict
    from sft_core.store import open_store
    overrides = {k: v for k, v in overrides_from_args(args, RetrievalConfig).items() if v is not None}
    cfg = load_config(RetrievalConfig, args.config, overrides) if (overrides or args.config) else None
    ws = Workspace.from_env()
    store = open_store(ws.db_url)
    # the files stay where they are (no staging copy, unlike an upload): unchanged ones are reused by path
    job_id = retrieval.submit_build(args.paths, args.name, ws, store, stage=False,
                                    config=to_dict(cfg) if cfg is not None else None)
    done = run_job(job_id, ws, store, args.detach, f"knowledge base {args.name}")
    if done is None:
        return 0
    print(f"knowledge base {args.name}: {done.get('result', 'built')}")
    return 1 if done.get("empty") else 0


def cmd_search(args) -> int:
    kb = retrieval.open_kb(args.name, Workspace.from_env())
    hits = kb.search(args.query, k=args.k, mode=args.mode, reranker=args.reranker)
    if not hits:
        print("no hits")
    for rank, h in enumerate(hits, 1):
        print(f"#{rank}  score {h.score:.4f}  {Path(h.source).name} · {h.doc_id} · {h.position}")
        print("    " + h.text.strip().replace("\n", "\n    ")[:800])
        print()
    return 0


def cmd_list(args) -> int:
    rows = retrieval.list_kbs(Workspace.from_env())
    if not rows:
        print("no knowledge bases yet: `sft-studio kb build PATH... --name NAME`")
    for r in rows:
        print(f"{r['name']:24s} docs {r['n_docs']:6d}  chunks {r['n_chunks']:6d}  embedder {r['embedder']}")
    return 0


def cmd_eval(args) -> int:
    from sft_core import data
    ws = Workspace.from_env()
    kb = retrieval.open_kb(args.name, ws)
    recs = data.load_split(args.dataset, args.split, ws=ws)
    res = retrieval.evaluate_retrieval(kb, recs)
    print(f"retrieval on {args.dataset}/{args.split} ({next(iter(res.values()))['n']} questions) against kb {args.name}")
    print(f"{'mode':8s} {'recall@1':>9s} {'recall@5':>9s} {'recall@10':>10s} {'MRR':>7s}")
    for mode, m in res.items():
        print(f"{mode:8s} {m['recall@1']:9.3f} {m['recall@5']:9.3f} {m['recall@10']:10.3f} {m['mrr']:7.3f}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("kb", help="knowledge bases for retrieval-augmented generation")
    s = p.add_subparsers(dest="kb_cmd", metavar="ACTION", required=True)
    b = s.add_parser("build", help="index files/folders (.txt .md .html .pdf .jsonl); unchanged files are reused")
    b.add_argument("paths", nargs="+")
    b.add_argument("--name", required=True)
    b.add_argument("--config", help="YAML file with retrieval options")
    b.add_argument("--detach", action="store_true", help="queue the build job and return at once")
    add_arguments(b, RetrievalConfig)
    b.set_defaults(func=cmd_build)
    q = s.add_parser("search", help="search a knowledge base")
    q.add_argument("name")
    q.add_argument("query")
    q.add_argument("-k", type=int, default=5)
    q.add_argument("--mode", choices=retrieval.MODES, default="hybrid")
    q.add_argument("--reranker", default=None, metavar="MODEL",
                   help="cross-encoder (local dir or hub id) to rerank the hybrid candidates; default: the kb's setting")
    q.set_defaults(func=cmd_search)
    s.add_parser("list", help="list knowledge bases").set_defaults(func=cmd_list)
    e = s.add_parser("eval", help="recall@1/5/10 and MRR of bm25, dense and hybrid on a dataset with meta.source")
    e.add_argument("name")
    e.add_argument("--dataset", required=True)
    e.add_argument("--split", default="test")
    e.set_defaults(func=cmd_eval)
