"""The CUDA kernels on a real GPU against apply_lora's CPU path (skipped without CUDA).

Weights and activations are rounded to the kernel's dtype first and the CPU op runs in fp32 on
the same values, so the tolerance only covers summation order and the final rounding of y.
"""
from __future__ import annotations

import threading

import pytest
import torch

from multilora.kernels.loader import load_lora_kernels
from multilora.lora.ops import LoraBatch, LoraWeightTable, apply_lora

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _pair(lora_ref, gen, dtype, h_in, h_out, ranks):
    """(cpu fp32 table, gpu table in dtype) holding the same (dtype-rounded) weights."""
    cpu = lora_ref.random_table(gen, h_in, h_out, ranks, dtype)
    gpu = LoraWeightTable(h_in, h_out, len(ranks))
    for s in range(len(ranks)):
        if cpu.a[s] is not None:
            gpu.set_slot(s, cpu.a[s].cuda(), cpu.b[s].cuda())
            cpu.set_slot(s, cpu.a[s].float(), cpu.b[s].float())
    return cpu, gpu


def _compare(lora_ref, gen, dtype, num_tokens, h_in, h_out, ranks, run_len, slots=None):
    cpu_t, gpu_t = _pair(lora_ref, gen, dtype, h_in, h_out, ranks)
    slots = slots or lora_ref.random_slots(gen, num_tokens, len(ranks), run_len)
    x = torch.randn(len(slots), h_in, generator=gen).to(dtype)
    full, y = lora_ref.fused_output(gen, len(slots), h_out, dtype)
    y_cpu = y.float().clone()
    apply_lora(y_cpu, x.float(), cpu_t, LoraBatch.from_token_slots(slots))
    full_gpu = full.cuda()
    y_gpu = full_gpu[:, 5:5 + h_out]
    kernels = load_lora_kernels(torch.device("cuda"), "on")
    apply_lora(y_gpu, x.cuda(), gpu_t, LoraBatch.from_token_slots(slots, "cuda", kernels=kernels))
    torch.cuda.synchronize()
    assert gpu_t.cuda_pointers is not None, "the kernels were not used"
    scale = y_cpu.abs().max().item() + 1.0
    torch.testing.assert_close(y_gpu.float().cpu(), y_cpu, rtol=TOL[dtype], atol=TOL[dtype] * scale)
    for t, s in enumerate(slots):
        if s < 0 or ranks[s] is None:
            assert torch.equal(y_gpu[t].cpu(), y[t]), f"token {t} has no adapter but changed"
    assert torch.equal(full_gpu[:, :5].cpu(), full[:, :5])
    assert torch.equal(full_gpu[:, 5 + h_out:].cpu(), full[:, 5 + h_out:])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("run_len", [1, 12], ids=["decode", "prefill"])
@pytest.mark.parametrize("seed", range(4))
def test_kernels_match_cpu_op(lora_ref, dtype, run_len, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    h_in, h_out = (int(torch.randint(16, 5000, (1,), generator=gen)) for _ in range(2))
    ranks = [None if torch.rand(1, generator=gen) < 0.15 else int(torch.randint(4, 129, (1,), generator=gen))
             for _ in range(int(torch.randint(1, 9, (1,), generator=gen)))]
    num_tokens = int(torch.randint(1, 300, (1,), generator=gen))
    _compare(lora_ref, gen, dtype, num_tokens, h_in, h_out, ranks, run_len)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_llama_shapes_with_split_k(lora_ref, dtype):
    gen = torch.Generator().manual_seed(7)
    slots = [0, 1, 2, 3, -1, 1]  # decode: one token per adapter, split-k over h_in=14336
    _compare(lora_ref, gen, dtype, 6, 14336, 4096, [8, 16, 64, 128], 1, slots=slots)


def test_worker_thread_and_side_stream(lora_ref):
    """A thread with no current context, launching on a non-default stream."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.cuda.stream(torch.cuda.Stream()):
                _compare(lora_ref, torch.Generator().manual_seed(9), torch.float16, 40, 512, 768,
                         [16, 32], 6)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors, errors
