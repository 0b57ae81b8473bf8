"""`sft-studio ...`: sub-commands over the library's functions (wiring only).

Each module in ``sft_core.commands`` exposes ``register(subparsers)`` and sets ``func`` on its
parsers. A user-facing error (:class:`sft_core.StudioError`) prints as ``error: ...`` with exit 1,
never as a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import pkgutil
import sys

from sft_core import StudioError, __version__


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sft-studio", description="Fine-tune, prompt, or retrieve? SFT Studio.")
    parser.add_argument("--version", action="version", version=f"sft-studio {__version__}")
    parser.add_argument("--home", default=None, help="workspace root (default $SFT_STUDIO_HOME or ./workspace)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    import sft_core.commands as commands
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"sft_core.commands.{info.name}")
        if hasattr(mod, "register"):
            mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.home:
        os.environ["SFT_STUDIO_HOME"] = args.home
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        rc = args.func(args)
    except StudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
