"""The paged decode attention kernels, run on the CPU emulation, against the float64 definition.

Goes through the real CUDA path (PagedDecode: shape, context splits, grid/block, cuda.bindings
packing) on CPU tensors, so every index and stride the GPU would use is checked here; slots a
row must not read hold NaN (conftest.paged_case). tests/cuda/test_gpu_attention.py repeats
the comparison on a GPU, against SDPA too.
"""
from __future__ import annotations

import pytest
import torch

from engine_kit import Recorder, make_engine, req
from multilora.cuda import attention_launch
from multilora.cuda.driver import DTYPE_NAMES
from multilora.cuda.paged_decode import PagedDecode

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _run(emulator, attention_ref, gen, *, ctx_lens, heads, kv_heads, head_dim, block_size=16,
         dtype=torch.bfloat16, window=None, sm_count=1, unaligned_q=False):
    case = attention_ref.case(gen, ctx_lens, heads, kv_heads, head_dim, block_size, dtype)
    if unaligned_q:  # rows one element past a 16-byte boundary, row stride H * d + 1
        wide = torch.zeros(len(ctx_lens), heads * head_dim + 1, dtype=dtype)
        case.q = wide[:, 1:].view(len(ctx_lens), heads, head_dim).copy_(case.q)
        assert case.q.data_ptr() % 16 and case.q.stride(0) == heads * head_dim + 1
    scale = head_dim ** -0.5
    expected = attention_ref.naive(case, scale, window)
    out = torch.full_like(case.q, float("nan"))
    step = PagedDecode.build(None, case.tables, case.ctx_lens, max(ctx_lens), block_size, sm_count=sm_count)
    launches = step.launches(case.q, case.k_cache, case.v_cache, out, scale, window)
    emulator(launches)
    err = (out.double() - expected).abs().max().item()
    assert err <= TOL[dtype] * 4, f"max error {err} for contexts {ctx_lens}, window {window}"
    return launches


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gqa_mixed_lengths(emulator, attention_ref, dtype):
    gen = torch.Generator().manual_seed(1)
    launches = _run(emulator, attention_ref, gen, ctx_lens=[1, 17, 40, 16], heads=8, kv_heads=2,
                    head_dim=128, dtype=dtype)
    assert [launch.kernel for launch in launches] == [f"paged_decode_{DTYPE_NAMES[dtype]}"]
    assert launches[0].grid == (4, 2, 1)  # rows, KV heads x one tile of 4 query heads, one split


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (8, 4), (14, 2), (16, 2)],
                         ids=["mha", "group2", "group7", "group8"])
def test_gqa_ratios(emulator, attention_ref, heads, kv_heads):
    # groups of 7 and 8 take two blocks per KV head (4 + 3 and 4 + 4 query heads)
    gen = torch.Generator().manual_seed(2)
    launches = _run(emulator, attention_ref, gen, ctx_lens=[5, 33], heads=heads, kv_heads=kv_heads,
                    head_dim=64)
    assert launches[0].grid[1] == kv_heads * -(-(heads // kv_heads) // 4)


@pytest.mark.parametrize("head_dim, dtype", [(64, torch.bfloat16), (80, torch.float16), (256, torch.bfloat16),
                                             (256, torch.float32), (36, torch.float16), (20, torch.float32)])
def test_head_dims(emulator, attention_ref, head_dim, dtype):
    # 80: 10 chunks of 8 on 16 lanes; 256 fp32: two chunks per lane; 36 and 20 are not whole
    # 16-byte chunks, so the element loads run
    gen = torch.Generator().manual_seed(3)
    _run(emulator, attention_ref, gen, ctx_lens=[9, 30], heads=4, kv_heads=2, head_dim=head_dim, dtype=dtype)


@pytest.mark.parametrize("block_size", [1, 5, 16, 32])
def test_block_sizes(emulator, attention_ref, block_size):
    gen = torch.Generator().manual_seed(4)
    _run(emulator, attention_ref, gen, ctx_lens=[1, 31, 32, 70], heads=4, kv_heads=1, head_dim=64,
         block_size=block_size)


@pytest.mark.parametrize("window", [1, 8, 64])
def test_sliding_window(emulator, attention_ref, window):
    # rows shorter than, equal to and longer than the window (64 covers them all)
    gen = torch.Generator().manual_seed(5)
    _run(emulator, attention_ref, gen, ctx_lens=[1, 8, 9, 50], heads=8, kv_heads=2, head_dim=64,
         window=window)


def test_unaligned_q_takes_the_element_path(emulator, attention_ref):
    gen = torch.Generator().manual_seed(6)
    _run(emulator, attention_ref, gen, ctx_lens=[3, 20], heads=4, kv_heads=2, head_dim=64,
         dtype=torch.float16, unaligned_q=True)


@pytest.mark.parametrize("window", [None, 20])
def test_split_contexts_with_short_rows(emulator, attention_ref, monkeypatch, window):
    """Split-k with the merge kernel: splits of 9 (or 10 in the window) keys over rows of 1 to 45
    keys, so some rows have empty splits (nothing visible: max -inf, sum 0) the merge must ignore."""
    monkeypatch.setattr(attention_launch, "MIN_SPLIT_KEYS", 8)
    gen = torch.Generator().manual_seed(7)
    launches = _run(emulator, attention_ref, gen, ctx_lens=[45, 1, 13, 24], heads=4, kv_heads=2,
                    head_dim=64, dtype=torch.float32, window=window, sm_count=64)
    assert [launch.kernel for launch in launches] == ["paged_decode_f32", "paged_reduce_f32"]
    splits = launches[0].grid[2]
    assert splits == (5 if window is None else 2), launches[0].grid
    assert launches[1].grid == (4, 4, 1) and launches[1].params[0][2] == splits


def test_split_bf16_with_group_tiles(emulator, attention_ref, monkeypatch):
    monkeypatch.setattr(attention_launch, "MIN_SPLIT_KEYS", 16)
    gen = torch.Generator().manual_seed(8)
    launches = _run(emulator, attention_ref, gen, ctx_lens=[64, 37], heads=12, kv_heads=2, head_dim=128,
                    block_size=32, sm_count=16)
    assert launches[0].grid == (2, 4, 4) and len(launches) == 2


def test_engine_decodes_through_the_kernel_as_through_sdpa(kernels, demo_dir):
    """The model runner's metadata (block tables, context lengths) drives the kernel in a real
    engine on the CPU: every step's logits match the gather + SDPA path's, over contexts of several
    blocks, with a request arriving mid-batch (steps that mix decode rows and a prefill)."""
    prompts = ["SELECT name FROM orders", "a", "Translate to French: the cat " * 3]
    logits, texts = {}, {}
    for name in ("sdpa", "kernel"):
        engine = make_engine(demo_dir, device="cpu", kv_block_size=4, max_num_seqs=3)
        if name == "kernel":
            engine.runner.kernels = kernels
        logits[name] = _record_logits(engine.runner)
        rec = Recorder(engine)
        for i, prompt in enumerate(prompts[:2]):
            rec.add(req(f"r{i}", max_tokens=6, ignore_eos=True, prompt=prompt))
        rec.run(until=2)
        rec.add(req("late", max_tokens=4, ignore_eos=True, prompt=prompts[2]))
        rec.run()
        texts[name] = {rid: "".join(o.text for o in outs) for rid, outs in rec.outputs.items()}
    assert len(logits["kernel"]) == len(logits["sdpa"]) == 6
    for step, (got, expected) in enumerate(zip(logits["kernel"], logits["sdpa"])):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=f"step {step}")
    assert texts["kernel"] == texts["sdpa"]
    # one launch per layer and step with decode rows: the 5 steps after the first prefill (the
    # late prompt's prefill shares the third step with two decode rows)
    assert kernels.launched["paged_decode_f32"] == 5 * len(engine.model.layers)


def _record_logits(runner) -> list[torch.Tensor]:
    """Every step's logits, as the runner hands them to the sampler."""
    steps = []
    forward = runner.forward

    def recording(scheduled):
        layout, sampling, logits = forward(scheduled)
        steps.append(logits.clone())
        return layout, sampling, logits

    runner.forward = recording
    return steps
