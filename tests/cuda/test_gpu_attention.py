"""The paged decode attention kernels on a real GPU (skipped without CUDA): against the float64
definition, and against the PyTorch path they replace (gather the blocks, then SDPA).

Inputs are rounded to the kernel's dtype first and the reference computes from those values, so
the tolerance covers fp32 accumulation and the output's rounding. `make gpu-check` runs the tests
named `sanitizer_*` under compute-sanitizer (memcheck, racecheck).
"""
from __future__ import annotations

import pytest
import torch

from multilora.cuda.module import load_cuda_kernels
from multilora.cuda.paged_decode import PagedDecode
from multilora.models.attention import AttentionMetadata, _decode, visible

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _kernel(attention_ref, gen, ctx_lens, heads, kv_heads, head_dim, block_size, dtype, window):
    case = attention_ref.case(gen, ctx_lens, heads, kv_heads, head_dim, block_size, dtype, device="cuda")
    kernels = load_cuda_kernels(torch.device("cuda"), "on")
    step = PagedDecode.build(kernels, case.tables, case.ctx_lens, max(ctx_lens), block_size)
    assert step.supports(case.q, case.k_cache, case.v_cache)
    out = torch.full_like(case.q, float("nan"))
    scale = head_dim ** -0.5
    step.run(case.q, case.k_cache, case.v_cache, out, scale, window)
    torch.cuda.synchronize()
    return case, out, scale, step


def _compare(attention_ref, gen, ctx_lens, heads, kv_heads, head_dim, block_size=16, dtype=torch.bfloat16,
             window=None):
    case, out, scale, _ = _kernel(attention_ref, gen, ctx_lens, heads, kv_heads, head_dim, block_size, dtype, window)
    expected = attention_ref.naive(case, scale, window)
    torch.testing.assert_close(out.double().cpu(), expected, rtol=TOL[dtype], atol=TOL[dtype])


def _sdpa_path(case, scale: float, window) -> torch.Tensor:
    """attention._decode, the PyTorch path, on the same cache (its NaN slots masked out there)."""
    width = case.tables.shape[1] * case.block_size
    query = (case.ctx_lens - 1)[:, None]
    keys = torch.arange(width, device="cuda")[None, :]
    meta = AttentionMetadata(cache_index=torch.empty(0, dtype=torch.int64, device="cuda"),
                             decode_tokens=torch.arange(len(case.ctx_lens), device="cuda"),
                             decode_blocks=case.tables.reshape(-1),
                             decode_masks={window: visible(query, keys, window)[:, None, None, :]},
                             block_size=case.block_size, prefill_rows=[])
    k_cache, v_cache = (c.nan_to_num(0.0) for c in (case.k_cache, case.v_cache))  # a masked NaN still poisons SDPA
    return _decode(case.q, k_cache, v_cache, meta, scale, window)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", range(3))
def test_random_shapes_match_reference(attention_ref, dtype, seed):
    gen = torch.Generator().manual_seed(200 + seed)
    kv_heads = int(torch.randint(1, 5, (1,), generator=gen))
    group = [1, 2, 4, 7, 8][int(torch.randint(0, 5, (1,), generator=gen))]
    head_dim = [64, 80, 96, 128, 256][int(torch.randint(0, 5, (1,), generator=gen))]
    rows = int(torch.randint(1, 24, (1,), generator=gen))
    ctx_lens = torch.randint(1, 2500, (rows,), generator=gen).tolist()
    window = [None, 100, 1024][seed]
    _compare(attention_ref, gen, ctx_lens, group * kv_heads, kv_heads, head_dim,
             block_size=[16, 32, 16][seed], dtype=dtype, window=window)


@pytest.mark.parametrize("rows, context", [(32, 1024), (64, 4096), (1, 4096)])
def test_llama3_shapes_match_the_sdpa_path(attention_ref, rows, context):
    """Llama-3-8B decode (32 heads, 8 KV heads, d 128, bf16), as the engine runs it: split and not."""
    gen = torch.Generator().manual_seed(300 + rows)
    ctx_lens = [context - i for i in range(rows)]
    case, out, scale, step = _kernel(attention_ref, gen, ctx_lens, 32, 8, 128, 16, torch.bfloat16, None)
    reference = _sdpa_path(case, scale, None)
    torch.testing.assert_close(out.float(), reference.float(), rtol=1.6e-2, atol=1.6e-2)
    assert len(step._plans) == 1


def test_sanitizer_mixed_rows_and_window(attention_ref):
    """Small but every path: group tiles, splits with empty splits, a window, element loads."""
    gen = torch.Generator().manual_seed(400)
    _compare(attention_ref, gen, [1, 600, 1300, 17], 14, 2, 128, window=700)
    _compare(attention_ref, gen, [3, 700], 4, 2, 36, dtype=torch.float16)
    _compare(attention_ref, gen, [900, 5, 260], 8, 8, 256, block_size=32, dtype=torch.float32)


def test_sanitizer_llama3_split(attention_ref):
    gen = torch.Generator().manual_seed(401)
    _compare(attention_ref, gen, [2048, 1500, 1], 32, 8, 128)
