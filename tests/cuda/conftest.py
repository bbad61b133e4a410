"""Fixtures for the kernel tests: the CPU emulation of the kernels, naive LoRA and attention references.

The emulation (bench/gpu_check/emulation.py, which the GPU check's dry run uses too) compiles the
package's lora_kernels.cu with g++ against tests/cuda/emu/cuda_emu.h and runs each launch one
block at a time, a thread per CUDA thread. Parameters come packed as the engine packs them for
cuLaunchKernel, so the planning, packing and kernel code are the ones a GPU would run; only the
driver and the hardware are missing.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from bench.gpu_check.emulation import Emulator, build_emulator
from multilora.cuda.launches import Launch
from multilora.lora.plan import LoraBatch
from multilora.lora.weights import LoraWeightTable


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[Launch]], None]:
    """run(launches): execute the launches on the CPU, on CPU tensors' memory."""
    try:
        return Emulator(build_emulator(tmp_path_factory.mktemp("emu")))
    except FileNotFoundError as exc:  # no g++
        pytest.skip(str(exc))


class CountingKernels:
    """Stands in for the loaded CudaKernels: runs each launch on the emulator, and counts the
    contexts made current and the launches by kernel."""

    sm_count = 4

    def __init__(self, emulator: Callable[[list[Launch]], None]) -> None:
        self.emulator, self.current, self.launches, self.launched = emulator, 0, [], Counter()

    def make_current(self) -> None:
        self.current += 1

    def launch(self, launch, stream: int) -> None:
        self.launches.append(launch)
        self.launched[launch.kernel] += 1
        self.emulator([launch])


@pytest.fixture
def kernels(emulator) -> CountingKernels:
    return CountingKernels(emulator)


def random_table(gen: torch.Generator, h_in: int, h_out: int, ranks: list[int | None],
                 dtype: torch.dtype = torch.float32) -> LoraWeightTable:
    """A table with one slot per entry of `ranks` (None = empty slot), weights ~ N(0, 1/fan_in)."""
    table = LoraWeightTable(h_in, h_out, len(ranks))
    for slot, r in enumerate(ranks):
        if r is None:
            continue
        a = torch.randn(h_in, r, generator=gen) / h_in**0.5
        b = torch.randn(r, h_out, generator=gen) / r**0.5
        table.set_slot(slot, a.to(dtype), b.to(dtype))
    return table


def random_slots(gen: torch.Generator, num_tokens: int, num_slots: int,
                 run_len: int = 1) -> list[int]:
    """Per-token slots in runs of ~run_len (as the runner sorts them), with some -1 (no adapter)."""
    slots: list[int] = []
    while len(slots) < num_tokens:
        s = int(torch.randint(-1, num_slots, (1,), generator=gen))
        n = int(torch.randint(1, 2 * run_len, (1,), generator=gen))
        slots += [s] * n
    return slots[:num_tokens]


def naive_lora(y: torch.Tensor, x: torch.Tensor, table: LoraWeightTable,
               slots: list[int]) -> torch.Tensor:
    """y + the LoRA delta, row by row in float64: the definition, with no batching at all."""
    out = y.double().clone()
    for t, slot in enumerate(slots):
        if slot < 0 or table.a[slot] is None:
            continue
        out[t] += (x[t].double() @ table.a[slot].double()) @ table.b[slot].double()
    return out


def fused_output(gen: torch.Generator, num_tokens: int, h_out: int, dtype: torch.dtype,
                 device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(full, y): y is a column slice of a wider `full`, as q/k/v slices of a fused qkv output."""
    full = torch.randn(num_tokens, h_out + 13, generator=gen).to(dtype=dtype, device=device)
    return full, full[:, 5 : 5 + h_out]


def make_batch(slots: list[int], device: str = "cpu") -> LoraBatch:
    return LoraBatch.from_token_slots(slots, device)


@pytest.fixture
def lora_ref() -> SimpleNamespace:
    """The helpers above, for test modules (importlib mode keeps conftest out of their imports)."""
    return SimpleNamespace(random_table=random_table, random_slots=random_slots, naive=naive_lora,
                           fused_output=fused_output, make_batch=make_batch)


@dataclass
class PagedCase:
    """Decode rows over a paged KV cache: q [rows, H, d], caches [blocks * block_size, KVH, d],
    each row's block table (int64, padded) and context length (int64)."""

    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    tables: torch.Tensor
    ctx_lens: torch.Tensor
    block_size: int


def paged_case(gen: torch.Generator, ctx_lens: list[int], heads: int, kv_heads: int, head_dim: int,
               block_size: int, dtype: torch.dtype, device: str = "cpu") -> PagedCase:
    """Random rows whose blocks are scattered through the cache. Every slot no row may read (free
    blocks, the table's padding block, each row's slots past its context) holds NaN, so a kernel
    reading outside a row's context gives NaN instead of a plausible number. The values are drawn
    on `device` (a generator seeded from `gen`): a GPU fills large caches at once."""
    needed = [-(-n // block_size) for n in ctx_lens]
    num_blocks = sum(needed) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    pad_block = order.pop()  # what the padded table entries point at
    tables = torch.full((len(ctx_lens), max(needed)), pad_block, dtype=torch.int64)
    for r, blocks in enumerate(needed):
        tables[r, :blocks] = torch.tensor([order.pop() for _ in range(blocks)])
    draw = torch.Generator(device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    rows = torch.repeat_interleave(torch.arange(len(ctx_lens)), torch.tensor(ctx_lens))
    pos = torch.cat([torch.arange(n) for n in ctx_lens])
    slots = (tables[rows, pos // block_size] * block_size + pos % block_size).to(device)
    shape = (num_blocks * block_size, kv_heads, head_dim)
    caches = []
    for _ in range(2):
        cache = torch.full(shape, float("nan"), dtype=dtype, device=device)
        cache[slots] = torch.randn(len(pos), kv_heads, head_dim, generator=draw, device=device).to(dtype)
        caches.append(cache)
    q = torch.randn(len(ctx_lens), heads, head_dim, generator=draw, device=device).to(dtype)
    return PagedCase(q, *caches, tables.to(device), torch.tensor(ctx_lens, dtype=torch.int64, device=device),
                     block_size)


def naive_paged_decode(case: PagedCase, scale: float, window: int | None) -> torch.Tensor:
    """[rows, H, d] float64 on the CPU, row by row and head by head: the definition, in float64
    from the same (rounded) values the kernel reads."""
    q = case.q.cpu().double()
    rows, heads, d = q.shape
    group = heads // case.k_cache.shape[1]
    tables = case.tables.cpu()
    out = torch.zeros(rows, heads, d, dtype=torch.float64)
    for r, n in enumerate(case.ctx_lens.tolist()):
        pos = torch.arange(max(0, n - window) if window else 0, n)
        slots = (tables[r, pos // case.block_size] * case.block_size + pos % case.block_size).to(case.q.device)
        keys, values = (c[slots].cpu().double() for c in (case.k_cache, case.v_cache))  # [n, KVH, d]
        for h in range(heads):
            weights = torch.softmax(keys[:, h // group] @ q[r, h] * scale, dim=0)
            out[r, h] = weights @ values[:, h // group]
    return out


@pytest.fixture
def attention_ref() -> SimpleNamespace:
    return SimpleNamespace(case=paged_case, naive=naive_paged_decode)
