"""The canonical record and its chat form (shared by data, training, serving and evals).

A record is a plain dict (one JSON line in a dataset split)::

    {"id": str, "system": str | None, "instruction": str, "context": str | None,
     "response": str, "messages": list[dict] | None, "meta": dict}

``messages`` is set for multi-turn data; ``instruction`` / ``response`` then hold its last user and
assistant turns.
"""
from __future__ import annotations

from sft_core.workspace import sha256_json

CONTEXT_TEMPLATE = "{instruction}\n\nContext:\n{context}"


def make_record(instruction: str, response: str, *, system: str | None = None, context: str | None = None,
                messages: list[dict] | None = None, meta: dict | None = None) -> dict:
    rec = {"system": system or None, "instruction": instruction, "context": context or None,
           "response": response, "messages": messages or None, "meta": dict(meta or {})}
    rec["id"] = sha256_json({k: rec[k] for k in ("system", "instruction", "context", "response", "messages")})[:16]
    return {"id": rec.pop("id"), **rec}


def user_content(record: dict, with_context: bool = True) -> str:
    if with_context and record.get("context"):
        return CONTEXT_TEMPLATE.format(instruction=record["instruction"], context=record["context"])
    return record["instruction"]


def to_messages(record: dict, with_context: bool = True, with_response: bool = True) -> list[dict]:
    """Chat messages for a record: system?, user (instruction + context), assistant (response).

    With ``with_response=False`` the final assistant turn is left out (a prompt for generation).
    """
    if record.get("messages"):
        msgs = [dict(m) for m in record["messages"]]
        if not with_response and msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        return msgs
    msgs = []
    if record.get("system"):
        msgs.append({"role": "system", "content": record["system"]})
    msgs.append({"role": "user", "content": user_content(record, with_context)})
    if with_response:
        msgs.append({"role": "assistant", "content": record["response"]})
    return msgs


def prompt_messages(record: dict, with_context: bool = True) -> list[dict]:
    return to_messages(record, with_context=with_context, with_response=False)
