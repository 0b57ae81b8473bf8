"""Config layering, workspace safety, the store, and the embedded model registry."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pytest

from sft_core import StudioError
from sft_core.config import ConfigError, DataConfig, DecodingConfig, StudioSettings, add_arguments, load_config, overrides_from_args
from sft_core.workspace import Workspace, atomic_dir, atomic_write_json, safe_name, sha256_json


# ---- config ---------------------------------------------------------------------------------
def test_config_layers_defaults_yaml_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("seed: 7\neval_fraction: 0.2\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser, DataConfig)
    args = parser.parse_args(["--seed", "9", "--map", "instruction=q,response=a"])
    cfg = load_config(DataConfig, y, overrides_from_args(args, DataConfig))
    assert cfg.seed == 9                    # flag beats YAML
    assert cfg.eval_fraction == 0.2         # YAML beats default
    assert cfg.test_fraction == 0.1         # default
    assert cfg.mapping == {"instruction": "q", "response": "a"}


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(DataConfig, overrides={"eval_fraction": 1.5})
    assert e.value.where == "eval_fraction"
    with pytest.raises(ConfigError) as e:
        load_config(DecodingConfig, overrides={"max_new_tokens": "many"})
    assert e.value.where == "max_new_tokens"
    y = tmp_path / "bad.yaml"
    y.write_text("no_such_option: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(DataConfig, y)
    assert "no_such_option" in str(e.value)
    y.write_text("seed: [unclosed\n")
    with pytest.raises(ConfigError) as e:
        load_config(DataConfig, y)
    assert "bad.yaml" in str(e.value)


def test_settings_from_env():
    s = StudioSettings.from_env({"SFT_STUDIO_HOME": "/x", "SFT_STUDIO_DEMO": "1", "SFT_STUDIO_ADMIN_PASSWORD": "pw"})
    assert (s.home, s.demo_mode, s.admin_password) == ("/x", True, "pw")


# ---- workspace ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["", "..", "a/b", "a\\b", "../etc", "x\x00y", "tab\there", ".hidden", "-rf"])
def test_safe_name_rejects(bad):
    with pytest.raises(StudioError):
        safe_name(bad)


def test_safe_name_accepts():
    assert safe_name("run-2024_01.v2+lora") == "run-2024_01.v2+lora"


def test_workspace_paths_stay_inside(ws):
    assert ws.runs_dir("abc").parent == ws.root / "runs"
    with pytest.raises(StudioError):
        ws.runs_dir("../../etc")
    assert ws.contains(ws.root / "runs" / "x")
    assert not ws.contains("/etc/passwd")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "v1"
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as d:
            (d / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(final) as d:
        (d / "a.txt").write_text("a")
    with pytest.raises(StudioError):  # never overwritten
        with atomic_dir(final) as d:
            pass
    assert (final / "a.txt").read_text() == "a"


def test_atomic_write_and_hash(tmp_path):
    p = atomic_write_json(tmp_path / "x.json", {"b": 1, "a": 2})
    assert json.loads(p.read_text()) == {"a": 2, "b": 1}
    assert sha256_json({"a": 1, "b": 2}) == sha256_json({"b": 2, "a": 1})
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]  # no temp files left


# ---- store ----------------------------------------------------------------------------------
def test_store_wal_and_transactions(ws, store):
    """WAL: a reader keeps its snapshot while a writer commits (in rollback-journal mode the commit would
    wait for the reader); a failed transaction rolls back whole."""
    from sqlalchemy import insert
    from sqlalchemy.exc import IntegrityError

    from sft_core.db import kbs, write
    from sft_core.db.schema import kbs as kbs_table
    with store.read() as reader:
        assert kbs.list_kbs(reader) == []  # the reader's snapshot starts here
        kbs.upsert(store, "w", "p", 1, 1, "e")  # committed while the reader is open
        assert kbs.list_kbs(reader) == []
    assert kbs.names(store) == ["w"]
    assert ws.db_path.with_name(ws.db_path.name + "-wal").exists()

    with pytest.raises(IntegrityError):
        with store.tx() as con:
            kbs.upsert(con, "a", "p", 1, 1, "e")
            write(con, insert(kbs_table).values(name="a", path="p", created_at=0, updated_at=0, n_docs=1,
                                                n_chunks=1, embedder="e"))  # duplicate key: whole tx rolls back
    assert kbs.names(store) == ["w"]


def test_store_write_transactions_serialise(ws):
    """Writers in several connections (as in several processes) each read then write inside tx():
    BEGIN IMMEDIATE serialises them, so no update is lost and none fails as busy."""
    import threading

    from sft_core.db import kbs
    from sft_core.store import Store
    stores = [Store(ws.db_url) for _ in range(4)]
    kbs.upsert(stores[0], "counter", "p", 0, 0, "e")
    errors = []

    def bump(st):
        try:
            for _ in range(10):
                with st.tx() as con:
                    n = next(r["n_docs"] for r in kbs.list_kbs(con) if r["name"] == "counter")
                    kbs.upsert(con, "counter", "p", n + 1, 0, "e")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=bump, args=(st,)) for st in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert errors == []
        assert kbs.list_kbs(stores[0])[0]["n_docs"] == 40
    finally:
        for st in stores:
            st.close()


@pytest.mark.parametrize("url, needle", [
    ("postgres://x", "unsupported database 'postgres'"),
    ("mysql://u@h/db", "unsupported database 'mysql'"),
    ("not a url", "is not a database URL"),
    ("postgresql://u:secret@h/db", "must not carry a password"),
])
def test_store_rejects_unknown_url(url, needle):
    from sft_core.store import Store
    with pytest.raises(StudioError) as e:
        Store(url)
    assert needle in str(e.value) and "SFT_STUDIO_DB_URL" in str(e.value)
    assert "secret" not in str(e.value)


# ---- models ---------------------------------------------------------------------------------
def test_embedded_model_answers_sensibly(embedded_model_dir):
    from sft_core.models import load_causal_lm, load_tokenizer
    cfg = json.loads((embedded_model_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    tok = load_tokenizer(embedded_model_dir)
    model = load_causal_lm(embedded_model_dir, "cpu")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_embedded_model_loads_in_peft(embedded_model_dir):
    from peft import LoraConfig, get_peft_model
    from sft_core.models import load_causal_lm
    model = get_peft_model(load_causal_lm(embedded_model_dir, "cpu"), LoraConfig(r=4, target_modules="all-linear"))
    assert model.get_nb_trainable_parameters()[0] > 0


def test_second_resolve_uses_cache(embedded_model_dir, ws):
    from sft_core.models import resolve_model
    t = time.time()
    assert resolve_model("smollm2-135m-instruct", ws) == embedded_model_dir
    assert time.time() - t < 1.0  # no conversion: the directory is reused


def test_unknown_and_offline_models_give_clear_errors(ws):
    from sft_core.models import ModelError, resolve_model
    with pytest.raises(ModelError) as e:
        resolve_model("no-such-model", ws)
    assert "unknown model" in str(e.value)
    with pytest.raises(ModelError) as e:
        resolve_model("some-org/some-model-that-is-not-cached", ws)
    assert "offline" in str(e.value)
    with pytest.raises(ModelError):
        resolve_model("./not/a/dir", ws)


def test_tiny_llama_fixture(tiny_model_dir):
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 64
    assert (tiny_model_dir / "tokenizer.json").exists()


def test_cli_bad_input_prints_error_not_traceback(tmp_path):
    env = {**os.environ, "SFT_STUDIO_HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "sft_core.cli", "models", "prepare", "nope"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    assert "error: base_model: unknown model 'nope'" in r.stderr
    assert "Traceback" not in r.stderr
