"""The CUDA kernels, run on the CPU emulation, against the row-by-row LoRA definition.

Goes through the real CUDA path (CudaBackend.launches: the projection's descriptor, segment arrays,
variant, grid/block, the arguments packed as the engine packs them) on CPU tensors, so every index
and stride the GPU would use is checked here; tests/cuda/test_gpu_kernels.py repeats the comparison
on a real GPU.
"""
from __future__ import annotations

import pytest
import torch

from lora_kit import whole_table
from multilora.cuda.launches import PackedLaunch
from multilora.cuda.lora_launch import choose_variant
from multilora.lora.backends.cuda import CudaBackend, step_segments
from multilora.lora.plan import LoraBatch
from multilora.lora.weights import LoraTarget, LoraTargets, LoraWeightTable

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def prepare_launches(y: torch.Tensor, x: torch.Tensor, targets: LoraWeightTable | LoraTargets, batch: LoraBatch,
                     sm_count: int) -> tuple[PackedLaunch, ...]:
    """One call's launches, planned as the engine plans a step (without kernels to launch them). A
    table alone covers all of y's columns."""
    backend = CudaBackend(None, sm_count=sm_count)
    targets = whole_table(targets) if isinstance(targets, LoraWeightTable) else targets
    return backend.launches(backend.plan_step(batch), y, x, targets)


def _run_case(emulator, lora_ref, gen, *, dtype, num_tokens, h_in, h_out, ranks, run_len=1,
              sm_count=1, block=None, slots=None):
    table = lora_ref.random_table(gen, h_in, h_out, ranks, dtype)
    if slots is None:
        slots = lora_ref.random_slots(gen, num_tokens, len(ranks), run_len)
    batch = lora_ref.make_batch(slots)
    x = torch.randn(num_tokens, h_in, generator=gen).to(dtype)
    full, y = lora_ref.fused_output(gen, num_tokens, h_out, dtype)
    before = full.clone()
    expected = lora_ref.naive(y, x, table, slots)
    launches = prepare_launches(y, x, table, batch, sm_count)
    if block is not None:
        for launch in launches:
            launch.block = block
    emulator(launches)
    scale = expected.abs().max().item() + 1.0
    err = (y.double() - expected).abs().max().item()
    assert err <= TOL[dtype] * scale * 4, f"max error {err} (scale {scale}) for slots {slots}"
    # columns outside the slice are untouched
    assert torch.equal(full[:, :5], before[:, :5]) and torch.equal(full[:, 5 + h_out:], before[:, 5 + h_out:])
    # tokens without an adapter are untouched, bit for bit
    for t, s in enumerate(slots):
        if s < 0 or ranks[s] is None:
            assert torch.equal(y[t], before[t, 5:5 + h_out]), f"token {t} (slot {s}) changed"
    return launches, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_token_variant_mixed_ranks(emulator, lora_ref, dtype):
    gen = torch.Generator().manual_seed(1)
    launches, slots = _run_case(emulator, lora_ref, gen, dtype=dtype, num_tokens=9, h_in=600,
                                h_out=200, ranks=[4, None, 16, 7, 32], run_len=1,
                                sm_count=8)
    assert launches[0].kernel.startswith("lora_shrink_token_")
    assert launches[0].grid[1] == 2, "expected split-k over h_in=600 (two blocks per token)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_segment_variant_mixed_ranks(emulator, lora_ref, dtype):
    gen = torch.Generator().manual_seed(2)
    # segments of 19, 9 and 17 tokens span several 8-token tiles; slot 2 is empty, 4 tokens have none
    slots = [0] * 19 + [-1] * 3 + [1] * 9 + [3] * 17 + [2] * 4 + [0] * 2
    launches, _ = _run_case(emulator, lora_ref, gen, dtype=dtype, num_tokens=len(slots), h_in=96,
                            h_out=136, ranks=[8, 64, None, 12], slots=slots)
    assert launches[0].kernel.startswith("lora_shrink_segment_")
    assert launches[1].grid[2] == 3, "expected 3 token-tile strides for the 19-token segment"


def test_rank_above_staging_chunk_and_odd_widths(emulator, lora_ref):
    # rank 130 > LORA_RCHUNK (128): expand stages v in two passes; h_out 67 is not a multiple of
    # the vector width and rank 130 not of 8, so the element-wise load path runs too.
    gen = torch.Generator().manual_seed(3)
    _run_case(emulator, lora_ref, gen, dtype=torch.float16, num_tokens=6, h_in=40, h_out=67,
              ranks=[130, 3], run_len=3)


def test_rank_wider_than_block(emulator, lora_ref):
    # 32 threads x 4 fp32 columns < rank 200: shrink walks A's columns in several passes.
    gen = torch.Generator().manual_seed(4)
    _run_case(emulator, lora_ref, gen, dtype=torch.float32, num_tokens=3, h_in=50, h_out=24,
              ranks=[200], run_len=1, block=(32, 1, 1))


def test_unaligned_weights_take_the_element_path(emulator, lora_ref):
    # A and B views starting one element into their storage: no 16-byte loads allowed.
    gen = torch.Generator().manual_seed(5)
    table = lora_ref.random_table(gen, 32, 48, [16], torch.float16)
    a = torch.zeros(32 * 16 + 1, dtype=torch.float16)[1:].view(32, 16)
    a.copy_(table.a[0])
    b = torch.zeros(16 * 48 + 1, dtype=torch.float16)[1:].view(16, 48)
    b.copy_(table.b[0])
    table.set_slot(0, a, b)
    assert a.data_ptr() % 16 != 0 and b.data_ptr() % 16 != 0
    slots = [0, 0, -1, 0]
    x = torch.randn(4, 32, generator=gen).to(torch.float16)
    y = torch.zeros(4, 48, dtype=torch.float16)
    expected = lora_ref.naive(y, x, table, slots)
    emulator(prepare_launches(y, x, table, lora_ref.make_batch(slots), 1))
    assert (y.double() - expected).abs().max().item() < 2e-2
    assert y[2].abs().max().item() == 0.0


def test_variant_follows_segment_lengths(lora_ref):
    decode = lora_ref.make_batch([0, 1, 2, -1, 3])
    prefill = lora_ref.make_batch([0] * 7 + [1] * 5)
    d, p = step_segments(decode), step_segments(prefill)
    assert choose_variant(d.adapter_tokens, len(d.slots)) == "token"
    assert choose_variant(p.adapter_tokens, len(p.slots)) == "segment"
    assert (p.starts, p.ends, p.slots, p.max_len) == ([0, 7], [7, 12], [0, 1], 7)


def _fused_qkv(gen, lora_ref, dtype, widths, ranks):
    """A fused projection's targets (q, k, v of widths `widths`) at columns 3.. of a wider y, each with
    its own ranks per slot (None: the adapter does not target it)."""
    targets, start = [], 3
    for width, target_ranks in zip(widths, ranks):
        table = lora_ref.random_table(gen, 600, width, target_ranks, dtype)
        targets.append(LoraTarget("t", start, start + width, table))
        start += width
    return LoraTargets(targets), start


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("run_len", [1, 6], ids=["token", "segment"])
@pytest.mark.parametrize("sm_count", [1, 64], ids=["one-split", "split-k"])
def test_all_targets_of_a_projection_in_one_launch_pair(emulator, lora_ref, dtype, run_len, sm_count):
    """q, k and v of different widths and ranks per slot (slot 1 empty everywhere, slot 2 without k):
    one shrink and one expand for all three; each target's columns get its own delta, the columns
    around them stay as they were, bit for bit."""
    gen = torch.Generator().manual_seed(20 + run_len + sm_count)
    targets, end = _fused_qkv(gen, lora_ref, dtype, (96, 32, 40),
                              ([4, None, 16, 7], [8, None, None, 12], [16, None, 3, 5]))
    slots = lora_ref.random_slots(gen, 13, 4, run_len)
    x = torch.randn(len(slots), 600, generator=gen).to(dtype)
    y = torch.randn(len(slots), end + 2, generator=gen).to(dtype)
    before = y.clone()
    launches = prepare_launches(y, x, targets, lora_ref.make_batch(slots), sm_count)
    assert len(launches) == 2 and launches[0].kernel.endswith(f"_{'token' if run_len == 1 else 'segment'}_"
                                                              f"{'f32' if dtype == torch.float32 else 'bf16'}")
    splits = launches[0].grid[1] // 3
    assert (splits > 1) == (sm_count > 1), launches[0].grid
    emulator(launches)
    for target in targets.targets:
        expected = lora_ref.naive(before[:, target.start:target.end], x, target.table, slots)
        scale = expected.abs().max().item() + 1.0
        err = (y[:, target.start:target.end].double() - expected).abs().max().item()
        assert err <= TOL[dtype] * scale * 4, f"target at {target.start}: max error {err}"
    assert torch.equal(y[:, :3], before[:, :3]) and torch.equal(y[:, end:], before[:, end:])


def test_a_projection_call_after_slots_changed_reads_the_new_weights(emulator, lora_ref):
    """The descriptor is rewritten in place when a table changes: same address, new weights."""
    gen = torch.Generator().manual_seed(30)
    targets, end = _fused_qkv(gen, lora_ref, torch.float32, (24, 16), ([8, 4], [8, None]))
    backend = CudaBackend(None, sm_count=4, max_rank=8)
    slots = [0, 1, 1, 0]
    x = torch.randn(4, 600, generator=gen)
    first = backend.descriptor(targets, x.device, x.dtype).tensor.data_ptr()
    fresh = lora_ref.random_table(gen, 600, 16, [None, 8])
    targets.targets[1].table.set_slot(1, fresh.a[1], fresh.b[1])
    y = torch.zeros(4, end)
    emulator(backend.launches(backend.plan_step(lora_ref.make_batch(slots)), y, x, targets))
    assert backend.descriptor(targets, x.device, x.dtype).tensor.data_ptr() == first
    for target in targets.targets:
        expected = lora_ref.naive(torch.zeros(4, target.end - target.start), x, target.table, slots)
        torch.testing.assert_close(y[:, target.start:target.end].double(), expected, atol=1e-5, rtol=1e-5)
