"""`sft-studio rate campaign create|list`, `rate invite`, `rate publish|close`, `rate results`, `rate export`."""
from __future__ import annotations

from sft_core.workspace import Workspace


def _guidelines(value: str | None) -> str:
    """--guidelines TEXT, or @FILE for a Markdown file (raters see it above every task)."""
    from pathlib import Path
    if not value:
        return ""
    if value.startswith("@"):
        return Path(value[1:]).read_text(encoding="utf-8")  # OSError: one line from the CLI's handler
    return value


def cmd_create(args) -> int:
    from evals import rating
    systems = [s.strip() for s in args.systems.split(",") if s.strip()] if args.systems else None
    cid = rating.create_campaign(args.eval, systems, name=args.name, show_reference=not args.hide_reference,
                                 seed=args.seed, open_rating=args.open, guidelines=_guidelines(args.guidelines),
                                 reveal_after_vote=args.reveal_after_vote, ws=Workspace.from_env())
    print(cid)
    return 0


def cmd_list(args) -> int:
    from evals import rating
    from sft_core.store import loads
    for c in rating.list_campaigns(Workspace.from_env()):
        state = "published" if c["published_at"] else "closed" if c["closed_at"] else "rating"
        print(f"{c['id']}  {c['name']}  eval {c['eval_id']}  tasks {c['n_tasks']}  votes {c['n_votes']}  "
              f"systems {', '.join(loads(c['systems']))}  {'open' if c['open_rating'] else 'invite-only'}  {state}"
              + ("  reveals systems after each vote" if c["reveal_after_vote"] else ""))
    return 0


def invite_url(base_url: str, token: str) -> str:
    return f"{base_url.rstrip('/')}/?invite={token}"


def cmd_invite(args) -> int:
    """One secret link per rater; the tokens are shown once (the database keeps their sha256)."""
    from evals import rating
    for inv in rating.create_invites(args.campaign, args.rater, Workspace.from_env()):
        print(f"{inv['name']}\t{invite_url(args.base_url, inv['token'])}")
    return 0


def cmd_publish(args) -> int:
    from evals import rating
    rating.publish(args.campaign, Workspace.from_env())
    print(f"{args.campaign}: results published; rating is over")
    return 0


def cmd_close(args) -> int:
    from evals import rating
    rating.close(args.campaign, Workspace.from_env())
    print(f"{args.campaign}: closed; raters now see the results")
    return 0


def cmd_results(args) -> int:
    from evals import leaderboard, rating
    res = rating.results(args.campaign, Workspace.from_env())
    print(f"{res['name']}: {res['n_votes']} votes from {res['n_raters']} raters")
    print(res["method"])
    cols, rows = leaderboard.board_table(res)
    keep = [i for i, c in enumerate(cols) if c != "interval"]  # the text bar needs a monospace table cell
    print("  ".join(f"{cols[i]:>14s}" if i else f"{cols[i]:28s}" for i in keep))
    for r in rows:
        print("  ".join(f"{str(r[i]):>14s}" if i else f"{str(r[i]):28s}" for i in keep))
    if res["leaderboard"]:
        print("win rate (row beats column; ties count half):")
        cols, rows = leaderboard.win_rate_table(res)
        print(" " * 28 + "".join(f"{c[:12]:>13s}" for c in cols[1:]))
        for r in rows:
            print(f"{r[0]:28s}" + "".join(f"{c:>13s}" for c in r[1:]))
    print(leaderboard.agreement_text(res))
    for w in res["warnings"]:
        print(f"warning: {w}")
    return 0


def cmd_export(args) -> int:
    from evals import rating
    ws = Workspace.from_env()
    ext = "csv" if args.format == "csv" else "jsonl"
    out = args.out or ws.root / "exports" / f"{args.campaign}-{args.format}.{ext}"
    print(rating.export_votes(args.campaign, args.format, out, ws))
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
    cc.add_argument("--guidelines", default=None, metavar="TEXT|@FILE",
                    help="what raters should judge, shown above every task (Markdown; @FILE reads a file)")
    cc.add_argument("--seed", type=int, default=None, help="fix the left/right draw (default: OS randomness)")
    cc.add_argument("--open", action="store_true",
                    help="anyone may join under a self-chosen name (trusted rooms); default: invites only")
    cc.add_argument("--reveal-after-vote", action="store_true",
                    help="show each rater which systems were A and B once they voted on a task (that vote can "
                         "then not be changed); default: never shown")
    cc.set_defaults(func=cmd_create)
    cs.add_parser("list").set_defaults(func=cmd_list)
    i = s.add_parser("invite", help="secret invite links, one per rater (printed once: NAME<TAB>URL)")
    i.add_argument("--campaign", required=True)
    i.add_argument("--rater", required=True, action="append", help="the rater's display name (repeat for several)")
    i.add_argument("--base-url", default="http://localhost:7860", help="where the app is reached (default: %(default)s)")
    i.set_defaults(func=cmd_invite)
    pb = s.add_parser("publish", help="show the results to raters (ends the rating)")
    pb.add_argument("campaign")
    pb.set_defaults(func=cmd_publish)
    cl = s.add_parser("close", help="end the rating (raters then see the results)")
    cl.add_argument("campaign")
    cl.set_defaults(func=cmd_close)
    r = s.add_parser("results", help="Bradley-Terry ratings with 95% intervals, win rates, agreement")
    r.add_argument("campaign")
    r.set_defaults(func=cmd_results)
    e = s.add_parser("export", help="votes as csv/jsonl, or a DPO preference dataset")
    e.add_argument("campaign")
    e.add_argument("--format", choices=["csv", "jsonl", "dpo"], default="csv")
    e.add_argument("--out", default=None, help="default: <workspace>/exports/CAMPAIGN-FORMAT.EXT")
    e.set_defaults(func=cmd_export)
