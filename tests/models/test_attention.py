"""paged_attention's decode rows: the gather + SDPA path against the definition, and the choice
between it and our paged kernel (tests/cuda runs the kernel itself, emulated and on a GPU)."""
from __future__ import annotations

import pytest
import torch

from multilora.cuda.attention_launch import SIGNATURES
from multilora.cuda.paged_decode import PagedDecode
from multilora.models.attention import AttentionMetadata, PrefillRow, paged_attention, visible

BLOCK = 4
HEADS, KV_HEADS, D = 6, 2, 8


class RecordingKernels:
    """Stands in for the loaded kernel module: records the launches instead of running them."""

    sm_count = 8

    def __init__(self) -> None:
        self.launches = []

    def make_current(self) -> None:
        pass

    def launch(self, launch, stream: int) -> None:
        self.launches.append(launch)


def _decode_step(ctx_lens: list[int], dtype: torch.dtype, window, kernels=None):
    """A step of decode rows only, as the model runner lays it out: each row's blocks scattered
    through the cache, its newest token's cache entry in the cache index."""
    gen = torch.Generator().manual_seed(0)
    width = max(-(-n // BLOCK) for n in ctx_lens)
    tables = torch.randperm(len(ctx_lens) * width, generator=gen).view(len(ctx_lens), width)
    lens = torch.tensor(ctx_lens)
    k_cache, v_cache = (torch.randn(tables.numel() * BLOCK, KV_HEADS, D, generator=gen).to(dtype) for _ in range(2))
    newest = lens - 1
    cache_index = tables[torch.arange(len(ctx_lens)), newest // BLOCK] * BLOCK + newest % BLOCK
    keys = torch.arange(width * BLOCK)[None, :]
    meta = AttentionMetadata(cache_index=cache_index, decode_tokens=torch.arange(len(ctx_lens)),
                             decode_blocks=tables.reshape(-1),
                             decode_masks={window: visible(newest[:, None], keys, window)[:, None, None, :]},
                             block_size=BLOCK, prefill_rows=[])
    if kernels is not None:
        meta.paged_decode = PagedDecode.build(kernels, tables, lens, max(ctx_lens), BLOCK)
    q = torch.randn(len(ctx_lens), HEADS, D, generator=gen).to(dtype)
    return q, k_cache, v_cache, meta, tables


def _definition(q, k_cache, v_cache, tables, ctx_lens, window) -> torch.Tensor:
    out = torch.zeros(q.shape, dtype=torch.float64)
    for r, n in enumerate(ctx_lens):
        pos = torch.arange(max(0, n - window) if window else 0, n)
        entries = tables[r, pos // BLOCK] * BLOCK + pos % BLOCK
        keys, values = k_cache[entries].double(), v_cache[entries].double()  # [n, KV_HEADS, D]
        for h in range(HEADS):
            kv = h // (HEADS // KV_HEADS)
            out[r, h] = torch.softmax(keys[:, kv] @ q[r, h].double() / D**0.5, dim=0) @ values[:, kv]
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_sdpa_path_matches_the_definition(window):
    ctx_lens = [1, 7, 13, 4]
    q, k_cache, v_cache, meta, tables = _decode_step(ctx_lens, torch.float32, window)
    new_k, new_v = k_cache[meta.cache_index].clone(), v_cache[meta.cache_index].clone()
    out = paged_attention(q, new_k, new_v, k_cache, v_cache, meta, D**-0.5, window)
    expected = _definition(q, k_cache, v_cache, tables, ctx_lens, window)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_the_kernel_takes_the_decode_rows_in_place():
    kernels = RecordingKernels()
    q, k_cache, v_cache, meta, _ = _decode_step([3, 9], torch.bfloat16, None, kernels)
    out = paged_attention(q, q[:, :KV_HEADS], q[:, :KV_HEADS], k_cache, v_cache, meta, D**-0.5, None)
    (launch,) = kernels.launches
    args = dict(zip([name for name, _ in SIGNATURES["paged_decode"]], launch.params[0]))
    step = meta.paged_decode
    assert (args["q"], args["ldq"], args["out"], args["num_rows"]) == (q.data_ptr(), HEADS * D, out.data_ptr(), 2)
    assert (args["k_cache"], args["v_cache"]) == (k_cache.data_ptr(), v_cache.data_ptr())
    assert (args["block_tables"], args["ld_table"], args["ctx_lens"]) == (
        step.block_tables.data_ptr(), step.block_tables.shape[1], step.ctx_lens.data_ptr())


def test_a_layer_the_kernel_cannot_take_falls_back_to_sdpa():
    kernels = RecordingKernels()
    ctx_lens = [2, 11]
    q, k_cache, v_cache, meta, tables = _decode_step(ctx_lens, torch.float64, None, kernels)
    assert not meta.paged_decode.supports(q, k_cache, v_cache)
    out = paged_attention(q, k_cache[meta.cache_index], v_cache[meta.cache_index], k_cache, v_cache, meta,
                          D**-0.5, None)
    assert kernels.launches == []
    torch.testing.assert_close(out, _definition(q, k_cache, v_cache, tables, ctx_lens, None))


@pytest.mark.parametrize("past", [0, 5], ids=["fresh-prompt", "continued-chunk"])
def test_prefill_rows_reach_sdpa_as_4d_tensors(monkeypatch, past):
    """SDPA's flash and memory-efficient kernels take [B, H, L, d] only (a 3-D call runs the math
    backend, with the whole score matrix): each prefill row is one batch of 1, same result."""
    import multilora.models.attention as attention

    dims = []
    sdpa = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: dims.append((q.dim(), k.dim(), v.dim())) or sdpa(q, k, v, **kw))
    gen = torch.Generator().manual_seed(3)
    n = 6
    k_cache, v_cache = (torch.randn(16 * BLOCK, KV_HEADS, D, generator=gen) for _ in range(2))
    q, k, v = (torch.randn(n, heads, D, generator=gen) for heads in (HEADS, KV_HEADS, KV_HEADS))
    entries = torch.arange(past + n) + 3  # the row's context: the cache entries 3 .. 3 + past + n
    queries, keys = torch.arange(past, past + n)[:, None], torch.arange(past + n)[None, :]
    mask = visible(queries, keys, None) if past else None
    row = PrefillRow(0, n, past, entries if past else None, {None: mask})
    meta = AttentionMetadata(cache_index=entries[past:], decode_tokens=torch.arange(0), decode_blocks=torch.arange(0),
                             decode_masks={}, block_size=BLOCK, prefill_rows=[row])
    out = paged_attention(q, k, v, k_cache, v_cache, meta, D**-0.5, None)
    assert dims == [(4, 4, 4)]
    expected = torch.zeros(n, HEADS, D, dtype=torch.float64)
    keys_all, values_all = k_cache[entries].double(), v_cache[entries].double()  # the new k, v written in
    for i in range(n):
        for h in range(HEADS):
            kv = h // (HEADS // KV_HEADS)
            weights = torch.softmax(keys_all[:past + i + 1, kv] @ q[i, h].double() * D**-0.5, dim=0)
            expected[i, h] = weights @ values_all[:past + i + 1, kv]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
