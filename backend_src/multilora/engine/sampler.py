"""Choosing the next token of every row of a step in one batched call.

Each row keeps its own parameters (temperature, top-k, top-p, repetition penalty, seed). Random
choices use inverse-CDF sampling with one uniform number per row, derived from the row's seed and
its token index by a hash: no generator state, so the same seed gives the same text whatever else
shares the batch, on any device, and nothing per row runs outside the batched tensor ops.

Rows under a grammar (structured output, engine/grammar.py) come with a bitmask of the tokens
they may take: the others get -inf before anything else, so penalty, temperature, top-k and top-p
work within what the grammar allows. Rows without one are not touched, and a step in which no row
has one does no mask work at all.

One row's trouble stays that row's: values are clamped so that no parameter can overflow (a
temperature of 1e-40 or a penalty of 1e-40 ends up greedy, never NaN), rows whose logits are not
finite (or whose grammar allows nothing) are reported as failed, and if the batched call itself
raises, the rows are redone one by one so that only the faulty ones fail.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # temperatures under this are greedy: the distribution is a point already
_MASK64 = (1 << 64) - 1


@dataclass
class SamplingBatch:
    """The sampling inputs of a step's n sampled rows, on the logits' device."""

    temperature: torch.Tensor  # [n] f32; < GREEDY_BELOW: greedy
    top_p: torch.Tensor  # [n] f32 in (0, 1]
    top_k: torch.Tensor  # [n] int64; 0: off
    penalty: torch.Tensor  # [n] f32; 1: off
    uniform: torch.Tensor  # [n] f32 in [0, 1): each row's random draw for this token
    seen: torch.Tensor | None  # [n, V] bool: tokens already in the row (prompt + output), for the penalty
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_penalty: bool
    masked: torch.Tensor | None = None  # [c] int64: the rows under a grammar; None: no row is
    allowed: torch.Tensor | None = None  # [c, ceil(V / 32)] int32: their allowed tokens, bit t % 32 of word t // 32

    def row(self, i: int) -> SamplingBatch:
        """Row i alone (the fallback that isolates a failing row)."""
        pick = slice(i, i + 1)
        masked = allowed = None
        if self.masked is not None and bool((self.masked == i).any()):
            masked, allowed = torch.zeros_like(self.masked[:1]), self.allowed[self.masked == i]
        return SamplingBatch(self.temperature[pick], self.top_p[pick], self.top_k[pick], self.penalty[pick],
                             self.uniform[pick], None if self.seen is None else self.seen[pick],
                             self.all_greedy, self.any_top_k, self.any_top_p, self.any_penalty, masked, allowed)


def uniform(seed: int, index: int) -> float:
    """A number in [0, 1) that depends only on (seed, index): splitmix64 of both, 24 bits kept."""
    return (splitmix64(seed ^ splitmix64(index)) >> 40) / float(1 << 24)


def splitmix64(x: int) -> int:
    """SplitMix64's step: a 64-bit integer to a well-mixed 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass
class Sampled:
    tokens: torch.Tensor  # [n] int64 on the logits' device (-1 where a row failed)
    token_list: list[int]  # the same on the host
    errors: list[str | None]  # per row: None, or why it could not be sampled


def sample(logits: torch.Tensor, batch: SamplingBatch) -> Sampled:
    """Tokens for n rows of fp32 logits [n, V], with one device-to-host transfer. The logits are
    not changed (logprobs are computed from them after sampling)."""
    try:
        tokens, status = _sample(logits, batch)
        tokens = torch.where(status == _OK, tokens, -1)
        out = torch.stack((tokens, status)).tolist()
        return Sampled(tokens, out[0], [_ERRORS[code] for code in out[1]])
    except Exception:  # isolate the faulty rows: redo them one by one
        token_list, errors = [], []
        for i in range(logits.shape[0]):
            try:
                token, status = _sample(logits[i:i + 1], batch.row(i))
                error = _ERRORS[int(status)]
                token_list.append(int(token) if error is None else -1)
                errors.append(error)
            except Exception as exc:
                token_list.append(-1)
                errors.append(f"sampling failed: {type(exc).__name__}: {exc}")
        return Sampled(torch.tensor(token_list, device=logits.device), token_list, errors)


# A row's status: sampled, or why not.
_OK, _NOT_FINITE, _NOTHING_ALLOWED = 0, 1, 2
_ERRORS = {_OK: None,
           _NOT_FINITE: "the model produced non-finite logits for this request (NaN or infinity); it cannot be sampled",
           _NOTHING_ALLOWED: "the request's response_format allows no token here; it cannot be sampled"}


def _sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    status = torch.where(torch.isfinite(logits).all(dim=-1), _OK, _NOT_FINITE)  # [n]
    big = torch.finfo(torch.float32).max
    x = logits
    if batch.masked is not None:
        x, some = _apply_masks(logits, batch.masked, batch.allowed)
        status = status.index_put((batch.masked,), torch.where(some, status[batch.masked], _NOTHING_ALLOWED))
    if batch.any_penalty and batch.seen is not None:
        p = batch.penalty[:, None]
        x = torch.where(batch.seen, torch.where(x > 0, x / p, x * p), x).clamp(-big, big)
    greedy = x.argmax(dim=-1)
    if batch.all_greedy:
        return greedy, status
    temperature = torch.where(batch.temperature < GREEDY_BELOW, 1.0, batch.temperature)
    z = (x / temperature[:, None]).clamp(-big, big)
    if batch.any_top_k or batch.any_top_p:
        z, order = z.sort(dim=-1, descending=True)
        keep = torch.ones_like(z, dtype=torch.bool)
        if batch.any_top_k:
            k = torch.where(batch.top_k > 0, batch.top_k, z.shape[-1])
            keep &= torch.arange(z.shape[-1], device=z.device)[None, :] < k[:, None]
        if batch.any_top_p:
            probs = torch.softmax(z.masked_fill(~keep, float("-inf")), dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            keep &= (probs.cumsum(dim=-1) - probs) < batch.top_p[:, None]
        z = z.masked_fill(~keep, float("-inf"))
    else:
        order = None
    probs = torch.softmax(z, dim=-1)
    cdf = probs.cumsum(dim=-1)
    pick = torch.searchsorted(cdf, (batch.uniform[:, None] * cdf[:, -1:]).contiguous(), right=True)
    pick = pick.clamp(max=z.shape[-1] - 1)
    valid = probs.gather(1, pick).squeeze(1) > 0  # rounding at the very top of the CDF: take the mode
    drawn = pick.squeeze(1) if order is None else order.gather(1, pick).squeeze(1)
    drawn = torch.where(valid, drawn, greedy)
    return torch.where(batch.temperature < GREEDY_BELOW, greedy, drawn), status


def _apply_masks(logits: torch.Tensor, rows: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of `logits` [n, V] where row rows[j] keeps only the tokens set in allowed[j] (the
    others get -inf), and per masked row whether any token is allowed at all [c]."""
    shifts = torch.arange(32, dtype=torch.int32, device=allowed.device)
    bits = (allowed[:, :, None] >> shifts) & 1  # [c, words, 32]: word w's bit b is token 32 w + b
    keep = bits.flatten(1)[:, :logits.shape[-1]].bool()  # [c, V]
    masked = logits[rows].masked_fill(~keep, float("-inf"))
    return logits.index_copy(0, rows, masked), keep.any(dim=-1)
