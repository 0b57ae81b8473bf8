"""`sft-studio rate campaign create|list`, `rate results`, `rate export`."""
from __future__ import annotations


def cmd_create(args) -> int:
    from evals import rating
    systems = [s.strip() for s in args.systems.split(",") if s.strip()] if args.systems else None
    cid = rating.create_campaign(args.eval, systems, name=args.name, show_reference=not args.hide_reference,
                                 seed=args.seed)
    print(cid)
    return 0


def cmd_list(args) -> int:
    from evals import rating
    from sft_core.store import loads
    for c in rating.list_campaigns():
        print(f"{c['id']}  {c['name']}  eval {c['eval_id']}  tasks {c['n_tasks']}  votes {c['n_votes']}  "
              f"systems {', '.join(loads(c['systems']))}")
    return 0


def cmd_results(args) -> int:
    from evals import rating
    res = rating.results(args.campaign, n_boot=args.n_boot)
    print(f"{res['name']}: {res['n_votes']} votes from {res['n_raters']} raters")
    print(res["method"])
    print(f"{'system':28s} {'BT':>7s} {'95% CI':>18s} {'Elo':>7s} {'votes':>6s}")
    for r in res["leaderboard"]:
        print(f"{r['system']:28s} {r['bt_score']:7.3f} [{r['ci_low']:7.3f},{r['ci_high']:7.3f}] {r['elo']:7.1f} {r['votes']:6d}")
    if res["leaderboard"]:
        systems = res["systems"]
        print("win rate (row beats column; ties count half):")
        print(" " * 28 + "".join(f"{s[:10]:>11s}" for s in systems))
        for s in systems:
            cells = ["—" if t == s or res["win_rate"][s][t] is None else f"{res['win_rate'][s][t]:.2f}" for t in systems]
            print(f"{s:28s}" + "".join(f"{c:>11s}" for c in cells))
    for k, v in res["agreement"].items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    for w in res["warnings"]:
        print(f"warning: {w}")
    return 0


def cmd_export(args) -> int:
    from evals import rating
    from sft_core.workspace import Workspace
    ext = "csv" if args.format == "csv" else "jsonl"
    out = args.out or Workspace.from_env().root / "exports" / f"{args.campaign}-{args.format}.{ext}"
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
    cc.add_argument("--name", default=None)
    cc.add_argument("--hide-reference", action="store_true", help="do not show raters the reference answer")
    cc.add_argument("--seed", type=int, default=None, help="fix the left/right draw (default: OS randomness)")
    cc.set_defaults(func=cmd_create)
    cs.add_parser("list").set_defaults(func=cmd_list)
    r = s.add_parser("results", help="Bradley-Terry leaderboard, Elo, win rates, agreement")
    r.add_argument("campaign")
    r.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the CIs")
    r.set_defaults(func=cmd_results)
    e = s.add_parser("export", help="votes as csv/jsonl, or a DPO preference dataset")
    e.add_argument("campaign")
    e.add_argument("--format", choices=["csv", "jsonl", "dpo"], default="csv")
    e.add_argument("--out", default=None, help="default: <workspace>/exports/CAMPAIGN-FORMAT.EXT")
    e.set_defaults(func=cmd_export)
