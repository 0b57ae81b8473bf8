"""Datasets: load any supported file, normalise to the canonical record, validate, report, split, version.

Inputs: JSONL, JSON (a list), CSV, Parquet, or a directory written by ``datasets.save_to_disk``.
Formats (auto-detected or named): ``alpaca`` (instruction/input/output), ``prompt_completion``,
``messages`` (OpenAI), ``sharegpt`` (conversations with from/value), and ``table`` (any columns,
through a mapping such as ``instruction=question,response=answer,context=passage``).

Every problem is an :class:`Issue` naming the file, the line (JSONL/CSV) or row (JSON/Parquet) and
the field. Errors block an import (nothing is stored); warnings (over-long rows, likely PII) are
reported but do not. A dataset version is stored under its content hash and never overwritten.
"""
from __future__ import annotations

import csv
import io
import json
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from sft_core import StudioError
from sft_core.config import DataConfig
from sft_core.records import make_record, to_messages  # noqa: F401  (make_record re-exported)
from sft_core.store import Store, dumps, loads, open_store
from sft_core.workspace import Workspace, atomic_dir, atomic_write_json, read_jsonl, safe_name, sha256_json, write_jsonl

FORMATS = ("alpaca", "prompt_completion", "messages", "sharegpt", "table")
SPLITS = ("train", "eval", "test")
MAX_REPORTED = 200  # issues listed per report; counts stay exact


class DataError(StudioError):
    """Invalid data; ``where`` names the file (and line/field when there is a single one)."""


@dataclass
class Issue:
    file: str
    line: int | None  # 1-based line (JSONL, CSV) or row (JSON list, Parquet, datasets dir); None = whole file
    field: str | None
    message: str
    severity: str = "error"  # error | warning

    def __str__(self) -> str:
        where = Path(self.file).name
        if self.line is not None:
            where += f":{self.line}"
        if self.field:
            where += f" [{self.field}]"
        return f"{where}: {self.message}"


@dataclass
class Report:
    file: str
    format: str | None
    n_rows: int = 0
    n_valid: int = 0
    issues: list[Issue] = field(default_factory=list)
    stats: dict = field(default_factory=dict)

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors and self.n_valid > 0

    def to_dict(self) -> dict:
        return {"file": self.file, "format": self.format, "ok": self.ok, "n_rows": self.n_rows,
                "n_valid": self.n_valid, "errors": [asdict(i) for i in self.errors[:MAX_REPORTED]],
                "n_errors": len(self.errors), "warnings": [asdict(i) for i in self.warnings[:MAX_REPORTED]],
                "n_warnings": len(self.warnings), "stats": self.stats}


@dataclass
class DatasetVersion:
    name: str
    version: str
    path: Path
    splits: dict[str, int]
    n_rows: int
    created: bool = False


# ------------------------------------------------------------------------------------------------
# Reading raw rows: (line_or_row_number, dict) pairs, or issues
# ------------------------------------------------------------------------------------------------
def _looks_binary(head: bytes) -> bool:
    if b"\x00" in head:
        return True
    return head.startswith((b"\x89PNG", b"%PDF", b"PK\x03\x04", b"\x1f\x8b", b"\x7fELF", b"GIF8", b"\xff\xd8\xff"))


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n:,} bytes"


def _over_size(f: str, size: int, cfg: DataConfig, what: str = "file") -> Issue:
    return Issue(f, None, None, f"{what} is {_size(size)}, over the limit of {_size(cfg.max_upload_bytes)} "
                                "(max_upload_bytes): split it into smaller files, or raise the limit with "
                                "--max-upload-bytes / SFT_STUDIO_MAX_UPLOAD_BYTES")


def _over_rows(f: str, n: int | None, cfg: DataConfig) -> Issue:
    return Issue(f, n, None, f"more than {cfg.max_rows:,} rows (max_rows): split the file, or raise the limit with "
                             "--max-rows / SFT_STUDIO_MAX_ROWS")


def _over_depth(f: str, n: int | None, cfg: DataConfig, fieldname: str | None = None) -> Issue:
    return Issue(f, n, fieldname, f"JSON nested deeper than {cfg.max_json_depth} levels (max_json_depth): flatten "
                                  "the record, or raise the limit with --max-json-depth / SFT_STUDIO_MAX_JSON_DEPTH")


def _row_limits(row: dict, cfg: DataConfig) -> tuple[str | None, str] | None:
    """(field, message) for the first value of a row over max_field_chars or max_json_depth, else None."""
    bad = _row_limits_walk(row, cfg)
    if bad and bad[0] and len(bad[0]) > 80:  # a deep path: its start and end say enough
        return bad[0][:40] + "…" + bad[0][-30:], bad[1]
    return bad


def _row_limits_walk(row: dict, cfg: DataConfig) -> tuple[str | None, str] | None:
    """Iterative (an explicit stack), so a deeply nested row cannot exhaust Python's recursion limit."""
    stack: list[tuple[str | None, Any, int]] = [(None, row, 1)]  # (field path, value, depth; the row is 1)
    while stack:
        path, v, depth = stack.pop()
        if isinstance(v, (str, bytes)):
            if len(v) > cfg.max_field_chars:
                return path, (f"{len(v):,} characters, over the limit of {cfg.max_field_chars:,} (max_field_chars): "
                              "shorten it, or raise the limit with --max-field-chars / SFT_STUDIO_MAX_FIELD_CHARS")
        elif isinstance(v, (dict, list, tuple)):
            if depth > cfg.max_json_depth:
                return path, _over_depth("", None, cfg).message
            items = v.items() if isinstance(v, dict) else enumerate(v)
            for k, x in items:
                if isinstance(k, str) and len(k) > cfg.max_field_chars:
                    return path, f"a field name of {len(k):,} characters, over the limit of {cfg.max_field_chars:,}"
                sub = (f"{path}[{k}]" if isinstance(v, (list, tuple)) else
                       f"{path}.{k}" if path else str(k))
                stack.append((sub, x, depth + 1))
    return None


def _read_rows(path: Path, issues: list[Issue], cfg: DataConfig | None = None) -> Iterator[tuple[int, Any]]:
    """Rows of a file within the limits of ``cfg``: an over-limit file is refused before it is parsed,
    a row over the field-length or nesting limit is an error of its own, reading stops at max_rows."""
    cfg = cfg or DataConfig()
    f = str(path)
    for n, row in _read_rows_unchecked(path, issues, cfg):
        bad = _row_limits(row, cfg)
        if bad:
            issues.append(Issue(f, n, bad[0], bad[1]))
            continue
        yield n, row


def _read_rows_unchecked(path: Path, issues: list[Issue], cfg: DataConfig) -> Iterator[tuple[int, Any]]:
    f = str(path)
    if path.is_dir():
        yield from _read_hf_dir(path, issues, cfg)
        return
    if not path.exists():
        raise DataError("file not found", f)
    if not path.is_file():
        issues.append(Issue(f, None, None, "not a regular file: expected JSONL, JSON, CSV or Parquet"))
        return
    size = path.stat().st_size
    if size > cfg.max_upload_bytes:  # refused before anything is read
        issues.append(_over_size(f, size, cfg))
        return
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path, issues, cfg)
        return
    try:
        with open(path, "rb") as fh:
            raw = fh.read(cfg.max_upload_bytes + 1)  # the size on disk may lie (/proc, a growing file)
    except OSError as e:
        raise DataError(f"cannot read the file: {e.strerror or e}", f) from None
    if len(raw) > cfg.max_upload_bytes:
        issues.append(_over_size(f, len(raw), cfg))
        return
    if not raw.strip():
        issues.append(Issue(f, None, None, "file is empty"))
        return
    if _looks_binary(raw[:8192]):
        issues.append(Issue(f, None, None, "binary file, not text: expected JSONL, JSON, CSV or Parquet"))
        return
    if suffix == ".csv" or suffix == ".tsv":
        yield from _read_csv(path, raw, issues, delimiter="\t" if suffix == ".tsv" else ",", cfg=cfg)
    elif suffix == ".json":
        yield from _read_json(path, raw, issues, cfg)
    else:  # .jsonl, .ndjson, or unknown: JSON lines, unless the file is one JSON document
        if suffix not in (".jsonl", ".ndjson") and raw.lstrip()[:1] == b"[":
            yield from _read_json(path, raw, issues, cfg)
        else:
            yield from _read_jsonl(path, raw, issues, cfg)


def _read_jsonl(path: Path, raw: bytes, issues: list[Issue], cfg: DataConfig | None = None) -> Iterator[tuple[int, Any]]:
    f = str(path)
    cfg = cfg or DataConfig()
    count = 0
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        count += 1  # every non-blank line counts, valid or not, so a flood of bad lines stops too
        if count > cfg.max_rows:
            issues.append(_over_rows(f, n, cfg))
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            issues.append(Issue(f, n, None, f"not valid UTF-8 (byte {e.start}: {line[e.start:e.start + 1]!r})"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            issues.append(Issue(f, n, None, f"invalid JSON: {e.msg} at column {e.colno}"))
            continue
        except RecursionError:  # thousands of nested [ or {: json's parser recurses
            issues.append(_over_depth(f, n, cfg))
            continue
        if not isinstance(obj, dict):
            issues.append(Issue(f, n, None, f"expected a JSON object per line, got {type(obj).__name__}"))
            continue
        yield n, obj


# A JSON string (to the end of the text when unterminated) or a bracket; possessive, so linear.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]++|\\.)*+(?:"|\\?\Z)|[\[\]{}]', re.S)


def _too_deep_line(raw: bytes, limit: int) -> int | None:
    """1-based line where the nesting of a JSON text first exceeds ``limit`` (brackets inside strings
    do not count), or None. One linear pass, stopping at that point; no recursion."""
    depth = 0
    for m in _JSON_TOKEN.finditer(raw):
        c = raw[m.start()]
        if c in b"[{":
            depth += 1
            if depth > limit:
                return raw.count(b"\n", 0, m.start()) + 1
        elif c in b"]}":
            depth -= 1
    return None


def _read_json(path: Path, raw: bytes, issues: list[Issue], cfg: DataConfig | None = None) -> Iterator[tuple[int, Any]]:
    f = str(path)
    cfg = cfg or DataConfig()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        issues.append(Issue(f, line, None, f"not valid UTF-8 (byte {e.start})"))
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        issues.append(Issue(f, e.lineno, None, f"invalid JSON: {e.msg} at column {e.colno}"))
        return
    except RecursionError:  # the list itself is one level above each record
        issues.append(_over_depth(f, _too_deep_line(raw, cfg.max_json_depth + 1), cfg))
        return
    if isinstance(obj, dict):
        issues.append(Issue(f, None, None, "expected a JSON list of records, got a JSON object "
                                           f"(keys: {', '.join(list(obj)[:5])[:200]}); use JSONL or wrap the records in [...]"))
        return
    if not isinstance(obj, list):
        issues.append(Issue(f, None, None, f"expected a JSON list of records, got {type(obj).__name__}"))
        return
    for i, item in enumerate(obj, 1):
        if i > cfg.max_rows:
            issues.append(_over_rows(f, i, cfg))
            return
        if not isinstance(item, dict):
            issues.append(Issue(f, i, None, f"record {i} is a {type(item).__name__}, expected an object"))
            continue
        yield i, item


def _read_csv(path: Path, raw: bytes, issues: list[Issue], delimiter: str,
              cfg: DataConfig | None = None) -> Iterator[tuple[int, Any]]:
    f = str(path)
    cfg = cfg or DataConfig()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        issues.append(Issue(f, line, None, f"not valid UTF-8 (byte {e.start})"))
        return
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        if not reader.fieldnames:
            issues.append(Issue(f, 1, None, "no header row"))
            return
        count = 0
        for row in reader:
            line = reader.line_num
            count += 1
            if count > cfg.max_rows:
                issues.append(_over_rows(f, line, cfg))
                return
            if None in row:
                issues.append(Issue(f, line, None, f"more values than the {len(reader.fieldnames)} header columns"))
                continue
            yield line, {k: v for k, v in row.items()}
    except csv.Error as e:  # also a field over csv's own limit (131,072 characters)
        issues.append(Issue(f, reader.line_num, None, f"CSV error: {e}"))


PARQUET_BATCH_ROWS = 256  # rows decoded at a time: bounds the memory one batch can take


def _read_parquet(path: Path, issues: list[Issue], cfg: DataConfig | None = None) -> Iterator[tuple[int, Any]]:
    """Rows of a Parquet file. The footer's row count and uncompressed column sizes are checked before
    any data is decoded (a few KB of Parquet can hold GBs of repeated text), and the data is decoded
    in small batches that stop at the limits, in case the footer understates them."""
    import pyarrow.parquet as pq
    f = str(path)
    cfg = cfg or DataConfig()
    try:
        pf = pq.ParquetFile(path)
        md = pf.metadata
        sizes: Counter = Counter()
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            for c in range(rg.num_columns):
                col = rg.column(c)
                sizes[col.path_in_schema.split(".")[0]] += col.total_uncompressed_size
    except Exception as e:  # corrupt or not parquet
        issues.append(Issue(f, None, None, f"cannot read Parquet: {e}"))
        return
    if md.num_rows > cfg.max_rows:
        issues.append(_over_rows(f, None, cfg))
        return
    total = sum(sizes.values())
    if total > cfg.max_upload_bytes:
        col, biggest = sizes.most_common(1)[0]
        issues.append(Issue(f, None, col, f"uncompressed, the data is {_size(total)} (this column {_size(biggest)}), "
                                          f"over the limit of {_size(cfg.max_upload_bytes)} (max_upload_bytes): "
                                          "split the file, or raise the limit with SFT_STUDIO_MAX_UPLOAD_BYTES"))
        return
    n, decoded = 0, 0
    try:
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            decoded += batch.nbytes
            if decoded > cfg.max_upload_bytes:
                issues.append(_over_size(f, decoded, cfg, "the decoded data"))
                return
            for row in batch.to_pylist():
                n += 1
                if n > cfg.max_rows:
                    issues.append(_over_rows(f, n, cfg))
                    return
                yield n, row
    except Exception as e:  # corrupt pages
        issues.append(Issue(f, n + 1, None, f"cannot read Parquet: {e}"))


def _read_hf_dir(path: Path, issues: list[Issue], cfg: DataConfig | None = None) -> Iterator[tuple[int, Any]]:
    import datasets
    f = str(path)
    cfg = cfg or DataConfig()
    if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        issues.append(Issue(f, None, None, "a directory, but not one saved by `datasets` (save_to_disk): "
                                           "give a JSONL, JSON, CSV or Parquet file"))
        return
    size = 0
    try:
        for p in path.rglob("*"):
            if p.is_file():
                size += p.stat().st_size
                if size > cfg.max_upload_bytes:
                    issues.append(_over_size(f, size, cfg, "the directory"))
                    return
    except OSError as e:
        issues.append(Issue(f, None, None, f"cannot read the directory: {e.strerror or e}"))
        return
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        issues.append(Issue(f, None, None, f"not a saved `datasets` directory: {e}"))
        return
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else datasets.concatenate_datasets(list(ds.values()))
    if len(ds) > cfg.max_rows:
        issues.append(_over_rows(f, None, cfg))
        return
    for i, row in enumerate(ds, 1):
        yield i, dict(row)


# ------------------------------------------------------------------------------------------------
# Normalising one raw row into the canonical record
# ------------------------------------------------------------------------------------------------
def detect_format(row: dict, mapping: dict | None = None) -> str | None:
    if mapping:
        return "table"
    keys = set(row)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and ("output" in keys or "response" in keys):
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    return None


_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "bot": "assistant", "model": "assistant"}


class _RowError(Exception):
    def __init__(self, fieldname: str | None, message: str):
        self.field, self.message = fieldname, message


def _text(row: dict, key: str, required: bool = True, label: str | None = None) -> str | None:
    label = label or key
    if key not in row or row[key] is None:
        if required:
            raise _RowError(label, "missing")
        return None
    v = row[key]
    if isinstance(v, float) and v != v:  # NaN from pandas/parquet
        if required:
            raise _RowError(label, "missing")
        return None
    if not isinstance(v, str):
        raise _RowError(label, f"expected text, got {type(v).__name__} {json.dumps(v, default=str)[:40]}")
    if required and not v.strip():
        raise _RowError(label, "empty")
    return v if v.strip() else None


def _check_turns(msgs: list[dict], fieldname: str) -> list[dict]:
    if not msgs:
        raise _RowError(fieldname, "no messages")
    i = 0
    if msgs[0]["role"] == "system":
        i = 1
    if i >= len(msgs):
        raise _RowError(fieldname, "only a system message")
    expected = "user"
    for n, m in enumerate(msgs[i:], i):
        if m["role"] != expected:
            raise _RowError(f"{fieldname}[{n}].role", f"roles out of order: expected {expected}, got {m['role']}")
        expected = "assistant" if expected == "user" else "user"
    if msgs[-1]["role"] != "assistant":
        raise _RowError(f"{fieldname}[{len(msgs) - 1}].role", "the conversation must end with an assistant turn")
    return msgs


def _messages(items: Any, fieldname: str, role_key: str, content_key: str, role_map: dict | None) -> list[dict]:
    if not isinstance(items, list):
        raise _RowError(fieldname, f"expected a list of turns, got {type(items).__name__}")
    out = []
    for n, m in enumerate(items):
        if not isinstance(m, dict):
            raise _RowError(f"{fieldname}[{n}]", f"expected an object, got {type(m).__name__}")
        role = m.get(role_key)
        if not isinstance(role, str):
            raise _RowError(f"{fieldname}[{n}].{role_key}", "missing")
        role = (role_map or {}).get(role.lower(), role) if role_map else role
        if role not in ("system", "user", "assistant"):
            raise _RowError(f"{fieldname}[{n}].{role_key}", f"unknown role {m.get(role_key)!r}")
        content = m.get(content_key)
        if not isinstance(content, str):
            raise _RowError(f"{fieldname}[{n}].{content_key}",
                            "missing" if content is None else f"expected text, got {type(content).__name__}")
        if not content.strip():
            raise _RowError(f"{fieldname}[{n}].{content_key}", "empty")
        out.append({"role": role, "content": content})
    return _check_turns(out, fieldname)


def _from_messages(msgs: list[dict], meta: dict) -> dict:
    system = msgs[0]["content"] if msgs[0]["role"] == "system" else None
    users = [m for m in msgs if m["role"] == "user"]
    if len(msgs) - (1 if system else 0) == 2:  # single turn: keep the simple shape
        return make_record(users[-1]["content"], msgs[-1]["content"], system=system, meta=meta)
    return make_record(users[-1]["content"], msgs[-1]["content"], system=system, messages=msgs, meta=meta)


def _meta(row: dict, used: set[str]) -> dict:
    meta = dict(row.get("meta") or {}) if isinstance(row.get("meta"), dict) else {}
    for k in ("source", "id"):
        if k in row and k not in used and isinstance(row[k], (str, int)):
            meta.setdefault(k, row[k])
    return meta


def normalise(row: dict, fmt: str, mapping: dict | None = None) -> dict:
    """One raw row -> canonical record; raises _RowError(field, message)."""
    if fmt == "alpaca":
        out_key = "output" if "output" in row else "response"
        instr = _text(row, "instruction")
        ctx = _text(row, "input", required=False)
        resp = _text(row, out_key)
        system = _text(row, "system", required=False)
        return make_record(instr, resp, system=system, context=ctx, meta=_meta(row, {"instruction", "input", out_key}))
    if fmt == "prompt_completion":
        p, c = row.get("prompt"), row.get("completion")
        if isinstance(p, list) or isinstance(c, list):  # conversational prompt/completion (TRL)
            prompt = _messages_loose(p, "prompt")
            completion = _messages_loose(c, "completion")
            return _from_messages(_check_turns(prompt + completion, "prompt+completion"), _meta(row, set()))
        return make_record(_text(row, "prompt"), _text(row, "completion"), system=_text(row, "system", required=False),
                           meta=_meta(row, {"prompt", "completion"}))
    if fmt == "messages":
        return _from_messages(_messages(row.get("messages"), "messages", "role", "content", None), _meta(row, set()))
    if fmt == "sharegpt":
        return _from_messages(_messages(row.get("conversations"), "conversations", "from", "value", _SHAREGPT_ROLES),
                              _meta(row, set()))
    if fmt == "table":
        m = mapping or {}
        col = {k: m.get(k, k) for k in ("instruction", "response", "context", "system")}
        instr = _text(row, col["instruction"], label=f"{col['instruction']} (instruction)")
        resp = _text(row, col["response"], label=f"{col['response']} (response)")
        ctx = _text(row, col["context"], required=False) if col["context"] in row else None
        system = _text(row, col["system"], required=False) if col["system"] in row else None
        return make_record(instr, resp, system=system, context=ctx, meta=_meta(row, set(col.values())))
    raise _RowError(None, f"unknown format {fmt!r}")


def _messages_loose(items: Any, fieldname: str) -> list[dict]:
    if isinstance(items, str):
        return [{"role": "user" if fieldname == "prompt" else "assistant", "content": items}]
    if not isinstance(items, list):
        raise _RowError(fieldname, f"expected text or a list of messages, got {type(items).__name__}")
    out = []
    for n, m in enumerate(items):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant"):
            raise _RowError(f"{fieldname}[{n}]", "expected {role, content}")
        if not m["content"].strip():
            raise _RowError(f"{fieldname}[{n}].content", "empty")
        out.append({"role": m["role"], "content": m["content"]})
    return out


_REQUIRED = {"alpaca": ("instruction", "output|response"), "prompt_completion": ("prompt", "completion"),
             "messages": ("messages",), "sharegpt": ("conversations",)}


def _check_columns(keys: set[str], fmt: str, mapping: dict | None, file: str) -> list[Issue]:
    """Columns a format needs that the data (header / first row) lacks: one issue per column."""
    if fmt == "table":
        m = mapping or {}
        need = [(m.get(k, k), k) for k in ("instruction", "response")]
        return [Issue(file, 1, col, f"column {col!r} (mapped to {canon}) not found; columns are: {', '.join(sorted(keys))}")
                for col, canon in need if col not in keys]
    out = []
    for req in _REQUIRED.get(fmt, ()):
        alts = req.split("|")
        if not any(a in keys for a in alts):
            out.append(Issue(file, 1, req, f"column {req!r} required by format {fmt} not found; "
                                           f"columns are: {', '.join(sorted(keys))}"))
    return out


def load_records(path: str | Path, fmt: str = "auto", mapping: dict | None = None,
                 cfg: DataConfig | None = None) -> tuple[list[dict], list[Issue], str | None]:
    """Read and normalise a file within the limits of ``cfg`` (default: DataConfig()).

    Returns (records, issues, format); records carry ``meta.line``."""
    path = Path(path)
    f = str(path)
    issues: list[Issue] = []
    if fmt not in ("auto", *FORMATS):
        raise DataError(f"unknown format {fmt!r}; choose auto, {', '.join(FORMATS)}", "format")
    if mapping:
        bad = set(mapping) - {"instruction", "response", "context", "system"}
        if bad:
            raise DataError(f"mapping keys must be instruction, response, context, system; got {', '.join(sorted(bad))}",
                            "mapping")
        fmt = "table" if fmt == "auto" else fmt
    records: list[dict] = []
    chosen: str | None = None if fmt == "auto" else fmt
    columns_checked = False
    for n, row in _read_rows(path, issues, cfg):
        if chosen is None:
            chosen = detect_format(row, mapping)
            if chosen is None:  # a plain table: map its columns by their names when they leave no doubt
                from sft_core.mapping import describe, guess_mapping, is_complete
                guess = guess_mapping(list(row))
                if not is_complete(guess):
                    issues.append(Issue(f, n, None, "cannot tell which fields hold the question and the answer "
                                                    f"(fields: {', '.join(sorted(map(str, row)))}); choose the format, "
                                                    "or map the columns (instruction=COLUMN, response=COLUMN)"))
                    return [], issues, None
                mapping, chosen = guess, "table"
                issues.append(Issue(f, None, None, f"columns mapped by their names: {describe(guess)}",
                                    severity="warning"))
        if not columns_checked:
            columns_checked = True
            missing = _check_columns(set(row), chosen, mapping, f)
            if missing:
                issues.extend(missing)
                return [], issues, chosen
        try:
            rec = normalise(row, chosen, mapping)
        except _RowError as e:
            issues.append(Issue(f, n, e.field, e.message))
            continue
        rec["meta"]["line"] = n
        records.append(rec)
    return records, issues, chosen


# ------------------------------------------------------------------------------------------------
# Quality: duplicates, lengths, PII, leakage
# ------------------------------------------------------------------------------------------------
# Every pattern below runs on uploaded text, so each must take linear time on any input (tests/test_limits.py
# measures it on adversarial shapes). _WS, _PUNCT: single character classes. EMAIL: a match can only start
# where a run of local-part characters starts (the lookbehind), so each run is scanned once instead of once
# per starting position (quadratic on a long word: 100,000 letters took ~13 s); the matches are the same,
# since any start inside a run reaches the same '@'. The domain class excludes '@', so each domain is
# scanned from one '@' only. PHONE, CARD: bounded quantifiers, a constant amount of work per position.
_WS = re.compile(r"\s+")
_PUNCT = re.compile(r"[^\w\s]")
EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
PHONE = re.compile(r"(?<!\w)(?:\+?\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])\d{3,4}[\s.-]?\d{3,4}(?!\w)")
CARD = re.compile(r"(?<!\d)(?:\d[ -]?){13,19}(?!\d)")


def normalised_key(rec: dict) -> str:
    text = " ".join(filter(None, [rec.get("instruction"), rec.get("context")]))
    return _WS.sub(" ", _PUNCT.sub(" ", text.lower())).strip()


def _luhn(digits: str) -> bool:
    total, alt = 0, False
    for ch in reversed(digits):
        d = int(ch)
        if alt:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
        alt = not alt
    return total % 10 == 0


def _mask(s: str) -> str:
    if "@" in s:
        user, _, dom = s.partition("@")
        return user[:1] + "***@" + dom
    digits = re.sub(r"\D", "", s)
    return "*" * max(0, len(digits) - 4) + digits[-4:]


def find_pii(text: str) -> list[tuple[str, str]]:
    """(kind, value) of likely e-mails, card numbers (Luhn-valid) and phone numbers; linear in len(text)."""
    import bisect
    found, spans = [], []  # spans of the e-mails and cards found: a phone number inside one is not reported
    if "@" in text:
        for m in EMAIL.finditer(text):
            found.append(("email", m.group()))
            spans.append(m.span())
    for m in CARD.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if 13 <= len(digits) <= 19 and _luhn(digits):
            found.append(("card", m.group()))
            spans.append(m.span())
    spans.sort()
    starts, reach = [a for a, _ in spans], []  # reach[i]: the furthest end among spans[:i + 1]
    for _, b in spans:
        reach.append(max(b, reach[-1]) if reach else b)
    for m in PHONE.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if not 7 <= len(digits) <= 15:
            continue
        i = bisect.bisect_right(starts, m.start()) - 1  # spans[:i + 1] start at or before the phone number
        if i >= 0 and reach[i] >= m.end():
            continue
        found.append(("phone", m.group()))
    return found


def _token_lengths(records: list[dict], model: str) -> list[int] | None:
    try:
        from sft_core.models import load_tokenizer, resolve_model
        tok = load_tokenizer(resolve_model(model))
    except StudioError:
        return None
    out = []
    for r in records:
        msgs = to_messages(r)
        try:
            ids = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)
            n = len(ids["input_ids"])
        except Exception:  # no chat template: plain text length
            n = len(tok(" ".join(m["content"] for m in msgs))["input_ids"])
        out.append(n)
    return out


def _histogram(values: list[int], bins: int = 10) -> list[dict]:
    if not values:
        return []
    lo, hi = min(values), max(values)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((v - lo) // width for v in values)
    return [{"from": lo + i * width, "to": lo + (i + 1) * width - 1, "count": counts.get(i, 0)}
            for i in range(-(-(hi - lo + 1) // width))]


def quality(records_by_split: dict[str, list[dict]], cfg: DataConfig, file: str,
            all_records: list[dict] | None = None) -> tuple[dict, list[Issue]]:
    """Stats + warnings: duplicates (exact, normalised), lengths, PII, train/test overlap.

    ``all_records`` are the rows as read (before the split drops exact duplicates)."""
    issues: list[Issue] = []
    allrecs = all_records if all_records is not None else [r for rs in records_by_split.values() for r in rs]
    by_id: dict[str, list[int]] = defaultdict(list)
    by_norm: dict[str, list[int]] = defaultdict(list)
    for r in allrecs:
        line = r["meta"].get("line")
        by_id[r["id"]].append(line)
        by_norm[normalised_key(r)].append(line)
    exact = {k: v for k, v in by_id.items() if len(v) > 1}
    norm = {k: v for k, v in by_norm.items() if len(v) > 1}
    stats: dict[str, Any] = {
        "rows": len(allrecs),
        "splits": {k: len(v) for k, v in records_by_split.items()},
        "duplicates_exact": sum(len(v) - 1 for v in exact.values()),
        "duplicates_normalised": sum(len(v) - 1 for v in norm.values()),
        "duplicate_examples": [{"lines": v[:5]} for v in list(norm.values())[:5]],
    }
    lengths = _token_lengths(allrecs, cfg.model)
    if lengths:
        s = sorted(lengths)
        stats["tokens"] = {"min": s[0], "mean": round(sum(s) / len(s), 1), "p50": s[len(s) // 2],
                           "p95": s[min(len(s) - 1, int(len(s) * 0.95))], "max": s[-1], "model": cfg.model,
                           "histogram": _histogram(lengths)}
        over = [(r, n) for r, n in zip(allrecs, lengths) if n > cfg.max_tokens]
        stats["over_long"] = len(over)
        for r, n in over[:MAX_REPORTED]:
            issues.append(Issue(file, r["meta"].get("line"), None,
                                f"over-long: {n} tokens > max_tokens {cfg.max_tokens}", "warning"))
    pii_counts: Counter = Counter()
    pii_examples: list[dict] = []
    for r in allrecs:
        text = "\n".join(filter(None, [r.get("system"), r.get("instruction"), r.get("context"), r.get("response")]))
        for kind, value in find_pii(text):
            pii_counts[kind] += 1
            if len(pii_examples) < 10:
                pii_examples.append({"line": r["meta"].get("line"), "kind": kind, "masked": _mask(value)})
            if pii_counts[kind] <= 20:
                issues.append(Issue(file, r["meta"].get("line"), None, f"likely PII ({kind}): {_mask(value)}", "warning"))
    stats["pii"] = dict(pii_counts)
    stats["pii_examples"] = pii_examples
    train_keys = {normalised_key(r) for r in records_by_split.get("train", [])}
    leak = {s: sum(1 for r in rs if normalised_key(r) in train_keys)
            for s, rs in records_by_split.items() if s != "train"}
    stats["leakage"] = leak
    return stats, issues


# ------------------------------------------------------------------------------------------------
# Split, check, import, read back
# ------------------------------------------------------------------------------------------------
def split_records(records: list[dict], cfg: DataConfig) -> dict[str, list[dict]]:
    """Deterministic seeded split. Exact duplicates are dropped; rows sharing a normalised question
    are kept in the same split so the split itself never leaks."""
    seen, unique = set(), []
    for r in records:
        if r["id"] not in seen:
            seen.add(r["id"])
            unique.append(r)
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in unique:
        groups[normalised_key(r)].append(r)
    keys = sorted(groups, key=lambda k: sha256_json([cfg.seed, k]))
    n = len(keys)
    n_test = int(round(n * cfg.test_fraction)) if n >= 3 else 0
    n_eval = int(round(n * cfg.eval_fraction)) if n >= 3 else 0
    if n >= 3 and cfg.test_fraction > 0:
        n_test = max(1, n_test)
    if n >= 3 and cfg.eval_fraction > 0:
        n_eval = max(1, n_eval)
    parts = {"test": keys[:n_test], "eval": keys[n_test:n_test + n_eval], "train": keys[n_test + n_eval:]}
    return {s: [r for k in parts[s] for r in groups[k]] for s in SPLITS}


def _resolve_cfg(cfg: DataConfig | None) -> DataConfig:
    cfg = cfg or DataConfig()
    cfg.validate()
    return cfg


def check_file(path: str | Path, cfg: DataConfig | None = None) -> Report:
    """Load, validate and report on a file without storing anything."""
    cfg = _resolve_cfg(cfg)
    records, issues, fmt = load_records(path, cfg.format, cfg.mapping or None, cfg)
    report = Report(file=str(path), format=fmt, issues=list(issues))
    report.n_valid = len(records)
    report.n_rows = len(records) + len({(i.line, i.file) for i in issues if i.severity == "error" and i.line})
    if records:
        stats, warn = quality(split_records(records, cfg), cfg, str(path), all_records=records)
        report.stats = stats
        report.issues.extend(warn)
    elif not report.errors:
        report.issues.append(Issue(str(path), None, None, "no records found"))
    return report


def format_report(report: Report) -> str:
    """Markdown rendering of a report (CLI and UI)."""
    name = Path(report.file).name
    head = "✅ valid" if report.ok else f"❌ {len(report.errors)} error(s)"
    lines = [f"### {name} — {head}", "",
             f"- format: **{report.format or 'unknown'}** · rows read: **{report.n_rows}** · valid: **{report.n_valid}**"]
    st = report.stats
    if st:
        lines.append(f"- split: " + ", ".join(f"{k} {v}" for k, v in st.get("splits", {}).items()))
        lines.append(f"- duplicates: {st.get('duplicates_exact', 0)} exact, {st.get('duplicates_normalised', 0)} "
                     "after normalising case/punctuation/space")
        if "tokens" in st:
            t = st["tokens"]
            lines.append(f"- tokens ({t['model']}): min {t['min']} · mean {t['mean']} · p50 {t['p50']} · "
                         f"p95 {t['p95']} · max {t['max']} · over max_tokens: {st.get('over_long', 0)}")
            peak = max(b["count"] for b in t["histogram"]) or 1
            lines.append("")
            lines.append("```")
            for b in t["histogram"]:
                lines.append(f"{b['from']:>6}-{b['to']:<6} {'█' * max(0, round(30 * b['count'] / peak)):<30} {b['count']}")
            lines.append("```")
        leak = st.get("leakage", {})
        lines.append("- train/test overlap (leakage): " + (", ".join(f"{k} {v}" for k, v in leak.items()) or "n/a"))
        pii = st.get("pii", {})
        lines.append("- likely PII: " + (", ".join(f"{k} {v}" for k, v in pii.items()) if pii else "none found"))
        for ex in st.get("pii_examples", [])[:5]:
            lines.append(f"  - line {ex['line']}: {ex['kind']} `{ex['masked']}`")
    if report.errors:
        lines += ["", f"**Errors** ({len(report.errors)}):"]
        lines += [f"- {i}" for i in report.errors[:50]]
        if len(report.errors) > 50:
            lines.append(f"- … and {len(report.errors) - 50} more")
    if report.warnings:
        lines += ["", f"**Warnings** ({len(report.warnings)}):"]
        lines += [f"- {i}" for i in report.warnings[:20]]
    return "\n".join(lines)


def _store(store: Store | None, ws: Workspace) -> Store:
    return store or open_store(ws.db_url)


def import_dataset(path: str | Path, name: str, cfg: DataConfig | None = None, ws: Workspace | None = None,
                   store: Store | None = None) -> DatasetVersion:
    """Validate, split and store a file as a dataset version. Invalid data stores nothing."""
    safe_name(name, "name")
    cfg = _resolve_cfg(cfg)
    report = check_file(path, cfg)
    if not report.ok:
        first = report.errors[0] if report.errors else None
        more = f" (and {len(report.errors) - 1} more problems)" if len(report.errors) > 1 else ""
        msg = f"{first}{more}" if first else "no valid records"
        raise DataError(f"invalid data, nothing stored: {msg}", str(path))
    records, _, fmt = load_records(path, cfg.format, cfg.mapping or None, cfg)
    splits = split_records(records, cfg)
    return import_records(splits, name, cfg=cfg, ws=ws, store=store, source=Path(path).name, report=report.to_dict(),
                          fmt=fmt)


def import_records(records_by_split: dict[str, list[dict]], name: str, cfg: DataConfig | None = None,
                   ws: Workspace | None = None, store: Store | None = None, source: str | None = None,
                   report: dict | None = None, fmt: str | None = None) -> DatasetVersion:
    """Store already-split canonical records as a version (content-addressed, never overwritten)."""
    safe_name(name, "name")
    cfg = _resolve_cfg(cfg)
    ws = ws or Workspace.from_env()
    store = _store(store, ws)
    for split, rows in records_by_split.items():
        safe_name(split, "split")
        if split == "train" and not rows:
            raise DataError("the train split is empty", "train")
    content = {s: [r["id"] for r in rs] for s, rs in sorted(records_by_split.items())}
    version = sha256_json({"ids": content, "records": sha256_json(records_by_split)})[:12]
    final = ws.datasets_dir(name, version)
    created = not (final / "manifest.json").exists()
    if created:
        if report is None:
            stats, warns = quality(records_by_split, cfg, source or name)
            report = {"stats": stats, "warnings": [asdict(w) for w in warns[:MAX_REPORTED]], "ok": True}
        with atomic_dir(final, exist_ok=True) as tmp:
            for split, rows in records_by_split.items():
                write_jsonl(tmp / f"{split}.jsonl", rows)
            atomic_write_json(tmp / "report.json", report)
            atomic_write_json(tmp / "manifest.json", {
                "name": name, "version": version, "created_at": time.time(), "source": source, "format": fmt,
                "config": asdict(cfg), "splits": {s: len(r) for s, r in records_by_split.items()}})
    splits = {s: len(r) for s, r in records_by_split.items()}
    n_rows = sum(splits.values())
    with store.tx() as con:  # the directory is complete before the row that points to it
        con.execute("INSERT OR IGNORE INTO datasets (name, version, created_at, path, source, n_rows, splits) "
                    "VALUES (?,?,?,?,?,?,?)", (name, version, time.time(), str(final), source, n_rows, dumps(splits)))
    return DatasetVersion(name, version, final, splits, n_rows, created)


def list_datasets(ws: Workspace | None = None, store: Store | None = None) -> list[dict]:
    ws = ws or Workspace.from_env()
    rows = _store(store, ws).query("SELECT * FROM datasets ORDER BY created_at DESC")
    for r in rows:
        r["splits"] = loads(r["splits"], {})
    return rows


def get_version(name: str, version: str | None = None, ws: Workspace | None = None,
                store: Store | None = None) -> DatasetVersion:
    ws = ws or Workspace.from_env()
    safe_name(name, "dataset")
    st = _store(store, ws)
    if version:
        row = st.query_one("SELECT * FROM datasets WHERE name=? AND version=?", (name, version))
    else:
        row = st.query_one("SELECT * FROM datasets WHERE name=? ORDER BY created_at DESC, rowid DESC", (name,))
    if row is None:
        known = sorted({r["name"] for r in st.query("SELECT name FROM datasets")})
        what = f"{name}@{version}" if version else name
        raise DataError(f"unknown dataset {what!r}; known: {', '.join(known) or 'none (import one first)'}", "dataset")
    splits = loads(row["splits"], {})
    return DatasetVersion(row["name"], row["version"], Path(row["path"]), splits, row["n_rows"], False)


def load_split(name: str, split: str, version: str | None = None, ws: Workspace | None = None,
               store: Store | None = None) -> list[dict]:
    v = get_version(name, version, ws, store)
    p = v.path / f"{safe_name(split, 'split')}.jsonl"
    if not p.exists():
        raise DataError(f"dataset {v.name}@{v.version} has no {split!r} split; it has: {', '.join(v.splits)}", "split")
    return read_jsonl(p)
