"""Normalising: each raw row becomes the canonical record (:mod:`sft_core.records`), or an issue naming its field.

Formats (auto-detected from the first row, or named): ``alpaca`` (instruction/input/output),
``prompt_completion``, ``messages`` (OpenAI), ``sharegpt`` (conversations with from/value), and
``table`` (any columns, through a mapping such as ``instruction=question,response=answer,context=passage``;
guessed from the column names when they leave no doubt).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sft_core.config import DataConfig
from sft_core.data.issues import DataError, Issue
from sft_core.data.readers import read_rows
from sft_core.records import make_record

FORMATS = ("alpaca", "prompt_completion", "messages", "sharegpt", "table")


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
    for n, row in read_rows(path, issues, cfg):
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
