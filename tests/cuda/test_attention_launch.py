"""Launch planning of the paged decode attention kernels, and PagedDecode's per-step plans
(test_launch.py checks the signatures and constants against the .cu)."""
from __future__ import annotations

import ctypes

import pytest
import torch

from multilora.cuda import attention_launch as A
from multilora.cuda.paged_decode import PagedDecode


def _shape(**kw) -> A.DecodeShape:
    base = dict(dtype="bf16", num_rows=32, num_heads=32, kv_heads=8, head_dim=128, block_size=16,
                window=0, scale=128 ** -0.5, max_context=4096)
    return A.DecodeShape(**{**base, **kw})


ADDRESSES = dict(q=0x1000, ldq=4096, k_cache=0x2000, v_cache=0x3000, block_tables=0x4000, ld_table=256,
                 ctx_lens=0x5000, out=0x6000, ldo=4096, part_out=0x7000, part_ml=0x8000)


def test_split_examples():
    # Llama-3-8B: 32 rows x 8 KV heads = 256 blocks; 132 SMs want 528: three splits of a 4k context
    assert A.split_context(_shape(), 132) == (3, 1366)
    assert A.split_context(_shape(num_rows=64), 132) == (2, 2048)
    assert A.split_context(_shape(num_rows=1), 132) == (16, 256)  # capped: no split under 256 keys
    assert A.split_context(_shape(max_context=300), 132) == (1, 300)
    assert A.split_context(_shape(num_rows=1, window=512), 132) == (2, 256)  # the window bounds the keys


@pytest.mark.parametrize("rows", [1, 7, 64, 256])
@pytest.mark.parametrize("context", [1, 255, 256, 1000, 4096, 32768])
@pytest.mark.parametrize("window", [0, 100, 4096])
def test_splits_cover_the_visible_keys_without_empty_or_tiny_splits(rows, context, window):
    shape = _shape(num_rows=rows, max_context=context, window=window)
    splits, split_len = A.split_context(shape, 132)
    assert splits * split_len >= shape.visible > (splits - 1) * split_len
    assert splits == 1 or split_len >= A.MIN_SPLIT_KEYS
    blocks = rows * 8 * splits
    assert blocks >= 4 * 132 or splits == 1 or splits == shape.visible // A.MIN_SPLIT_KEYS


def test_plan_one_split_writes_out_directly():
    (decode,) = A.plan_decode(_shape(), 1, 4096, **{**ADDRESSES, "part_out": 0, "part_ml": 0})
    assert decode.kernel == "paged_decode_bf16" and decode.grid == (32, 8, 1) and decode.block == (128, 1, 1)
    values, types = decode.params
    names = [n for n, _ in A.SIGNATURES["paged_decode"]]
    assert values[names.index("scale")] == pytest.approx(128 ** -0.5) and types[names.index("scale")] is ctypes.c_float
    assert values[names.index("split_len")] == 4096 and values[names.index("part_out")] == 0


def test_plan_splits_add_the_merge():
    decode, reduce = A.plan_decode(_shape(dtype="f16", num_heads=56, kv_heads=8), 3, 1366, **ADDRESSES)
    assert decode.grid == (32, 16, 3)  # groups of 7 query heads: two tiles of <= 4 per KV head
    assert reduce.kernel == "paged_reduce_f16" and reduce.grid == (32, 56, 1)
    assert reduce.params[0] == (0x7000, 0x8000, 3, 56, 128, 0x6000, 4096)


def test_plan_refuses_what_the_kernel_cannot_do():
    with pytest.raises(ValueError, match="partial buffers"):
        A.plan_decode(_shape(), 2, 2048, **{**ADDRESSES, "part_out": 0})
    with pytest.raises(ValueError, match="head_dim 512"):
        A.plan_decode(_shape(head_dim=512), 1, 4096, **ADDRESSES)
    with pytest.raises(ValueError, match="not a multiple of 5 KV heads"):
        A.plan_decode(_shape(kv_heads=5), 1, 4096, **ADDRESSES)
    with pytest.raises(ValueError, match="dtype 'f64'"):
        A.plan_decode(_shape(dtype="f64"), 1, 4096, **ADDRESSES)


def test_a_later_layer_changes_only_the_layer_addresses():
    step = _step()
    q, out = torch.zeros(4, 8, 64, dtype=torch.float16), torch.zeros(4, 8, 64, dtype=torch.float16)
    caches = [torch.zeros(640, 2, 64, dtype=torch.float16) for _ in range(4)]
    planned = [(launch.grid, launch.block, launch.params) for launch in step.launches(q, *caches[:2], out, 0.125, None)]
    q2, out2 = q.clone(), out.clone()
    layer = {"q": q2.data_ptr(), "k_cache": caches[2].data_ptr(), "v_cache": caches[3].data_ptr(),
             "out": out2.data_ptr()}
    for (grid, block, (values, types)), after in zip(planned, step.launches(q2, *caches[2:], out2, 0.125, None)):
        names = [n for n, _ in A.SIGNATURES[A.family_of(after.kernel)]]
        for name, old, new in zip(names, values, after.params[0]):
            assert new == layer.get(name, old), name
        assert (after.grid, after.block, after.params[1]) == (grid, block, types)


def test_scratch_sizes():
    assert A.scratch_floats(_shape(), 1) == (0, 0)
    assert A.scratch_floats(_shape(), 3) == (32 * 32 * 3 * 128, 32 * 32 * 3 * 2)


def _step(rows=4, max_context=600, sm_count=132) -> PagedDecode:
    tables = torch.zeros(rows, 40, dtype=torch.int64)
    return PagedDecode.build(None, tables, torch.full((rows,), max_context), max_context, 16, sm_count=sm_count)


def test_paged_decode_plans_once_per_shape_and_window(monkeypatch):
    """Layers after the first reuse the plan and its scratch; another window gets its own."""
    step = _step()
    q, out = torch.zeros(4, 8, 64, dtype=torch.float16), torch.zeros(4, 8, 64, dtype=torch.float16)
    caches = [torch.zeros(640, 2, 64, dtype=torch.float16) for _ in range(4)]
    calls = []
    monkeypatch.setattr("multilora.cuda.paged_decode.plan_decode",
                        lambda *a, **k: calls.append(a) or A.plan_decode(*a, **k))
    first = [launch.params[0] for launch in step.launches(q, caches[0], caches[1], out, 0.125, None)]
    second = [launch.params[0] for launch in step.launches(q, caches[2], caches[3], out, 0.125, None)]
    assert len(calls) == 1 and len(first) == 2  # 600 keys over 4 x 2 blocks: split, then merged
    assert second[0][2:4] == (caches[2].data_ptr(), caches[3].data_ptr())
    assert second[1][:2] == first[1][:2] and first[1][0] != 0  # the same scratch
    step.launches(q, caches[0], caches[1], out, 0.125, 256)
    assert len(calls) == 2 and len(step._plans) == 2


def test_supports_refuses_layouts_the_kernel_cannot_read():
    step = _step()

    def zeros(*shape, dtype=torch.bfloat16):
        return torch.zeros(*shape, dtype=dtype)

    q, cache = zeros(4, 8, 64), zeros(64, 2, 64)
    assert step.supports(q, cache, cache)
    assert not step.supports(q.float(), cache, cache)  # dtypes differ
    assert not step.supports(q.double(), cache.double(), cache.double())
    assert not step.supports(q.transpose(0, 1).contiguous().transpose(0, 1), cache, cache)  # heads strided
    assert not step.supports(q, cache[::2], cache[::2])  # cache not dense
    assert not step.supports(zeros(4, 6, 64), zeros(64, 4, 64), zeros(64, 4, 64))  # 6 heads over 4 KV heads
    assert not step.supports(zeros(4, 2, 512), zeros(8, 1, 512), zeros(8, 1, 512))  # head_dim over 256
