"""The batched sampler: per-row parameters in one call, seeded draws independent of the batch,
and one row's trouble kept to that row."""
from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from multilora.engine import sampler
from multilora.engine.sampler import SamplingBatch, sample, uniform


def batch(n, temperature=1.0, top_p=1.0, top_k=0, penalty=1.0, draws=None, seen=None):
    def col(value, dtype=torch.float32):
        values = value if isinstance(value, list) else [value] * n
        return torch.tensor(values, dtype=dtype)

    t, p, k, r = col(temperature), col(top_p), col(top_k, torch.long), col(penalty)
    u = torch.tensor(draws if draws is not None else [uniform(7, i) for i in range(n)], dtype=torch.float32)
    return SamplingBatch(t, p, k, r, u, seen, all_greedy=bool((t < sampler.GREEDY_BELOW).all()),
                         any_top_k=bool((k > 0).any()), any_top_p=bool((p < 1).any()), any_penalty=bool((r != 1).any()))


def test_uniform_depends_only_on_seed_and_index():
    draws = [uniform(seed, i) for seed in (0, 1, 2**64 - 1) for i in range(200)]
    assert all(0.0 <= d < 1.0 for d in draws) and len(set(draws)) == len(draws)
    assert uniform(1234, 5) == uniform(1234, 5) != uniform(1234, 6)
    assert abs(sum(draws) / len(draws) - 0.5) < 0.05


def test_values_that_would_overflow_are_computed_not_crashed():
    """Issue 10 item 1: temperature 1e-40 (or 1e-300, 0 in fp32), or a penalty of 1e-40 with
    temperature 1, overflowed and took the whole step down; now each is a plain greedy choice."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 10
    seen = torch.zeros(4, 50, dtype=torch.bool)
    seen[:, :25] = True
    out = sample(logits, batch(4, temperature=[1e-40, 1e-300, 1.0, 1.0], penalty=[1.0, 1.0, 1e-40, 1e-40], seen=seen))
    assert out.errors == [None] * 4
    greedy = logits.argmax(-1).tolist()
    assert out.token_list[:2] == greedy[:2]
    # a penalty of 1e-40 lifts every seen positive logit to the largest float: one of them is drawn
    assert all(seen[i, t] and logits[i, t] > 0 for i, t in enumerate(out.token_list[2:], 2))


def test_a_row_with_non_finite_logits_fails_alone():
    torch.manual_seed(1)
    logits = torch.randn(3, 40)
    alone = sample(logits[[0, 2]], batch(2, draws=[0.3, 0.8]))
    logits[1, 5] = float("nan")
    out = sample(logits, batch(3, draws=[0.3, 0.5, 0.8]))
    assert out.errors[0] is None and out.errors[2] is None and "non-finite logits" in out.errors[1]
    assert [out.token_list[0], out.token_list[2]] == alone.token_list and out.token_list[1] == -1


def test_an_exception_in_the_batched_call_fails_only_the_faulty_row(monkeypatch):
    real = sampler._sample

    def flaky(logits, b):
        if logits.shape[0] > 1 or float(b.temperature[0]) == 0.5:
            raise RuntimeError("boom")
        return real(logits, b)

    monkeypatch.setattr(sampler, "_sample", flaky)
    logits = torch.randn(3, 30)
    out = sample(logits, batch(3, temperature=[1.0, 0.5, 1.0]))
    assert out.errors[0] is None and out.errors[2] is None and "RuntimeError: boom" in out.errors[1]
    assert out.token_list[1] == -1 and out.tokens.tolist() == out.token_list


def test_same_draw_same_token_whatever_else_shares_the_batch():
    torch.manual_seed(2)
    logits = torch.randn(5, 100)
    mixed = sample(logits, batch(5, temperature=[0.7, 1.0, 0.0, 1.3, 0.9], top_p=[0.9, 1, 1, 0.5, 1],
                                 top_k=[0, 10, 0, 0, 3], draws=[0.1, 0.2, 0.3, 0.4, 0.5]))
    for i in range(5):
        alone = sample(logits[i:i + 1], batch(1, temperature=[0.7, 1.0, 0.0, 1.3, 0.9][i], top_p=[0.9, 1, 1, 0.5, 1][i],
                                              top_k=[0, 10, 0, 0, 3][i], draws=[[0.1, 0.2, 0.3, 0.4, 0.5][i]]))
        assert alone.token_list == [mixed.token_list[i]]


def test_draws_follow_the_distribution_and_its_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    probs = torch.softmax(logits / 0.8, -1)[0]
    n = 4000
    counts = torch.zeros(6)
    for i in range(n):
        counts[sample(logits, batch(1, temperature=0.8, draws=[uniform(99, i)])).token_list[0]] += 1
    assert ((counts / n - probs).abs() < 0.03).all()
    topk = {sample(logits, batch(1, top_k=2, draws=[uniform(5, i)])).token_list[0] for i in range(300)}
    assert topk == {0, 1}
    # top_p 0.7: tokens 0 (0.53) and 1 (0.20) reach 0.73; token 2 never drawn
    topp = {sample(logits, batch(1, top_p=0.7, draws=[uniform(6, i)])).token_list[0] for i in range(300)}
    assert topp == {0, 1}


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(3)
    logits = torch.randn(2, 60)
    history = torch.tensor([[1, 5, 9, 5, 30], [2, 2, 40, 41, 59]])
    seen = torch.zeros(2, 60, dtype=torch.bool).scatter_(1, history, True)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(history, logits.clone()).argmax(-1)
    out = sample(logits, batch(2, temperature=0.0, penalty=1.7, seen=seen))
    assert out.token_list == expected.tolist()
    assert math.isclose(sampler.GREEDY_BELOW, 1e-5)
