"""The batched sampler: per-row parameters in one call, seeded draws independent of the batch,
and one row's trouble kept to that row."""
from __future__ import annotations

import math

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


def bitmask(allowed_per_row, vocab):
    """xgrammar's packed layout: token t is bit t % 32 of int32 word t // 32."""
    words = torch.zeros(len(allowed_per_row), (vocab + 31) // 32, dtype=torch.int64)
    for row, allowed in enumerate(allowed_per_row):
        for t in allowed:
            words[row, t // 32] |= 1 << (t % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # bit 31 is the sign


def with_masks(b, rows, allowed_per_row, vocab):
    b.masked, b.allowed = torch.tensor(rows), bitmask(allowed_per_row, vocab)
    return b


def test_a_grammar_mask_limits_its_row_and_leaves_free_rows_alone():
    """Rows under a grammar draw only allowed tokens (including bit 31 of a word, the sign bit, and
    tokens past the last full word); a free row in the same batch samples exactly as without them."""
    torch.manual_seed(4)
    vocab = 70
    logits = torch.randn(3, vocab) * 3
    allowed = [[5, 31, 63, 69], [0, 40]]
    draws = [[uniform(11, i), uniform(12, i), uniform(13, i)] for i in range(200)]
    picked = [[], []]
    for d in draws:
        free = sample(logits[1:2], batch(1, temperature=1.0, draws=[d[1]]))
        out = sample(logits, with_masks(batch(3, temperature=1.0, draws=d), [0, 2], allowed, vocab))
        assert out.errors == [None] * 3 and out.token_list[1] == free.token_list[0]
        picked[0].append(out.token_list[0])
        picked[1].append(out.token_list[2])
    assert set(picked[0]) == set(allowed[0]) and set(picked[1]) == set(allowed[1])
    greedy = sample(logits, with_masks(batch(3, temperature=0.0), [0, 2], allowed, vocab))
    assert greedy.token_list == [max(allowed[0], key=lambda t: logits[0, t]), int(logits[1].argmax()),
                                 max(allowed[1], key=lambda t: logits[2, t])]


def test_a_mask_works_with_top_k_top_p_and_the_penalty():
    """The filters act within what the grammar allows: top_k=1 takes the best allowed token."""
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    seen = torch.zeros(1, 6, dtype=torch.bool)
    seen[0, 2] = True  # with the penalty, 2's logit 3.0 becomes 0.3: 3 is then the best allowed
    for params, expected in [(dict(top_k=1), {2}), (dict(top_p=0.5), {2}), (dict(penalty=10.0, top_k=1), {3})]:
        got = {sample(logits, with_masks(batch(1, draws=[uniform(3, i)], seen=seen, **params), [0], [[2, 3, 4]], 6))
               .token_list[0] for i in range(50)}
        assert got == expected, params


def test_a_row_whose_grammar_allows_nothing_fails_alone():
    logits = torch.randn(2, 40)
    out = sample(logits, with_masks(batch(2, temperature=1.0), [1], [[]], 40))
    assert out.errors[0] is None and "response_format allows no token" in out.errors[1] and out.token_list[1] == -1


def test_the_row_by_row_fallback_keeps_each_rows_mask(monkeypatch):
    real = sampler._sample

    def flaky(logits, b):
        if logits.shape[0] > 1:
            raise RuntimeError("boom")
        return real(logits, b)

    monkeypatch.setattr(sampler, "_sample", flaky)
    logits = torch.zeros(3, 40)
    logits[:, 7] = 10.0
    out = sample(logits, with_masks(batch(3, temperature=0.0), [2], [[3]], 40))
    assert out.token_list == [7, 7, 3] and out.errors == [None] * 3
