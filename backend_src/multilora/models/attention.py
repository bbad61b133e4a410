"""Attention over a paged KV cache for a step that mixes prefill chunks and decode rows.

The KV cache of a layer is one flat tensor, one entry per token, [num_blocks * block_size, kv_heads, d];
a sequence's tokens live in the blocks of its block table. The step's metadata is built once by the
model runner and used by every layer: where to write the new keys/values, and for each row which
cache blocks hold its context. A layer may have a sliding window (Mistral, Phi-3, some Qwen2
layers): its queries then see only the last `window` positions, as in transformers; the runner
builds one mask per distinct window of the model.

Decode rows on CUDA use our paged kernel when it is loaded (cuda/paged_decode.PagedDecode: it reads
each row's blocks in place); otherwise, and on the CPU, they gather their blocks and run SDPA.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..cuda.paged_decode import PagedDecode

Window = int | None  # attention window of a layer; None: full causal


@dataclass
class PrefillRow:
    """A row computing tokens [start, end) of the step, at positions past .. past + (end - start) - 1."""

    start: int  # first of the row's tokens in the step's flat token axis
    end: int
    past: int  # tokens of the row already in the cache before this step
    ctx_cache_index: torch.Tensor | None  # [past + n] cache entries of the whole context; None when past == 0
    masks: dict[Window, torch.Tensor | None]  # [n, past + n] bool, True = visible; None: plain causal


@dataclass
class AttentionMetadata:
    cache_index: torch.Tensor  # [T] the cache entry each new token writes
    # [Bd] positions in the flat token axis of the one-token rows: the step's first Bd tokens (the
    # runner puts decode rows first; the paged kernel relies on it).
    decode_tokens: torch.Tensor
    # Decode rows read whole blocks (one contiguous copy each, much cheaper than a gather per
    # token): [Bd * Nmax] block ids, each row's blocks padded to Nmax.
    decode_blocks: torch.Tensor
    # [Bd, 1, 1, Nmax * block_size]: bool, True = visible; or additive, 0 / -inf in q's dtype (the runner's)
    decode_masks: dict[Window, torch.Tensor]
    block_size: int
    prefill_rows: list[PrefillRow]
    paged_decode: PagedDecode | None = None  # our CUDA kernel for the decode rows; None: gather + SDPA


def paged_attention(
    q: torch.Tensor,  # [T, H, d]
    k: torch.Tensor,  # [T, KVH, d]
    v: torch.Tensor,  # [T, KVH, d]
    k_cache: torch.Tensor,  # [S, KVH, d]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: Window,
) -> torch.Tensor:
    """Write this step's k/v into the cache, then attend each row to its own context."""
    k_cache.index_copy_(0, meta.cache_index, k)
    v_cache.index_copy_(0, meta.cache_index, v)
    bd = meta.decode_tokens.numel()  # the decode rows are the step's first bd tokens
    kernel = bd and meta.paged_decode is not None and meta.paged_decode.supports(q, k_cache, v_cache)
    if bd == q.shape[0] and not kernel:  # decode rows only: their attention is the whole output
        return _decode(q, k_cache, v_cache, meta, scale, window)
    out = q.new_empty(q.shape)
    if kernel:
        meta.paged_decode.run(q[:bd], k_cache, v_cache, out[:bd], scale, window)
    elif bd:
        out[:bd] = _decode(q[:bd], k_cache, v_cache, meta, scale, window)
    for row in meta.prefill_rows:
        if row.ctx_cache_index is None:  # a fresh prompt: its context is exactly this step's keys and values
            kp, vp = k[row.start:row.end], v[row.start:row.end]
        else:
            kp, vp = k_cache[row.ctx_cache_index], v_cache[row.ctx_cache_index]
        # [1, H, n, d]: SDPA's flash and memory-efficient kernels take 4-D inputs only (a 3-D call
        # runs the math backend, which materialises the whole score matrix).
        qp = q[row.start:row.end].transpose(0, 1)[None]
        op = _sdpa(qp, kp.transpose(0, 1)[None], vp.transpose(0, 1)[None], row.masks[window], scale)
        out[row.start:row.end] = op[0].transpose(0, 1)
    return out


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
            scale: float, window: Window) -> torch.Tensor:
    """One query per row: [Bd, H, d]."""
    bd, heads, d = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    # The query heads sharing a KV head act as `group` query positions of that head: one plain
    # attention over [Bd, KVH], no GQA expansion of the keys.
    qd = q.view(bd, kv_heads, group, d)
    kd = _blocks(k_cache, meta, bd).transpose(1, 2)  # [Bd, KVH, L, d]
    vd = _blocks(v_cache, meta, bd).transpose(1, 2)
    mask = meta.decode_masks[window]
    mask = mask.expand(bd, 1, group, mask.shape[-1])
    return F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale).reshape(bd, heads, d)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          scale: float) -> torch.Tensor:
    """q [1, H, n, d], k/v [1, KVH, L, d]; `mask` None means plain causal over n == L.

    Without a mask, SDPA's fused causal kernels run (flash on CUDA). With a mask (a chunk that
    continues a prompt, or a sliding window) CUDA's fused kernels refuse GQA plus a mask and would
    drop to the math backend with a full fp32 score matrix: there the keys and values are expanded
    to every query head, which the memory-efficient kernel takes.
    """
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if q.is_cuda and k.shape[1] != q.shape[1]:
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def _blocks(cache: torch.Tensor, meta: AttentionMetadata, rows: int) -> torch.Tensor:
    """The decode rows' context blocks, [Bd, Nmax * block_size, KVH, d]."""
    entries, kv_heads, d = cache.shape
    blocks = cache.view(entries // meta.block_size, meta.block_size * kv_heads * d).index_select(0, meta.decode_blocks)
    return blocks.view(rows, -1, kv_heads, d)


def visible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: Window) -> torch.Tensor:
    """Bool [.., q, k]: key at key_pos is visible from query_pos (causal, within the window)."""
    ok = key_pos <= query_pos
    if window is not None:
        ok &= key_pos > query_pos - window
    return ok
