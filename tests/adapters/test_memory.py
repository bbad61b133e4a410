"""Adapters' host buffers: large ones on a mapping advised for transparent huge pages (the fused
CPU op streams them every step), small ones from the heap; the weights read back unchanged."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multilora.adapters.memory import HUGE_PAGE_BYTES, host_buffer

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def mapping_of(tensor: torch.Tensor) -> dict[str, str]:
    """The /proc/self/smaps entry whose address range holds the tensor's first byte."""
    address, entry = tensor.data_ptr(), None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(x, 16) for x in head.split("-"))
            entry = {} if start <= address < end else None
        elif entry is not None and ":" in head:
            entry[head.rstrip(":")] = line.split(":", 1)[1].strip()
            if head == "VmFlags:":
                return entry
    raise AssertionError("no mapping holds the buffer")


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(), reason="transparent huge pages are off here")
def test_a_large_buffer_is_its_own_mapping_advised_for_huge_pages():
    numel = 3 * HUGE_PAGE_BYTES // 4
    flat = host_buffer(numel, torch.float32)
    flat.copy_(torch.arange(numel, dtype=torch.float32))
    entry = mapping_of(flat)
    assert "hg" in entry["VmFlags"].split(), entry["VmFlags"]  # madvise(MADV_HUGEPAGE)
    assert entry["THPeligible"] == "1"
    assert torch.equal(flat[-3:], torch.tensor([numel - 3, numel - 2, numel - 1], dtype=torch.float32))


def test_a_small_buffer_comes_from_the_heap():
    flat = host_buffer(1000, torch.bfloat16)
    assert flat.numel() == 1000 and flat.dtype == torch.bfloat16
    assert "hg" not in mapping_of(flat)["VmFlags"].split()
