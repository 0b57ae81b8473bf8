"""Versioned store: checked records become a dataset version, stored under its content hash and never overwritten.

A version is a directory ``datasets/<name>/<version>/`` (one JSONL per split, ``report.json``,
``manifest.json``), written atomically, and a row in the ``datasets`` table that points to it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sft_core.config import DataConfig
from sft_core.data.issues import MAX_REPORTED, DataError
from sft_core.data.pipeline import CheckedFile, check, resolve_cfg
from sft_core.data.stats import quality
from sft_core.db import datasets as dataset_rows
from sft_core.store import Store, loads, open_store
from sft_core.workspace import Workspace, atomic_dir, atomic_write_json, read_jsonl, safe_name, sha256_json, write_jsonl


@dataclass
class DatasetVersion:
    name: str
    version: str
    path: Path
    splits: dict[str, int]
    n_rows: int
    created: bool = False


def _store(store: Store | None, ws: Workspace) -> Store:
    return store or open_store(ws.db_url)


def import_dataset(path: str | Path, name: str, cfg: DataConfig | None = None, *, ws: Workspace,
                   store: Store | None = None) -> DatasetVersion:
    """Validate, split and store a file as a dataset version. Invalid data stores nothing."""
    safe_name(name, "name")
    return import_checked(check(path, cfg, ws=ws), name, ws=ws, store=store)


def import_checked(checked: CheckedFile, name: str, ws: Workspace,
                   store: Store | None = None) -> DatasetVersion:
    """Store a file already read by :func:`check` (so a check, then an import, parses it once).
    Invalid data stores nothing."""
    safe_name(name, "name")
    report = checked.report
    if not report.ok:
        first = report.errors[0] if report.errors else None
        more = f" (and {len(report.errors) - 1} more problems)" if len(report.errors) > 1 else ""
        msg = f"{first}{more}" if first else "no valid records"
        raise DataError(f"invalid data, nothing stored: {msg}", str(checked.path))
    return import_records(checked.splits, name, cfg=checked.cfg, ws=ws, store=store, source=checked.path.name,
                          report=report.to_dict(), fmt=checked.format)


def import_records(records_by_split: dict[str, list[dict]], name: str, cfg: DataConfig | None = None, *,
                   ws: Workspace, store: Store | None = None, source: str | None = None,
                   report: dict | None = None, fmt: str | None = None) -> DatasetVersion:
    """Store already-split canonical records as a version (content-addressed, never overwritten)."""
    safe_name(name, "name")
    cfg = resolve_cfg(cfg)
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
            stats, warns = quality(records_by_split, cfg, source or name, ws=ws)
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
    # the directory is complete before the row that points to it
    dataset_rows.add_version(store, name, version, str(final), source, n_rows, splits)
    return DatasetVersion(name, version, final, splits, n_rows, created)


def list_datasets(ws: Workspace, store: Store | None = None) -> list[dict]:
    rows = dataset_rows.list_versions(_store(store, ws))
    for r in rows:
        r["splits"] = loads(r["splits"], {})
    return rows


def get_version(name: str, version: str | None = None, *, ws: Workspace,
                store: Store | None = None) -> DatasetVersion:
    safe_name(name, "dataset")
    st = _store(store, ws)
    row = dataset_rows.get(st, name, version)
    if row is None:
        known = dataset_rows.names(st)
        what = f"{name}@{version}" if version else name
        raise DataError(f"unknown dataset {what!r}; known: {', '.join(known) or 'none (import one first)'}", "dataset")
    splits = loads(row["splits"], {})
    return DatasetVersion(row["name"], row["version"], Path(row["path"]), splits, row["n_rows"], False)


def load_split(name: str, split: str, version: str | None = None, *, ws: Workspace,
               store: Store | None = None) -> list[dict]:
    v = get_version(name, version, ws=ws, store=store)
    p = v.path / f"{safe_name(split, 'split')}.jsonl"
    if not p.exists():
        raise DataError(f"dataset {v.name}@{v.version} has no {split!r} split; it has: {', '.join(v.splits)}", "split")
    return read_jsonl(p)
