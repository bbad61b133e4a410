"""A request with n choices: one prefill shared by n sequences, each with its own sampling stream."""
from __future__ import annotations

import dataclasses

import pytest

from engine_kit import Recorder, make_engine, req
from multilora.engine.sequence import FinishReason
from multilora.errors import InvalidParameterError, RequestTooLongError

SAMPLED = dict(temperature=1.0, top_p=0.95, seed=7, max_tokens=12, ignore_eos=True)


def streamed(rid, adapter=None, **params):
    return dataclasses.replace(req(rid, adapter, **params), stream=True)


def choice_texts(final) -> list[str]:
    assert final.finished and [c.index for c in final.choices] == list(range(len(final.choices)))
    return [c.text for c in final.choices]


def test_four_seeded_choices_are_distinct_reproducible_and_computed_from_one_prefill(demo_dir):
    engine = make_engine(demo_dir)
    prompt_tokens = len(engine.tokenizer.encode("SELECT name FROM orders"))
    outputs = engine.generate([req("four", "sql", n=4, **SAMPLED)])["four"]
    assert len(outputs) == 1  # not streamed: one output holds every choice
    texts = choice_texts(outputs[0])
    assert len(set(texts)) == 4, texts
    assert engine.prompt_tokens_computed == prompt_tokens  # the prompt computed once, not four times
    assert [c.completion_tokens for c in outputs[0].choices] == [12] * 4 and outputs[0].completion_tokens == 48
    assert all(c.finish_reason is FinishReason.LENGTH and c.prompt_tokens == prompt_tokens for c in outputs[0].choices)
    assert engine.kv_cache.num_free == engine.kv_cache.num_blocks and not engine.scheduler.running

    crowd = [req(f"o{i}", ["chat", None, "summarize"][i % 3], temperature=1.0, max_tokens=4 + i) for i in range(5)]
    mixed = engine.generate(crowd[:2] + [req("four", "sql", n=4, **SAMPLED)] + crowd[2:])
    assert choice_texts(mixed["four"][-1]) == texts  # the same seed, whatever else shares the batch
    assert engine.kv_cache.num_free == engine.kv_cache.num_blocks

    one = make_engine(demo_dir).generate([req("one", "sql", **SAMPLED)])["one"][-1].text
    assert texts[0] == one  # choice 0 samples with the seed itself
    other = engine.generate([req("four", "sql", n=4, **{**SAMPLED, "seed": 8})])["four"][-1]
    assert not set(choice_texts(other)) & set(texts)


@pytest.mark.parametrize("config", [dict(kv_block_size=4), dict(kv_block_size=5), dict(max_num_batched_tokens=3)],
                         ids=["partial-last-block", "whole-blocks", "chunked-prefill"])
def test_greedy_choices_read_the_shared_prompt_as_one_greedy_request_does(demo_dir, config):
    """Greedy choices are the same text, with the same logprobs as one greedy request: each reads
    the prompt's K/V through its shared blocks and its copy of the last partial block."""
    engine = make_engine(demo_dir, **config)
    assert len(engine.tokenizer.encode("SELECT name FROM orders")) == 5  # 4 + 1 with blocks of 4, whole with 5
    alone = engine.generate([req("one", "chat", max_tokens=10, ignore_eos=True, logprobs=0)])["one"][-1]
    final = engine.generate([req("three", "chat", n=3, max_tokens=10, ignore_eos=True, logprobs=0)])["three"][-1]
    assert choice_texts(final) == [alone.text] * 3
    for c in final.choices:
        assert [t.token_id for t in c.logprobs] == [t.token_id for t in alone.logprobs]
        assert [t.logprob for t in c.logprobs] == pytest.approx([t.logprob for t in alone.logprobs], abs=1e-5)
    assert engine.kv_cache.num_free == engine.kv_cache.num_blocks


def test_streamed_choices_carry_their_index_and_the_request_ends_once(demo_dir):
    engine = make_engine(demo_dir)
    whole = choice_texts(engine.generate([req("w", "sql", n=3, **SAMPLED, prompt_logprobs=0)])["w"][-1])
    outputs = engine.generate([streamed("s", "sql", n=3, **SAMPLED, prompt_logprobs=0)])["s"]
    assert [o.finished for o in outputs].count(True) == 1 and outputs[-1].finished
    assert {o.index for o in outputs} == {0, 1, 2}
    for i in range(3):
        mine = [o for o in outputs if o.index == i]
        assert "".join(o.text for o in mine) == whole[i]
        ends = [o for o in mine if o.finish_reason is not None]
        assert ends == [mine[-1]] and ends[0].completion_tokens == 12
    prompt = [o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None]
    assert len(prompt) == 1 and outputs[0].prompt_logprobs is prompt[0]  # the request's, with its first output
    assert len(prompt[0]) == len(engine.tokenizer.encode("SELECT name FROM orders"))


def test_the_prompt_logprobs_of_a_non_streamed_request_go_once_with_it(demo_dir):
    engine = make_engine(demo_dir)
    final = engine.generate([req("w", "sql", n=2, **SAMPLED, logprobs=1, prompt_logprobs=0)])["w"][-1]
    assert len(final.prompt_logprobs) == final.prompt_tokens
    assert all(c.prompt_logprobs is None and len(c.logprobs) == c.completion_tokens for c in final.choices)
    assert [t.token_id for t in final.choices[0].logprobs] != [t.token_id for t in final.choices[1].logprobs]


def test_cancel_ends_every_choice_within_one_step_and_frees_their_blocks(demo_dir):
    engine = make_engine(demo_dir)
    rec = Recorder(engine)
    rec.add(req("keep", None, max_tokens=20, ignore_eos=True))
    rec.add(streamed("drop", "chat", n=3, max_tokens=20, ignore_eos=True, temperature=1.0))
    while len([s for s in engine.scheduler.running if s.num_generated > 1]) < 4:  # the adapter loads in background
        rec.run(until=rec.step + 1)
    engine.cancel("drop")
    rec.run(until=rec.step + 1)
    ends = [o for o in rec.outputs["drop"] if o.finish_reason is not None]
    assert sorted(o.index for o in ends) == [0, 1, 2] and {o.finish_reason for o in ends} == {FinishReason.CANCELLED}
    assert [o.finished for o in rec.outputs["drop"]].count(True) == 1 and rec.outputs["drop"][-1].finished
    assert [s.request.request_id for s in engine.scheduler.running] == ["keep"]
    rec.run()
    assert engine.kv_cache.num_free == engine.kv_cache.num_blocks


def test_an_error_in_one_choice_ends_the_request_with_one_error_output(demo_dir):
    engine = make_engine(demo_dir)
    execute = engine.runner.execute

    def failing_second_choice(chunks):
        out = execute(chunks)
        for i, seq in enumerate(out.ready):
            if seq.index == 1 and seq.num_generated == 3:
                out.sampled.errors[i] = "boom"
        return out

    engine.runner.execute = failing_second_choice
    outputs = engine.generate([streamed("bad", None, n=3, **SAMPLED), req("ok", None, **SAMPLED)])
    assert [o.finished for o in outputs["bad"]] == [False] * (len(outputs["bad"]) - 1) + [True]
    assert "boom" in str(outputs["bad"][-1].error) and outputs["bad"][-1].finish_reason is FinishReason.ERROR
    assert outputs["ok"][-1].completion_tokens == 12
    assert engine.kv_cache.num_free == engine.kv_cache.num_blocks and not engine.scheduler.running


def test_requests_that_could_never_start_are_refused_at_once(demo_dir):
    engine = make_engine(demo_dir, max_num_seqs=2)
    with pytest.raises(InvalidParameterError, match=r"'n': 3 choices need 3 running rows; .*max_num_seqs \(2\)"):
        engine.add_request(req("x", n=3), lambda out: None)
    with pytest.raises(InvalidParameterError, match=r"invalid 'n': must be an integer in \[1, 16\], got 17"):
        req("x", n=17)
    small = make_engine(demo_dir, kv_cache_memory="96KiB", kv_block_size=4)  # 12 blocks of 4 tokens
    assert small.kv_cache.num_blocks == 12
    small.add_request(req("fits", max_tokens=40), lambda out: None)  # 45 tokens: 12 blocks
    with pytest.raises(RequestTooLongError, match="plus max_tokens \\(12\\) in each of 4 choices can never fit"):
        small.add_request(req("y", max_tokens=12, n=4), lambda out: None)  # 1 shared + 4 * 4 own blocks
