"""The CPU backend against the row-by-row definition, and the CUDA backend's host-side tables.

The CPU op is the reference the GPU kernels are compared with (test_gpu_kernels.py), so it is
pinned here to the plain definition first.
"""
from __future__ import annotations

import pytest
import torch

from lora_kit import apply_lora, whole_table
from multilora.cuda.lora_launch import descriptor
from multilora.lora.backends.cuda import CudaBackend
from multilora.lora.plan import LoraBatch
from multilora.lora.weights import LoraWeightTable, slot_pointers

CPU = torch.device("cpu")


@pytest.mark.parametrize("seed", range(6))
def test_apply_lora_cpu_matches_row_by_row(lora_ref, seed):
    gen = torch.Generator().manual_seed(seed)
    h_in = int(torch.randint(8, 300, (1,), generator=gen))
    h_out = int(torch.randint(8, 300, (1,), generator=gen))
    num_slots = int(torch.randint(1, 7, (1,), generator=gen))
    # ranks 4..128, some slots empty
    ranks = [None if torch.rand(1, generator=gen) < 0.2 else int(torch.randint(4, 129, (1,), generator=gen))
             for _ in range(num_slots)]
    table = lora_ref.random_table(gen, h_in, h_out, ranks)
    num_tokens = int(torch.randint(1, 60, (1,), generator=gen))
    slots = lora_ref.random_slots(gen, num_tokens, num_slots, run_len=1 + seed)
    x = torch.randn(num_tokens, h_in, generator=gen)
    full, y = lora_ref.fused_output(gen, num_tokens, h_out, torch.float32)
    before = full.clone()
    expected = lora_ref.naive(y, x, table, slots)

    apply_lora(y, x, whole_table(table), LoraBatch.from_token_slots(slots))

    assert y.stride(0) == h_out + 13  # really a column slice
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(full[:, :5], before[:, :5]) and torch.equal(full[:, 5 + h_out:], before[:, 5 + h_out:])
    changed = (y != before[:, 5:5 + h_out]).any(dim=1).tolist()
    for t, s in enumerate(slots):
        if s < 0 or ranks[s] is None:
            assert not changed[t], f"token {t} has no adapter but changed"


def test_apply_lora_known_values():
    table = LoraWeightTable(h_in=2, h_out=3, num_slots=2)
    table.set_slot(1, torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, 0.0, -1.0]]))  # rank 1
    x = torch.tensor([[1.0, 1.0], [3.0, -1.0], [5.0, 5.0]])
    y = torch.zeros(3, 3)
    apply_lora(y, x, whole_table(table), LoraBatch.from_token_slots([1, 1, -1]))
    assert y.tolist() == [[3.0, 0.0, -3.0], [1.0, 0.0, -1.0], [0.0, 0.0, 0.0]]


def test_slot_pointers_follow_set_slot(lora_ref):
    gen = torch.Generator().manual_seed(0)
    table = lora_ref.random_table(gen, 16, 24, [4, None, 8])
    ptrs = slot_pointers(table, torch.device("cpu"), torch.float32)
    assert ptrs.ranks == [4, 0, 8] and ptrs.max_rank == 8
    assert ptrs.a_ptrs == [table.a[0].data_ptr(), 0, table.a[2].data_ptr()]
    assert ptrs.b_ptrs == [table.b[0].data_ptr(), 0, table.b[2].data_ptr()]

    backend = CudaBackend(None, max_rank=32, sm_count=1)  # plans only: its descriptors live on the CPU here
    targets = whole_table(table)
    cached = backend.descriptor(targets, CPU, torch.float32)
    assert backend.descriptor(targets, CPU, torch.float32) is cached
    assert cached.tensor.tolist() == descriptor([ptrs.a_ptrs], [ptrs.b_ptrs], [[4, 0, 8]], [(0, 24, 0)])
    address = cached.tensor.data_ptr()
    table.set_slot(1, torch.randn(16, 32).t().contiguous().t(), torch.randn(32, 24))  # A not contiguous
    rebuilt = backend.descriptor(targets, CPU, torch.float32)
    assert rebuilt is not cached, "set_slot must rebuild the descriptor"
    assert rebuilt.tensor.data_ptr() == address, "in place: a captured graph holds its address"
    ptrs = slot_pointers(table, torch.device("cpu"), torch.float32)
    a_ptrs = [ptrs.a_ptrs[0], rebuilt.keep[2].data_ptr(), ptrs.a_ptrs[2]]  # slot 1's A: the descriptor's own copy
    assert rebuilt.tensor.tolist() == descriptor([a_ptrs], [ptrs.b_ptrs], [[4, 32, 8]], [(0, 24, 0)])
    assert torch.equal(rebuilt.keep[2], table.a[1])
    assert ptrs.ranks == [4, 32, 8] and ptrs.max_rank == 32
    kept_a = ptrs.keep[2]  # slot 1's A, copied to dense row-major
    assert kept_a.is_contiguous() and torch.equal(kept_a, table.a[1]) and ptrs.a_ptrs[1] == kept_a.data_ptr()


def test_slot_pointers_refuse_mismatched_weights():
    table = LoraWeightTable(h_in=16, h_out=24, num_slots=1)
    table.set_slot(0, torch.randn(16, 4), torch.randn(5, 24))
    with pytest.raises(ValueError, match="slot 0"):
        slot_pointers(table, torch.device("cpu"), torch.float32)
    table.set_slot(0, torch.randn(16, 4), torch.randn(4, 24))
    with pytest.raises(ValueError, match="float16"):
        slot_pointers(table, torch.device("cpu"), torch.float16)
