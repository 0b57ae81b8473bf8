"""The example domain: Python standard-library documentation, present on every machine.

From the docstrings of public functions and classes of a fixed set of stdlib modules it builds:

* a document corpus (``<home>/example/corpus.jsonl``: one document per object, signature + docstring);
* an instruction dataset ``pydocs`` of questions about an object with a concise answer (the first
  paragraph of its docstring), several phrasings per object, split into
  ``train`` / ``eval`` (seen objects, for eval loss) / ``test`` (held-out objects) /
  ``test_seen`` (new phrasings about objects seen in training).

Deterministic for a given Python version; nothing is committed.
"""
from __future__ import annotations

import importlib
import inspect
import re

from sft_core.config import DataConfig
from sft_core.data import DatasetVersion, import_records
from sft_core.records import make_record
from sft_core.db import jobs as job_rows
from sft_core.store import Store
from sft_core.workspace import Workspace, atomic_write_text, sha256_json

MODULES = ["json", "os.path", "re", "itertools", "functools", "collections", "string", "textwrap", "math",
           "statistics", "datetime", "pathlib", "shutil", "random", "heapq", "bisect", "fnmatch", "glob",
           "base64", "hashlib", "csv", "difflib", "operator", "copy", "html", "urllib.parse", "zlib", "uuid"]

# Phrasings 0-2 train; 3 is the new phrasing of test_seen; 4 feeds the eval split.
PHRASINGS = [
    "What does {qual} do?",
    "Explain the purpose of {qual} in Python's standard library.",
    "In the {module} module, what is {name} used for?",
    "I'm reading code that calls {qual}. What does it do?",
    "Briefly, what is {qual}?",
]
TEST_FRACTION = 0.2
MAX_ANSWER_CHARS = 400


def _first_paragraph(doc: str) -> str:
    para = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    text = " ".join(line.strip() for line in para.splitlines()).strip()
    if len(text) > MAX_ANSWER_CHARS:  # keep whole sentences
        cut = text[:MAX_ANSWER_CHARS]
        end = cut.rfind(". ")
        text = cut[:end + 1] if end > 80 else cut.rstrip() + "…"
    return text


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def collect_objects() -> list[dict]:
    """Public, documented functions and classes of MODULES, with their docstrings."""
    out, seen = [], set()
    for modname in MODULES:
        mod = importlib.import_module(modname)
        names = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
        for name in sorted(set(names)):
            obj = getattr(mod, name, None)
            if obj is None or not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                continue
            if inspect.isclass(obj) and issubclass(obj, BaseException):
                continue
            doc = inspect.getdoc(obj) or ""
            answer = _first_paragraph(doc)
            if len(answer) < 25 or answer.lower().startswith(("return ", "returns ")) and len(answer) < 30:
                continue
            qual = f"{modname}.{name}"
            key = id(obj)
            if key in seen:  # the same object re-exported by several modules: keep the first
                continue
            seen.add(key)
            out.append({"id": qual, "module": modname, "name": name, "signature": _signature(obj),
                        "doc": doc, "answer": answer, "kind": "class" if inspect.isclass(obj) else "function"})
    return out


def build_records(objects: list[dict]) -> dict[str, list[dict]]:
    test_ids = {o["id"] for o in objects if int(sha256_json(["pydocs-test", o["id"]])[:8], 16) / 0xFFFFFFFF < TEST_FRACTION}
    splits: dict[str, list[dict]] = {"train": [], "eval": [], "test": [], "test_seen": []}
    for o in objects:
        q = lambda i: PHRASINGS[i].format(qual=o["id"], module=o["module"], name=o["name"])  # noqa: E731
        meta = {"source": o["id"], "object": o["id"]}
        if o["id"] in test_ids:
            splits["test"].append(make_record(q(0), o["answer"], meta=meta))
            continue
        for i in (0, 1, 2):
            splits["train"].append(make_record(q(i), o["answer"], meta=meta))
        bucket = int(sha256_json(["pydocs-seen", o["id"]])[:8], 16) % 4
        if bucket == 0:
            splits["test_seen"].append(make_record(q(3), o["answer"], meta=meta))
        elif bucket == 1:
            splits["eval"].append(make_record(q(4), o["answer"], meta=meta))
    return splits


def corpus_text(o: dict) -> str:
    return f"{o['id']}{o['signature']}\n\n{o['doc']}"


def build_example(ws: Workspace, store: Store | None = None, name: str = "pydocs") -> dict:
    """Write the corpus and import the dataset (same version when nothing changed)."""
    import json
    objects = collect_objects()
    corpus = ws.root / "example" / "corpus.jsonl"
    lines = "".join(json.dumps({"id": o["id"], "title": o["id"], "text": corpus_text(o)}, ensure_ascii=False) + "\n"
                    for o in objects)
    if not corpus.exists() or corpus.read_text(encoding="utf-8") != lines:
        atomic_write_text(corpus, lines)
    dv: DatasetVersion = import_records(build_records(objects), name, cfg=DataConfig(), ws=ws, store=store,
                                        source="python-stdlib-docs", fmt="example")
    return {"dataset": dv, "corpus": corpus, "n_objects": len(objects)}


# ------------------------------------------------------------------------------------------------
# The example-domain bootstrap as a job (the app queues it on start; a worker process runs it)
# ------------------------------------------------------------------------------------------------
BOOTSTRAP_REF = "example-domain"


def submit_bootstrap(ws: Workspace, store: Store, base_model: str, name: str = "pydocs") -> str | None:
    """Queue the bootstrap unless a bootstrap job is queued or running, or the last one succeeded.
    Returns the new job id, or None."""
    from sft_core import jobs
    jobs.reconcile(store, ws=ws)
    with store.tx() as con:
        last = job_rows.latest(con, BOOTSTRAP_REF, kind="example")
        if last is not None and last["status"] in ("queued", "running", "succeeded"):
            return None
        return jobs._insert_job(con, "example", BOOTSTRAP_REF, {"base_model": base_model, "name": name})


def bootstrap_state(ws: Workspace, store: Store) -> str | None:
    """running | done | failed for the latest bootstrap job, None if there is none."""
    row = job_rows.latest(store, BOOTSTRAP_REF, kind="example")
    if row is None:
        return None
    return {"queued": "running", "running": "running", "succeeded": "done"}.get(row["status"], "failed")


def job_entry(ctx, payload: dict) -> None:
    """Prepare the base model, build the example dataset, index its corpus (each step reported)."""
    from sft_core import models, retrieval
    name = payload.get("name", "pydocs")
    ctx.progress(0, 3, force=True, unit="steps", step="preparing the base model")
    models.resolve_model(payload["base_model"], ctx.ws)
    ctx.check_cancel()
    ctx.progress(1, 3, force=True, unit="steps", step="building the example dataset")
    ex = build_example(ctx.ws, ctx.store, name=name)
    ctx.check_cancel()
    ctx.progress(2, 3, force=True, unit="steps", step="indexing the example corpus")
    retrieval.build_kb([ex["corpus"]], name, ws=ctx.ws, store=ctx.store)
    ds = ex["dataset"]
    ctx.progress(3, 3, force=True, unit="steps",
                 result=f"dataset {ds.name}@{ds.version} ({ds.n_rows} rows), knowledge base {name}")
