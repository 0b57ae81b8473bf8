"""Datasets: every format round-trips into the canonical record; malformed files fail clearly and store nothing."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from sft_core import cli, data, models
from sft_core.render import format_report
from sft_core.config import DataConfig
from sft_core.db import datasets as datasets_db
from sft_core.store import open_store

ROWS = [("What is 2+2?", "4", None), ("Capital of France?", "Paris", "Europe facts"), ("Say hi", "Hi!", None),
        ("Colour of the sky?", "Blue", None), ("Opposite of hot?", "Cold", None), ("Largest planet?", "Jupiter", None)]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _canon(recs):
    return [(r["instruction"], r["response"], r["context"]) for r in recs]


@pytest.fixture
def cfg():
    return DataConfig(max_tokens=512)


# ---- formats round-trip ---------------------------------------------------------------------
def test_alpaca_jsonl(tmp_path, cfg):
    p = _jsonl(tmp_path / "a.jsonl", [{"instruction": q, "input": c or "", "output": a} for q, a, c in ROWS])
    recs, issues, fmt = data.load_records(p)
    assert fmt == "alpaca" and not issues
    assert _canon(recs) == ROWS


def test_prompt_completion_json_list(tmp_path):
    p = tmp_path / "pc.json"
    p.write_text(json.dumps([{"prompt": q, "completion": a} for q, a, _ in ROWS]))
    recs, issues, fmt = data.load_records(p)
    assert fmt == "prompt_completion" and not issues
    assert _canon(recs) == [(q, a, None) for q, a, _ in ROWS]


def test_openai_messages(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q},
                          {"role": "assistant", "content": a}]} for q, a, _ in ROWS]
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                              {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]})
    recs, issues, fmt = data.load_records(_jsonl(tmp_path / "m.jsonl", rows))
    assert fmt == "messages" and not issues
    assert recs[0]["system"] == "Be brief." and recs[0]["instruction"] == ROWS[0][0]
    multi = recs[-1]
    assert multi["messages"] and len(multi["messages"]) == 4
    assert (multi["instruction"], multi["response"]) == ("bye", "ciao")


def test_sharegpt(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a, _ in ROWS]
    recs, issues, fmt = data.load_records(_jsonl(tmp_path / "s.jsonl", rows))
    assert fmt == "sharegpt" and not issues
    assert _canon(recs) == [(q, a, None) for q, a, _ in ROWS]


def test_csv_with_mapping(tmp_path):
    p = tmp_path / "t.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "answer", "passage"])
        for q, a, c in ROWS:
            w.writerow([q, a, c or ""])
    recs, issues, fmt = data.load_records(p, mapping={"instruction": "question", "response": "answer",
                                                      "context": "passage"})
    assert fmt == "table" and not issues
    assert _canon(recs) == ROWS


def test_parquet_and_saved_datasets_dir(tmp_path):
    import datasets
    ds = datasets.Dataset.from_list([{"instruction": q, "output": a} for q, a, _ in ROWS])
    ds.to_parquet(str(tmp_path / "x.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for p in (tmp_path / "x.parquet", tmp_path / "saved"):
        recs, issues, fmt = data.load_records(p)
        assert fmt == "alpaca" and not issues
        assert _canon(recs) == [(q, a, None) for q, a, _ in ROWS]


# ---- malformed files: non-zero exit, message names file + line/field, nothing stored ------------
def _bad_cases(tmp: Path) -> list[tuple[str, Path, list[str]]]:
    """(label, file, strings the error output must contain); the file may carry CLI flags after '|'."""
    good = [json.dumps({"instruction": q, "output": a}) for q, a, _ in ROWS]
    cases = []
    p = tmp / "empty.jsonl"; p.write_text("")
    cases.append(("empty", p, ["empty.jsonl", "empty"]))
    p = tmp / "badline.jsonl"; p.write_text("\n".join(good[:3] + ['{"instruction": "x", "output": '] + good[3:]) + "\n")
    cases.append(("bad json line", p, ["badline.jsonl:4", "invalid JSON"]))
    p = tmp / "missingcol.csv"; p.write_text("question,reply\nq1,a1\n")
    cases.append(("missing column", p, ["missingcol.csv:1", "[answer]", "not found"]))
    p = tmp / "types.jsonl"; p.write_text("\n".join(good[:2] + [json.dumps({"instruction": 5, "output": "x"})]) + "\n")
    cases.append(("wrong type", p, ["types.jsonl:3", "[instruction]", "expected text"]))
    p = tmp / "latin1.jsonl"; p.write_bytes(("\n".join(good[:2]) + "\n").encode() + '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    cases.append(("non-utf8", p, ["latin1.jsonl:3", "UTF-8"]))
    p = tmp / "binary.jsonl"; p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    cases.append(("binary", p, ["binary.jsonl", "binary"]))
    p = tmp / "object.json"; p.write_text(json.dumps({"instruction": "q", "output": "a"}))
    cases.append(("object not list", p, ["object.json", "JSON object"]))
    p = tmp / "roles.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n"
                 + json.dumps({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}) + "\n")
    cases.append(("roles out of order", p, ["roles.jsonl:2", "messages[0].role", "out of order"]))
    p = tmp / "emptyresp.jsonl"; p.write_text("\n".join(good[:2] + [json.dumps({"instruction": "q", "output": "  "})]) + "\n")
    cases.append(("empty response", p, ["emptyresp.jsonl:3", "[output]", "empty"]))
    return cases


def test_malformed_matrix(tmp_path, ws, capsys):
    store = open_store(ws.db_url)
    for label, path, expected in _bad_cases(tmp_path):
        extra = ["--map", "instruction=question,response=answer"] if path.suffix == ".csv" else []
        for argv in (["data", "check", str(path), *extra], ["data", "import", str(path), "--name", "bad", *extra]):
            rc = cli.main(argv)
            out = capsys.readouterr()
            text = out.out + out.err
            assert rc != 0, f"{label}: {argv[1]} exited 0"
            assert "Traceback" not in text
            for needle in expected:
                assert needle in text, f"{label}: {needle!r} not in output:\n{text}"
    assert not ws.datasets_dir().exists() or not any(ws.datasets_dir().iterdir())
    assert datasets_db.list_versions(store) == []


def test_every_bad_row_is_reported(tmp_path, ws):
    rows = [json.dumps({"instruction": "q", "output": "a"}), "not json", json.dumps({"instruction": "", "output": "a"}),
            json.dumps({"instruction": "q", "output": 3}), json.dumps({"instruction": "q2", "output": "a2"})]
    p = tmp_path / "mixed.jsonl"; p.write_text("\n".join(rows) + "\n")
    report = data.check_file(p, ws=ws)
    assert [(i.line, i.field) for i in report.errors] == [(2, None), (3, "instruction"), (4, "output")]
    assert report.n_valid == 2 and not report.ok


# ---- versions ---------------------------------------------------------------------------------
def test_versions_are_content_addressed_and_never_overwritten(tmp_path, ws, store, cfg):
    p = _jsonl(tmp_path / "d.jsonl", [{"instruction": q, "output": a} for q, a, _ in ROWS] * 1)
    v1 = data.import_dataset(p, "demo", cfg, ws=ws, store=store)
    assert v1.created and sum(v1.splits.values()) == len(ROWS)
    before = {f.name: f.read_bytes() for f in v1.path.iterdir()}
    v1b = data.import_dataset(p, "demo", cfg, ws=ws, store=store)
    assert v1b.version == v1.version and not v1b.created
    assert {f.name: f.read_bytes() for f in v1.path.iterdir()} == before
    _jsonl(p, [{"instruction": q, "output": a + "!"} for q, a, _ in ROWS])
    v2 = data.import_dataset(p, "demo", cfg, ws=ws, store=store)
    assert v2.version != v1.version and v2.created
    assert {f.name: f.read_bytes() for f in v1.path.iterdir()} == before  # old version untouched
    assert data.get_version("demo", ws=ws, store=store).version == v2.version
    assert data.get_version("demo", v1.version, ws=ws, store=store).version == v1.version
    assert len(data.list_datasets(ws, store)) == 2
    train = data.load_split("demo", "train", v1.version, ws=ws, store=store)
    assert all(set(r) >= {"id", "instruction", "response", "meta"} for r in train)
    with pytest.raises(data.DataError, match="no 'nope' split"):
        data.load_split("demo", "nope", ws=ws, store=store)
    with pytest.raises(data.DataError, match="unknown dataset 'other'"):
        data.get_version("other", ws=ws, store=store)


def test_split_is_deterministic_and_groups_duplicates(cfg, ws):
    recs = [data.make_record(f"question {i}", f"answer {i}") for i in range(50)]
    recs += [data.make_record("Question 1!", "other answer")]  # same normalised question as "question 1"
    a, b = data.split_records(recs, cfg), data.split_records(list(reversed(recs)), cfg)
    assert {s: sorted(r["id"] for r in rs) for s, rs in a.items()} == {s: sorted(r["id"] for r in rs) for s, rs in b.items()}
    where = {r["instruction"]: s for s, rs in a.items() for r in rs}
    assert where["question 1"] == where["Question 1!"]
    assert all(v == 0 for v in data.quality(a, cfg, "x", ws=ws)[0]["leakage"].values())


# ---- quality report ---------------------------------------------------------------------------
def test_quality_report_finds_duplicates_pii_and_leakage(tmp_path, cfg, ws):
    rows = [{"instruction": q, "output": a} for q, a, _ in ROWS]
    rows += [rows[0], {"instruction": "what is 2+2", "output": "four"}]
    rows += [{"instruction": "Contact?", "output": "Mail jane.doe@example.com or call +1 415-555-0132"},
             {"instruction": "Card?", "output": "Use 4111 1111 1111 1111 to pay"}]
    report = data.check_file(_jsonl(tmp_path / "q.jsonl", rows), cfg, ws=ws)
    st = report.stats
    assert report.ok
    assert st["duplicates_exact"] == 1 and st["duplicates_normalised"] >= 2
    assert st["pii"]["email"] == 1 and st["pii"]["card"] == 1 and st["pii"]["phone"] >= 1
    masked = json.dumps(st["pii_examples"])
    assert "jane.doe@example.com" not in masked and "4111 1111 1111 1111" not in masked and "1111" in masked
    assert st["tokens"]["max"] >= st["tokens"]["min"] > 0 and st["tokens"]["histogram"]
    text = format_report(report)
    assert "likely PII" in text and "duplicates" in text

    leaky = {"train": [data.make_record("What is X?", "x")], "test": [data.make_record("what is x", "x")]}
    assert data.quality(leaky, cfg, "f", ws=ws)[0]["leakage"] == {"test": 1}


def test_over_long_rows_are_reported(tmp_path, ws):
    p = _jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 300, "output": "ok"}, {"instruction": "q", "output": "a"}])
    report = data.check_file(p, DataConfig(max_tokens=64), ws=ws)
    assert report.stats["over_long"] == 1
    assert any(i.line == 1 and "over-long" in i.message for i in report.warnings)


def test_cli_import_and_list(tmp_path, ws, capsys):
    p = _jsonl(tmp_path / "c.jsonl", [{"question": q, "answer": a} for q, a, _ in ROWS])
    assert cli.main(["data", "import", str(p), "--name", "qa", "--map", "instruction=question,response=answer"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("qa@") and "train" in out
    assert cli.main(["data", "list"]) == 0
    assert "qa@" in capsys.readouterr().out
    assert cli.main(["data", "import", str(p), "--name", "../evil"]) == 1
    assert "path separators" in capsys.readouterr().err


# ---- tables without a record format: the column mapping is guessed from the headers ------------
@pytest.mark.parametrize("columns, expected", [
    (["question", "answer"], {"instruction": "question", "response": "answer"}),
    (["prompt", "completion_text"], {"instruction": "prompt", "response": "completion_text"}),
    (["input", "output"], {"instruction": "input", "response": "output"}),
    # beside an instruction column, "input" is the context (alpaca's meaning)
    (["instruction", "input", "output"], {"instruction": "instruction", "response": "output", "context": "input"}),
    (["Question", "Answer", "Context", "System Prompt"],
     {"instruction": "Question", "response": "Answer", "context": "Context", "system": "System Prompt"}),
    (["customer_question", "Agent Answer"], {"instruction": "customer_question", "response": "Agent Answer"}),
    (["query_id", "query", "reply"], {"instruction": "query", "response": "reply"}),  # never an id column
    (["q", "a"], {"instruction": "q", "response": "a"}),
    (["qa", "aq", "user_id"], {}),  # q, a and user match only as whole names
    (["foo", "bar"], {}),
])
def test_guess_mapping(columns, expected):
    from sft_core import mapping
    assert mapping.guess_mapping(columns) == expected


def _qa_csv(path: Path, header=("question", "answer")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for q, a, _ in ROWS:
            w.writerow([q, a])
    return path


def test_question_answer_csv_is_mapped_without_being_told(tmp_path, ws):
    """The support-desk CSV of issue #16: it used to fail with "rows read: 1" and CLI advice."""
    p = _qa_csv(tmp_path / "support.csv")
    recs, issues, fmt = data.load_records(p)
    assert fmt == "table"
    assert _canon(recs) == [(q, a, None) for q, a, _ in ROWS]
    assert [(i.severity, i.message) for i in issues] == [
        ("warning", "columns mapped by their names: question → instruction, answer → response")]
    report = data.check_file(p, DataConfig(max_tokens=512), ws=ws)
    assert report.ok and report.n_valid == len(ROWS) == report.n_rows
    assert "rows read: **6**" in format_report(report)


def test_undetectable_table_says_what_to_do_in_words(tmp_path, ws):
    p = _qa_csv(tmp_path / "odd.csv", header=("foo", "bar"))
    report = data.check_file(p, ws=ws)
    assert not report.ok
    text = format_report(report)
    assert "odd.csv:2: cannot tell which fields hold the question and the answer (fields: bar, foo)" in text
    assert "--format" not in text and "--map" not in text


def test_inspect_file_previews_columns_and_guesses(tmp_path):
    from sft_core import mapping
    info = mapping.inspect_file(_qa_csv(tmp_path / "support.csv"), n=3)
    assert (info.name, info.columns, info.detected) == ("support.csv", ["question", "answer"], None)
    assert info.rows == [{"question": q, "answer": a} for q, a, _ in ROWS[:3]]
    assert info.needs_mapping and info.guess == {"instruction": "question", "response": "answer"}
    assert mapping.to_text(info.guess) == "instruction=question,response=answer"
    alpaca = mapping.inspect_file(_jsonl(tmp_path / "a.jsonl", [{"instruction": q, "output": a} for q, a, _ in ROWS]))
    assert alpaca.detected == "alpaca" and not alpaca.needs_mapping and alpaca.guess == {} and len(alpaca.rows) == 5
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    bad = mapping.inspect_file(broken)
    assert bad.rows == [] and bad.problems == ["broken.jsonl:1: invalid JSON: Expecting property name enclosed in "
                                               "double quotes at column 2"]
    assert mapping.preview_cell({"a": [1, 2]}) == '{"a": [1, 2]}' and mapping.preview_cell("x" * 200, 10) == "x" * 9 + "…"


# ---- one pass: a file is read once and each row tokenized once, however it is imported -----------
class _CountingTokenizer:
    """The real tokenizer, counting the conversations it is asked to tokenize."""

    def __init__(self, tok, counts: dict):
        self._tok, self._counts = tok, counts

    def apply_chat_template(self, conversation, *args, **kwargs):
        batched = bool(conversation) and isinstance(conversation[0], list)
        self._counts["conversations"] += len(conversation) if batched else 1
        return self._tok.apply_chat_template(conversation, *args, **kwargs)

    def __call__(self, text, *args, **kwargs):  # the plain-text fallback
        self._counts["conversations"] += len(text) if isinstance(text, list) else 1
        return self._tok(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.fixture
def counted(monkeypatch):
    """Counts, through the real reader and tokenizer: reads of each file, tokenizer loads, conversations tokenized."""
    import builtins
    import io
    counts = {"opens": [], "tokenizers": 0, "conversations": 0}
    real_open, real_load = builtins.open, models.load_tokenizer

    def counting_open(f, mode="r", *args, **kwargs):
        if not set(mode) & set("wax+"):  # reads only: writing the test's own file does not count
            counts["opens"].append(str(f))
        return real_open(f, mode, *args, **kwargs)

    def counting_load(path):
        counts["tokenizers"] += 1
        return _CountingTokenizer(real_load(path), counts)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)  # pathlib's Path.open
    monkeypatch.setattr(models, "load_tokenizer", counting_load)
    return counts


def _one_pass(counts: dict, path: Path, n_rows: int) -> tuple[int, int, int]:
    return counts["opens"].count(str(path)), counts["tokenizers"], counts["conversations"] - n_rows


def test_import_reads_the_file_once_and_tokenizes_each_row_once(tmp_path, ws, store, cfg, counted):
    """An import used to parse its file twice (check_file, then load_records again) and the CLI's three
    times, running the tokenizer pass twice; each count here is 1 (0 extra conversations) after the fix."""
    rows = [{"instruction": q, "output": a} for q, a, _ in ROWS]
    rows.append(rows[0])  # an exact duplicate is measured too (quality sees every row read), but stored once
    p = _jsonl(tmp_path / "once.jsonl", rows)
    v = data.import_dataset(p, "once", cfg, ws=ws, store=store)
    assert v.created and v.n_rows == len(ROWS)
    assert _one_pass(counted, p, len(rows)) == (1, 1, 0)


def test_check_then_import_reads_the_file_once(tmp_path, ws, store, cfg, counted):
    """The check-then-save flow (CLI `data import`, the app's Data tab) can keep what the check read."""
    p = _jsonl(tmp_path / "flow.jsonl", [{"instruction": q, "output": a} for q, a, _ in ROWS])
    checked = data.check(p, cfg, ws=ws)
    assert checked.report.ok and checked.report.stats["splits"] == {s: len(r) for s, r in checked.splits.items()}
    v = data.import_checked(checked, "flow", ws=ws, store=store)
    assert v.splits == checked.report.stats["splits"]
    assert _one_pass(counted, p, len(ROWS)) == (1, 1, 0)
    assert json.loads((v.path / "report.json").read_text()) == checked.report.to_dict()
    bad = data.check(_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q", "output": " "}]), cfg, ws=ws)
    with pytest.raises(data.DataError, match=r"bad.jsonl:1 \[output\]: empty"):
        data.import_checked(bad, "bad", ws=ws, store=store)
    assert [r["name"] for r in datasets_db.list_versions(store)] == ["flow"]


def test_cli_import_reads_the_file_once(tmp_path, ws, counted, capsys):
    p = _jsonl(tmp_path / "cli.jsonl", [{"instruction": q, "output": a} for q, a, _ in ROWS])
    assert cli.main(["data", "import", str(p), "--name", "cli"]) == 0
    capsys.readouterr()
    assert _one_pass(counted, p, len(ROWS)) == (1, 1, 0)


def test_token_lengths_in_batches_match_one_conversation_at_a_time(monkeypatch, ws):
    from sft_core.data import stats
    from sft_core.records import to_messages
    recs = [data.make_record(f"question {i} " + "word " * i, f"answer {i}", system="Be brief." if i % 2 else None,
                             context="some context" if i % 3 == 0 else None) for i in range(7)]
    recs.append(data.make_record("bye", "ciao", messages=[
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]))
    tok = models.load_tokenizer(models.resolve_model(DataConfig().model, ws))
    one_at_a_time = [len(tok.apply_chat_template(to_messages(r), tokenize=True, return_dict=True)["input_ids"])
                     for r in recs]
    monkeypatch.setattr(stats, "TOKEN_BATCH", 3)  # several batches, the last one short
    assert stats._token_lengths(recs, DataConfig().model, ws) == one_at_a_time
    assert len(set(one_at_a_time)) > 3  # the records differ in length, so a mix-up of rows would show


def test_data_layer_does_not_import_the_presentation_layer():
    import subprocess
    import sys
    code = "import sys, sft_core.data; print('sft_core.render' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert out == "False"
    assert not hasattr(data, "format_report") and callable(format_report)  # rendering lives in render


def test_no_public_name_hides_a_module_of_the_package():
    """``data.quality`` is the function and ``sft_core.data.stats`` the module: were a module named like a
    re-exported function, ``from sft_core.data import X`` would give one or the other depending on import order."""
    import pkgutil
    modules = {m.name for m in pkgutil.iter_modules(data.__path__)}
    assert {"readers", "formats", "stats", "pipeline", "versions", "issues"} <= modules
    assert not modules & set(data.__all__)
