"""The LLM judge (evals/judge.py) against a scripted OpenAI-compatible server.

``ScriptedOpenAI`` is the project's own serve front (sft_core/serving/front.py) on 127.0.0.1 over a scripted
engine written here; it stands in for a remote
judge model (and for remote ``openai:*`` systems and an attached engine): a real remote model is a
boundary that cannot exist in this sandbox (no network). It speaks the parts of the OpenAI API the
code uses (``GET /v1/models``, ``POST /v1/chat/completions``) and answers deterministically from the
prompt's content, so the judge's position swap, ties and inconsistent verdicts are really exercised:

* a pairwise judge prompt: the answer that contains the reference wins ("A"/"B"); both or neither
  -> "T"; a question containing ``POSITION-BIASED`` -> always "A" (flips with the swap);
* a rubric prompt: "Score: 5" if the answer contains the reference, "Score: 3" if it shares a
  content word with it, "Score: 1" otherwise, and "n/a" for an answer containing ``UNSCORABLE``;
* anything else: model ``zorbia`` answers "The capital of Zorbia is Quuxville."; others echo.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest

from evals import judge as J
from evals import runner
from sft_core import StudioError, data
from sft_core.config import StudioSettings
from sft_core.db import evals as evals_db
from sft_core.records import make_record
from sft_core.serving.base import GenResult
from sft_core.workspace import read_jsonl

ZORBIA = "The capital of Zorbia is Quuxville."
MODELS = ("scripted-judge", "zorbia", "echo")


class _ScriptedEngine:
    """The engine behind the real front: the first model is the "base", the others are addressed like
    adapters (the front hands any other model name to the engine); each answer comes from ``reply``."""

    def __init__(self, owner: "ScriptedOpenAI"):
        self.owner = owner
        self.served_name = owner.models[0]

    def health(self):
        return {"ok": True, "state": "ready"}

    def list_adapters(self):
        return self.owner.models[1:]

    def _answer(self, model, messages) -> GenResult:
        o = self.owner
        with o.lock:
            o.requests.append({"model": model, "messages": messages})
        time.sleep(o.delay_s)
        text = o.reply(model, messages)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        return GenResult(text, prompt_tokens, len(text.split()), finish_reason="stop")

    def generate_batch(self, requests):
        return [self._answer(r.adapter or self.served_name, r.messages) for r in requests]

    def chat(self, messages, adapter=None, decoding=None, info=None):
        r = self._answer(adapter or self.served_name, messages)
        if info is not None:
            info.update(finish_reason="stop", prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens)
        yield r.text


class ScriptedOpenAI:
    """A deterministic OpenAI-compatible endpoint on 127.0.0.1 (see the module docstring): the project's
    own serve front over a scripted engine."""

    def __init__(self, models=MODELS, api_key: str | None = None):
        from sft_core.serving.front import Front, build_app
        self.models, self.api_key = list(models), api_key
        self.delay_s = 0.0  # per chat answer: lets a test catch a job mid-generation
        self.requests: list[dict] = []  # every chat request: {"model", "messages"}
        self.lock = threading.Lock()
        # the key is read per request: a test may set .api_key on a running server
        self.front = Front(build_app(_ScriptedEngine(self), self.models[0], api_key=lambda: self.api_key))

    @property
    def base(self) -> str:  # what an attached engine takes (it adds /v1 itself)
        return self.front.url

    @property
    def url(self) -> str:  # an OpenAI client's base_url
        return self.base + "/v1"

    def close(self) -> None:
        self.front.close()

    # -- the script ------------------------------------------------------------------------------
    @staticmethod
    def _field(prompt: str, name: str) -> str:
        m = re.search(rf"^{name}: (.*?)(?:\n\n|\Z)", prompt, re.MULTILINE | re.DOTALL)
        return m.group(1).strip() if m else ""

    @staticmethod
    def _contains(answer: str, ref: str) -> bool:
        return ref.lower().rstrip(".") in answer.lower()

    def reply(self, model: str, messages: list[dict]) -> str:
        prompt = str(messages[-1]["content"]) if messages else ""
        if prompt.startswith("You are judging two answers"):
            q, ref = self._field(prompt, "Question"), self._field(prompt, "Reference answer")
            a, b = self._field(prompt, "Answer A"), self._field(prompt, "Answer B")
            if "POSITION-BIASED" in q:
                return "A"
            ga, gb = self._contains(a, ref), self._contains(b, ref)
            return "A" if ga and not gb else "B" if gb and not ga else "T"
        if prompt.startswith("Score the answer"):
            ref, a = self._field(prompt, "Reference answer"), self._field(prompt, "Answer")
            if "UNSCORABLE" in a:
                return "n/a"
            if self._contains(a, ref):
                return "Score: 5"
            words = {w for w in re.findall(r"[a-z]{4,}", ref.lower())}
            return "Score: 3" if words & set(re.findall(r"[a-z]{4,}", a.lower())) else "Score: 1"
        if model == "zorbia":
            return ZORBIA
        return f"You asked: {prompt}"


def closed_port() -> int:
    """A localhost port nothing listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def import_tiny(ws, store, name: str = "tiny", test_rows: list[tuple[str, str]] | None = None) -> str:
    """A small dataset: 4 train rows, and test rows (question, reference)."""
    train = [make_record(f"Train question {i}?", f"Train answer {i}.") for i in range(4)]
    test = [make_record(q, r) for q, r in (test_rows or [("What is the capital of Zorbia?", ZORBIA),
                                                        ("Which fruit is yellow?", "Bananas are yellow."),
                                                        ("POSITION-BIASED: name the capital of Zorbia.", ZORBIA)])]
    data.import_records({"train": train, "test": test}, name, ws=ws, store=store)
    return name


@pytest.fixture
def server():
    srv = ScriptedOpenAI()
    yield srv
    srv.close()


Q, REF = "What is the capital of Zorbia?", "Quuxville"
GOOD, BAD, PARTIAL = "Its capital is Quuxville.", "I do not know.", "Zorbia has a capital city."


# ------------------------------------------------------------------------------------------------
def test_parse_choice_and_score():
    assert [J.parse_choice(t) for t in ("A", " b.", "Tie", "T", "**B**", "Answer B is better.",
                                        "I think a better one is B", "", "banana", "It is a tie")] == \
        ["a", "b", "tie", "tie", "b", "b", "b", None, None, "tie"]
    assert [J.parse_score(t) for t in ("4", "Score: 4/5", "5.", " 2 ", "10", "0", "none", "", "score 3 of 5")] == \
        [4, 4, 5, 2, None, None, None, None, 3]
    assert J.combine("A", "B") == "a" and J.combine("B", "A") == "b" and J.combine("T", "T") == "tie"
    assert J.combine("A", "A") == "inconsistent" and J.combine("A", "hmm") == "inconsistent"
    assert J.combine("T", "A") == "inconsistent"


def test_pairwise_both_orders_position_swap(server):
    judge = J.Judge(url=server.url, model="scripted-judge")
    v = judge.pairwise(Q, REF, GOOD, BAD)
    assert v == {"winner": "a", "raw": ["A", "B"]}
    # the same pair went out twice, in both orders (concurrently: the arrival order is free)
    sent = [r["messages"][0]["content"] for r in server.requests]
    assert sorted((ScriptedOpenAI._field(t, "Answer A"), ScriptedOpenAI._field(t, "Answer B")) for t in sent) == \
        sorted([(GOOD, BAD), (BAD, GOOD)])
    assert all(r["model"] == "scripted-judge" for r in server.requests)
    # the other order: the good answer is B
    assert judge.pairwise(Q, REF, BAD, GOOD) == {"winner": "b", "raw": ["B", "A"]}


def test_tie_and_inconsistent_swap_are_recorded(server):
    judge = J.Judge(url=server.url, model="scripted-judge")
    assert judge.pairwise(Q, REF, GOOD, "Quuxville, of course.") == {"winner": "tie", "raw": ["T", "T"]}
    assert judge.pairwise(Q, REF, BAD, "No idea.")["winner"] == "tie"
    # a judge that always picks the first position: its verdict flips with the swap
    v = judge.pairwise("POSITION-BIASED: " + Q, REF, GOOD, BAD)
    assert v == {"winner": "inconsistent", "raw": ["A", "A"]}


def test_rubric_scores_parsed(server):
    judge = J.Judge(url=server.url)  # no model given: the first one the endpoint lists
    assert judge.rubric(Q, REF, GOOD) == 5
    assert judge.model == "scripted-judge"
    assert judge.rubric(Q, "The capital of Zorbia is Quuxville.", PARTIAL) == 3
    assert judge.rubric(Q, REF, BAD) == 1
    assert judge.rubric(Q, REF, "UNSCORABLE") is None
    many = judge.rubric_many([(Q, REF, GOOD), (Q, REF, BAD)])
    assert many == [{"score": 5, "raw": "Score: 5"}, {"score": 1, "raw": "Score: 1"}]


def test_judge_target_and_key(server, monkeypatch):
    assert J.judge_target(None) is None and J.judge_target(False) is None
    assert J.judge_target(True) == "local" and J.judge_target("local") == "local"
    assert J.judge_target("http://h:1/v1/") == "http://h:1/v1"
    with pytest.raises(StudioError, match="endpoint URL"):
        J.judge_target("gpt-4o")
    # the judge's key comes from SFT_STUDIO_JUDGE_API_KEY (before OPENAI_API_KEY)
    server.api_key = "judge-secret"
    monkeypatch.setenv("OPENAI_API_KEY", "other")
    monkeypatch.setenv("SFT_STUDIO_JUDGE_API_KEY", "judge-secret")
    assert J.check_endpoint_for_judge(server.url) == list(MODELS)
    assert J.Judge(url=server.url, model="scripted-judge").pairwise(Q, REF, GOOD, BAD)["winner"] == "a"
    monkeypatch.setenv("SFT_STUDIO_JUDGE_API_KEY", "wrong")
    with pytest.raises(StudioError, match="the judge: the endpoint .* rejected the API key"):
        J.check_endpoint_for_judge(server.url)
    with pytest.raises(StudioError, match="judge endpoint .* failed"):
        J.Judge(url=server.url, model="scripted-judge").rubric(Q, REF, GOOD)


def test_eval_with_judge_endpoint(ws, store, server, monkeypatch):
    """openai:* systems + `judge=URL`: pairwise verdicts of every kind and rubric scores are recorded,
    summarised per system in scores.json, and shown in the report."""
    monkeypatch.setenv("SFT_STUDIO_OPENAI_BASE_URL", server.url)
    import_tiny(ws, store)
    eval_id = runner.create_eval("tiny", ["openai:zorbia", "openai:echo"], limit=3, metrics=["token_f1", "exact_match"],
                                 judge=server.url, judge_model="scripted-judge", ws=ws, store=store,
                                 settings=StudioSettings())
    summary = runner.run_eval(eval_id, ws, store)
    path = ws.evals_dir(eval_id)
    outs = {(o["row_id"], o["system"]): o for o in read_jsonl(path / "outputs.jsonl") if o["set"] == "domain"}
    verdicts = {j["row_id"]: j for j in read_jsonl(path / "judge.jsonl")}
    by_q = {outs[(rid, "openai:zorbia")]["instruction"]: v for rid, v in verdicts.items()}
    assert len(verdicts) == 3 and all(v["system_a"] == "openai:zorbia" and v["system_b"] == "openai:echo"
                                      for v in verdicts.values())
    assert by_q["What is the capital of Zorbia?"]["winner"] == "a"
    assert by_q["Which fruit is yellow?"]["winner"] == "tie"
    assert by_q["POSITION-BIASED: name the capital of Zorbia."]["winner"] == "inconsistent"  # kept, not dropped

    rubric = read_jsonl(path / "judge_rubric.jsonl")
    assert sorted((r["row_id"], r["system"]) for r in rubric) == sorted(outs)  # one per (row, system)
    zs = sorted(r["score"] for r in rubric if r["system"] == "openai:zorbia")
    assert zs == [1, 5, 5]  # correct twice; the banana question's reference shares no word with the answer

    j = json.loads((path / "scores.json").read_text())["judge"]
    assert j == summary["judge"]
    assert j["rubric"]["openai:zorbia"]["mean"] == pytest.approx(11 / 3)
    assert j["rubric"]["openai:zorbia"]["n"] == 3 and j["rubric"]["openai:zorbia"]["unparsed"] == 0
    assert j["rubric"]["openai:echo"]["mean"] < j["rubric"]["openai:zorbia"]["mean"]
    assert j["pairwise"] == {"n": 3, "ties": 1, "inconsistent": 1, "wins": {"openai:zorbia": 1, "openai:echo": 0},
                             "pairs": [{"a": "openai:zorbia", "b": "openai:echo", "a_wins": 1, "b_wins": 0,
                                        "ties": 1, "inconsistent": 1, "n": 3}]}
    md = (path / "report.md").read_text()
    html = (path / "report.html").read_text()
    # the report rounds to what the CI supports: 3 rubric scores (1, 5, 5) give a 95% CI of [1, 5], a half-width
    # of 2, so the mean 3.67 reads 4 (the Evaluate tab's table, below, keeps 3.67)
    assert "inconsistent after the swap 1" in md and "| openai:zorbia | 4 [1, 5] | 3 | 0 |" in md
    assert "Rubric score" in html and "scripted-judge" in md
    table = runner.eval_status(eval_id, ws, store)["table"]
    assert any(r["system"] == "openai:zorbia" and r["judge_rubric"].startswith("3.67") for r in table)
    # every judge request went to the judge model, never to the systems' models
    judged = [r for r in server.requests if r["messages"][-1]["content"].startswith(("You are judging", "Score the"))]
    assert len(judged) == 3 * 2 + 3 * 2 and {r["model"] for r in judged} == {"scripted-judge"}


def test_local_judge_when_every_system_is_external(ws, store, server, monkeypatch):
    """`judge=True` (the local engine) with only openai:* systems: run_eval starts the engine itself
    for the judge; here it attaches (the settings' engine_url, SFT_STUDIO_ENGINE_URL) to the scripted server as
    the engine."""
    monkeypatch.setenv("SFT_STUDIO_OPENAI_BASE_URL", server.url)
    settings = StudioSettings(engine_url=server.base)
    import_tiny(ws, store)
    eval_id = runner.create_eval("tiny", ["openai:zorbia", "openai:echo"], limit=2, metrics=["exact_match"],
                                 judge=True, general=False, ws=ws, store=store, settings=settings)
    summary = runner.run_eval(eval_id, ws, store, settings=settings)
    verdicts = read_jsonl(ws.evals_dir(eval_id) / "judge.jsonl")
    assert [v["winner"] for v in verdicts] == ["a", "tie"]
    assert summary["judge"]["rubric"]["openai:zorbia"]["n"] == 2
    judged = [r for r in server.requests if r["messages"][-1]["content"].startswith(("You are judging", "Score the"))]
    assert judged and {r["model"] for r in judged} == {"scripted-judge"}  # the engine's base model name


def test_dead_judge_endpoint_stores_nothing(ws, store, server, monkeypatch):
    monkeypatch.setenv("SFT_STUDIO_OPENAI_BASE_URL", server.url)
    import_tiny(ws, store)
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    with pytest.raises(StudioError, match=f"the judge: cannot reach the endpoint {dead}"):
        runner.create_eval("tiny", ["openai:zorbia"], judge=dead, ws=ws, store=store, settings=StudioSettings())
    with pytest.raises(StudioError, match="--judge-model needs --judge"):
        runner.create_eval("tiny", ["openai:zorbia"], judge_model="x", ws=ws, store=store)
    assert evals_db.ids(store) == []
    assert not ws.evals_dir().exists() or not any(ws.evals_dir().iterdir())


def test_judge_covers_every_row_unless_limited(ws, store, server, monkeypatch):
    """The judge used to stop silently after 50 rows; now it judges every domain row, and a configured
    judge_limit is honoured and stated in the summary and the report."""
    monkeypatch.setenv("SFT_STUDIO_OPENAI_BASE_URL", server.url)
    import_tiny(ws, store, test_rows=[(f"Question number {i}?", f"Answer {i}.") for i in range(55)])
    full = runner.create_eval("tiny", ["openai:zorbia", "openai:echo"], metrics=["exact_match"], general=False,
                              judge=server.url, judge_model="scripted-judge", ws=ws, store=store,
                              settings=StudioSettings())
    j = runner.run_eval(full, ws, store)["judge"]
    assert len(read_jsonl(ws.evals_dir(full) / "judge.jsonl")) == 55 and j["pairwise"]["n"] == 55
    assert (j["rows_judged"], j["rows_total"], j["limit"]) == (55, 55, None)
    assert "Judged 55 of 55 domain rows." in (ws.evals_dir(full) / "report.md").read_text()

    part = runner.create_eval("tiny", ["openai:zorbia", "openai:echo"], metrics=["exact_match"], general=False,
                              judge=server.url, judge_model="scripted-judge", judge_limit=2, ws=ws, store=store,
                              settings=StudioSettings())
    j = runner.run_eval(part, ws, store)["judge"]
    assert (j["rows_judged"], j["rows_total"], j["limit"]) == (2, 55, 2)
    assert "Judged 2 of 55 domain rows (judge limit 2)." in (ws.evals_dir(part) / "report.md").read_text()
    with pytest.raises(StudioError, match="--judge-limit needs --judge"):
        runner.create_eval("tiny", ["openai:zorbia"], judge_limit=3, ws=ws, store=store)
