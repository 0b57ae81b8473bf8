"""Which column of a table holds the question, the answer, the context and the system prompt.

A CSV with ``question,answer`` (or ``prompt,completion``, ``input,output``, ...) is in no record format
of its own: its columns are mapped to the canonical record's ``instruction`` / ``response`` /
``context`` / ``system``. ``guess_mapping`` guesses that from the headers' names; the Data tab shows
the guess in dropdowns filled from the file's headers (``inspect_file``), and ``data.load_records``
applies it when a file names its columns clearly enough and nobody gave a mapping.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from sft_core.config import DataConfig

ROLES = ("instruction", "response", "context", "system")
REQUIRED = ("instruction", "response")

# Names people give each role's column, most telling first; compared after lower-casing and turning
# spaces and dashes into underscores. "input" is a question in an input/output table but the context
# beside an "instruction" column (alpaca), so it comes after every unambiguous question name and the
# roles are filled in this order: a column taken by one role is not offered to the next.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "question", "prompt", "query", "user_message", "user", "request", "input",
                    "q"),
    "response": ("response", "answer", "completion", "output", "reply", "assistant_message", "assistant",
                 "target", "a"),
    "context": ("context", "input", "passage", "document", "background"),
    "system": ("system", "system_prompt"),
}
_SEP = re.compile(r"[\s\-.]+")


def _norm(name: str) -> str:
    return _SEP.sub("_", str(name).strip().lower())


def guess_mapping(columns) -> dict[str, str]:
    """Role -> column for the roles whose column the names make clear (possibly none).

    An exact name match wins (``Question``, ``answer``); else a column whose name has the word as one
    of its parts (``customer_question``, ``Agent Answer``): words of five letters or more, never in an
    id column (``query_id``); short names (q, a, user) only match exactly."""
    cols = [c for c in columns if isinstance(c, str)]
    taken: set[str] = set()
    out: dict[str, str] = {}
    for role in ROLES:
        for word in SYNONYMS[role]:
            exact = [c for c in cols if c not in taken and _norm(c) == word]
            part = [] if len(word) < 5 else [c for c in cols if c not in taken and word in _norm(c).split("_")
                                             and _norm(c).split("_")[-1] != "id"]
            hit = (exact or part or [None])[0]
            if hit is not None:
                out[role] = hit
                taken.add(hit)
                break
    return out


def is_complete(mapping: dict) -> bool:
    return all(mapping.get(r) for r in REQUIRED)


def describe(mapping: dict) -> str:
    """``question → instruction, answer → response`` for messages."""
    return ", ".join(f"{mapping[r]} → {r}" for r in ROLES if mapping.get(r))


def to_text(mapping: dict) -> str:
    """The mapping as ``instruction=question,response=answer`` (DataConfig.mapping's text form)."""
    return ",".join(f"{r}={mapping[r]}" for r in ROLES if mapping.get(r))


@dataclass
class FileInfo:
    """What the Data tab shows right after an upload, before any check."""
    name: str                     # the file's own name (never the upload's temp path)
    columns: list[str]            # header names in file order (union over the first rows)
    rows: list[dict]              # the first rows as read
    detected: str | None          # a record format recognised from the names (alpaca, messages, ...), or None
    guess: dict[str, str] = field(default_factory=dict)  # role -> column, for a table (detected None)
    problems: list[str] = field(default_factory=list)    # reading problems in the first rows, in words

    @property
    def needs_mapping(self) -> bool:
        return self.detected is None


def inspect_file(path: str | Path, cfg: DataConfig | None = None, n: int = 5) -> FileInfo:
    """The first ``n`` rows of a file, its column names, its detected format and a mapping guess. Reads
    through data's own readers (same limits, same line numbers); nothing is stored."""
    from sft_core import data
    path = Path(path)
    issues: list = []
    rows: list[dict] = []
    for _, row in data.read_rows(path, issues, cfg or DataConfig()):
        rows.append(row)
        if len(rows) >= n:
            break
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    detected = data.detect_format(rows[0]) if rows else None
    return FileInfo(name=path.name, columns=columns, rows=rows, detected=detected,
                    guess=guess_mapping(columns) if rows and detected is None else {},
                    problems=[str(i) for i in issues[:5]])


def preview_cell(value, limit: int = 120) -> str:
    """A cell of the preview table: text as is, anything else as JSON, cut at ``limit`` characters."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"
