"""Bounded inputs (issue 15 items 2 and 7): linear-time PII patterns, and limits on file size, rows,
field length and JSON nesting, enforced before and while a file is parsed, with errors naming file,
line and field. Each test failed before the fix (its docstring says how)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sft_core import data
from sft_core.config import ConfigError, DataConfig, load_config

REPO = Path(__file__).resolve().parents[1]
OK = {"instruction": "What is 2+2?", "output": "4"}


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _errors(issues) -> list[str]:
    return [str(i) for i in issues if i.severity == "error"]


# ------------------------------------------------------------------------------------------------
# PII patterns: linear time on adversarial text
# ------------------------------------------------------------------------------------------------
# Timed in a child process, so a regression (quadratic: ~13 s for 100,000 letters, hours for 1 MB)
# fails at the timeout instead of hanging the suite. The bound is relative to a trivial input of the
# same length timed in the same process (1 MB of spaces: every pattern gives up after one or two steps
# per position). A linear pattern does a bounded number of steps per position: at most ~19 repetitions
# of CARD's group with their backtracking, PHONE's {1,4}-bounded parts, one pass of EMAIL per run and
# per '@'; measured at 1-5x the trivial input. A quadratic one does ~N/2 steps per position, i.e.
# ~10^5 times the trivial input at N = 10^6. 40x (plus 0.2 s for timer and scheduler noise on a shared
# machine) is far above the first and far below the second.
PII_TIMING = r"""
import json, sys, time
from sft_core.data import find_pii, normalised_key
N = 1_000_000
shapes = {"letters": "a" * N, "a@": "a@" * (N // 2), "a.": "a." * (N // 2), "word@dots": "a" * (N // 2) + "@" + "a." * (N // 4),
          "@.a": "@" + ".a" * (N // 2), "digits": "1" * N, "digit space": "1 " * (N // 2), "digit dash": "12-" * (N // 3),
          "digit dot": "123." * (N // 4), "parens": "(12) " * (N // 5), "plus": "+1 " * (N // 3), "mixed": "a1@b2.c3- " * (N // 10),
          "cards": "4111 1111 1111 1111 555-123-4567 " * (N // 33)}
def timed(s):
    best = None
    for _ in range(2):
        t = time.perf_counter(); find_pii(s); normalised_key({"instruction": s}); d = time.perf_counter() - t
        best = d if best is None else min(best, d)
    return best
out = {"trivial": timed(" " * N)}
for k, s in shapes.items():
    out[k] = timed(s)
print(json.dumps(out))
"""


def test_pii_patterns_take_linear_time_on_adversarial_text():
    """Before the fix EMAIL scanned a run of letters once per starting position: 1 MB of one letter
    never finished within the timeout (100,000 letters took ~13 s)."""
    r = subprocess.run([sys.executable, "-c", PII_TIMING], capture_output=True, text=True, cwd=REPO, timeout=180)
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)
    trivial = t.pop("trivial")
    slow = {k: round(v / trivial, 1) for k, v in t.items() if v > 40 * trivial + 0.2}
    assert not slow, f"times relative to 1 MB of spaces ({trivial:.3f} s): {slow}"


def test_email_pattern_finds_the_same_addresses():
    """The anchored pattern matches exactly what the old one matched (they differ only in where a failed
    search restarts)."""
    import re
    old = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
    texts = ["mail jo.x+tag@ex.co.uk now", "a@b.cd", "x@y", "(me@x.org)", "me@@x.org", "a.b@c.d.e.fg", "-_%+@z.io",
             "über@x.de", "1@2.3", "me@x.org,you@y.net", "@x.org", "a@x.org@y.org", "foo bar@baz.qux."]
    for s in texts:
        assert [m.group() for m in data.EMAIL.finditer(s)] == [m.group() for m in old.finditer(s)], s


def test_phone_inside_a_card_is_not_reported_twice():
    found = data.find_pii("card 4111 1111 1111 1111, call 555-123-4567, mail jo@ex.com")
    assert found == [("email", "jo@ex.com"), ("card", "4111 1111 1111 1111"), ("phone", "555-123-4567")]


def test_a_large_check_does_not_hold_the_interpreter(tmp_path, ws):
    """The app runs data_check in a worker thread; /healthz and other requests answer as long as no
    single C call holds the GIL. Before the fix one EMAIL search over a 100,000-letter field held it
    for ~13 s. Here the main thread measures its longest wait while a check of a file at the field
    limit (and of the other adversarial shapes) runs in a thread."""
    n = DataConfig().max_field_chars
    p = _jsonl(tmp_path / "long.jsonl", [{"instruction": "a" * n, "output": "x"},
                                         {"instruction": "a." * (n // 2), "output": "1 " * (n // 2)},
                                         {"instruction": "b" * (n - 1) + "@", "output": "12-" * (n // 3)}])
    cfg = DataConfig(model="/nonexistent/no-tokenizer")  # the patterns only: no tokenizer load in the timing
    done = threading.Event()
    result = {}

    def work():
        result["report"] = data.check_file(p, cfg, ws=ws)
        done.set()

    def longest_wait(target) -> tuple[float, float]:
        """(longest gap between 5 ms ticks of this thread while ``target`` runs in another, its duration)."""
        done.clear()
        t = threading.Thread(target=target)
        t0 = last = time.perf_counter()
        t.start()
        worst = 0.0
        while not done.is_set():
            time.sleep(0.005)
            now = time.perf_counter()
            worst, last = max(worst, now - last), now
        t.join()
        return worst, time.perf_counter() - t0

    small = _jsonl(tmp_path / "small.jsonl", [{"instruction": "what is 2+2?", "output": "4"}] * 50)

    def trivial():
        for _ in range(20):
            data.check_file(small, cfg, ws=ws)
        done.set()

    base_worst, _ = longest_wait(trivial)  # scheduler noise on this machine, same run
    worst, took = longest_wait(work)
    assert result["report"].n_valid == 3
    # Relative bound, no absolute time: a super-linear pattern holds the interpreter for one long C call,
    # i.e. for most of the check (before the fix ~13-19 s of a check that long); a linear check yields
    # it between calls, so the longest wait stays near the machine's noise. Both terms scale with load.
    assert worst < 0.25 * took + 5 * base_worst, (f"the main thread waited {worst:.2f} s for the interpreter "
                                                   f"during a {took:.2f} s check (noise {base_worst:.3f} s)")


# ------------------------------------------------------------------------------------------------
# Limits: configuration
# ------------------------------------------------------------------------------------------------
def test_limits_defaults_env_flags_and_validation(monkeypatch):
    """Before the fix there were no limits at all."""
    cfg = DataConfig()
    assert (cfg.max_upload_bytes, cfg.max_rows, cfg.max_field_chars, cfg.max_json_depth) == (
        50 * 2**20, 200_000, 100_000, 64)
    monkeypatch.setenv("SFT_STUDIO_MAX_ROWS", "5")
    monkeypatch.setenv("SFT_STUDIO_MAX_UPLOAD_BYTES", "1_000")
    assert DataConfig().max_rows == 5 and DataConfig().max_upload_bytes == 1000
    assert load_config(DataConfig, overrides={"max_rows": "7"}).max_rows == 7  # a flag beats the environment
    monkeypatch.setenv("SFT_STUDIO_MAX_ROWS", "lots")
    with pytest.raises(ConfigError, match="SFT_STUDIO_MAX_ROWS"):
        DataConfig()
    monkeypatch.delenv("SFT_STUDIO_MAX_ROWS")
    with pytest.raises(ConfigError, match="max_json_depth"):
        load_config(DataConfig, overrides={"max_json_depth": 0})
    from sft_core import cli
    help_ = cli.make_parser().parse_args(["data", "check", "x.jsonl", "--max-rows", "3", "--max-field-chars", "9"])
    assert help_.max_rows == "3" and help_.max_field_chars == "9"


# ------------------------------------------------------------------------------------------------
# Limits: file size (before reading)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_file_over_the_size_limit_is_refused_before_reading(suffix, tmp_path, monkeypatch):
    """Before the fix any size was read whole into memory."""
    import pandas as pd
    rows = [OK] * 200
    p = tmp_path / f"big{suffix}"
    {".jsonl": lambda: _jsonl(p, rows), ".json": lambda: p.write_text(json.dumps(rows)),
     ".csv": lambda: pd.DataFrame(rows).to_csv(p, index=False), ".parquet": lambda: pd.DataFrame(rows).to_parquet(p)}[suffix]()
    limit = p.stat().st_size - 1
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    recs, issues, _ = data.load_records(p, cfg=DataConfig(max_upload_bytes=limit))
    monkeypatch.undo()
    assert recs == [] and str(p) not in opened
    errs = _errors(issues)
    assert len(errs) == 1 and errs[0].startswith(f"big{suffix}: file is") and "max_upload_bytes" in errs[0], errs
    # at the limit: read (Parquet's uncompressed data, larger than the file, counts too: tested below)
    assert data.load_records(p, cfg=DataConfig(max_upload_bytes=limit + 1 + (10**6 if suffix == ".parquet" else 0)))[0]


def test_a_file_whose_size_lies_is_cut_at_the_limit(tmp_path, monkeypatch):
    p = _jsonl(tmp_path / "grows.jsonl", [OK] * 50)
    real = Path.stat
    monkeypatch.setattr(Path, "stat", lambda self, **k: type("S", (), {"st_size": 0, "st_mode": real(self).st_mode})()
                        if self == p else real(self, **k))
    _, issues, _ = data.load_records(p, cfg=DataConfig(max_upload_bytes=100))
    assert any("over the limit" in e for e in _errors(issues))


# ------------------------------------------------------------------------------------------------
# Limits: rows
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix, first_over", [(".jsonl", 11), (".json", 11), (".csv", 12), (".parquet", None)])
def test_reading_stops_at_the_row_limit(suffix, first_over, tmp_path, ws):
    """Before the fix every row was read (and a flood of invalid lines produced one issue each)."""
    import pandas as pd
    rows = [{"instruction": f"q{i}", "output": "a"} for i in range(25)]
    p = tmp_path / f"rows{suffix}"
    {".jsonl": lambda: _jsonl(p, rows), ".json": lambda: p.write_text(json.dumps(rows)),
     ".csv": lambda: pd.DataFrame(rows).to_csv(p, index=False), ".parquet": lambda: pd.DataFrame(rows).to_parquet(p)}[suffix]()
    recs, issues, _ = data.load_records(p, cfg=DataConfig(max_rows=10))
    errs = [i for i in issues if i.severity == "error"]
    assert len(errs) == 1 and "more than 10 rows (max_rows)" in errs[0].message and errs[0].line == first_over, errs
    assert len(recs) == (0 if suffix == ".parquet" else 10)  # Parquet: refused from the footer's row count
    report = data.check_file(p, DataConfig(max_rows=10), ws=ws)
    assert not report.ok


def test_invalid_lines_count_towards_the_row_limit(tmp_path):
    p = tmp_path / "junk.jsonl"
    p.write_text("not json\n" * 1000)
    _, issues, _ = data.load_records(p, cfg=DataConfig(max_rows=10))
    assert len(issues) == 11 and "max_rows" in issues[-1].message and issues[-1].line == 11


def test_hf_dir_row_limit(tmp_path):
    import datasets
    datasets.Dataset.from_list([OK] * 12).save_to_disk(str(tmp_path / "ds"))
    recs, issues, _ = data.load_records(tmp_path / "ds", cfg=DataConfig(max_rows=10))
    assert recs == [] and "max_rows" in _errors(issues)[0]
    recs, issues, _ = data.load_records(tmp_path / "ds", cfg=DataConfig(max_upload_bytes=1000))
    assert recs == [] and "the directory is" in _errors(issues)[0]


# ------------------------------------------------------------------------------------------------
# Limits: field length
# ------------------------------------------------------------------------------------------------
def test_field_over_the_length_limit_is_an_error_naming_line_and_field(tmp_path, ws):
    """Before the fix a field of any length was accepted (and its PII scan was quadratic)."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 101}]
    p = _jsonl(tmp_path / "long.jsonl", [OK, {"instruction": "y" * 101, "output": "a"}, {"messages": msgs},
                                         {"instruction": "z" * 100, "output": "a"}])
    recs, issues, _ = data.load_records(p, "auto", cfg=DataConfig(max_field_chars=100))
    errs = _errors(issues)
    assert errs[0].startswith("long.jsonl:2 [instruction]: 101 characters, over the limit of 100 (max_field_chars)")
    assert errs[1].startswith("long.jsonl:3 [messages[1].content]: 101 characters"), errs
    assert len(errs) == 2 and len(recs) == 2  # at the limit: accepted
    report = data.check_file(p, DataConfig(max_field_chars=100), ws=ws)
    assert not report.ok
    csv_p = tmp_path / "long.csv"
    csv_p.write_text("instruction,output\nq," + "w" * 101 + "\n")
    assert _errors(data.load_records(csv_p, cfg=DataConfig(max_field_chars=100))[1])[0].startswith(
        "long.csv:2 [output]: 101 characters")


# ------------------------------------------------------------------------------------------------
# Limits: JSON nesting
# ------------------------------------------------------------------------------------------------
def test_deeply_nested_json_is_an_error_naming_file_and_line(tmp_path, ws):
    """Before the fix a 200,000-deep JSON document raised a raw RecursionError out of check_file."""
    deep = '{"a":' * 200_000 + "1" + "}" * 200_000
    p = tmp_path / "deep.json"
    p.write_text("[\n" + json.dumps(OK) + ",\n" + json.dumps(OK) + ",\n" + deep + "\n]")
    recs, issues, _ = data.load_records(p)
    errs = _errors(issues)
    assert errs == ["deep.json:4: JSON nested deeper than 64 levels (max_json_depth): flatten the record, or raise "
                    "the limit with --max-json-depth / SFT_STUDIO_MAX_JSON_DEPTH"]
    q = tmp_path / "deep.jsonl"
    q.write_text(json.dumps(OK) + "\n" + deep + "\n" + json.dumps(OK) + "\n")
    recs, issues, _ = data.load_records(q)
    assert len(recs) == 2 and _errors(issues)[0].startswith("deep.jsonl:2: JSON nested deeper than 64 levels")
    report = data.check_file(p, ws=ws)
    assert not report.ok


def test_brackets_inside_strings_do_not_count_as_nesting():
    raw = b'[{"a": "[[[[[[[[\\"{{{{{{{", "b": [1]}, {"c": "\\\\"},\n[[['  # depth 3 on line 1, 4 on line 2
    assert data._too_deep_line(raw, 3) == 2
    assert data._too_deep_line(raw, 2) == 1
    assert data._too_deep_line(raw, 4) is None
    assert data._too_deep_line(b'["' + b'\\"[' * 1000, 1) is None  # unterminated string: one linear pass


def test_moderate_nesting_over_the_limit_names_the_field(tmp_path):
    """Nesting Python can parse (70 levels) but over max_json_depth: an error of that row only."""
    nested = json.loads('{"a":' * 70 + "1" + "}" * 70)
    p = _jsonl(tmp_path / "meta.jsonl", [OK, {**OK, "meta": nested}])
    recs, issues, _ = data.load_records(p)
    errs = [i for i in issues if i.severity == "error"]
    assert len(recs) == 1 and len(errs) == 1 and errs[0].line == 2 and errs[0].field.startswith("meta.a.a")
    assert "max_json_depth" in errs[0].message and len(errs[0].field) <= 80


# ------------------------------------------------------------------------------------------------
# Limits: Parquet, from the footer before decoding, then in batches
# ------------------------------------------------------------------------------------------------
def test_parquet_bomb_is_refused_from_its_footer_without_decoding(tmp_path, monkeypatch):
    """A few KB of Parquet holding 60 MB of text. Before the fix pq.read_table inflated all of it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = tmp_path / "bomb.parquet"
    pq.write_table(pa.table({"instruction": ["a" * 1_000_000] * 60, "output": ["x"] * 60}), p,
                   compression="zstd", use_dictionary=False)
    assert p.stat().st_size < 10_000
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", lambda *a, **k: pytest.fail("data decoded"))
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("data decoded"))
    recs, issues, _ = data.load_records(p)
    errs = [i for i in issues if i.severity == "error"]
    assert recs == [] and len(errs) == 1 and errs[0].field == "instruction", errs
    assert "uncompressed, the data is 57.2 MiB" in errs[0].message and "max_upload_bytes" in errs[0].message


def test_parquet_decoding_stops_when_the_decoded_data_exceeds_the_limit(tmp_path):
    """Dictionary encoding stores one 10 KB value once; 4,000 rows decode to 40 MB. The footer looks
    small, so the batches are measured as they are decoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    p = tmp_path / "dict.parquet"
    pq.write_table(pa.table({"instruction": ["q" * 10_000] * 4000, "output": ["x"] * 4000}), p, use_dictionary=True)
    cfg = DataConfig(max_upload_bytes=5 * 2**20)
    md = pq.ParquetFile(p).metadata
    assert sum(md.row_group(0).column(c).total_uncompressed_size for c in range(2)) < cfg.max_upload_bytes
    recs, issues, _ = data.load_records(p, cfg=cfg)
    errs = _errors(issues)
    assert len(errs) == 1 and "the decoded data is" in errs[0] and len(recs) < 600, (errs, len(recs))


# ------------------------------------------------------------------------------------------------
# The app: Gradio's upload limit, and /healthz during a large check
# ------------------------------------------------------------------------------------------------
APP_SCRIPT = r"""
import io, json, sys, threading, time
import app
from fastapi.testclient import TestClient
from ui.data import data_check
limit = int(sys.argv[2])
c = TestClient(app.make_app())
out = {"max_file_size": c.get("/config").json().get("max_file_size")}
out["upload_over"] = c.post("/gradio_api/upload", files={"files": ("x.jsonl", io.BytesIO(b"x" * (limit + 1)))}).status_code
out["upload_under"] = c.post("/gradio_api/upload", files={"files": ("x.jsonl", io.BytesIO(b"x" * 1000))}).status_code
done = threading.Event()
def work():  # what Gradio's worker thread runs for the "Check" button
    out["report"] = data_check(sys.argv[1], "auto", "")[0][:300]
    done.set()
base = []
for _ in range(50):  # a trivial request, same process and run: the machine's own latency
    s = time.perf_counter()
    assert c.get("/healthz").status_code == 200
    base.append(time.perf_counter() - s)
    time.sleep(0.02)
t0 = time.time()
threading.Thread(target=work).start()
lat = []
while not done.is_set():
    s = time.perf_counter()
    assert c.get("/healthz").status_code == 200
    lat.append(time.perf_counter() - s)
    time.sleep(0.02)
out.update(check_s=time.time() - t0, healthz_max_s=max(lat), n_healthz=len(lat), worst_at=lat.index(max(lat)),
           base_max_s=max(base))
print(json.dumps(out))
"""


def test_app_upload_limit_and_healthz_during_a_large_check(tmp_path):
    """make_app() hands max_upload_bytes to Gradio (413 while the upload streams in; /config tells the
    browser), and /healthz answers promptly while data_check works through ~5 MB of adversarial
    text. Before the fix there was no upload limit (/config: null) and the check of the first
    100,000-letter field held the interpreter for ~13-19 s."""
    n = 100_000
    shapes = ["a" * n, "a." * (n // 2), "b" * (n - 1) + "@", "12-" * (n // 3), "a@" * (n // 2)]
    p = _jsonl(tmp_path / "big.jsonl", [{"instruction": shapes[i % 5], "output": shapes[(i + 1) % 5]}
                                        for i in range(25)])
    limit = 8 * 2**20
    env = {**os.environ, "SFT_STUDIO_HOME": str(tmp_path / "home"),
           "SFT_STUDIO_MAX_UPLOAD_BYTES": str(limit), "GRADIO_ANALYTICS_ENABLED": "False"}
    r = subprocess.run([sys.executable, "-c", APP_SCRIPT, str(p), str(limit)], capture_output=True, text=True,
                       cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["max_file_size"] == limit and out["upload_over"] == 413 and out["upload_under"] == 200, out
    assert "valid" in out["report"], out
    # Relative bound (no absolute time): before the fix one regex call held the interpreter for most of
    # the check (>= 13 s of it), so /healthz waited about as long as the check; now it waits about as
    # long as a trivial /healthz in the same run. Both terms scale with the machine's load.
    assert out["healthz_max_s"] < 0.25 * out["check_s"] + 5 * out["base_max_s"], out
