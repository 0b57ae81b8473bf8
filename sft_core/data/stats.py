"""Quality of a set of records: duplicates (exact and normalised), token lengths, likely PII, train/test leakage.

Every finding is a number in the stats and, where a row is at fault, a warning naming its line;
none of them blocks an import.
"""
from __future__ import annotations

import bisect
import re
from collections import Counter, defaultdict
from typing import Any

from sft_core import StudioError
from sft_core.config import DataConfig
from sft_core.data.issues import MAX_REPORTED, Issue
from sft_core.records import to_messages
from sft_core.workspace import Workspace

TOKEN_BATCH = 512  # conversations rendered and encoded per tokenizer call: bounds the memory of one batch
PII_WARNINGS_PER_KIND = 20  # rows warned about per kind of PII; the counts stay exact
PII_EXAMPLES = 10


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


def _token_lengths(records: list[dict], model: str, ws: Workspace) -> list[int] | None:
    """Tokens per record in ``model``'s chat template (None when the model cannot be loaded). One pass:
    the conversations are rendered and encoded a batch at a time, which gives the same ids as one
    conversation at a time (no padding, no truncation, no special tokens added beyond the template's)."""
    try:
        from sft_core.models import load_tokenizer, resolve_model
        tok = load_tokenizer(resolve_model(model, ws))
    except StudioError:
        return None
    convs = [to_messages(r) for r in records]
    out: list[int] = []
    for i in range(0, len(convs), TOKEN_BATCH):
        out += _batch_lengths(tok, convs[i:i + TOKEN_BATCH])
    return out


def _batch_lengths(tok, convs: list[list[dict]]) -> list[int]:
    try:
        return [len(ids) for ids in tok.apply_chat_template(convs, tokenize=True, return_dict=True)["input_ids"]]
    except Exception:  # a template that refuses some conversation, or none at all: one at a time, as below
        return [_one_length(tok, msgs) for msgs in convs]


def _one_length(tok, msgs: list[dict]) -> int:
    try:
        return len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    except Exception:  # no chat template: plain text length
        return len(tok(" ".join(m["content"] for m in msgs))["input_ids"])


def _histogram(values: list[int], bins: int = 10) -> list[dict]:
    if not values:
        return []
    lo, hi = min(values), max(values)
    width = max(1, -(-(hi - lo + 1) // bins))
    counts = Counter((v - lo) // width for v in values)
    return [{"from": lo + i * width, "to": lo + (i + 1) * width - 1, "count": counts.get(i, 0)}
            for i in range(-(-(hi - lo + 1) // width))]


def quality(records_by_split: dict[str, list[dict]], cfg: DataConfig, file: str,
            all_records: list[dict] | None = None, *, ws: Workspace) -> tuple[dict, list[Issue]]:
    """Stats + warnings: duplicates (exact, normalised), lengths, PII, train/test overlap.

    ``all_records`` are the rows as read (before the split drops exact duplicates); ``ws`` is where the
    model whose tokenizer measures lengths is cached."""
    allrecs = all_records if all_records is not None else [r for rs in records_by_split.values() for r in rs]
    keys = [normalised_key(r) for r in allrecs]
    stats: dict[str, Any] = {"rows": len(allrecs), "splits": {k: len(v) for k, v in records_by_split.items()},
                             **_duplicates(allrecs, keys)}
    issues = _lengths(allrecs, cfg, file, stats, ws)
    issues += _pii(allrecs, file, stats)
    train_keys = {normalised_key(r) for r in records_by_split.get("train", [])}
    stats["leakage"] = {s: sum(1 for r in rs if normalised_key(r) in train_keys)
                        for s, rs in records_by_split.items() if s != "train"}
    return stats, issues


def _duplicates(allrecs: list[dict], keys: list[str]) -> dict:
    by_id: dict[str, list[int]] = defaultdict(list)
    by_norm: dict[str, list[int]] = defaultdict(list)
    for r, key in zip(allrecs, keys):
        line = r["meta"].get("line")
        by_id[r["id"]].append(line)
        by_norm[key].append(line)
    exact = [v for v in by_id.values() if len(v) > 1]
    norm = [v for v in by_norm.values() if len(v) > 1]
    return {"duplicates_exact": sum(len(v) - 1 for v in exact),
            "duplicates_normalised": sum(len(v) - 1 for v in norm),
            "duplicate_examples": [{"lines": v[:5]} for v in norm[:5]]}


def _lengths(allrecs: list[dict], cfg: DataConfig, file: str, stats: dict, ws: Workspace) -> list[Issue]:
    """Token-length stats into ``stats``; a warning per over-long row (the first MAX_REPORTED)."""
    lengths = _token_lengths(allrecs, cfg.model, ws)
    if not lengths:
        return []
    s = sorted(lengths)
    stats["tokens"] = {"min": s[0], "mean": round(sum(s) / len(s), 1), "p50": s[len(s) // 2],
                       "p95": s[min(len(s) - 1, int(len(s) * 0.95))], "max": s[-1], "model": cfg.model,
                       "histogram": _histogram(lengths)}
    over = [(r, n) for r, n in zip(allrecs, lengths) if n > cfg.max_tokens]
    stats["over_long"] = len(over)
    return [Issue(file, r["meta"].get("line"), None, f"over-long: {n} tokens > max_tokens {cfg.max_tokens}", "warning")
            for r, n in over[:MAX_REPORTED]]


def _pii(allrecs: list[dict], file: str, stats: dict) -> list[Issue]:
    """PII counts and masked examples into ``stats``; a warning per finding (the first few of each kind)."""
    counts: Counter = Counter()
    examples: list[dict] = []
    issues: list[Issue] = []
    for r in allrecs:
        text = "\n".join(filter(None, [r.get("system"), r.get("instruction"), r.get("context"), r.get("response")]))
        for kind, value in find_pii(text):
            counts[kind] += 1
            if len(examples) < PII_EXAMPLES:
                examples.append({"line": r["meta"].get("line"), "kind": kind, "masked": _mask(value)})
            if counts[kind] <= PII_WARNINGS_PER_KIND:
                issues.append(Issue(file, r["meta"].get("line"), None, f"likely PII ({kind}): {_mask(value)}", "warning"))
    stats["pii"] = dict(counts)
    stats["pii_examples"] = examples
    return issues
