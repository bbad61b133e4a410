"""Issue 10, engine side: one request's bad values, a stalled or odd adapter file, a huge prompt or
an unfinished request must end only what it touches. Bounded in time; no server needed."""
from __future__ import annotations

import dataclasses
import os
import random
import shutil
import string
import threading
import time

import pytest

from engine_kit import Recorder, make_engine, req
from multilora.adapters import files as adapter_files
from multilora.engine.prompts import CHARS_PER_TOKEN_CEILING
from multilora.engine.sequence import FinishReason
from multilora.errors import InvalidParameterError, RequestTooLongError, UserError


def test_a_huge_prompt_is_refused_before_it_is_tokenized(demo_dir):
    """Issue 10 item 4: 50 MB of text is refused by its length alone, at once, untokenized."""
    engine = make_engine(demo_dir, max_model_len=256)
    calls = []
    encode = engine.tokenizer.encode
    engine.tokenizer.encode = lambda text, **kw: calls.append(len(text)) or encode(text, **kw)
    started = time.monotonic()
    with pytest.raises(RequestTooLongError, match="more than 256 tokens \\(max_model_len\\) can hold"):
        engine.add_request(req("huge", prompt="x" * 50_000_000), lambda out: None)
    assert time.monotonic() - started < 0.5 and calls == []
    assert engine.prompts.max_chars == 256 * CHARS_PER_TOKEN_CEILING  # its tokens are longer (25 characters)
    # at the limit, the exact token count decides (and refuses too: 256 tokens plus max_tokens)
    with pytest.raises(RequestTooLongError, match="together they must be at most max_model_len"):
        engine.add_request(req("long", prompt="SELECT " * 300), lambda out: None)


def test_parameters_that_overflowed_end_no_request(demo_dir):
    """Issue 10 item 1: a request with temperature 1e-40 used to fail every request of the step; it
    now runs like a greedy one and its neighbours are untouched. A repetition penalty that small is
    refused where it enters (dividing by it overflows float32)."""
    engine = make_engine(demo_dir)
    neighbours = [req("n0", "sql", max_tokens=6, ignore_eos=True), req("n1", None, max_tokens=6, ignore_eos=True),
                  req("n2", "chat", max_tokens=6, temperature=0.8, seed=3, ignore_eos=True)]
    alone = engine.generate(neighbours)
    odd = [req("t", max_tokens=4, temperature=1e-40, seed=1, ignore_eos=True),
           req("u", max_tokens=4, temperature=1e-300, seed=1, ignore_eos=True)]
    together = engine.generate(odd + neighbours)
    for out in together.values():
        assert out[-1].error is None and out[-1].finish_reason is FinishReason.LENGTH
    for rid in ("n0", "n1", "n2"):
        assert together[rid][-1].text == alone[rid][-1].text
    greedy = engine.generate([req("g", max_tokens=4, ignore_eos=True)])["g"][-1].text
    assert together["t"][-1].text == together["u"][-1].text == greedy
    with pytest.raises(InvalidParameterError, match="repetition_penalty.*\\[0.01, 10\\]"):
        req("p", max_tokens=4, temperature=1.0, repetition_penalty=1e-40)


def test_a_request_past_request_timeout_s_ends_with_an_error(demo_dir):
    engine = make_engine(demo_dir, request_timeout_s=0.2)
    rec = Recorder(engine)
    rec.add(req("slow", max_tokens=200, ignore_eos=True))
    deadline = time.monotonic() + 20
    while "slow" not in rec.end and time.monotonic() < deadline:
        rec.run(until=rec.step + 1)
        time.sleep(0.01)
    out = rec.outputs["slow"][-1]
    assert out.finish_reason is FinishReason.ERROR and "request_timeout_s (0.2 s)" in str(out.error)
    assert 0 < out.completion_tokens < 200 and engine.kv_cache.num_free == engine.kv_cache.num_blocks


def _run_threaded(engine, requests, timeout=60):
    """Add requests to a running engine; {request id: (final output, seconds until it)}."""
    done, started = {}, time.monotonic()
    finished = threading.Event()

    def on_output(out):
        if out.finished:
            done[out.request_id] = (out, time.monotonic() - started)
            if len(done) == len(requests):
                finished.set()

    for request in requests:
        engine.add_request(request, on_output)
    finished.wait(timeout)
    return done


def test_a_stalled_adapter_read_blocks_only_its_own_requests(demo_dir, monkeypatch):
    """Issue 10 item 2: while one adapter's weights hang on read, the base model, loaded adapters
    and `list` answer as usual, and the stalled adapter's request fails at adapter_load_timeout_s."""
    release = threading.Event()
    real_read = adapter_files.read_file

    def read(adapter_id, path, root, max_bytes):
        if adapter_id == "chat" and path.name == adapter_files.WEIGHTS_FILE:
            release.wait(60)
        return real_read(adapter_id, path, root, max_bytes)

    monkeypatch.setattr(adapter_files, "read_file", read)
    engine = make_engine(demo_dir, adapter_load_timeout_s=1.5)
    engine.start()
    try:
        engine.manage("load", "sql")
        done = _run_threaded(engine, [req("stalled", "chat", max_tokens=4), req("base", max_tokens=4),
                                      req("loaded", "sql", max_tokens=4)])
        listed = time.monotonic()
        listing = engine.manage("list", timeout=5)
        assert time.monotonic() - listed < 1.0 and "sql" in listing["host"]
    finally:
        release.set()
        engine.shutdown()
    assert done["base"][0].error is None and done["loaded"][0].error is None
    assert done["base"][1] < 1.5 and done["loaded"][1] < 1.5
    stalled, seconds = done["stalled"]
    assert stalled.finish_reason is FinishReason.ERROR and "adapter_load_timeout_s (1.5 s)" in str(stalled.error)
    assert 1.4 < seconds < 4.0


def test_a_stalled_load_holds_later_requests_for_the_grace_period_at_most(demo_dir, monkeypatch):
    """Fairness (an overtaken request holds later arrivals) must not let a hung load stall them."""
    from multilora.engine.admission import LOAD_GRACE_S

    release = threading.Event()
    real_read = adapter_files.read_file
    monkeypatch.setattr(adapter_files, "read_file", lambda adapter_id, path, root, max_bytes: (
        release.wait(60) if adapter_id == "chat" and path.name == adapter_files.WEIGHTS_FILE else None)
        or real_read(adapter_id, path, root, max_bytes))
    engine = make_engine(demo_dir, adapter_load_timeout_s=8, max_num_seqs=1)
    engine.start()
    try:
        done = _run_threaded(engine, [req("stalled", "chat", max_tokens=2)] +
                             [req(f"b{i}", max_tokens=2) for i in range(4)], timeout=30)
    finally:
        release.set()
        engine.shutdown()
    base = sorted(seconds for rid, (out, seconds) in done.items() if rid != "stalled")
    assert all(done[f"b{i}"][0].error is None for i in range(4))
    assert base[-1] < LOAD_GRACE_S + 3.0  # held once, for the grace period, not until the 8 s timeout
    assert "adapter_load_timeout_s (8 s)" in str(done["stalled"][0].error)


def test_a_fifo_or_device_as_adapter_file_is_refused_at_once(demo_dir, tmp_path):
    """A FIFO stands in for hung storage: opening it used to freeze the whole process."""
    adapters = tmp_path / "adapters"
    shutil.copytree(demo_dir / "adapters", adapters)
    weights = adapters / "chat" / "adapter_model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    engine = make_engine(demo_dir, adapter_dir=str(adapters))
    outputs = engine.generate([req("fifo", "chat", max_tokens=3), req("base", max_tokens=3)])
    assert "adapter_model.safetensors is not a regular file" in str(outputs["fifo"][-1].error)
    assert outputs["base"][-1].error is None and outputs["base"][-1].completion_tokens == 3


def test_after_files_change_and_unload_every_later_request_gets_the_new_weights(demo_dir, tmp_path):
    """Issue 10 item 5: new requests used to re-pin the slot waiting to be unloaded (old weights)."""
    adapters = tmp_path / "adapters"
    shutil.copytree(demo_dir / "adapters", adapters)
    reference = make_engine(demo_dir).generate([req("chat", "chat", ignore_eos=True)])["chat"][-1].text
    # Files are looked at again only after an hour: what `unload` does alone (test_adapter_faults.py
    # has the looks at changed files).
    engine = make_engine(demo_dir, adapter_dir=str(adapters), adapter_check_interval_s=3600)
    rec = Recorder(engine)
    rec.add(req("old-running", "sql", max_tokens=30, ignore_eos=True))  # keeps the old slot pinned
    rec.run(until=3)
    before = engine.generate([req("before", "sql", ignore_eos=True)])["before"][-1].text
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapters / "chat" / name, adapters / "sql" / name)
    assert engine.generate([req("cached", "sql", ignore_eos=True)])["cached"][-1].text == before
    assert engine.manage("unload", "sql") == {"adapter_id": "sql", "unloaded": True}
    after = engine.generate([req(f"after{i}", "sql", ignore_eos=True) for i in range(11)])
    assert {out[-1].text for out in after.values()} == {reference} != {before}
    rec.run()
    assert rec.outputs["old-running"][-1].completion_tokens == 30


# -- issue 23 items 1 and 3: what a request needs before it can queue holds up no other request ------
PLAIN_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


def _submit_in_order(engine, requests):
    """Add `requests` from one thread, in order, as Triton's request thread does; returns
    ({request id: (final output or the UserError add_request raised, seconds since the first was
    sent)}, an Event set once all have ended)."""
    done, started, all_done = {}, time.monotonic(), threading.Event()

    def end(request_id, result):
        done[request_id] = (result, time.monotonic() - started)
        if len(done) == len(requests):
            all_done.set()

    def send():
        for request in requests:
            try:
                engine.add_request(request, lambda out: out.finished and end(out.request_id, out))
            except UserError as error:
                end(request.request_id, error)

    threading.Thread(target=send, daemon=True).start()
    return done, all_done


def _error(result):
    return result if isinstance(result, Exception) else result.error


def test_a_stalled_chat_template_read_blocks_only_its_adapters_requests(demo_dir, tmp_path, monkeypatch):
    """Issue 23 item 1: a chat template whose storage hangs was read on the request thread: every
    request of every client waited the whole stall (90 s). Now its adapter's chat requests fail at
    adapter_load_timeout_s, later ones at once, and every other request goes on."""
    adapters = tmp_path / "adapters"
    shutil.copytree(demo_dir / "adapters", adapters)
    for adapter_id in ("chat", "sql"):
        (adapters / adapter_id / "chat_template.jinja").write_text(PLAIN_TEMPLATE)
    stalled_file = str(adapters / "chat" / "chat_template.jinja")
    release = threading.Event()
    real_stat = os.stat

    def stat(path, *args, **kwargs):  # hung storage: even looking at the file waits
        if str(path) == stalled_file:
            release.wait(20)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    engine = make_engine(demo_dir, adapter_dir=str(adapters), adapter_load_timeout_s=1.5)
    engine.start()
    hello = [{"role": "user", "content": "Hello"}]

    def chat(rid, adapter_id):
        return dataclasses.replace(req(rid, adapter_id, max_tokens=4, prompt=""), messages=hello)

    try:
        done, all_done = _submit_in_order(engine, [chat("stalled", "chat"), req("base", max_tokens=4),
                                                   chat("sql-chat", "sql"), req("sql", "sql", max_tokens=4)])
        assert all_done.wait(30), sorted(done)
        later, later_done = _submit_in_order(engine, [chat("stalled-again", "chat"), req("base-again", max_tokens=4)])
        assert later_done.wait(30), sorted(later)
    finally:
        release.set()
        engine.shutdown()
    for rid in ("base", "sql-chat", "sql"):
        assert _error(done[rid][0]) is None and done[rid][1] < 1.5, (rid, done[rid])
    message = "adapter 'chat': its chat template was not read within adapter_load_timeout_s (1.5 s)"
    assert message in str(_error(done["stalled"][0])) and 1.4 < done["stalled"][1] < 4.0
    assert message in str(_error(later["stalled-again"][0])) and later["stalled-again"][1] < 0.5
    assert _error(later["base-again"][0]) is None


def test_prompts_near_the_length_limit_do_not_hold_up_a_neighbour(demo_dir):
    """Issue 23 item 3: prompts just under the character limit were tokenized on the request thread
    (~516k tokens, 2.1 s each with the demo), so 8 of them held a neighbour's 2-token request for
    15.2 s (0.3 s alone). Now the limit follows the model's context at a few characters per token,
    and long prompts are tokenized off the request thread."""
    engine = make_engine(demo_dir)
    engine.start()
    rng = random.Random(0)

    def text(n):
        return "".join(rng.choices(string.ascii_letters + string.digits + " ", k=n))

    def neighbour(rid):
        return req(rid, max_tokens=2, ignore_eos=True)

    longest = max(len(t) for t in engine.tokenizer.get_vocab())
    old_limit = engine.max_model_len * longest * 2  # what the character limit admitted before
    try:
        alone = []
        for i in range(3):
            done, all_done = _submit_in_order(engine, [neighbour(f"alone{i}")])
            assert all_done.wait(30)
            alone.append(done[f"alone{i}"][1])
        near = ([req(f"old{i}", max_tokens=2, prompt=text(old_limit - 1)) for i in range(12)]
                + [req(f"new{i}", max_tokens=2, prompt=text(engine.prompts.max_chars - 1)) for i in range(4)])
        done, all_done = _submit_in_order(engine, near + [neighbour("neighbour")])
        assert all_done.wait(120), sorted(done)
    finally:
        engine.shutdown()
    result, seconds = done["neighbour"]
    assert _error(result) is None and result.completion_tokens == 2
    assert seconds < max(4 * min(alone), min(alone) + 1.5), (seconds, alone)
    for request in near:
        error = _error(done[request.request_id][0])
        assert isinstance(error, RequestTooLongError)
        assert ("characters" if request.request_id.startswith("old") else "tokens") in str(error), str(error)
