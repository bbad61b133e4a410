"""Continuous batching invariants, seeds, stop strings, cancellation and per-request errors."""
from __future__ import annotations

import time

import pytest

from engine_kit import Recorder, make_engine, req
from multilora.engine.sampling_params import SamplingParams
from multilora.engine.sequence import FinishReason, GenerationRequest
from multilora.errors import AdapterNotFoundError, RequestTooLongError


def test_a_request_arriving_mid_batch_starts_before_the_batch_ends(demo_dir):
    engine = make_engine(demo_dir)
    rec = Recorder(engine)
    for i in range(3):
        rec.add(req(f"long{i}", ["sql", "chat", None][i], max_tokens=40, ignore_eos=True))
    rec.run(until=5)
    rec.add(req("late", "summarize", max_tokens=4, ignore_eos=True))
    rec.run()
    assert rec.first["late"] < min(rec.end[f"long{i}"] for i in range(3))
    assert rec.end["late"] < min(rec.end[f"long{i}"] for i in range(3))


def test_every_request_ends_exactly_once_and_all_kv_blocks_come_back(demo_dir):
    engine = make_engine(demo_dir, max_num_seqs=4, max_num_batched_tokens=16)
    rec = Recorder(engine)
    adapters = [None, "sql", "chat", "summarize", "acme/translate"]
    for i in range(12):
        rec.add(GenerationRequest(str(i), "Translate to French: " * (1 + i % 3), SamplingParams(max_tokens=3 + i),
                                  adapters[i % 5], stream=True))
    rec.run()
    for i in range(12):
        finals = [o for o in rec.outputs[str(i)] if o.finished]
        assert len(finals) == 1 and rec.outputs[str(i)][-1].finished
    assert engine.kv_cache.num_free == engine.kv_cache.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_when_the_kv_cache_is_full_requests_wait_in_arrival_order(demo_dir):
    engine = make_engine(demo_dir, kv_cache_memory="120KiB", kv_block_size=4)  # 15 blocks of 4 tokens
    per_request = engine.kv_cache.blocks_for(len(engine.tokenizer.encode("SELECT name FROM orders")) + 20)
    assert engine.kv_cache.num_blocks // per_request == 2, "the test wants room for exactly two requests"
    rec = Recorder(engine)
    for i in range(5):
        rec.add(req(str(i), max_tokens=20, ignore_eos=True))
    rec.run()
    assert [rec.first[str(i)] for i in range(5)] == sorted(rec.first[str(i)] for i in range(5))
    assert rec.first["2"] >= rec.end["0"]  # the third only started once the first gave its blocks back
    assert all(rec.outputs[str(i)][-1].completion_tokens == 20 for i in range(5))


def test_requests_that_can_never_fit_fail_at_once(demo_dir):
    engine = make_engine(demo_dir, max_model_len=64)
    with pytest.raises(RequestTooLongError, match="at most max_model_len \\(64\\)"):
        engine.add_request(req("x", max_tokens=60), lambda out: None)
    small = make_engine(demo_dir, kv_cache_memory="8KiB", kv_block_size=4)
    with pytest.raises(RequestTooLongError, match="can never fit the KV cache budget"):
        small.add_request(req("y", max_tokens=100), lambda out: None)
    out = engine.generate([req("z", "nope")])["z"][-1]
    assert isinstance(out.error, AdapterNotFoundError) and "unknown adapter 'nope'" in str(out.error)


def test_same_seed_same_text_whatever_else_is_in_the_batch(demo_dir):
    sampled = dict(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    alone = make_engine(demo_dir).generate([req("s", "chat", **sampled)])["s"][-1].text
    crowd = [req(f"o{i}", ["sql", None, "summarize"][i % 3], temperature=1.0, max_tokens=6 + i) for i in range(6)]
    together = make_engine(demo_dir).generate(crowd[:3] + [req("s", "chat", **sampled)] + crowd[3:])["s"][-1].text
    other_seed = make_engine(demo_dir).generate([req("s", "chat", **{**sampled, "seed": 99})])["s"][-1].text
    assert alone == together
    assert other_seed != alone


def test_stop_string_ends_the_text_before_it(demo_dir):
    engine = make_engine(demo_dir)
    full = engine.generate([req("a", "sql", max_tokens=16, ignore_eos=True)])["a"][-1].text
    stop = full[5:9]
    out = engine.generate([req("b", "sql", max_tokens=16, ignore_eos=True, stop=(stop,))])["b"][-1]
    assert out.finish_reason is FinishReason.STOP
    assert out.text == full[:full.index(stop)]


def test_cancel_frees_the_row_and_its_blocks_within_one_step(demo_dir):
    engine = make_engine(demo_dir)
    rec = Recorder(engine)
    rec.add(req("keep", "sql", max_tokens=20, ignore_eos=True))
    rec.add(req("drop", "chat", max_tokens=20, ignore_eos=True))
    while len([s for s in engine.scheduler.running if s.num_generated > 1]) < 2:  # adapters load in background
        rec.run(until=rec.step + 1)
    engine.cancel("drop")
    rec.run(until=rec.step + 1)
    assert rec.outputs["drop"][-1].finish_reason is FinishReason.CANCELLED
    assert [s.request.request_id for s in engine.scheduler.running] == ["keep"]
    rec.run()
    assert rec.outputs["keep"][-1].completion_tokens == 20
    assert engine.kv_cache.num_free == engine.kv_cache.num_blocks


def test_a_bad_adapter_fails_its_request_only(demo_dir, tmp_path):
    import shutil
    adapters = tmp_path / "adapters"
    shutil.copytree(demo_dir / "adapters", adapters)
    (adapters / "chat" / "adapter_model.safetensors").write_bytes(b"garbage")
    engine = make_engine(demo_dir, adapter_dir=str(adapters))
    reference = make_engine(demo_dir).generate([req("good", "sql")])["good"][-1].text
    outputs = engine.generate([req("bad", "chat"), req("good", "sql")])
    assert outputs["bad"][-1].finish_reason is FinishReason.ERROR
    assert "adapter 'chat'" in str(outputs["bad"][-1].error) and "truncated" in str(outputs["bad"][-1].error)
    assert outputs["good"][-1].text == reference


def test_an_engine_fault_ends_every_request_with_an_error_and_the_engine_recovers(demo_dir):
    engine = make_engine(demo_dir)
    outputs = {}
    engine.add_request(req("running", "sql", max_tokens=30, ignore_eos=True),
                       lambda o: outputs.setdefault(o.request_id, []).append(o))
    engine.step()
    engine.step()
    original = engine.scheduler._try_start

    def broken(seq, wanted):
        raise RuntimeError("slot table exploded")

    engine.scheduler._try_start = broken
    for i in range(3):
        engine.add_request(req(f"w{i}", ["chat", None, "sql"][i]),
                           lambda o: outputs.setdefault(o.request_id, []).append(o))
    engine.start()  # the loop's fault handler, as in the server
    deadline = time.monotonic() + 30
    while len(outputs) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.scheduler._try_start = original
    for rid in ["running", "w0", "w1", "w2"]:
        finals = [o for o in outputs[rid] if o.finished]
        assert len(finals) == 1 and finals[0].finish_reason is FinishReason.ERROR
        assert "slot table exploded" in str(finals[0].error)
    assert engine.kv_cache.num_free == engine.kv_cache.num_blocks
    done = []
    engine.add_request(req("after", "sql", max_tokens=3), lambda o: done.append(o) if o.finished else None)
    while not done and time.monotonic() < deadline + 30:
        time.sleep(0.01)
    engine.shutdown()
    assert done[0].error is None and done[0].completion_tokens == 3



def test_requests_for_resident_adapters_pass_one_waiting_for_a_slot(demo_dir):
    engine = make_engine(demo_dir, max_loras=2, max_num_seqs=4)
    rec = Recorder(engine)
    rec.add(req("sql-long", "sql", max_tokens=30, ignore_eos=True))
    rec.add(req("chat-long", "chat", max_tokens=30, ignore_eos=True))
    while len(engine.scheduler.running) < 2:  # both slots pinned once their loads are done
        rec.run(until=rec.step + 1)
    rec.add(req("cold", "summarize", max_tokens=2, ignore_eos=True))  # no slot until a long one ends
    rec.add(req("warm", "sql", max_tokens=2, ignore_eos=True))
    rec.run()
    assert rec.first["warm"] < rec.first["cold"] and rec.first["cold"] >= min(rec.end["sql-long"], rec.end["chat-long"])
    assert all(rec.outputs[r][-1].error is None for r in ("cold", "warm"))


def test_no_request_is_overtaken_by_more_than_max_num_seqs_later_arrivals(demo_dir):
    engine = make_engine(demo_dir, max_loras=1, max_num_seqs=2)
    started = []
    add_row = engine.runner.rows.add
    engine.runner.rows.add = lambda seq: started.append(seq) or add_row(seq)
    engine.manage("load", "chat")  # in host memory, ready: a request still loading holds no one up
    rec = Recorder(engine)
    rec.add(req("hog", "sql", max_tokens=60, ignore_eos=True))  # pins the only slot for a long time
    while not engine.scheduler.running:
        rec.run(until=rec.step + 1)
    rec.add(req("cold", "chat", max_tokens=2, ignore_eos=True))
    for i in range(6):
        rec.add(req(f"warm{i}", "sql", max_tokens=2, ignore_eos=True))
    rec.run()
    order = [seq.request.request_id for seq in started]
    assert order[:4] == ["hog", "warm0", "warm1", "cold"]  # max_num_seqs = 2 later ones, then the cold one
    assert next(seq for seq in started if seq.request.request_id == "cold").overtaken == 2
    assert all(rec.outputs[r][-1].error is None for r in rec.outputs)
