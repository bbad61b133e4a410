"""Log-probabilities of tokens and their top alternatives, from the logits the sampler used.

What is reported is the model's own distribution: log_softmax of the raw logits, before the
repetition penalty, temperature, top-k and top-p (vLLM's default, its "raw_logprobs"), so a
token's logprob says how likely the model (with the row's adapter) found it, whatever way it was
drawn. Only rows that asked are computed, in one device-to-host transfer per call; a step in which
no row asked runs exactly as without this module.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Prompt positions whose logits are computed at once (bounds the [n, vocab] fp32 block to 64 MiB).
_PROMPT_LOGITS_BYTES = 64 << 20


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token that came there, its logprob, and the k most likely tokens
    (most likely first). A prompt's first token has none: nothing before it predicts it."""

    token_id: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, ks: list[int]) -> list[TokenLogprob]:
    """For rows of fp32 logits [n, V] and the tokens [n] that came after them (on the same device):
    each token's logprob and the ks[i] most likely alternatives of row i."""
    if not ks:
        return []
    logprobs = torch.log_softmax(logits, dim=-1)  # [n, V]
    chosen = logprobs.gather(1, tokens.clamp(min=0)[:, None])  # [n, 1]; a failed row's -1 is never read
    k = min(max(ks), logprobs.shape[-1])
    columns = [chosen]
    if k:
        values, ids = logprobs.topk(k, dim=-1)  # [n, k] each, most likely first
        columns += [values, ids]
    # One transfer: float64 holds the fp32 values and the token ids exactly.
    host = torch.cat([c.double() for c in columns], dim=1).tolist()
    out = []
    for row, token, want in zip(host, tokens.tolist(), ks):
        top = tuple((int(i), v) for v, i in zip(row[1:1 + want], row[1 + k:1 + k + want]))
        out.append(TokenLogprob(int(token), row[0], top))
    return out


def prompt_token_logprobs(lm_head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor,
                          targets: torch.Tensor, k: int, vocab_size: int) -> list[TokenLogprob]:
    """Logprobs of the prompt tokens `targets` [m] given the hidden states [m, H] of the positions
    before each (`lm_head` gives their fp32 logits); the head runs over slices of positions, so a
    long prompt chunk never holds all its [m, V] logits at once."""
    rows = max(1, _PROMPT_LOGITS_BYTES // (4 * vocab_size))
    out: list[TokenLogprob] = []
    for start in range(0, hidden.shape[0], rows):
        part = targets[start:start + rows]
        out += token_logprobs(lm_head(hidden[start:start + rows]), part, [k] * part.shape[0])
    return out
