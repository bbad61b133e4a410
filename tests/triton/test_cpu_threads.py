"""The served engine's torch threads: the model loads on one thread, the loop thread takes the
cores (or OMP_NUM_THREADS), so only the loop thread ever has an OpenMP team."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from multilora.triton.cpu_threads import engine_threads

# What model.py does (start_served_engine), in a fresh interpreter (torch's thread counts are per
# process and thread), then the count each thread sees (the loop thread's from an output callback,
# which it runs).
SERVED = """
import json, sys, threading
import torch
from multilora.config import EngineConfig
from multilora.triton.cpu_threads import start_served_engine
from engine_kit import req
demo = sys.argv[1]
engine, threads = start_served_engine(EngineConfig(base_model=demo + "/base", adapter_dir=demo + "/adapters",
                                                   kv_cache_memory="16MiB"))
seen = []
done = threading.Event()
engine.add_request(req("r", max_tokens=2),
                   lambda out: seen.append(torch.get_num_threads()) or (out.finished and done.set()))
done.wait(60)
engine.shutdown()
print(json.dumps({"main": torch.get_num_threads(), "loop": seen[-1], "planned": threads}))
"""


def served_threads(demo_dir, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    support = os.path.join(os.path.dirname(os.path.dirname(__file__)), "support")
    out = subprocess.run([sys.executable, "-c", SERVED, str(demo_dir)], env=clean | env | {"PYTHONPATH": support},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_engine_threads_are_the_cores_unless_omp_num_threads_says(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert engine_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert engine_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
    assert engine_threads() == len(os.sched_getaffinity(0))


def test_the_main_thread_stays_serial_and_the_loop_thread_takes_the_cores(demo_dir):
    cores = len(os.sched_getaffinity(0))
    assert served_threads(demo_dir) == {"main": 1, "loop": cores, "planned": cores}
    assert served_threads(demo_dir, OMP_NUM_THREADS="3") == {"main": 1, "loop": 3, "planned": 3}
