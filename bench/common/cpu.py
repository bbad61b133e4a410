"""What every CPU benchmark table names, measured in the same run as its figures: the CPU model and
its vector features, the ISA level the fused LoRA op ran, the copy bandwidth, a GEMM's GFLOP/s and
the load average. The project's machines are shared, and the same model name covers machines with
and without AVX-512 and copy bandwidths from 17 to 55 GB/s: a figure without these is not comparable."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from bench.common.bandwidth import host_copy_gbs
from multilora.lora.native import cpu_model

VECTOR_FEATURES = ("avx512f", "avx2", "fma")


def vector_features() -> str:
    """The CPU's vector features the op's ISA levels depend on, as /proc/cpuinfo lists them."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in VECTOR_FEATURES if f in flags) or "none of " + "/".join(VECTOR_FEATURES)


def gemm_gflops(m: int = 512, k: int = 768, n: int = 2048, rounds: int = 5,
                clock: Callable[[], float] = time.perf_counter) -> float:
    """fp32 torch.mm GFLOP/s on [m, k] @ [k, n] at torch's current thread count, best of `rounds`
    (`clock`: time.thread_time with one thread leaves out the time other jobs held the core)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(rounds):
        started = clock()
        torch.mm(a, b, out=out)
        best = min(best, clock() - started)
    return 2 * m * k * n / best / 1e9


@dataclass
class HostFacts:
    cpu: str
    features: str
    threads: int
    isa: str | None  # the fused LoRA op's level in the measured runs; None where it did not run
    copy_gbs: float  # read + write
    gemm_gflops: float
    load: tuple[float, float, float]

    def line(self) -> str:
        isa = f"LoRA op ISA level {self.isa}; " if self.isa else ""
        if onednn := os.environ.get("ONEDNN_MAX_CPU_ISA"):  # what an AVX2-only CPU runs, on this one
            isa += f"oneDNN (the base model's matmuls) limited to {onednn} by ONEDNN_MAX_CPU_ISA; "
        return (f"CPU: {self.cpu} ({os.cpu_count()} cores; {self.features}); {isa}{self.threads} torch threads; "
                f"copy {self.copy_gbs:.1f} GB/s (read + write); fp32 GEMM {self.gemm_gflops:.0f} GFLOP/s "
                f"(512x768x2048); load average {' '.join(f'{x:.1f}' for x in self.load)}")


def host_facts(isa: str | None) -> HostFacts:
    """The facts, measured now at torch's current thread count."""
    return HostFacts(cpu_model(), vector_features(), torch.get_num_threads(), isa, host_copy_gbs(),
                     gemm_gflops(), os.getloadavg())


def quiet_note() -> str:
    """A sentence for a docs section: whether the machine was busy when the figures were taken."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cores / 4:  # other jobs held the cores a quarter of the time at most
        return f"Load average {load:.1f} on {cores} cores at the end: a quiet machine."
    return (f"**Measured on a shared machine** (load average {load:.1f} on {cores} cores at the end): only figures "
            "of the same rounds compare, and the floors need a rerun on a quiet machine.")
