"""Datasets: load any supported file, normalise to the canonical record, check its quality, split, version.

One concern per module, in the order a file flows through them:

* :mod:`.readers` — bytes to raw rows (JSONL, JSON, CSV/TSV, Parquet, a ``save_to_disk`` directory),
  within the input limits of :class:`~sft_core.config.DataConfig`;
* :mod:`.formats` — raw rows to canonical records (format detection, column mapping);
* :mod:`.stats` — duplicates, token lengths, likely PII, leakage;
* :mod:`.pipeline` — the one pass that reads a file once, splits it and measures it (:func:`check`);
* :mod:`.versions` — the versioned store: content-addressed versions, never overwritten;
* :mod:`.issues` — :class:`Issue`, :class:`Report`, :class:`DataError`, shared by all of them.

Every problem is an :class:`Issue` naming the file, the line (JSONL/CSV) or row (JSON/Parquet) and the
field. Errors block an import (nothing is stored); warnings are reported but do not. Rendering a report
for people (Markdown) is presentation, in :mod:`sft_core.render`.

This package re-exports the names callers use, so ``from sft_core import data; data.import_dataset(...)``
reads the same as before the split.
"""
from __future__ import annotations

from sft_core.data.formats import FORMATS, detect_format, load_records, normalise
from sft_core.data.issues import MAX_REPORTED, DataError, Issue, Report
from sft_core.data.pipeline import SPLITS, CheckedFile, check, check_file, split_records
from sft_core.data import readers as _readers
from sft_core.data.readers import PARQUET_BATCH_ROWS, read_rows
from sft_core.data.stats import CARD, EMAIL, PHONE, find_pii, normalised_key, quality
from sft_core.data.versions import (DatasetVersion, get_version, import_checked, import_dataset, import_records,
                                    list_datasets, load_split)
from sft_core.records import make_record, to_messages

# Private names callers outside the package still use: sft_core/mapping.py and sft_core/preference.py
# (_read_rows), tests/test_limits.py (_too_deep_line).
_read_rows = read_rows
_too_deep_line = _readers._too_deep_line

__all__ = ["CARD", "EMAIL", "FORMATS", "MAX_REPORTED", "PARQUET_BATCH_ROWS", "PHONE", "SPLITS", "CheckedFile",
           "DataError", "DatasetVersion", "Issue", "Report", "check", "check_file", "detect_format", "find_pii",
           "get_version", "import_checked", "import_dataset", "import_records", "list_datasets", "load_records",
           "load_split", "make_record", "normalise", "normalised_key", "quality", "read_rows", "split_records",
           "to_messages"]
