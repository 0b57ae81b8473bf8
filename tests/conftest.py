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
    from sft_core import models
    from sft_core.workspace import Workspace
    return models.build_tiny_llama(session_dir / "tiny-llama", Workspace.at(session_dir / "ws"))
