"""`sft-studio eval`, `evals list`, `report EVAL_ID`."""
from __future__ import annotations

import sys

from sft_core import StudioError
from sft_core.commands.follow import follow_job
from sft_core.config import StudioSettings
from sft_core.db import evals as eval_rows
from sft_core.store import loads, open_store
from sft_core.workspace import Workspace


def cmd_eval(args) -> int:
    from evals import runner
    if not args.dataset and not args.resume:
        raise StudioError("give --dataset NAME (or --resume EVAL_ID)", "dataset")
    if args.resume and (args.judge or args.judge_model):
        raise StudioError("--judge is fixed when an eval is created; --resume keeps its setting", "judge")
    ws = Workspace.from_env()
    store = open_store(ws.db_url)
    systems = [s for s in args.systems.split(",") if s.strip()]
    metrics = [m for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    eval_id = args.resume or runner.create_eval(
        args.dataset, systems, split=args.split, kb=args.kb, limit=args.limit, metrics=metrics,
        judge=args.judge, judge_model=args.judge_model, judge_limit=args.judge_limit, few_shot=args.few_shot,
        max_new_tokens=args.max_new_tokens, base_model=args.base, ws=ws, store=store,
        settings=StudioSettings.from_env())
    print(f"eval {eval_id}: {ws.evals_dir(eval_id)}")

    job_id = runner.submit_eval(eval_id, ws, store)
    if args.detach:
        from sft_core import jobs
        jobs.follow_detached(job_id, ws, store)
        print(f"job {job_id} queued; it runs in the background (`sft-studio jobs list`, `sft-studio evals list`)")
        return 0
    status = follow_job(job_id, ws, store)
    if status != "succeeded":
        from sft_core import jobs
        job = jobs.job_row(job_id, store)
        raise StudioError(f"eval {eval_id} {status}: {job.get('error') or 'see its log'}; "
                          f"continue it with `sft-studio eval --resume {eval_id}`", "eval")
    print(file=sys.stderr)
    st = runner.eval_status(eval_id, ws, store)
    for row in st["table"]:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    from evals.report import recommendation
    import json
    print()
    print(recommendation(json.loads((ws.evals_dir(eval_id) / "scores.json").read_text())).replace("**", ""))
    print(f"report: {ws.evals_dir(eval_id) / 'report.html'}")
    return 0


def cmd_list(args) -> int:
    ws = Workspace.from_env()
    rows = eval_rows.list_evals(open_store(ws.db_url))
    if not rows:
        print("no evals yet: `sft-studio eval --dataset NAME --systems prompt,rag`")
    for r in rows:
        print(f"{r['id']:32s} {r['status']:10s} {r['dataset']}/{r['split']}  {', '.join(loads(r['systems']))}")
    return 0


def cmd_report(args) -> int:
    from evals import report
    ws = Workspace.from_env()
    store = open_store(ws.db_url)
    row = eval_rows.get(store, args.eval_id)
    if row is None:
        raise StudioError(f"unknown eval {args.eval_id!r}", "eval")
    if not (ws.evals_dir(args.eval_id) / "scores.json").exists():
        raise StudioError(f"eval {args.eval_id} has no scores yet ({row['status']})", "eval")
    html_path, md_path = report.write_report(args.eval_id, ws, store, args.out)
    print(f"{html_path}\n{md_path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("eval", help="compare systems (prompt, rag, sft:RUN, sft+rag:RUN, raft:RUN, openai:MODEL) on a test split")
    p.add_argument("--dataset", required=False)
    p.add_argument("--systems", default="prompt,rag")
    p.add_argument("--split", default="test")
    p.add_argument("--kb", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--metrics", default=None, help="comma-separated; default: all that apply")
    p.add_argument("--judge", nargs="?", const="local", default=None, metavar="ENDPOINT",
                   help="also run the LLM judge (pairwise, position-swapped, + a 1-5 rubric): with no value the "
                        "local engine on the base model; with a URL any OpenAI-compatible endpoint "
                        "(key from SFT_STUDIO_JUDGE_API_KEY or OPENAI_API_KEY)")
    p.add_argument("--judge-limit", type=int, default=None, metavar="N",
                   help="judge only the first N domain rows (default: every row; the report says how many)")
    p.add_argument("--judge-model", default=None,
                   help="model name at the judge endpoint (default: the first one it lists)")
    p.add_argument("--few-shot", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--base", default=None, help="base model (default: the app's)")
    p.add_argument("--resume", default=None, metavar="EVAL_ID", help="continue an interrupted eval")
    p.add_argument("--detach", action="store_true", help="queue the eval job and return at once")
    p.set_defaults(func=cmd_eval)
    e = sub.add_parser("evals", help="list evaluations")
    es = e.add_subparsers(dest="evals_cmd", metavar="ACTION", required=True)
    es.add_parser("list").set_defaults(func=cmd_list)
    r = sub.add_parser("report", help="(re)write an eval's decision report")
    r.add_argument("eval_id")
    r.add_argument("--out", default=None)
    r.set_defaults(func=cmd_report)
