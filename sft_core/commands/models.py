"""`sft-studio models list`."""
from __future__ import annotations

from sft_core import models
from sft_core.workspace import Workspace


def cmd_list(args) -> int:
    ws = Workspace.from_env()
    for m in models.list_models(ws):
        print(f"{m.name:28s} {m.kind:9s} {m.path or '(not converted yet)'}  {m.description}")
    return 0


def cmd_prepare(args) -> int:
    import time
    ws = Workspace.from_env()
    t = time.time()
    path = models.resolve_model(args.name, ws)
    print(f"{args.name}: {path} ({time.time() - t:.1f}s)")
    return 0


def register(sub) -> None:
    p = sub.add_parser("models", help="list and prepare base models")
    s = p.add_subparsers(dest="models_cmd", metavar="ACTION", required=True)
    s.add_parser("list", help="list known models").set_defaults(func=cmd_list)
    pp = s.add_parser("prepare", help="resolve/convert a model once (the embedded one is converted from GGUF)")
    pp.add_argument("name", nargs="?", default=models.EMBEDDED_MODEL)
    pp.set_defaults(func=cmd_prepare)
