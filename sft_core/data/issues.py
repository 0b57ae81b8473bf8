"""What a check finds: an :class:`Issue` per problem (file, line or row, field), gathered in a :class:`Report`.

Errors block an import (nothing is stored); warnings (over-long rows, likely PII, a guessed column
mapping) are reported but do not. Rendering a report for people lives in :mod:`sft_core.render`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from sft_core import StudioError

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
