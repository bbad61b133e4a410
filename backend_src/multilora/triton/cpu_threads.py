"""How many CPU threads torch may use in the served engine: all cores but one.

Behind tritonserver the engine shares the machine with the serving path itself: the stub's sender
and IPC threads, tritonserver's backend and gRPC threads, and often the clients. With every core
in torch's OpenMP team, each of those wake-ups takes a core from the team in the middle of a
matmul, and the team also pays a futex sleep and wake at almost every parallel region (libgomp
counts the stub's idle first team and so barely spins; see docs/design.md, "The served path").
Leaving one core to the serving path measured faster on 2 cores (1 thread: 124-132 tokens/s served,
2 threads: 110-111, the same run otherwise). OMP_NUM_THREADS, when set, is the operator's choice
and wins.
"""
from __future__ import annotations

import os

import torch


def serving_threads(cores: int) -> int:
    """Threads for torch when `cores` are available to the server."""
    return max(1, cores - 1)


def limit_torch_threads() -> int:
    """Apply `serving_threads` to torch (unless OMP_NUM_THREADS is set); returns torch's count."""
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(serving_threads(len(os.sched_getaffinity(0))))
    return torch.get_num_threads()
