"""Attention over a paged KV cache for a step that mixes prefill chunks and decode rows.

The KV cache of a layer is one flat tensor of token slots, [num_blocks * block_size, kv_heads, d];
a sequence's tokens live in the blocks of its block table. The step's metadata is built once by the
model runner and used by every layer: where to write the new keys/values, and for each row which
cache slots hold its context.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillRow:
    """A row computing `end - start` new tokens whose context (past + new) has `ctx_len` tokens."""

    start: int  # first of the row's tokens in the step's flat token axis
    end: int
    ctx_slots: torch.Tensor  # [ctx_len] cache slots of the row's whole context, in order
    mask: torch.Tensor  # [end - start, ctx_len] bool, True where attention is allowed (causal)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot written by each new token
    decode_tokens: torch.Tensor  # [Bd] positions in the flat token axis of the one-token rows
    # Decode rows read whole blocks (one contiguous copy each, much cheaper than a gather per
    # token slot): [Bd * Nmax] block ids, each row's blocks padded to Nmax with block 0.
    decode_blocks: torch.Tensor
    decode_mask: torch.Tensor  # [Bd, 1, 1, Nmax * block_size] bool, False past each row's context
    block_size: int
    prefill_rows: list[PrefillRow]


def paged_attention(
    q: torch.Tensor,  # [T, H, d]
    k: torch.Tensor,  # [T, KVH, d]
    v: torch.Tensor,  # [T, KVH, d]
    k_cache: torch.Tensor,  # [S, KVH, d]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's k/v into the cache, then attend each row to its own context."""
    k_cache.index_copy_(0, meta.slot_mapping, k)
    v_cache.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    if meta.decode_tokens.numel():
        bd, heads, d = meta.decode_tokens.numel(), q.shape[1], q.shape[2]
        kv_heads = k_cache.shape[1]
        group = heads // kv_heads
        # The query heads sharing a KV head act as `group` query positions of that head: one
        # plain attention over [Bd, KVH], no GQA expansion of the keys.
        qd = q[meta.decode_tokens].view(bd, kv_heads, group, d)
        kd = _blocks(k_cache, meta).transpose(1, 2)  # [Bd, KVH, L, d]
        vd = _blocks(v_cache, meta).transpose(1, 2)
        mask = meta.decode_mask.expand(bd, 1, group, meta.decode_mask.shape[-1])
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale)
        out[meta.decode_tokens] = od.reshape(bd, heads, d)
    for row in meta.prefill_rows:
        qp = q[row.start:row.end].transpose(0, 1)  # [H, n, d]
        kp = k_cache[row.ctx_slots].transpose(0, 1)  # [KVH, L, d]
        vp = v_cache[row.ctx_slots].transpose(0, 1)
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=row.mask, scale=scale, enable_gqa=True)
        out[row.start:row.end] = op.transpose(0, 1)
    return out


def _blocks(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """The decode rows' context blocks, [Bd, Nmax * block_size, KVH, d]."""
    slots, kv_heads, d = cache.shape
    blocks = cache.view(slots // meta.block_size, meta.block_size * kv_heads * d).index_select(0, meta.decode_blocks)
    return blocks.view(meta.decode_mask.shape[0], -1, kv_heads, d)
