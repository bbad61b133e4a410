"""The served engine's torch threads: all cores but one, unless OMP_NUM_THREADS says otherwise."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from multilora.triton.cpu_threads import serving_threads


@pytest.mark.parametrize("cores, threads", [(1, 1), (2, 1), (4, 3), (64, 63)])
def test_one_core_is_left_to_the_serving_path(cores, threads):
    assert serving_threads(cores) == threads


def torch_threads_after_limit(**env: str) -> int:
    """limit_torch_threads in a fresh interpreter (torch's thread count is per process)."""
    code = "from multilora.triton.cpu_threads import limit_torch_threads; print(limit_torch_threads())"
    clean = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], env=clean | env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def test_torch_gets_all_cores_but_one_and_omp_num_threads_wins():
    cores = len(os.sched_getaffinity(0))
    assert torch_threads_after_limit() == serving_threads(cores)
    assert torch_threads_after_limit(OMP_NUM_THREADS=str(cores)) == cores
