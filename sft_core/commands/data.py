"""`sft-studio data check|import|list|synth` and `sft-studio example build`."""
from __future__ import annotations

import json

from sft_core import data
from sft_core.render import format_report
from sft_core.config import DataConfig, add_arguments, load_config, overrides_from_args
from sft_core.workspace import Workspace


def _cfg(args) -> DataConfig:
    return load_config(DataConfig, getattr(args, "config", None), overrides_from_args(args, DataConfig))


def cmd_check(args) -> int:
    report = data.check_file(args.path, _cfg(args), ws=Workspace.from_env())
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    if not report.ok:  # the report is on stdout; stderr gets the verdict in one line
        _verdict(report)
    return 0 if report.ok else 1


def _verdict(report) -> None:
    import sys
    errors = report.errors
    first = f"{errors[0]}" if errors else "no valid records"
    more = f" (and {len(errors) - 1} more, listed above)" if len(errors) > 1 else ""
    print(f"error: {report.file}: invalid data: {first}{more}"[:500], file=sys.stderr)


def cmd_import(args) -> int:
    from sft_core.workspace import safe_name
    safe_name(args.name, "name")
    cfg = _cfg(args)
    ws = Workspace.from_env()
    checked = data.check(args.path, cfg, ws=ws)  # read, normalised, split and scored once; imported as checked
    report = checked.report
    if not report.ok:
        print(format_report(report))
        first = report.errors[0] if report.errors else "no valid records"
        more = f" (and {len(report.errors) - 1} more, listed above)" if len(report.errors) > 1 else ""
        raise data.DataError(f"invalid data, nothing stored: {first}{more}", args.path)
    v = data.import_checked(checked, args.name, ws=ws)
    state = "new version" if v.created else "identical to existing version"
    print(f"{v.name}@{v.version} ({state}): " + ", ".join(f"{k} {n}" for k, n in v.splits.items()))
    return 0


def cmd_list(args) -> int:
    rows = data.list_datasets(Workspace.from_env())
    if not rows:
        print("no datasets yet: `sft-studio data import FILE --name NAME` or `sft-studio example build`")
    for r in rows:
        print(f"{r['name']}@{r['version']}  rows {r['n_rows']}  " + " ".join(f"{k}={v}" for k, v in r["splits"].items())
              + f"  ({r['source'] or ''})")
    return 0


def cmd_example(args) -> int:
    """The example domain as an ``example`` job (the one the app queues on first start): base model,
    dataset and knowledge base, followed here unless --detach."""
    from sft_core import jobs
    from sft_core.commands.follow import run_job
    from sft_core.config import StudioSettings
    from sft_core.example import BOOTSTRAP_REF
    from sft_core.store import open_store
    ws = Workspace.from_env()
    store = open_store(ws.db_url)
    base = args.base or StudioSettings.from_env().base_model
    job_id = jobs.submit("example", BOOTSTRAP_REF, {"base_model": base, "name": "pydocs"}, ws=ws, store=store)
    done = run_job(job_id, ws, store, args.detach, "example domain")
    if done is not None:
        print(f"example domain: {done.get('result', 'built')}")
    return 0


def cmd_synth(args) -> int:
    """Synthetic Q&A from a knowledge base as a ``synth`` job (the one the app queues), followed here unless
    --detach; prints the filter counts and the splits."""
    from sft_core import synth
    from sft_core.commands.follow import run_job
    from sft_core.store import open_store
    cfg = load_config(synth.SynthConfig, args.config, overrides_from_args(args, synth.SynthConfig))
    ws = Workspace.from_env()
    store = open_store(ws.db_url)
    job_id = synth.submit_synth(cfg, ws, store)
    done = run_job(job_id, ws, store, args.detach, f"synth {cfg.name}")
    if done is not None:
        print(f"dataset {done.get('result', cfg.name)}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("data", help="check, import and list instruction datasets")
    s = p.add_subparsers(dest="data_cmd", metavar="ACTION", required=True)
    for name, fn, help_ in [("check", cmd_check, "validate a file and print its quality report"),
                            ("import", cmd_import, "validate, split and store a file as a dataset version")]:
        q = s.add_parser(name, help=help_)
        q.add_argument("path", help="JSONL, JSON, CSV, Parquet file or a saved `datasets` directory")
        if name == "import":
            q.add_argument("--name", required=True, help="dataset name")
        else:
            q.add_argument("--json", action="store_true", help="print the report as JSON")
        q.add_argument("--config", help="YAML file with data options")
        add_arguments(q, DataConfig)
        q.add_argument("--map", dest="mapping", default=None, help="alias of --mapping")
        q.set_defaults(func=fn)
    s.add_parser("list", help="list dataset versions").set_defaults(func=cmd_list)
    from sft_core.synth import SynthConfig
    y = s.add_parser("synth", help="generate a Q&A dataset from a knowledge base (test split held out by document)")
    y.add_argument("--config", help="YAML file with synth options (e.g. a multi-line prompt_template)")
    y.add_argument("--detach", action="store_true", help="queue the synth job and return at once")
    add_arguments(y, SynthConfig)
    y.set_defaults(func=cmd_synth)
    e = sub.add_parser("example", help="the built-in example domain (Python stdlib docs)")
    es = e.add_subparsers(dest="example_cmd", metavar="ACTION", required=True)
    eb = es.add_parser("build", help="build the example corpus, dataset and knowledge base")
    eb.add_argument("--base", default=None, help="base model to prepare (default: the studio's, SFT_STUDIO_BASE_MODEL)")
    eb.add_argument("--detach", action="store_true", help="queue the build job and return at once")
    eb.set_defaults(func=cmd_example)
