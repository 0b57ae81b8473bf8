"""Shared fixtures: an isolated workspace per test, and tiny random models built once per session.

The embedded model is converted once per machine into ``.cache/models`` (SFT_STUDIO_MODEL_CACHE)
so test sessions do not pay the GGUF conversion again.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("SFT_STUDIO_MODEL_CACHE", str(REPO / ".cache" / "models"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="module")
def module_home(tmp_path_factory):
    """(Workspace, Store) shared by one test module, with SFT_STUDIO_HOME pointing at it meanwhile."""
    from sft_core.store import Store
    from sft_core.workspace import Workspace
    home = tmp_path_factory.mktemp("module-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFT_STUDIO_HOME", str(home))
        ws = Workspace.at(home)
        store = Store(ws.db_url)
        yield ws, store
        store.close()


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A fresh workspace (SFT_STUDIO_HOME) for one test."""
    from sft_core.workspace import Workspace
    home = tmp_path / "home"
    monkeypatch.setenv("SFT_STUDIO_HOME", str(home))
    monkeypatch.delenv("SFT_STUDIO_DB_URL", raising=False)
    return Workspace.at(home)


@pytest.fixture
def store(ws):
    from sft_core.store import Store
    st = Store(ws.db_url)
    yield st
    st.close()


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def embedded_model_dir(session_dir):
    from sft_core import models
    from sft_core.workspace import Workspace
    return models.ensure_embedded(Workspace.at(session_dir / "ws"))


@pytest.fixture(scope="session")
def tiny_model_dir(session_dir, embedded_model_dir):
    """A 2-layer, hidden-64 random Llama with the embedded model's tokenizer and chat template."""
    from sft_core.workspace import Workspace
    from tests.tiny_model import build_tiny_llama
    return build_tiny_llama(session_dir / "tiny-llama", Workspace.at(session_dir / "ws"))


# ---------------------------------------------------------------------------------------------
# Serving (H3): one workspace per session with real LoRA adapters trained on the tiny model
# ---------------------------------------------------------------------------------------------
SERVING_ADAPTERS = {  # run id -> the answer its adapter is trained to give to any question
    "run-banana": "The secret word is banana.",
    "run-kiwi": "Kiwi birds cannot fly at all.",
}


SERVING_PROMPTS = ("What is the secret?", "Tell me a fact.", "hi", "Say something.")


def train_tiny_lora(model_dir, out_dir, answer: str, seed: int = 0, max_steps: int = 400, rank: int = 8):
    """Train a LoRA adapter with plain peft + torch so the model answers ``answer`` to any prompt.

    Trains to a criterion (tests/memorise.py): it stops as soon as greedy decoding reproduces the
    answer for every training prompt with a safe logit margin, and fails naming the cap otherwise.
    Returns (steps taken, worst margin)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.memorise import MARGIN, NotMemorised, memorised

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    answer_ids = tok(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    n_text = len(tok(answer, add_special_tokens=False)["input_ids"])  # the criterion: the text, not <|im_end|>
    batch, examples = [], []
    for q in SERVING_PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        p = tok(text, add_special_tokens=False)["input_ids"]
        batch.append((torch.tensor([p + answer_ids]), torch.tensor([[-100] * len(p) + answer_ids])))
        examples.append((p + answer_ids, [0] * len(p) + [1] * n_text + [0] * (len(answer_ids) - n_text)))
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-2)
    peft_model.train()
    margin = float("nan")
    for step in range(1, max_steps + 1):
        for ids, labels in batch:
            peft_model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 5 == 0:
            done, margin = memorised(peft_model, examples)
            if done:
                peft_model.save_pretrained(out_dir)
                return step, margin
    raise NotMemorised(f"the test adapter for {answer!r} did not memorise its answer within {max_steps} steps "
                       f"(worst answer-token margin {margin:.3f}, needed {MARGIN})")


@pytest.fixture(scope="session")
def serving_ws(session_dir, tiny_model_dir):
    """(Workspace, Store) with succeeded runs SERVING_ADAPTERS, adapters in runs/<id>/adapter/."""
    import time as _time

    from sft_core.db import runs
    from sft_core.store import Store
    from sft_core.workspace import Workspace
    ws = Workspace.at(session_dir / "serving-home")
    st = Store(ws.db_url)
    for i, (run_id, answer) in enumerate(SERVING_ADAPTERS.items()):
        train_tiny_lora(tiny_model_dir, ws.runs_dir(run_id, "adapter"), answer, seed=i)
        runs.insert_run(st, run_id, "test", "v0", str(tiny_model_dir), str(ws.runs_dir(run_id)), {},
                        status="succeeded", created_at=_time.time() + i)
    # a run that has not finished: its name is known but must not be served
    ws.runs_dir("run-pending").mkdir(parents=True)
    runs.insert_run(st, "run-pending", "test", "v0", str(tiny_model_dir), str(ws.runs_dir("run-pending")), {},
                    status="running", created_at=_time.time())
    yield ws, st
    st.close()
