"""Every CLI sub-command answers bad input with one clear line on stderr and a non-zero exit, never a traceback.

The sub-commands are enumerated from the argparse parser, so a new one is covered automatically: each
positional argument and required option is filled with one bad value of a matrix (missing file,
directory, binary garbage, deeply nested JSON, a huge line, an unknown name), commands with ``--out``
get an existing run/campaign/eval and an unwritable ``/proc`` path, commands with ``--config`` a bad
config file, and every command an unusable ``--home``. Commands that train, serve or evaluate only get
inputs that are refused before an engine, a model or a worker starts.

Before the fix (issue 15 item 9), ``data check deep.json`` (RecursionError), ``rate export --out /proc/...``
and ``export --out /proc/...`` (OSError) and ``--home /proc/1/nope data list`` (FileNotFoundError) printed
tracebacks, and ``data check`` of an invalid file printed nothing on stderr.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sft_core import cli

REPO = Path(__file__).resolve().parents[1]
MISSING = "/nonexistent/nope.jsonl"
UNKNOWN = "no-such-thing"
PROC_OUT = "/proc/nope/out"
BAD_HOME = "/proc/1/nope"


def _leaves(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, parser) of every runnable sub-command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for name, p in subs[0].choices.items():
        yield from _leaves(p, prefix + (name,))


LEAVES = {" ".join(words): p for words, p in _leaves(cli.make_parser())}


def _slots(p: argparse.ArgumentParser) -> tuple[list[argparse.Action], list[argparse.Action]]:
    """(positional arguments, required options) of a sub-command's parser."""
    pos = [a for a in p._actions if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]
    req = [a for a in p._actions if a.option_strings and a.required]
    return pos, req


def _has(p: argparse.ArgumentParser, flag: str) -> bool:
    return any(flag in a.option_strings for a in p._actions)


# Commands that would start an engine, load a model or index with an embedder once their input is
# valid: they get only the cases that fail on argument validation (each checked cheap below).
HEAVY_CASES = {
    "kb build": {"missing", "binary", "bad-config-deep", "bad-home"},  # an unusable path list / config
    "serve": {"bad-config-deep", "bad-config-binary", "bad-config-dir", "bad-home"},
    "example build": {"bad-home"},
}
FILE_CASES = ("missing", "directory", "binary", "deep", "huge", "unknown-name")
EXISTING = {"export": "run-ok", "merge": "run-ok", "rate export": "camp-ok", "report": "ev-ok"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad-inputs")
    (d / "garbage.bin").write_bytes(bytes(range(256)) * 16)
    (d / "deep.json").write_text("[" + '{"a":' * 200_000 + "1" + "}" * 200_000 + "]")
    (d / "huge.jsonl").write_text(json.dumps({"instruction": "a" * 2_000_000, "output": "x"}) + "\n")
    (d / "a-dir").mkdir()
    return {"missing": MISSING, "directory": str(d / "a-dir"), "binary": str(d / "garbage.bin"),
            "deep": str(d / "deep.json"), "huge": str(d / "huge.jsonl"), "unknown-name": UNKNOWN}


def _cases() -> list[tuple[str, str]]:
    out = []
    for name, p in LEAVES.items():
        pos, req = _slots(p)
        cases = ["bad-home"]
        if pos or req:
            cases += FILE_CASES
        if _has(p, "--config"):
            cases += ["bad-config-deep", "bad-config-binary", "bad-config-dir"]
        if _has(p, "--out") and (pos or req):
            cases.append("proc-out")
        if name in HEAVY_CASES:
            cases = [c for c in cases if c in HEAVY_CASES[name]]
        out += [(name, c) for c in cases]
    return out


def _argv(name: str, case: str, files: dict[str, str]) -> list[str]:
    p = LEAVES[name]
    pos, req = _slots(p)
    value = {"bad-home": UNKNOWN, "proc-out": EXISTING.get(name, UNKNOWN)}.get(case, files.get(case, UNKNOWN))
    argv = ([] if case != "bad-home" else ["--home", BAD_HOME]) + name.split()
    for a in pos:
        argv.append(value)
    for a in req:
        if "--out" in a.option_strings:  # written to: never a relative path here (the repo is the CWD)
            argv += ["--out", PROC_OUT if case == "proc-out" else str(Path(files["directory"]) / "out")]
        else:
            argv += [a.option_strings[0], value]
    if case.startswith("bad-config-"):
        argv += ["--config", {"deep": files["deep"], "binary": files["binary"], "dir": files["directory"]}[case[11:]]]
    if _has(p, "--out") and "--out" not in argv:
        argv += ["--out", PROC_OUT if case == "proc-out" else str(Path(files["directory"]) / "out")]
    return argv


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(argv)
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def seeded(ws, store):
    """A succeeded run with an adapter, a rating campaign and an eval without scores, for the --out cases."""
    from sft_core.db import evals as eval_rows, ratings as rating_rows, runs as run_rows
    now = time.time()
    run_dir = ws.runs_dir("run-ok")
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "adapter" / "adapter_config.json").write_text("{}")
    run_rows.insert_run(store, "run-ok", "d", "v", "/nonexistent/base-model", str(run_dir), {}, status="succeeded",
                        created_at=now)
    eval_rows.insert_eval(store, "ev-ok", "d", "v", "test", ["prompt", "rag"], str(ws.evals_dir("ev-ok")), {},
                          status="running")
    rating_rows.add_campaign(store, "camp-ok", "ev-ok", ["prompt", "rag"], name="", show_reference=True,
                             open_rating=False, guidelines="", reveal_after_vote=False, tasks=[])
    return ws


@pytest.mark.parametrize("name, case", _cases())
def test_bad_input_is_one_line_error(name, case, files, seeded, monkeypatch):
    monkeypatch.setenv("SFT_STUDIO_HOME", str(seeded.root))  # restored after `--home` changed it
    argv = _argv(name, case, files)
    t = time.time()
    rc, out, err = _run(argv)
    assert rc not in (0, None), (argv, out, err)
    assert "Traceback" not in err and "Traceback" not in out, (argv, err)
    assert err.strip(), (argv, out)
    lines = err.strip().splitlines()
    assert len(lines) <= 3, (argv, err)
    assert "unexpected" not in err, (argv, err)  # named, not the catch-all: a new kind of error to handle
    assert time.time() - t < 60, argv


def test_every_command_is_covered():
    covered = {n for n, _ in _cases()}
    assert covered == set(LEAVES)
    assert {"data check", "rate export", "export", "data list"} <= covered


@pytest.mark.parametrize("argv, says", [
    (["data", "check", "{deep}"], "nested deeper than 64"),
    (["--home", BAD_HOME, "data", "list"], BAD_HOME),
])
def test_real_process_exits_with_one_line(argv, says, files, tmp_path):
    argv = [a.format(deep=files["deep"]) for a in argv]
    env = {**os.environ, "SFT_STUDIO_HOME": str(tmp_path / "home")}
    env.pop("SFT_STUDIO_DEBUG", None)
    r = subprocess.run([sys.executable, "-m", "sft_core.cli", *argv], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=120)
    assert r.returncode == 1, r
    assert "Traceback" not in r.stderr and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_os_errors_say_what_where_and_what_to_do(seeded, monkeypatch):
    monkeypatch.setenv("SFT_STUDIO_HOME", str(seeded.root))
    rc, _, err = _run(["rate", "export", "camp-ok", "--out", PROC_OUT + "/votes.csv"])
    assert rc == 1 and err.startswith("error: ") and "/proc/nope" in err and "check the path" in err, err
    rc, _, err = _run(["export", "run-ok", "--out", PROC_OUT])
    assert rc == 1 and "/proc/nope" in err, err
