"""One pass from a file to checked, split records: read and normalise it once, split it, measure its quality.

:func:`check` returns everything an import needs (:class:`CheckedFile`), so a check followed by an
import parses the file and runs the tokenizer once; :func:`check_file` is the report alone.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from sft_core.config import DataConfig
from sft_core.data.formats import load_records
from sft_core.data.issues import Issue, Report
from sft_core.data.stats import normalised_key, quality
from sft_core.workspace import Workspace, sha256_json

SPLITS = ("train", "eval", "test")


@dataclass
class CheckedFile:
    """A file read, normalised, split and checked once: what an import of it stores is what was checked."""
    path: Path
    cfg: DataConfig
    report: Report
    records: list[dict]  # every valid row as read, exact duplicates included, each with meta.line
    splits: dict[str, list[dict]]  # split_records(records): exact duplicates dropped
    format: str | None


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


def resolve_cfg(cfg: DataConfig | None) -> DataConfig:
    cfg = cfg or DataConfig()
    cfg.validate()
    return cfg


def check(path: str | Path, cfg: DataConfig | None = None, *, ws: Workspace) -> CheckedFile:
    """Read, validate, split and report on a file, without storing anything (``ws``: where the model whose
    tokenizer measures lengths is cached)."""
    cfg = resolve_cfg(cfg)
    records, issues, fmt = load_records(path, cfg.format, cfg.mapping or None, cfg)
    report = Report(file=str(path), format=fmt, issues=list(issues))
    report.n_valid = len(records)
    report.n_rows = len(records) + len({(i.line, i.file) for i in issues if i.severity == "error" and i.line})
    splits: dict[str, list[dict]] = {}
    if records:
        splits = split_records(records, cfg)
        stats, warn = quality(splits, cfg, str(path), all_records=records, ws=ws)
        report.stats = stats
        report.issues.extend(warn)
    elif not report.errors:
        report.issues.append(Issue(str(path), None, None, "no records found"))
    return CheckedFile(Path(path), cfg, report, records, splits, fmt)


def check_file(path: str | Path, cfg: DataConfig | None = None, *, ws: Workspace) -> Report:
    """Load, validate and report on a file without storing anything."""
    return check(path, cfg, ws=ws).report
