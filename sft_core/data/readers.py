"""Reading raw rows: a file becomes (line_or_row_number, dict) pairs, or issues.

JSONL, JSON (a list), CSV/TSV, Parquet, or a directory written by ``datasets.save_to_disk``. Each
file is read once, within the limits of a :class:`DataConfig`: an over-size file is refused before it
is parsed, a row over the field-length or nesting limit is an error of its own, reading stops at
``max_rows``. Rows come out as the file holds them; :mod:`.formats` turns them into records.
"""
from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from sft_core.config import DataConfig
from sft_core.data.issues import DataError, Issue


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


def read_rows(path: Path, issues: list[Issue], cfg: DataConfig | None = None) -> Iterator[tuple[int, Any]]:
    """Rows of a file within the limits of ``cfg``: an over-limit file is refused before it is parsed,
    a row over the field-length or nesting limit is an error of its own, reading stops at max_rows."""
    cfg = cfg or DataConfig()
    f = str(path)
    for n, row in _rows_unchecked(path, issues, cfg):
        bad = _row_limits(row, cfg)
        if bad:
            issues.append(Issue(f, n, bad[0], bad[1]))
            continue
        yield n, row


def _rows_unchecked(path: Path, issues: list[Issue], cfg: DataConfig) -> Iterator[tuple[int, Any]]:
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


def _utf8(raw: bytes, f: str, issues: list[Issue], encoding: str) -> str | None:
    """The file's text, or None with an issue naming the line of the first byte that is not UTF-8."""
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        issues.append(Issue(f, raw[:e.start].count(b"\n") + 1, None, f"not valid UTF-8 (byte {e.start})"))
        return None


def _read_json(path: Path, raw: bytes, issues: list[Issue], cfg: DataConfig | None = None) -> Iterator[tuple[int, Any]]:
    f = str(path)
    cfg = cfg or DataConfig()
    text = _utf8(raw, f, issues, "utf-8")
    if text is None:
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
    text = _utf8(raw, f, issues, "utf-8-sig")
    if text is None:
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
