"""`sft-studio pref build|show|train|lineage|calibrate`: preference datasets, preference tuning, judge calibration.

`pref train` rather than `train --mode dpo`: a preference run has its own option set (PreferenceConfig: beta,
loss type, from_run, ...), and one parser per config keeps every flag generated from one dataclass; the run
itself is a training job like an SFT run (`runs list|show|cancel|resume` cover both).
"""
from __future__ import annotations

import json
import sys
import threading

from sft_core import StudioError, jobs
from sft_core.config import (DataConfig, PreferenceConfig, StudioSettings, add_arguments, load_config,
                             overrides_from_args)
from sft_core.db import jobs as job_rows, runs as run_rows
from sft_core.store import open_store
from sft_core.workspace import Workspace


def _ctx():
    ws = Workspace.from_env()
    return ws, open_store(ws.db_url)


def cmd_build(args) -> int:
    from sft_core import preference
    ws, store = _ctx()
    sources = [x for x in (args.campaign, args.eval, args.file) if x]
    if len(sources) != 1:
        raise StudioError("give exactly one source: --campaign C, --eval E --from judge, or --file F", "source")
    if args.eval and args.source != "judge":
        raise StudioError("--eval needs --from judge (the eval's position-consistent judge verdicts)", "from")
    kw = dict(eval_fraction=args.eval_fraction, seed=args.seed, ws=ws, store=store,
              cfg=DataConfig(model=args.model) if args.model else None)
    if args.campaign:
        dv = preference.build_from_campaign(args.campaign, args.name, **kw)
    elif args.eval:
        dv = preference.build_from_judge(args.eval, args.name, **kw)
    else:
        dv = preference.build_from_file(args.file, args.name, against=args.against, **kw)
    state = "new version" if dv.created else "identical to an existing version"
    print(f"{dv.name}@{dv.version} ({state})")
    print(preference.format_report(preference.report(dv.name, dv.version, ws=ws, store=store)))
    return 0


def cmd_show(args) -> int:
    from sft_core import preference
    ws, store = _ctx()
    rep = preference.report(args.name, args.version, ws=ws, store=store)
    print(json.dumps(rep, indent=2) if args.json else preference.format_report(rep))
    return 0


def cmd_train(args) -> int:
    from sft_core import pref_train
    from sft_core.commands.train import Progress
    ws, store = _ctx()
    cfg = load_config(PreferenceConfig, args.config, overrides_from_args(args, PreferenceConfig))
    run_id = pref_train.submit_pref_run(cfg, ws, store, settings=StudioSettings.from_env())
    print(f"preference run {run_id} queued ({ws.runs_dir(run_id)})")
    job = jobs.latest_job(run_id, store)
    progress = Progress(ws.runs_dir(run_id))
    stop = threading.Event()

    def ticker():
        while not stop.wait(1.0):
            progress()

    threading.Thread(target=ticker, daemon=True).start()
    try:
        status = jobs.run_in_foreground(job["id"], ws, store)
    except KeyboardInterrupt:
        jobs.cancel(run_id, ws, store)
        print("\ncancelling (the last checkpoint is kept; `sft-studio runs resume` continues)...", file=sys.stderr)
        status = jobs.run_in_foreground(job["id"], ws, store)
    finally:
        stop.set()
        progress()
    print(file=sys.stderr)
    row = job_rows.get(store, job["id"])
    print(f"run {run_id}: {status}" + (f" — {row['error']}" if row.get("error") else ""))
    if status != "succeeded":
        return 1
    print(json.dumps(json.loads((ws.runs_dir(run_id) / "metrics.json").read_text()), indent=2))
    print("lineage: " + pref_train.format_lineage(pref_train.lineage_of_run(run_id, ws, store)))
    print(f"evaluate it as system sft:{run_id}")
    return 0


def cmd_lineage(args) -> int:
    from sft_core import pref_train
    ws, store = _ctx()
    if not run_rows.exists(store, args.run_id):
        raise StudioError(f"unknown run {args.run_id!r} (see `sft-studio runs list`)", "run")
    steps = pref_train.lineage_of_run(args.run_id, ws, store)
    print(json.dumps(steps, indent=2) if args.json else pref_train.format_lineage(steps))
    return 0


def cmd_calibrate(args) -> int:
    from evals import calibration
    ws, store = _ctx()
    cal = calibration.judge_calibration(args.campaign, ws, store, n_boot=args.n_boot)
    if cal is None:
        print(f"campaign {args.campaign}: no voted pair was also judged (run its eval with --judge)")
        return 0
    print(json.dumps(cal, indent=2) if args.json else "\n".join(calibration.format_markdown(cal)))
    return 0


def register(sub) -> None:
    p = sub.add_parser("pref", help="preference datasets from votes or the judge, preference tuning (DPO), "
                                    "judge calibration")
    s = p.add_subparsers(dest="pref_cmd", metavar="ACTION", required=True)

    b = s.add_parser("build", help="build a preference dataset version (prompt/chosen/rejected pairs)")
    b.add_argument("--campaign", help="a rating campaign: its left/right votes (tie and both_bad skipped)")
    b.add_argument("--eval", help="an eval whose judge verdicts to use (with --from judge)")
    b.add_argument("--from", dest="source", choices=["judge"], help="with --eval: its position-consistent verdicts")
    b.add_argument("--file", help="a file in TRL's prompt/chosen/rejected format (plain or conversational)")
    b.add_argument("--name", required=True, help="dataset name")
    b.add_argument("--against", help="with --file: a dataset whose held-out splits the prompts are checked against")
    b.add_argument("--eval-fraction", type=float, default=0.1, help="share of prompts held out as eval pairs")
    b.add_argument("--seed", type=int, default=42, help="seed of the split")
    b.add_argument("--model", default=None, help="model whose tokenizer measures the lengths in the report")
    b.set_defaults(func=cmd_build)

    w = s.add_parser("show", help="a preference dataset's report (counts, leakage, source)")
    w.add_argument("name")
    w.add_argument("--version", default=None)
    w.add_argument("--json", action="store_true")
    w.set_defaults(func=cmd_show)

    t = s.add_parser("train", help="preference-tune (DPO by default) from an SFT run or the base model (queued)")
    t.add_argument("--config", help="YAML file with preference options (flags override it)")
    add_arguments(t, PreferenceConfig)
    t.set_defaults(func=cmd_train)

    g = s.add_parser("lineage", help="base -> SFT run -> preference dataset -> run, for a run")
    g.add_argument("run_id")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_lineage)

    c = s.add_parser("calibrate", help="judge vs human agreement on a campaign (accuracy, Cohen's kappa, CIs)")
    c.add_argument("--campaign", required=True)
    c.add_argument("--n-boot", type=int, default=1000)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_calibrate)
