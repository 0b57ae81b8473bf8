"""Systems under comparison, registered by name; each turns a test row into a generation request.

    prompt            base model, system prompt, optional k few-shot examples from the train split
    rag               base model + passages retrieved from a knowledge base
    sft:<run>         the run's adapter
    sft+rag:<run>     the run's adapter + retrieved passages
    raft:<run>        a RAFT run's adapter (trained with passages in its prompts, sft_core/raft.py) + the
                      run's own number of retrieved passages and token budget; the prompt comes from
                      ``raft.prompt_messages``, the function its training prompts came from
    openai:<model>    an external OpenAI-compatible endpoint (SFT_STUDIO_OPENAI_BASE_URL, OPENAI_API_KEY)

``raft:RUN`` needs a run trained in raft mode (``mode: raft`` in its config); any other run is refused,
because its prompt would be ``sft+rag:RUN``'s under another name in the decision report.

``check_systems`` checks every system before an eval is created; for ``openai:*`` systems that
includes a pre-flight ``GET {base}/models`` (short timeout), so a dead endpoint or a rejected key
is reported before anything is stored.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sft_core import StudioError
from sft_core.db import runs as run_rows
from sft_core.records import prompt_messages

if TYPE_CHECKING:
    from sft_core.store import Store
    from sft_core.workspace import Workspace

DEFAULT_SYSTEM_PROMPT = "You are a concise, accurate assistant. Answer in one or two sentences."
KINDS = ("prompt", "rag", "sft", "sft+rag", "raft", "openai")
KB_KINDS = ("rag", "sft+rag", "raft")        # retrieve passages from the eval's knowledge base
ADAPTER_KINDS = ("sft", "sft+rag", "raft")   # served with a run's adapter


class SystemError_(StudioError):
    pass


@dataclass
class System:
    name: str            # as given: "sft+rag:run-1"
    kind: str            # prompt | rag | sft | sft+rag | raft | openai
    run: str | None = None
    model: str | None = None

    @property
    def uses_kb(self) -> bool:
        return self.kind in KB_KINDS

    @property
    def adapter(self) -> str | None:
        return self.run if self.kind in ADAPTER_KINDS else None


def parse_system(name: str) -> System:
    name = name.strip()
    kind, _, arg = name.partition(":")
    if kind not in KINDS:
        raise SystemError_(f"unknown system {name!r}; use prompt, rag, sft:RUN, sft+rag:RUN, raft:RUN or openai:MODEL",
                           "systems")
    if kind in ("prompt", "rag") and arg:
        raise SystemError_(f"system {kind!r} takes no argument (got {name!r})", "systems")
    if kind in (*ADAPTER_KINDS, "openai") and not arg:
        raise SystemError_(f"system {kind!r} needs a name: {kind}:NAME", "systems")
    if kind == "openai":
        return System(name, kind, model=arg)
    return System(name, kind, run=arg or None)


def adapter_systems(run_id: str, config: dict | None = None) -> list[str]:
    """The systems a finished run is compared as, from its stored config (``runs.config``): sft:RUN and
    sft+rag:RUN, and raft:RUN for a run trained in raft mode (pickers and campaigns list these)."""
    names = [f"sft:{run_id}", f"sft+rag:{run_id}"]
    return (names + [f"raft:{run_id}"]) if (config or {}).get("mode") == "raft" else names


def openai_endpoint() -> tuple[str, str]:
    """(base URL, API key) of the external endpoint the ``openai:*`` systems use."""
    return (os.environ.get("SFT_STUDIO_OPENAI_BASE_URL", "").rstrip("/"),
            os.environ.get("OPENAI_API_KEY", "") or "none")


def check_endpoint(base_url: str, api_key: str | None, what: str, timeout: float = 5.0) -> list[str]:
    """Pre-flight: ``GET {base_url}/models``. Returns the model ids it lists ([] if it has no list).

    Unreachable (refused, DNS, timeout), a rejected key (401/403) or a server error raises a
    ``StudioError`` that names ``what`` (the system or "the judge") and the URL. A 404 is accepted:
    some OpenAI-compatible servers serve chat completions without listing models."""
    import httpx
    url = f"{base_url.rstrip('/')}/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key and api_key != "none" else {}
    try:
        r = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        raise SystemError_(f"{what}: the endpoint {base_url} did not answer GET /models within {timeout:g}s",
                           "systems") from None
    except (httpx.HTTPError, ValueError) as e:
        raise SystemError_(f"{what}: cannot reach the endpoint {base_url} ({type(e).__name__}: {e})",
                           "systems") from None
    if r.status_code in (401, 403):
        raise SystemError_(f"{what}: the endpoint {base_url} rejected the API key (HTTP {r.status_code})", "systems")
    if r.status_code == 404:
        return []
    if r.status_code >= 400:
        raise SystemError_(f"{what}: the endpoint {base_url} answered GET /models with HTTP {r.status_code}",
                           "systems")
    try:
        return [str(m["id"]) for m in r.json().get("data", [])]
    except Exception:
        return []


def preflight(systems: list[System]) -> None:
    """Check that the external endpoint of every ``openai:*`` system answers (one call per URL)."""
    ext = [s for s in systems if s.kind == "openai"]
    if not ext:
        return
    base, key = openai_endpoint()
    if not base:
        raise SystemError_("set SFT_STUDIO_OPENAI_BASE_URL (and OPENAI_API_KEY) for openai:* systems", "systems")
    check_endpoint(base, key, ", ".join(s.name for s in ext))


def check_systems(names: list[str], store, kb: str | None, check_endpoints: bool = True) -> list[System]:
    """Parse and check every system before anything runs (finished runs, a KB where needed, endpoints)."""
    if not names:
        raise SystemError_("choose at least one system", "systems")
    systems = [parse_system(n) for n in names]
    if len({s.name for s in systems}) != len(systems):
        raise SystemError_("a system is listed twice", "systems")
    for s in systems:
        if s.adapter:
            run_rows.finished(store, s.adapter, SystemError_, "systems", label=s.name)
        if s.kind == "raft":
            raft_settings(s.run, store)  # refuses a run not trained in raft mode
        if s.uses_kb and not kb:
            raise SystemError_(f"{s.name} needs a knowledge base (--kb NAME)", "kb")
        if s.kind == "openai" and not os.environ.get("SFT_STUDIO_OPENAI_BASE_URL"):
            raise SystemError_("set SFT_STUDIO_OPENAI_BASE_URL (and OPENAI_API_KEY) for openai:* systems", "systems")
    if check_endpoints:
        preflight(systems)
    return systems


@dataclass
class Context:
    """What building a request needs: the KB, a tokenizer for the context budget, few-shot rows."""
    kb: object | None = None
    tokenizer: object | None = None
    top_k: int = 3
    max_context_tokens: int = 1024
    few_shot: list[dict] = field(default_factory=list)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    raft: dict = field(default_factory=dict)  # run id -> sft_core.raft.RaftSettings of each raft:RUN system


def raft_settings(run_id: str, store):
    """The RAFT settings of a run (passages to retrieve, token budget); SystemError_ when it is no RAFT run."""
    from sft_core import raft
    try:
        return raft.run_settings(run_id, store)
    except StudioError as e:
        raise SystemError_(e.message, "systems") from None


def build_messages(system: System, record: dict, ctx: Context) -> tuple[list[dict], list]:
    """(chat messages, passages used) for one record under one system.

    Base-model systems get the instruction-style system prompt; adapters are prompted exactly as
    they were trained (the record's own system message, if any), so SFT is measured in its format."""
    from sft_core.retrieval import build_rag_messages
    from sft_core import raft
    if system.uses_kb:
        if ctx.kb is None:
            raise SystemError_(f"{system.name} needs a knowledge base", "kb")
        if system.kind == "raft":  # the run's own passage count and budget, the trainer's prompt builder
            if system.run not in ctx.raft:
                raise SystemError_(f"{system.name}: the run's RAFT settings were not loaded", "systems")
            s = ctx.raft[system.run]
            return raft.prompt_messages(record, ctx.kb.search(record["instruction"], k=s.top_k), ctx.tokenizer,
                                        s.context_tokens)
        hits = ctx.kb.search(record["instruction"], k=ctx.top_k)
        if system.adapter:  # prompted as adapters are trained: the row's own system message
            return raft.prompt_messages(record, hits, ctx.tokenizer, ctx.max_context_tokens)
        return build_rag_messages(record["instruction"], hits, ctx.tokenizer, ctx.max_context_tokens,
                                  system=ctx.system_prompt)
    if system.adapter:
        return prompt_messages(record), []
    msgs = [{"role": "system", "content": ctx.system_prompt}]
    if system.kind in ("prompt", "openai"):
        for ex in ctx.few_shot:  # each example as a user/assistant exchange (its own system turn dropped)
            msgs += [m for m in prompt_messages(ex) if m["role"] != "system"]
            msgs.append({"role": "assistant", "content": ex["response"]})
    return msgs + [m for m in prompt_messages(record) if m["role"] != "system"], []


def chat_request(system_name: str, message: str, kb: str | None = None, *, ws: Workspace,
                 store: Store | None = None, tokenizer=None) -> dict:
    """For the Chat tab: one message under one system -> {messages, adapter, passages}."""
    from sft_core.retrieval import open_kb
    from sft_core.records import make_record
    system = parse_system(system_name)
    if system.uses_kb and not kb:
        raise SystemError_(f"{system.name} needs a knowledge base: choose one above", "knowledge base")
    raft = {}
    if system.kind == "raft":
        from sft_core.store import open_store
        store = store or open_store(ws.db_url)
        raft[system.run] = raft_settings(system.run, store)
        if tokenizer is None:  # the budget in the tokens the run was trained with: its base model's
            tokenizer = _run_tokenizer(system.run, ws, store)
    ctx = Context(kb=open_kb(kb, ws) if system.uses_kb else None,
                  tokenizer=tokenizer or (_embed_tokenizer() if system.uses_kb else None), raft=raft)
    msgs, used = build_messages(system, make_record(message, "-"), ctx)
    return {"messages": msgs, "adapter": system.adapter, "passages": used}


def _run_tokenizer(run_id: str, ws, store):
    from sft_core import models
    run = run_rows.get(store, run_id)
    return models.load_tokenizer(models.resolve_model(run["base_model"], ws))


def _embed_tokenizer():
    from sft_core.retrieval import embedder
    return embedder("all-minilm-l6-v2").tokenizer
