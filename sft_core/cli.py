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
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # bad input and the OS: one line (what, where, what to do), never a traceback
        if os.environ.get("SFT_STUDIO_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
            raise
        print(f"error: {_one_line(describe_error(e))}", file=sys.stderr)
        return 1
    return int(rc or 0)


def _one_line(msg: str, limit: int = 500) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[:limit - 1] + "…"


def describe_error(e: BaseException) -> str:
    """One line for an error that is not a StudioError: the OS refusing a path, undecodable or too
    deeply nested input, memory. Anything else is named as unexpected (SFT_STUDIO_DEBUG=1 shows it)."""
    import errno
    import json
    if isinstance(e, OSError):
        where = e.filename if e.filename is not None else ""
        what = e.strerror or str(e) or type(e).__name__
        hint = {errno.ENOENT: "check the path (its folder must exist)",
                errno.EACCES: "check its permissions, or choose another path",
                errno.EPERM: "check its permissions, or choose another path",
                errno.EROFS: "the file system is read-only: choose another path (--out, --home)",
                errno.ENOSPC: "the disk is full: free space or choose another path",
                errno.EISDIR: "it is a directory: give a file",
                errno.ENOTDIR: "a part of the path is not a directory: check the path",
                errno.EEXIST: "it already exists: choose another path"}.get(e.errno,
                                                                          "check the path and its permissions")
        return f"{where}: {what}; {hint}" if where else f"{what}; {hint}"
    if isinstance(e, UnicodeError):
        return f"input is not valid UTF-8 text ({e}); save it as UTF-8"
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
    if isinstance(e, RecursionError):
        return "input nested too deeply to process; flatten it (see max_json_depth)"
    if isinstance(e, MemoryError):
        return "out of memory: the input is too large; use a smaller file (see max_upload_bytes, max_rows)"
    return (f"unexpected {type(e).__name__}: {e} -- rerun with SFT_STUDIO_DEBUG=1 for the traceback and "
            "report it as a bug")


if __name__ == "__main__":
    sys.exit(main())
