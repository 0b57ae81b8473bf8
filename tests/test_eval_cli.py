"""`sft-studio eval`, `evals list`, `report` in-process (``sft_core.cli.main``), external endpoints
(pre-flight, a working ``openai:NAME`` system) and few-shot prompting.

No model runs here: systems are ``openai:*`` against ``tests.test_judge.ScriptedOpenAI``, a scripted
OpenAI-compatible server on 127.0.0.1 standing in for a remote model (a boundary that cannot exist
in this sandbox). For the ``prompt`` system the eval's engine attaches to the same server
(the settings' ``engine_url``, SFT_STUDIO_ENGINE_URL), so the messages the runner builds are seen exactly as sent.
"""
from __future__ import annotations

import json
import re

import pytest

from evals import runner
from evals import systems as S
from sft_core import StudioError, data
from sft_core.config import StudioSettings
from sft_core.cli import main
from sft_core.db import evals as evals_db
from sft_core.workspace import read_jsonl
from tests.test_judge import ZORBIA, ScriptedOpenAI, closed_port, import_tiny


@pytest.fixture
def server():
    srv = ScriptedOpenAI()
    yield srv
    srv.close()


def nothing_stored(ws, store) -> bool:
    return evals_db.ids(store) == [] and (not ws.evals_dir().exists() or not any(ws.evals_dir().iterdir()))


def test_list_eval_and_report(ws, store, server, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("SFT_STUDIO_OPENAI_BASE_URL", server.url)
    import_tiny(ws, store)
    assert main(["evals", "list"]) == 0
    assert "no evals yet" in capsys.readouterr().out

    rc = main(["eval", "--dataset", "tiny", "--systems", "openai:zorbia,openai:echo", "--limit", "3",
               "--metrics", "token_f1,exact_match", "--judge", server.url, "--judge-model", "scripted-judge"])
    out = capsys.readouterr().out
    assert rc == 0, out
    eval_id = re.search(r"^eval (eval-\S+):", out, re.MULTILINE).group(1)
    assert "Recommendation: openai:zorbia" in out and "judge_rubric=" in out

    assert main(["evals", "list"]) == 0
    listed = capsys.readouterr().out
    assert re.search(rf"^{eval_id}\s+succeeded\s+tiny/test\s+openai:zorbia, openai:echo$", listed, re.MULTILINE)

    out_dir = tmp_path / "exported"
    assert main(["report", eval_id, "--out", str(out_dir)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(out_dir / "report.html"), str(out_dir / "report.md")]
    md = (out_dir / "report.md").read_text()
    assert md.startswith(f"# Decision report — {eval_id}") and "**Recommendation: openai:zorbia.**" in md
    assert "## LLM judge" in md and "Rubric score" in md and "<svg" in (out_dir / "report.html").read_text()
    # the eval's own report is still there, unchanged by the export
    assert (ws.evals_dir(eval_id) / "report.md").read_text() == md

    assert main(["report", "eval-nope"]) == 1
    assert "error: eval: unknown eval 'eval-nope'" in capsys.readouterr().err


def test_unknown_system_exits_1_and_stores_nothing(ws, store, capsys):
    import_tiny(ws, store)
    assert main(["eval", "--dataset", "tiny", "--systems", "prompt,magic", "--limit", "3"]) == 1
    cap = capsys.readouterr()
    assert cap.err.strip() == ("error: systems: unknown system 'magic'; use prompt, rag, sft:RUN, sft+rag:RUN, "
                               "raft:RUN or openai:MODEL")
    assert "Traceback" not in cap.err + cap.out and cap.out == ""
    assert nothing_stored(ws, store)


def test_dead_endpoint_is_refused_before_anything_is_stored(ws, store, monkeypatch, capsys):
    import_tiny(ws, store)
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    monkeypatch.setenv("SFT_STUDIO_OPENAI_BASE_URL", dead)
    with pytest.raises(StudioError, match=f"openai:ref: cannot reach the endpoint {re.escape(dead)}"):
        runner.create_eval("tiny", ["prompt", "openai:ref"], limit=2, ws=ws, store=store, settings=StudioSettings())
    assert nothing_stored(ws, store)
    # the same through the CLI: one clear line, exit 1
    assert main(["eval", "--dataset", "tiny", "--systems", "openai:ref", "--limit", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: systems: openai:ref: cannot reach the endpoint " + dead) and "Traceback" not in err
    assert nothing_stored(ws, store)


def test_openai_system_answers_are_recorded(ws, store, server, monkeypatch):
    monkeypatch.setenv("SFT_STUDIO_OPENAI_BASE_URL", server.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    server.api_key = "sk-test"
    import_tiny(ws, store)
    eval_id = runner.create_eval("tiny", ["openai:zorbia"], limit=3, metrics=["exact_match", "token_f1"],
                                 general=False, ws=ws, store=store, settings=StudioSettings())
    runner.run_eval(eval_id, ws, store)
    test = data.load_split("tiny", "test", ws=ws, store=store)
    # outputs.jsonl is in completion order (requests run concurrently in the eval's window): compare by row
    outs = {o["row_id"]: o for o in read_jsonl(ws.evals_dir(eval_id) / "outputs.jsonl")}
    assert sorted((o["set"], o["row_id"], o["system"]) for o in outs.values()) == \
        sorted(("domain", r["id"], "openai:zorbia") for r in test)
    assert all(outs[r["id"]]["output"] == ZORBIA and outs[r["id"]]["reference"] == r["response"]
               and outs[r["id"]]["completion_tokens"] == 6 and outs[r["id"]]["prompt_tokens"] > 0
               and outs[r["id"]]["latency_s"] > 0 for r in test)
    assert [r["model"] for r in server.requests] == ["zorbia"] * 3
    assert sorted(r["messages"][-1]["content"] for r in server.requests) == sorted(r["instruction"] for r in test)
    assert all(r["messages"][-1]["role"] == "user" for r in server.requests)
    scores = json.loads((ws.evals_dir(eval_id) / "scores.json").read_text())
    by_id = sorted(test, key=lambda r: r["id"])  # scores list rows in row-id order
    assert scores["sets"]["domain"]["rows"]["openai:zorbia"]["exact_match"] == \
        [1.0 if r["response"] == ZORBIA else 0.0 for r in by_id]


def test_few_shot_examples_from_train_deterministic(ws, store, server, monkeypatch):
    """`prompt` with few_shot=2: the first 2 train rows, as user/assistant turns between the system
    prompt and the question, identical on every build and in every eval."""
    settings = StudioSettings(engine_url=server.base)  # the engine: attached to the scripted server
    import_tiny(ws, store)
    train = data.load_split("tiny", "train", ws=ws, store=store)
    test = data.load_split("tiny", "test", ws=ws, store=store)
    sent = []
    for _ in range(2):
        server.requests.clear()
        eval_id = runner.create_eval("tiny", ["prompt"], limit=2, few_shot=2, metrics=["exact_match"],
                                     general=False, ws=ws, store=store, settings=settings)
        runner.run_eval(eval_id, ws, store, settings=settings)
        sent.append(sorted((r["messages"] for r in server.requests), key=lambda m: m[-1]["content"]))
        outs = {o["row_id"]: o for o in read_jsonl(ws.evals_dir(eval_id) / "outputs.jsonl")}  # completion order
        assert len(outs) == 2 and all(outs[r["id"]]["output"] == f"You asked: {r['instruction']}" for r in test[:2])
    assert sent[0] == sent[1]  # deterministic across evals
    expected = {r["instruction"]: [{"role": "system", "content": S.DEFAULT_SYSTEM_PROMPT},
                                   {"role": "user", "content": train[0]["instruction"]},
                                   {"role": "assistant", "content": train[0]["response"]},
                                   {"role": "user", "content": train[1]["instruction"]},
                                   {"role": "assistant", "content": train[1]["response"]},
                                   {"role": "user", "content": r["instruction"]}] for r in test[:2]}
    assert sent[0] == sorted(expected.values(), key=lambda m: m[-1]["content"])
    # the runner's own context builder gives the same messages (what the throughput bench uses)
    cfg = json.loads((ws.evals_dir(eval_id) / "manifest.json").read_text())["config"]
    ctx = runner.eval_context(cfg, ws, store)
    assert [S.build_messages(S.parse_system("prompt"), r, ctx)[0] for r in test[:2]] == [expected[r["instruction"]]
                                                                                         for r in test[:2]]
    # few-shot needs a train split and a non-negative k; nothing is stored otherwise
    with pytest.raises(StudioError, match="0 or more"):
        runner.create_eval("tiny", ["prompt"], few_shot=-1, ws=ws, store=store)
