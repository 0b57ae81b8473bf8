"""transformers + peft engine and the adapter registry, on the tiny model with adapters trained here."""
from __future__ import annotations

import os

import pytest

from sft_core.config import DecodingConfig, ServeConfig
from sft_core.db import runs as runs_db
from sft_core.serving import GenRequest, get_engine
from sft_core.serving.adapters import AdapterRegistry
from sft_core.serving.base import EngineError, cut_at_stop

GREEDY = DecodingConfig(temperature=0.0, max_new_tokens=12)


def user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def hf(serving_ws, tiny_model_dir):
    ws, st = serving_ws
    eng = get_engine(str(tiny_model_dir), ws, st, engine="hf")
    yield eng
    eng.close()


def test_registry_refuses_paths_and_unknown_names(serving_ws, tmp_path):
    ws, st = serving_ws
    reg = AdapterRegistry(ws, st)
    for bad in ["../run-banana", "/etc/passwd", "run-banana/../../x", "runs/run-banana/adapter", "~root",
                "http://evil/x", "C:\\x", ".hidden", ""]:
        with pytest.raises(EngineError, match="path|run id|empty|may use") as e:
            reg.resolve(bad)
        assert e.value.where == "adapter"
    with pytest.raises(EngineError, match="unknown adapter 'nope'.*run-banana"):
        reg.resolve("nope")
    with pytest.raises(EngineError, match="run 'run-pending' is running"):
        reg.resolve("run-pending")
    a, b = reg.resolve("run-banana"), reg.resolve("run-kiwi")
    assert a.path == ws.runs_dir("run-banana", "adapter").resolve() and a.rank == 8
    assert {a.lora_id, b.lora_id} == {1, 2} and reg.resolve("run-banana").lora_id == a.lora_id  # unique, stable
    assert reg.available() == ["run-banana", "run-kiwi"]


def test_registry_refuses_adapter_dir_linked_outside_workspace(ws, store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "adapter_config.json").write_text('{"r": 8}')
    ws.runs_dir("run-evil").mkdir(parents=True)
    os.symlink(outside, ws.runs_dir("run-evil", "adapter"))
    runs_db.insert_run(store, "run-evil", "d", "v", "m", "x", {}, status="succeeded")
    with pytest.raises(EngineError, match="outside the workspace"):
        AdapterRegistry(ws, store).resolve("run-evil")


def test_cut_at_stop():
    assert cut_at_stop("abc STOP def", ["STOP"]) == ("abc ", True)
    assert cut_at_stop("abc", ["x", ""]) == ("abc", False)
    assert cut_at_stop("a1b2", ["2", "1"]) == ("a", True)


def test_adapters_change_the_answer_and_mix_in_one_batch(hf):
    reqs = [GenRequest(user("What is the secret?"), None, GREEDY),
            GenRequest(user("What is the secret?"), "run-banana", GREEDY),
            GenRequest(user("Tell me something longer, please, about birds"), "run-kiwi", GREEDY),
            GenRequest(user("hi"), "run-banana", GREEDY),
            GenRequest(user("Tell me something longer, please, about birds"), None, GREEDY)]
    out = hf.generate_batch(reqs)
    assert all(r.error is None for r in out), [r.error for r in out]
    base, banana, kiwi, banana2, base2 = (r.text for r in out)
    assert "banana" in banana and "banana" in banana2, (banana, banana2)
    assert "Kiwi" in kiwi or "fly" in kiwi, kiwi
    assert "banana" not in base and "Kiwi" not in base2
    assert sorted(hf.list_adapters()) == ["run-banana", "run-kiwi"]  # hot-loaded on first use
    # left padding + per-row adapters: every row equals the same request run alone
    for req, res in zip(reqs, out):
        alone = hf.generate_batch([req])[0]
        assert alone.text == res.text and alone.completion_tokens == res.completion_tokens
    assert out[1].prompt_tokens == len(hf.prompt_ids(reqs[1].messages)) and out[1].completion_tokens > 0


def test_chat_streams_deltas_and_honours_stop(hf):
    info: dict = {}
    deltas = list(hf.chat(user("What is the secret?"), "run-banana", GREEDY, info=info))
    assert len(deltas) > 1  # streamed, not one blob
    res = hf.generate_batch([GenRequest(user("What is the secret?"), "run-banana", GREEDY)])[0]
    whole = res.text
    assert "".join(deltas) == whole
    # the Chat tab's per-answer line: the stream's own counts agree with the batched request's
    assert (info["prompt_tokens"], info["completion_tokens"], info["finish_reason"]) == \
        (res.prompt_tokens, res.completion_tokens, res.finish_reason)
    cut: dict = {}
    list(hf.chat(user("What is the secret?"), "run-banana", DecodingConfig(temperature=0.0, max_new_tokens=2),
                 info=cut))
    assert cut["finish_reason"] == "length" and cut["completion_tokens"] == 2 and cut["latency_s"] > 0
    stop = DecodingConfig(temperature=0.0, max_new_tokens=12, stop=["word"])
    streamed = "".join(hf.chat(user("What is the secret?"), "run-banana", stop))
    batched = hf.generate_batch([GenRequest(user("What is the secret?"), "run-banana", stop)])[0]
    assert "word" not in streamed and streamed == batched.text and whole.startswith(streamed)
    assert batched.finish_reason == "stop"


def test_sampling_is_seeded(hf):
    cfg = DecodingConfig(temperature=1.0, max_new_tokens=8, seed=7)
    a = hf.generate_batch([GenRequest(user("hi"), None, cfg)])[0].text
    b = hf.generate_batch([GenRequest(user("hi"), None, cfg)])[0].text
    assert a == b


def test_bad_requests_fail_alone_and_clearly(hf):
    out = hf.generate_batch([GenRequest(user("hi"), "../../etc", GREEDY), GenRequest(user("hi"), "ghost", GREEDY),
                             GenRequest(user("hi"), "run-pending", GREEDY),
                             GenRequest(user("hi"), None, DecodingConfig(max_new_tokens=0)),
                             GenRequest(user("hi"), "run-banana", GREEDY)])
    assert "looks like a path" in out[0].error and "unknown adapter 'ghost'" in out[1].error
    assert "running" in out[2].error and "max_new_tokens" in out[3].error
    assert out[4].error is None and "banana" in out[4].text
    with pytest.raises(EngineError, match="looks like a path"):
        list(hf.chat(user("hi"), "/tmp/adapter"))


def test_unload_then_reload(hf):
    hf.load_adapter("run-kiwi")
    before = hf.generate_batch([GenRequest(user("hi"), "run-kiwi", GREEDY)])[0].text
    hf.unload_adapter("run-kiwi")
    assert "run-kiwi" not in hf.list_adapters()
    with pytest.raises(EngineError, match="not loaded"):
        hf.unload_adapter("run-kiwi")
    assert hf.generate_batch([GenRequest(user("hi"), "run-kiwi", GREEDY)])[0].text == before  # hot-load again
    assert "run-kiwi" in hf.list_adapters()
    h = hf.health()
    assert h["ok"] and h["engine"] == "hf" and "run-kiwi" in h["adapters"]


def test_get_engine_options_are_checked(serving_ws, tiny_model_dir):
    ws, st = serving_ws
    with pytest.raises(Exception, match="engine"):
        get_engine(str(tiny_model_dir), ws, st, engine="tgi")
    with pytest.raises(Exception, match="max_lora_rank"):
        ServeConfig(max_lora_rank=12).validate()
    with pytest.raises(Exception, match="url"):
        get_engine(str(tiny_model_dir), ws, st, engine="vllm", url="localhost:8000")


def test_fixture_training_criterion_can_fail(tiny_model_dir, tmp_path):
    """The serving fixtures train until the answer is memorised with a margin (tests/memorise.py); the
    same loop with a cap too small to get there fails loudly instead of saving a half-trained adapter."""
    from tests.conftest import train_tiny_lora
    from tests.memorise import NotMemorised
    with pytest.raises(NotMemorised, match="within 5 steps"):
        train_tiny_lora(tiny_model_dir, tmp_path / "adapter", "The secret word is banana.", max_steps=5)
    assert not (tmp_path / "adapter").exists()
