"""`sft-studio rate campaign create|list`, `rate results`, `rate export`."""
from __future__ import annotations

import json


def cmd_create(args) -> int:
    from evals import rating
    cid = rating.create_campaign(args.eval, [s for s in args.systems.split(",") if s] if args.systems else None,
                                 show_reference=not args.hide_reference)
    print(cid)
    return 0


def cmd_list(args) -> int:
    from evals import rating
    for c in rating.list_campaigns():
        print(f"{c['id']}  eval {c['eval_id']}  tasks {c['n_tasks']}  votes {c['n_votes']}  {', '.join(json.loads(c['systems']))}")
    return 0


def cmd_results(args) -> int:
    from evals import rating
    res = rating.results(args.campaign)
    print(f"{res['n_votes']} votes from {res['n_raters']} raters — {res['method']}")
    print(f"{'system':28s} {'BT':>7s} {'95% CI':>18s} {'Elo':>7s} {'votes':>6s}")
    for r in res["leaderboard"]:
        print(f"{r['system']:28s} {r['bt_score']:7.3f} [{r['ci_low']:7.3f},{r['ci_high']:7.3f}] {r['elo']:7.1f} {r['votes']:6d}")
    for k, v in res["agreement"].items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def cmd_export(args) -> int:
    from evals import rating
    ext = "csv" if args.format == "csv" else "jsonl"
    out = args.out or f"{args.campaign}-{args.format}.{ext}"
    print(rating.export_votes(args.campaign, args.format, out))
    return 0


def register(sub) -> None:
    p = sub.add_parser("rate", help="blind human rating campaigns")
    s = p.add_subparsers(dest="rate_cmd", metavar="ACTION", required=True)
    c = s.add_parser("campaign", help="create or list campaigns")
    cs = c.add_subparsers(dest="campaign_cmd", metavar="ACTION", required=True)
    cc = cs.add_parser("create", help="a campaign from an eval run")
    cc.add_argument("--eval", required=True)
    cc.add_argument("--systems", default=None, help="comma-separated (default: all of the eval's)")
    cc.add_argument("--hide-reference", action="store_true")
    cc.set_defaults(func=cmd_create)
    cs.add_parser("list").set_defaults(func=cmd_list)
    r = s.add_parser("results", help="Bradley-Terry leaderboard, Elo, agreement")
    r.add_argument("campaign")
    r.set_defaults(func=cmd_results)
    e = s.add_parser("export", help="votes as csv/jsonl, or a DPO preference dataset")
    e.add_argument("campaign")
    e.add_argument("--format", choices=["csv", "jsonl", "dpo"], default="csv")
    e.add_argument("--out", default=None)
    e.set_defaults(func=cmd_export)
