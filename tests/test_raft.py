"""Retrieval-aware fine-tuning (sft_core/raft.py, TrainConfig mode raft) and the raft:RUN system.

A small real knowledge base (the embedded embedder, eight one-fact documents) and the tiny random
Llama: the prompts the trainer tokenises and the prompts the raft system sends are compared token for
token; the oracle rule, the distractors and the drop share are checked on the plans the trainer writes.
"""
from __future__ import annotations

import json

import pytest

from evals import runner
from evals import systems as S
from sft_core import StudioError, data, jobs, raft, retrieval
from sft_core.config import ConfigError, TrainConfig, load_config
from sft_core.db import evals as evals_db, jobs as jobs_db, runs as runs_db
from sft_core.records import make_record
from tests.test_train import _cli, run_in_process

FACTS = {  # document -> (question, answer); one chunk each
    "zorbia": ("What is the capital of Zorbia?", "The capital of Zorbia is Quuxville."),
    "glorp": ("What colour is a glorp fruit?", "A ripe glorp fruit is bright violet."),
    "tavi": ("How long does the Tavi river flow?", "The Tavi river flows for 412 kilometres."),
    "mek": ("Who founded the Mek guild?", "The Mek guild was founded by Ilsa Varn."),
    "plim": ("What do plim beetles eat?", "Plim beetles eat only copper moss."),
    "orrin": ("When is the Orrin festival held?", "The Orrin festival is held each spring equinox."),
    "kelvar": ("What is Kelvar bread made from?", "Kelvar bread is made from roasted acorn flour."),
    "sunda": ("How tall is Mount Sunda?", "Mount Sunda rises 5,210 metres above the sea."),
}
FILLER = {  # a paragraph per document, so the passages are documents, not bare answers
    "zorbia": "Zorbia is a small island nation in the northern sea, known for its fishing fleets.",
    "glorp": "The glorp is a tropical fruit grown on terraces; it is eaten fresh or dried.",
    "tavi": "The Tavi is the longest river of the western plains and feeds three lakes.",
    "mek": "The Mek guild trains clockmakers and keeps a library of old gear designs.",
    "plim": "Plim beetles live in damp caves and glow faintly in the dark.",
    "orrin": "The Orrin festival brings music, lanterns and a market to the old town.",
    "kelvar": "Kelvar bread is a dense loaf baked in the mountain villages.",
    "sunda": "Mount Sunda is a dormant volcano climbed by hundreds of people each summer.",
}
KB = "facts"
K = 3  # distractors


def build_facts_kb(ws, store, root) -> retrieval.KnowledgeBase:
    d = root / "facts-docs"
    d.mkdir(exist_ok=True)
    for name, (_, answer) in FACTS.items():
        (d / f"{name}.txt").write_text(f"{FILLER[name]} {answer}")
    retrieval.build_kb([d], KB, ws=ws, store=store)
    return retrieval.open_kb(KB, ws)


def chunk_of(kb, name: str) -> int:
    return next(i for i, c in enumerate(kb.chunks) if c["doc_id"] == f"{name}.txt")


def qa_rows(kb, variants: int = 2) -> list[dict]:
    """Rows as the synthetic-data job makes them (meta.source + meta.chunk), plus rows without a chunk id."""
    rows = []
    for v in range(variants):
        for j, (name, (q, a)) in enumerate(FACTS.items()):
            question = q if v == 0 else f"Tell me: {q[0].lower()}{q[1:]}"
            meta = {"source": f"{name}.txt"}
            if (j + v) % 2 == 0:
                meta["chunk"] = chunk_of(kb, name)
            rows.append(make_record(question, a, meta=meta))
    return rows


def tiny_raft_cfg(tiny_model_dir, **kw) -> TrainConfig:
    base = dict(dataset="factsqa", base_model=str(tiny_model_dir), mode="raft", kb=KB, raft_distractors=K,
                raft_oracle_drop=0.5, raft_cite=True, raft_context_tokens=150, max_length=320, max_steps=2,
                batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, lr_scheduler="constant", save_steps=50,
                lora_r=4, lora_alpha=8, lora_dropout=0.0, logging_steps=1, seed=7)
    base.update(kw)
    return load_config(TrainConfig, overrides=base)


@pytest.fixture(scope="module")
def facts(module_home):
    ws, store = module_home
    kb = build_facts_kb(ws, store, ws.root)
    rows = qa_rows(kb)
    test = [make_record(q, a, meta={"source": f"{n}.txt"}) for n, (q, a) in list(FACTS.items())[:3]]
    data.import_records({"train": rows, "eval": rows[:4], "test": test}, "factsqa", ws=ws, store=store)
    return ws, store, kb


@pytest.fixture(scope="module")
def raft_run(facts, tiny_model_dir):
    """A RAFT run, in-process through the queue (the worker's `run`), its SFTTrainer recorded."""
    import trl
    ws, store, kb = facts
    run_id = jobs.submit_train(tiny_raft_cfg(tiny_model_dir, run_name="raft-a"), ws, store)
    seen = {}

    class RecordingTrainer(trl.SFTTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            seen["trainer"] = self

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trl, "SFTTrainer", RecordingTrainer)
        assert run_in_process(ws, store, run_id) == 0
    return ws, store, kb, run_id, seen["trainer"]


def plans_of(ws, run_id: str, split: str = "train") -> list[dict]:
    lines = (ws.runs_dir(run_id) / raft.PLAN_FILE).read_text().splitlines()
    return [p for p in map(json.loads, lines) if p["split"] == split]


class FixedPassages:
    """A knowledge base whose search returns given chunks, in a given order: the same passages the trainer
    put in a row's prompt, handed to the raft system at inference."""

    def __init__(self, kb, chunk_ids: list[int], expect_k: int):
        self.kb, self.ids, self.expect_k = kb, chunk_ids, expect_k

    def search(self, query, k=None, **kw):
        assert k == self.expect_k, (k, self.expect_k)  # the system asks for the run's k + 1 passages
        return [self.kb._hit(i, 0.0) for i in self.ids]


# ------------------------------------------------------------------------------------------------
# (a) training prompt == inference prompt, token for token
# ------------------------------------------------------------------------------------------------
def test_training_and_raft_system_prompts_are_byte_identical(raft_run, tiny_model_dir):
    """For every training row: the prompt tokens the trainer trained on (TRL's tokenised row, the span
    before the first trained label) equal the chat template applied to the messages the raft:RUN system
    sends for the same row and the same passages; as text, too.

    Why this can fail: the system builds its messages through evals.systems.build_messages with its own
    settings (the run's k + 1 and budget, read from the run's stored config), the trainer through
    train.run with the TrainConfig; a different budget, system message, passage order or label format on
    either side changes the tokens."""
    from sft_core.models import load_tokenizer
    ws, store, kb, run_id, trainer = raft_run
    tok = load_tokenizer(tiny_model_dir)
    plans = plans_of(ws, run_id)
    records = data.load_split("factsqa", "train", None, ws=ws, store=store)
    assert [p["row_id"] for p in plans] == [r["id"] for r in records]
    settings = S.raft_settings(run_id, store)
    assert settings.top_k == K + 1 and settings.context_tokens == 150
    system = S.parse_system(f"raft:{run_id}")
    assert system.adapter == run_id and system.uses_kb
    assert {p["dropped"] for p in plans} == {True, False}  # both kinds of row are compared (p = 0.5, 16 rows)
    # the budget (150 tokens) is exercised: some prompts cut their passages, some oracles are cited
    assert any(p["used"] < len(p["passages"]) for p in plans) and any(p["oracle_in_prompt"] for p in plans)
    for i, (rec, plan) in enumerate(zip(records, plans)):
        row = trainer.train_dataset[i]  # TRL 1.16 folds its completion mask into labels (-100 = not trained)
        n_prompt = next(j for j, lab in enumerate(row["labels"]) if lab != -100)
        trained_prompt = row["input_ids"][:n_prompt]
        ctx = S.Context(kb=FixedPassages(kb, plan["passages"], K + 1), tokenizer=tok, raft={run_id: settings})
        msgs, used = S.build_messages(system, rec, ctx)
        sent = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert trained_prompt == list(sent), f"row {i}: trained and inference prompts differ"
        assert tok.decode(trained_prompt) == tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert len(used) == plan["used"]
        # the answer the trainer learns: the reference, citing the oracle's label when it is in the prompt
        answer = tok.decode([t for t in row["labels"][n_prompt:] if t != -100], skip_special_tokens=True)
        if plan["oracle_in_prompt"]:
            label = [h.chunk_id for h in used].index(plan["oracle"]) + 1
            assert answer.startswith(f"{rec['response']} [{label}]"), answer
            assert f"[{label}] ({kb.chunks[plan['oracle']]['doc_id']} · " in msgs[-1]["content"]
        else:
            assert answer.startswith(rec["response"]) and not answer.startswith(rec["response"] + " ["), answer


def test_raft_run_manifest_plan_and_adapter(raft_run):
    """(d) The run finished through the queue: adapter saved, the manifest records the RAFT settings, the
    KB it used (hash) and the counts, which agree with the per-row plan."""
    ws, store, kb, run_id, _ = raft_run
    run_dir = ws.runs_dir(run_id)
    assert runs_db.get(store, run_id)["status"] == "succeeded"
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["config"]["mode"] == "raft" and m["raft"]["settings"]["kb"] == KB
    from sft_core.workspace import sha256_file
    assert m["raft"]["kb_sha256"] == sha256_file(kb.path / "chunks.jsonl")
    plans = plans_of(ws, run_id)
    t = m["raft"]["train"]
    assert t["rows"] == len(plans) == 16 and t["oracle_dropped"] == sum(p["dropped"] for p in plans)
    assert t["oracle_from_meta"] == 8 and t["oracle_from_answer"] == 8  # qa_rows: every other row has meta.chunk
    assert m["raft"]["eval"]["rows"] == len(plans_of(ws, run_id, "eval")) == 4
    phases = [json.loads(x).get("phase") for x in (run_dir / "events.jsonl").read_text().splitlines()]
    assert "building RAFT prompts" in phases


# ------------------------------------------------------------------------------------------------
# (b) the oracle and the distractors
# ------------------------------------------------------------------------------------------------
def test_oracle_rule(facts):
    """meta.chunk when it exists and belongs to meta.source; else the answer's top hit (from meta.source)."""
    ws, store, kb = facts
    q, a = FACTS["tavi"]
    assert raft.find_oracle(make_record(q, a, meta={"source": "tavi.txt", "chunk": chunk_of(kb, "tavi")}), kb) == \
        (chunk_of(kb, "tavi"), "meta")
    # a stale id (the chunk now belongs to another document): not trusted, the answer decides
    stale = make_record(q, a, meta={"source": "tavi.txt", "chunk": chunk_of(kb, "mek")})
    assert raft.find_oracle(stale, kb) == (chunk_of(kb, "tavi"), "answer")
    # no chunk id: the top hit for the reference answer
    top = kb.search(a, k=len(kb.chunks))[0].chunk_id
    assert top == chunk_of(kb, "tavi")  # the answer sentence is in that document alone
    assert raft.find_oracle(make_record(q, a), kb) == (top, "answer")
    # meta.source names the document: its best chunk for the answer, even when another ranks first
    other = make_record(q, a, meta={"source": "orrin.txt"})
    assert raft.find_oracle(other, kb) == (chunk_of(kb, "orrin"), "answer")


def _plans(kb, rows, tok, **kw) -> list[dict]:
    s = raft.RaftSettings(kb=KB, distractors=K, context_tokens=2048, **kw)
    return raft.build_rows(rows, kb, tok, s)[1]


@pytest.fixture(scope="module")
def many_rows(facts):
    """24 rows (distinct ids): the eight facts asked three ways, half with meta.chunk.

    Kept small: each row costs a KB search, one embedder call (~0.4 s on this loaded 2-core machine)."""
    ws, store, kb = facts
    rows = []
    for i in range(24):
        name, (q, a) = list(FACTS.items())[i % len(FACTS)]
        meta = {"source": f"{name}.txt", **({"chunk": chunk_of(kb, name)} if i % 2 else {})}
        rows.append(make_record(f"{q} (asked {i})", a, meta=meta))
    return kb, rows


@pytest.fixture(scope="module")
def embed_tok():
    return retrieval.embedder("all-minilm-l6-v2").tokenizer


@pytest.fixture(scope="module")
def many_plans(many_rows, embed_tok):
    kb, rows = many_rows
    return _plans(kb, rows, embed_tok, oracle_drop=0.5, seed=1)


def test_distractors_never_include_the_oracle(many_rows, many_plans, raft_run):
    """Every prompt holds the oracle exactly once (kept) or not at all (dropped), plus K other chunks,
    in the rows built here and in the plans of the training run.

    Why this can fail: the question's own search finds the oracle among its K + 1 hits for most rows
    (checked below), so a distractor list that did not remove it would hold it."""
    kb, rows = many_rows
    plans = many_plans
    ws, store, _, run_id, _ = raft_run
    for p in plans + plans_of(ws, run_id) + plans_of(ws, run_id, "eval"):
        assert p["passages"].count(p["oracle"]) == (0 if p["dropped"] else 1), p
        assert len([c for c in p["passages"] if c != p["oracle"]]) == K and len(set(p["passages"])) == len(p["passages"])
    assert {p["dropped"] for p in plans} == {True, False}
    retrieved = sum(p["oracle"] in [h.chunk_id for h in kb.search(r["instruction"], k=K + 1)]
                    for r, p in zip(rows, plans))
    assert retrieved >= 18, retrieved  # the exclusion is exercised: the oracle was among the raw hits


# ------------------------------------------------------------------------------------------------
# (c) the drop share
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 0.2, 0.5])
def test_oracle_drop_share_within_sampling_error(p):
    """Dropped rows ~ Binomial(n, p): each row's draw (raft.draw, the one build_row makes) is its own
    Bernoulli(p), seeded by (seed, row id). n = 4000 row ids (the draw needs no KB search).

    Bound: the central 1 - 1e-6 interval of Binomial(4000, p) from scipy (binom.ppf / binom.isf at 5e-7):
    a correct draw falls outside it with probability 1e-6. For p = 0.2 it is about [727, 873] (mean 800,
    sd 25.3: about 4.9 sd each side), a share of 0.2 +- 0.018. Dropping with 1 - p, or never, or always,
    falls far outside; p = 0 must drop nothing."""
    from scipy.stats import binom
    n = 4000
    dropped = sum(raft.draw(11, make_record(f"question {i}", "answer")["id"], p)[0] for i in range(n))
    lo, hi = binom.ppf(5e-7, n, p), binom.isf(5e-7, n, p)
    assert lo <= dropped <= hi, (dropped, lo, hi)
    if p == 0:
        assert dropped == 0


def test_training_rows_use_the_tested_draw(raft_run, many_rows, many_plans, embed_tok):
    """The run's plans and rows built here drop exactly the rows raft.draw drops (the draw tested above),
    and a row built alone gets the plan it had among the others (no dependence on the other rows)."""
    ws, store, kb, run_id, _ = raft_run
    s = S.raft_settings(run_id, store)
    for p in plans_of(ws, run_id) + plans_of(ws, run_id, "eval"):
        assert p["dropped"] == raft.draw(s.seed, p["row_id"], s.oracle_drop)[0]
    kb, rows = many_rows
    plans = many_plans
    assert [p["dropped"] for p in plans] == [raft.draw(1, r["id"], 0.5)[0] for r in rows]
    assert _plans(kb, [rows[7]], embed_tok, oracle_drop=0.5, seed=1)[0] == plans[7]


# ------------------------------------------------------------------------------------------------
# (e) bad configurations: one clear error, nothing stored
# ------------------------------------------------------------------------------------------------
def nothing_stored(ws, store, before: set) -> bool:
    runs = set(runs_db.ids(store))
    dirs = {p.name for p in ws.runs_dir().iterdir()} if ws.runs_dir().exists() else set()
    return runs == before and dirs == before


@pytest.mark.parametrize("overrides,field,needle", [
    ({"kb": ""}, "kb", "RAFT builds its prompts from a knowledge base"),
    ({"kb": "no-such-kb"}, "kb", "unknown knowledge base 'no-such-kb'"),
    ({"mode": "sft"}, "kb", "used only by RAFT training"),
    ({"mode": "rafts"}, "mode", "must be sft or raft"),
    ({"raft_distractors": 8}, "kb", "at least 9"),
    ({"raft_oracle_drop": 1.0}, "raft_oracle_drop", "[0, 1)"),
    ({"max_length": 150}, "max_length", "raise max_length above it"),  # = raft_context_tokens
])
def test_bad_raft_configs_refused(facts, tiny_model_dir, overrides, field, needle):
    ws, store, kb = facts
    before = set(runs_db.ids(store))
    jobs_before = jobs_db.count(store)
    with pytest.raises(ConfigError) as e:
        jobs.submit_train(tiny_raft_cfg(tiny_model_dir, run_name="bad", **overrides), ws, store)
    assert e.value.where == field and needle in str(e.value), str(e.value)
    assert nothing_stored(ws, store, before) and jobs_db.count(store) == jobs_before


def test_cli_raft_without_kb_is_one_line(facts, tiny_model_dir):
    ws, store, kb = facts
    before = set(runs_db.ids(store))
    rc, out, err = _cli("train", "--dataset", "factsqa", "--base-model", tiny_model_dir, "--mode", "raft")
    assert rc == 1 and out == ""
    assert err.strip() == "error: kb: RAFT builds its prompts from a knowledge base: choose one (--kb NAME)"
    assert nothing_stored(ws, store, before)


def test_cli_raft_run_in_a_worker_process(facts, tiny_model_dir, raft_run):
    """(d) `sft-studio train --mode raft --kb NAME` through the job runtime's real worker process."""
    ws, store, kb = facts
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        rc, out, err = _cli("train", "--dataset", "factsqa", "--base-model", tiny_model_dir, "--mode", "raft",
                            "--kb", KB, "--raft-context-tokens", "200", "--max-length", "256", "--max-steps", "2",
                            "--batch-size", "4", "--lora-r", "4", "--lora-alpha", "8", "--run-name", "raft-cli")
    assert rc == 0, out + err
    assert "run raft-cli: succeeded" in out and f"RAFT prompts from knowledge base {KB}: 16 training rows" in out
    m = json.loads((ws.runs_dir("raft-cli") / "manifest.json").read_text())
    assert m["raft"]["settings"] == {"kb": KB, "distractors": 3, "oracle_drop": 0.2, "cite": False,
                                     "context_tokens": 200, "seed": 42}
    assert S.raft_settings("raft-cli", store).context_tokens == 200


# ------------------------------------------------------------------------------------------------
# (f) evals, chat: five systems
# ------------------------------------------------------------------------------------------------
def test_five_systems_accepted_and_built(raft_run, tiny_model_dir, monkeypatch):
    """check_systems and create_eval take prompt, rag, sft, sft+rag and raft on a RAFT run; the eval
    stores the run's RAFT settings, and each system builds its request (raft: k + 1 passages)."""
    ws, store, kb, run_id, _ = raft_run
    names = ["rag", f"sft:{run_id}", f"sft+rag:{run_id}", f"raft:{run_id}", "prompt"]
    config = json.loads(runs_db.get(store, run_id)["config"])
    assert S.adapter_systems(run_id, config) == names[1:4] and S.adapter_systems("x", {"mode": "sft"}) == ["sft:x", "sft+rag:x"]
    checked = S.check_systems(names, store, KB)
    assert [s.kind for s in checked] == ["rag", "sft", "sft+rag", "raft", "prompt"]
    eval_id = runner.create_eval("factsqa", names, kb=KB, base_model=str(tiny_model_dir), general=False,
                                 ws=ws, store=store)
    cfg = json.loads((ws.evals_dir(eval_id) / "manifest.json").read_text())["config"]
    assert cfg["raft"] == {run_id: S.raft_settings(run_id, store).to_dict()}
    ctx = runner.eval_context(cfg, ws, store)
    asked = []  # the k of every search (the raft system retrieves the run's k + 1, the others the eval's top_k)
    real_search = retrieval.KnowledgeBase.search
    monkeypatch.setattr(retrieval.KnowledgeBase, "search",
                        lambda self, q, k=None, **kw: asked.append(k) or real_search(self, q, k, **kw))
    row = data.load_split("factsqa", "test", None, ws=ws, store=store)[0]
    built = {s.kind: S.build_messages(s, row, ctx) for s in checked}
    assert asked == [ctx.top_k, ctx.top_k, K + 1]  # rag, sft+rag, raft
    assert 1 <= len(built["raft"][1]) <= K + 1 and built["raft"][0][-1]["content"].startswith(retrieval.RAG_INSTRUCTION)
    assert built["raft"][0] == raft.prompt_messages(row, real_search(ctx.kb, row["instruction"], K + 1), ctx.tokenizer,
                                                    150)[0]
    assert built["sft"][1] == [] and built["prompt"][1] == []
    # chat: the same system, one message
    req = S.chat_request(f"raft:{run_id}", FACTS["mek"][0], kb=KB, ws=ws, store=store)
    assert req["adapter"] == run_id and asked[-1] == K + 1 and 1 <= len(req["passages"]) <= K + 1
    assert req["messages"][-1]["content"].endswith(f"Question: {FACTS['mek'][0]}")


def test_raft_system_refuses_a_run_not_trained_in_raft_mode(raft_run):
    ws, store, kb, run_id, _ = raft_run
    import time
    runs_db.insert_run(store, "plain", "factsqa", "v", "x", str(ws.runs_dir("plain")), {"mode": "sft"},
                       status="succeeded", created_at=time.time())
    try:
        with pytest.raises(StudioError) as e:
            S.check_systems(["rag", "raft:plain"], store, KB)
        assert e.value.where == "systems" and "trained in sft mode, not raft" in str(e.value)
        assert "compare it as sft+rag:plain" in str(e.value)
        assert [s.kind for s in S.check_systems(["sft+rag:plain"], store, KB)] == ["sft+rag"]
        with pytest.raises(StudioError, match="raft:NAME"):
            S.parse_system("raft")
    finally:
        runs_db.delete_run(store, "plain")


def test_eval_refuses_a_preference_dataset_before_storing(facts, tmp_path):
    """Item 4: pairs (prompt/chosen/rejected) are refused at submit time, not in the worker."""
    from sft_core import preference
    ws, store, kb = facts
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": f"good {i}",
                                     "rejected": f"bad {i}"}) + "\n" for i in range(6)))
    dv = preference.build_from_file(f, "prefs", eval_fraction=0.34, ws=ws, store=store)
    before = evals_db.ids(store)
    for split in ("train", "eval"):
        with pytest.raises(StudioError) as e:
            runner.create_eval("prefs", ["prompt"], split=split, ws=ws, store=store)
        assert e.value.where == "dataset" and f"prefs@{dv.version} is a preference dataset" in str(e.value)
    assert evals_db.ids(store) == before


def test_cli_raft_mode_leaves_room_for_the_passages_unless_told():
    """`train --mode raft --kb K` alone: max_length grows to the passage budget + an answer's room (the
    default 512 is below the default budget, which TrainConfig refuses); an explicit --max-length or a
    config file is left to TrainConfig's check."""
    from sft_core.commands.train import raft_length
    from sft_core.config import ConfigError, TrainConfig
    from sft_core.guide import RAFT_ANSWER_TOKENS
    given = {f: None for f in ("max_length", "raft_context_tokens")}
    over, note = raft_length({**given, "mode": "raft", "kb": "k", "dataset": "d"}, from_file=False)
    budget = TrainConfig().raft_context_tokens
    assert over["max_length"] == budget + RAFT_ANSWER_TOKENS and str(budget + RAFT_ANSWER_TOKENS) in note
    TrainConfig(**{k: v for k, v in over.items() if v is not None}).validate()  # accepted as it stands
    over, note = raft_length({**given, "mode": "raft", "raft_context_tokens": 200}, from_file=False)
    assert over["max_length"] == 200 + RAFT_ANSWER_TOKENS
    for kept in ({**given, "mode": "raft", "max_length": 300}, {**given, "mode": "sft"}):
        assert raft_length(kept, from_file=False) == (kept, "")
    assert raft_length({**given, "mode": "raft"}, from_file=True)[1] == ""
    with pytest.raises(ConfigError, match="max_length"):
        TrainConfig(dataset="d", mode="raft", kb="k", max_length=300).validate()
