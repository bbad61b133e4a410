"""The CUDA kernels on a real GPU against the row-by-row float64 definition (skipped without CUDA).

Weights and activations are rounded to the kernel's dtype first and the reference sums those
same values in float64, so the tolerance only covers fp32 accumulation and the final rounding of
y. `make gpu-check` runs this file under compute-sanitizer too (the tests named `sanitizer_*`).
"""
from __future__ import annotations

import threading

import pytest
import torch

from lora_kit import whole_table
from multilora.config import EngineConfig
from multilora.cuda.module import load_cuda_kernels
from multilora.lora.backends.cuda import CudaBackend
from multilora.lora.plan import LoraBatch
from multilora.lora.weights import LoraWeightTable

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
MAX_LORA_RANK = EngineConfig(base_model="-").max_lora_rank


def _to_cuda(table: LoraWeightTable, unaligned: bool = False) -> LoraWeightTable:
    """The same weights on the GPU; `unaligned` puts each one element past a 16-byte boundary."""
    gpu = LoraWeightTable(table.h_in, table.h_out, table.num_slots)
    for s in range(table.num_slots):
        if table.a[s] is not None:
            a, b = (_unaligned_copy(w) if unaligned else w.cuda() for w in (table.a[s], table.b[s]))
            gpu.set_slot(s, a, b)
    return gpu


def _unaligned_copy(w: torch.Tensor) -> torch.Tensor:
    out = torch.empty(w.numel() + 1, dtype=w.dtype, device="cuda")[1:].view(w.shape)
    assert out.data_ptr() % 16 != 0
    return out.copy_(w)


def _compare(lora_ref, gen, dtype, h_in, h_out, ranks, slots, unaligned=False):
    table = lora_ref.random_table(gen, h_in, h_out, ranks, dtype)
    x = torch.randn(len(slots), h_in, generator=gen).to(dtype)
    full, y = lora_ref.fused_output(gen, len(slots), h_out, dtype)
    expected = lora_ref.naive(y, x, table, slots)  # float64
    gpu_t = _to_cuda(table, unaligned)
    full_gpu = full.cuda()
    y_gpu = full_gpu[:, 5:5 + h_out]
    backend = CudaBackend(load_cuda_kernels(torch.device("cuda"), "on"))
    targets = whole_table(gpu_t)
    backend.apply(y_gpu, x.cuda(), targets, backend.plan_step(LoraBatch.from_token_slots(slots, "cuda")))
    torch.cuda.synchronize()
    assert backend.projections[targets].tables == (gpu_t,), "the kernels were not used"
    scale = expected.abs().max().item() + 1.0
    torch.testing.assert_close(y_gpu.double().cpu(), expected, rtol=TOL[dtype], atol=TOL[dtype] * scale)
    for t, s in enumerate(slots):
        if s < 0 or ranks[s] is None:
            assert torch.equal(y_gpu[t].cpu(), y[t]), f"token {t} has no adapter but changed"
    assert torch.equal(full_gpu[:, :5].cpu(), full[:, :5])
    assert torch.equal(full_gpu[:, 5 + h_out:].cpu(), full[:, 5 + h_out:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("run_len", [1, 12], ids=["decode", "prefill"])
@pytest.mark.parametrize("seed", range(4))
def test_kernels_match_reference(lora_ref, dtype, run_len, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    h_in, h_out = (int(torch.randint(16, 5000, (1,), generator=gen)) for _ in range(2))
    ranks = [None if torch.rand(1, generator=gen) < 0.15 else int(torch.randint(4, 129, (1,), generator=gen))
             for _ in range(int(torch.randint(1, 9, (1,), generator=gen)))]
    num_tokens = int(torch.randint(1, 300, (1,), generator=gen))
    slots = lora_ref.random_slots(gen, num_tokens, len(ranks), run_len)
    _compare(lora_ref, gen, dtype, h_in, h_out, ranks, slots)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_llama_shapes_with_split_k(lora_ref, dtype):
    gen = torch.Generator().manual_seed(7)
    slots = [0, 1, 2, 3, -1, 1]  # decode: one token per adapter, split-k over h_in=14336
    _compare(lora_ref, gen, dtype, 14336, 4096, [8, 16, 64, 128], slots)


def test_every_rank_up_to_max_lora_rank(lora_ref):
    """One slot per rank 1..max_lora_rank, a decode token and a short segment on each."""
    gen = torch.Generator().manual_seed(11)
    ranks = list(range(1, MAX_LORA_RANK + 1))
    decode = list(range(len(ranks)))
    prefill = [s for s in range(len(ranks)) for _ in range(3)]
    for slots in (decode, prefill):
        _compare(lora_ref, gen, torch.bfloat16, 1024, 1536, ranks, slots)


@pytest.mark.parametrize("run_len", [1, 16], ids=["decode", "prefill"])
def test_sanitizer_gate_up_h_out_14336(lora_ref, run_len):
    """Llama-3-8B's gate/up projection (4096 -> 14336), rank 16, several adapters."""
    gen = torch.Generator().manual_seed(12)
    slots = lora_ref.random_slots(gen, 48, 6, run_len)
    _compare(lora_ref, gen, torch.bfloat16, 4096, 14336, [16] * 6, slots)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sanitizer_unaligned_weights(lora_ref, dtype):
    gen = torch.Generator().manual_seed(13)
    _compare(lora_ref, gen, dtype, 520, 776, [16, 7], [0, 0, -1, 1, 1, 1, 0], unaligned=True)


def test_a_2048_token_segment(lora_ref):
    """A whole prefill chunk on one adapter: 256 token tiles in blockIdx.z."""
    gen = torch.Generator().manual_seed(14)
    _compare(lora_ref, gen, torch.bfloat16, 4096, 4096, [64], [0] * 2048)


def test_sanitizer_mixed_small(lora_ref):
    """Small but every path: both variants' tails, split-k, a slot without adapter."""
    gen = torch.Generator().manual_seed(15)
    _compare(lora_ref, gen, torch.bfloat16, 600, 200, [4, None, 16, 7, 32], [0, 2, 3, -1, 4, 1, 0])
    _compare(lora_ref, gen, torch.float16, 96, 136, [8, 64, None, 12], [0] * 19 + [-1] * 3 + [1] * 9 + [3] * 17)


def test_worker_thread_and_side_stream(lora_ref):
    """A thread with no current context, launching on a non-default stream."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                gen = torch.Generator().manual_seed(9)
                _compare(lora_ref, gen, torch.float16, 512, 768, [16, 32],
                         lora_ref.random_slots(gen, 40, 2, 6))
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors, errors
