"""The eval's sliding window (continuous batching): ``sft_core.serving.base.run_window`` /
``generate_stream`` and ``evals.runner.generate_answers``.

These are boundary tests of the scheduler, so the engine is a fake written here: ``FakeEngine``
answers each request on its own thread, the way the vLLM engine's ``_one`` does over HTTP, but with
completion order and timing under the test's control (events and short sleeps), which a real
server cannot offer. It records how many requests are in flight at every moment. The real engine
goes through the same scheduler in tests/test_eval_e2e.py.
"""
from __future__ import annotations

import json
import threading
import time

import pytest

from evals import runner
from evals import systems as S
from sft_core.serving.base import GenResult, generate_stream, run_window, stream_batches


class FakeEngine:
    """Answers "A:<content>" after ``delay(content)`` seconds; ``block`` holds one request until
    ``release`` is set; ``fail`` makes one request fail."""

    def __init__(self, delay=lambda c: 0.0, fail: str | None = None, cap: int = 4):
        self.delay, self.fail, self.cap = delay, fail, cap
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.started: list[str] = []
        self.finished: list[str] = []
        self.hold: dict[str, threading.Event] = {}

    def capacity(self) -> int:
        return self.cap

    def one(self, req) -> GenResult:
        content = req.messages[-1]["content"]
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.started.append(content)
        try:
            if content in self.hold:
                if not self.hold[content].wait(5):
                    return GenResult("", error=f"{content} was held until the batch tail: the window was not refilled")
            time.sleep(self.delay(content))
            if content == self.fail:
                return GenResult("", error=f"boom on {content}")
            return GenResult(f"A:{content}", prompt_tokens=3, completion_tokens=2, latency_s=0.01)
        finally:
            with self.lock:
                self.in_flight -= 1
                self.finished.append(content)

    def generate_stream(self, requests, window=None, stop=None):
        return run_window(self.one, requests, window or self.cap, stop=stop, name="fake")

    def load_adapter(self, name):
        pass


def req(content: str):
    from sft_core.serving.base import GenRequest
    return GenRequest([{"role": "user", "content": content}])


def test_window_bound_refill_and_every_result_once():
    # q0 is held until every other request has finished: with a batch loop (wait for the slowest of
    # each chunk) the others could never run past q0's chunk, and q0 would time out with an error.
    eng = FakeEngine(delay=lambda c: 0.004 * (int(c[1:]) % 5) + 0.004)  # the rest complete out of order
    n = 40
    others_done = threading.Event()
    eng.hold["q0"] = others_done
    seen: list[int] = []
    for i, g in generate_stream(eng, (req(f"q{k}") for k in range(n)), window=4):
        assert g.error is None, g.error
        assert g.text == f"A:q{i}"
        seen.append(i)
        if len(seen) == n - 1:
            others_done.set()  # all but q0 came back while q0 was still in flight
    assert sorted(seen) == list(range(n)) and len(seen) == len(set(seen))  # every result exactly once
    assert seen[-1] == 0                        # the long one finished last, the window kept refilling
    assert eng.max_in_flight == 4               # full, and never more than the window
    assert eng.started == [f"q{k}" for k in range(n)]  # submitted in order, each once


def test_error_stops_submission_and_in_flight_results_still_come_back():
    eng = FakeEngine(delay=lambda c: 0.05 if c in ("q3", "q4") else 0.0, fail="q2")
    got = dict(generate_stream(eng, [req(f"q{k}") for k in range(30)], window=3))
    assert got[2].error == "boom on q2"
    # q2 was sent as the third of the first window; at most window-1 more were sent before its
    # error came back, and nothing after that
    assert len(eng.started) <= 2 + 3 and len(eng.started) < 30
    assert set(got) == {int(c[1:]) for c in eng.started}  # every request sent came back (in flight drained)
    assert eng.in_flight == 0


def test_consumer_stopping_waits_for_in_flight_and_submits_nothing_more():
    eng = FakeEngine(delay=lambda c: 0.05)
    stream = generate_stream(eng, [req(f"q{k}") for k in range(50)], window=5)
    next(stream)
    stream.close()  # e.g. KeyboardInterrupt in the consumer
    assert eng.in_flight == 0 and len(eng.started) <= 6 and len(eng.finished) == len(eng.started)


def test_batching_engines_get_chunks_of_their_capacity():
    class Batching:
        def __init__(self):
            self.calls = []

        def capacity(self):
            return 3

        def generate_batch(self, reqs):
            self.calls.append(len(reqs))
            return [GenResult(f"A:{r.messages[-1]['content']}") for r in reqs]

    eng = Batching()
    out = dict(generate_stream(eng, (req(f"q{k}") for k in range(8))))
    assert eng.calls == [3, 3, 2] and [out[i].text for i in range(8)] == [f"A:q{k}" for k in range(8)]
    stop = threading.Event()
    stop.set()
    assert list(stream_batches(eng.generate_batch, [req("x")], 3, stop)) == []


ROWS = [{"id": f"r{i}", "instruction": f"question {i}", "response": f"answer {i}"} for i in range(6)]
GENERAL = [{"id": f"g{i}", "instruction": f"general {i}", "response": f"ref {i}"} for i in range(3)]
SYSTEMS = [S.parse_system(n) for n in ("prompt", "sft:run-a")]


def test_generate_answers_writes_each_answer_once_and_resumes(tmp_path):
    sets = {"domain": ROWS, "general": GENERAL}
    total = (len(ROWS) + len(GENERAL)) * len(SYSTEMS)
    todo = runner.missing_answers(sets, SYSTEMS, set())
    # interleaved: both systems of a row together, both sets early (base and adapter mixed in a batch)
    assert [(s, r["id"], sy.name) for s, r, sy in todo[:4]] == [
        ("domain", "r0", "prompt"), ("domain", "r0", "sft:run-a"), ("general", "g0", "prompt"),
        ("general", "g0", "sft:run-a")]
    out = tmp_path / "outputs.jsonl"
    eng = FakeEngine(delay=lambda c: 0.001 * (len(c) % 4), cap=5)
    infos = []

    def stop_after_five(done, total_, info):
        infos.append((done, total_, info))
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner.generate_answers(todo, S.Context(), runner.DecodingConfig(temperature=0.0), eng, out, 0, total,
                                progress=stop_after_five)
    assert eng.max_in_flight <= 5 and eng.in_flight == 0
    first = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(first) == 5 and [i[0] for i in infos] == [1, 2, 3, 4, 5]
    assert infos[-1][2]["generated"] == 5 and infos[-1][2]["answers_per_s"] > 0 and infos[-1][2]["eta_s"] >= 0

    done = {(o["set"], o["row_id"], o["system"]) for o in first}
    rest = runner.missing_answers(sets, SYSTEMS, done)
    calls = []  # the old two-argument callback still works
    eng2 = FakeEngine(cap=5)
    n = runner.generate_answers(rest, S.Context(), runner.DecodingConfig(temperature=0.0), eng2, out, len(done),
                                total, progress=lambda d, t: calls.append((d, t)))
    assert n == len(rest) == total - 5 and len(eng2.started) == len(rest)  # only what was missing
    assert calls[-1] == (total, total)
    outs = [json.loads(line) for line in out.read_text().splitlines()]
    keys = [(o["set"], o["row_id"], o["system"]) for o in outs]
    assert len(keys) == len(set(keys)) == total and outs[:5] == first
    by = {(o["row_id"], o["system"]): o for o in outs}
    assert by[("r3", "prompt")]["output"] == "A:question 3" and by[("g1", "sft:run-a")]["reference"] == "ref 1"


def test_generate_answers_first_error_raises_and_keeps_answers(tmp_path):
    todo = runner.missing_answers({"domain": ROWS}, SYSTEMS, set())
    out = tmp_path / "outputs.jsonl"
    eng = FakeEngine(fail="question 1", cap=3)
    with pytest.raises(runner.EvalError, match="engine error for (prompt|sft:run-a): boom on question 1"):
        runner.generate_answers(todo, S.Context(), runner.DecodingConfig(temperature=0.0), eng, out, 0, len(todo))
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(eng.started) < len(todo) and eng.in_flight == 0  # submission stopped
    assert len(written) == sum(c != "question 1" for c in eng.started)  # all else that was sent was written
    assert all(o["output"].startswith("A:") for o in written)


def test_prefetch_builds_ahead_and_stops_with_the_window():
    from sft_core.serving.base import prefetch
    built: list[int] = []

    def source():
        for k in range(100):
            built.append(k)
            yield k

    it = prefetch(source(), 5)
    assert next(it) == 0
    end = time.time() + 10
    while len(built) < 6 and time.time() < end:
        time.sleep(0.01)
    time.sleep(0.2)
    assert 6 <= len(built) <= 7  # ahead of the consumer (5 queued, one waiting to be), but bounded
    it.close()  # the thread is joined: nothing more is built
    n = len(built)
    time.sleep(0.2)
    assert len(built) == n < 100

    def broken():
        yield 1
        raise ValueError("no KB")

    with pytest.raises(ValueError, match="no KB"):
        list(prefetch(broken(), 2))


def test_rag_systems_retrieve_each_question_once(tmp_path):
    class KB:
        def __init__(self):
            self.queries = []

        def search(self, query, k=None):
            self.queries.append(query)
            return []

    kb = KB()
    systems = [S.parse_system(n) for n in ("rag", "sft+rag:run-a")]
    todo = runner.missing_answers({"domain": ROWS}, systems, set())
    ctx = S.Context(kb=kb, tokenizer=lambda text, add_special_tokens=False: {"input_ids": text.split()})
    runner.generate_answers(todo, ctx, runner.DecodingConfig(temperature=0.0), FakeEngine(cap=3),
                            tmp_path / "o.jsonl", 0, len(todo))
    assert sorted(kb.queries) == sorted(r["instruction"] for r in ROWS)  # once per row, not once per system
    assert len(read_lines(tmp_path / "o.jsonl")) == len(todo)


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]
