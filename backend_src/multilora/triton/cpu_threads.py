"""Which threads run torch's CPU work in the served engine: the loop thread, with all cores.

Behind tritonserver the stub's main thread runs `initialize` (the model load) and `execute`, and
the engine's loop thread runs the steps. libgomp gives every thread that starts a parallel region
a team of its own, and once the process's OpenMP threads outnumber the cores, every barrier of
every team stops spinning and sleeps on a futex. A load on the main thread with all cores leaves
an idle team there, so the loop thread's team then paid a futex sleep and wake at almost every
matmul: with 2 cores the served engine ran slower with 2 threads than with 1 (110 vs 124-132
tokens/s). So the main thread loads the model with one torch thread (it never starts a team) and
the loop thread takes every core before its first step: 205 tokens/s served on the same run
(docs/design.md, "The served path"). OMP_NUM_THREADS, when set, is the operator's choice and wins.
"""
from __future__ import annotations

import os

import torch

from ..config import EngineConfig
from ..engine.llm_engine import LLMEngine


def engine_threads() -> int:
    """Torch threads for the engine's loop thread: OMP_NUM_THREADS, or every core we may use."""
    configured = os.environ.get("OMP_NUM_THREADS", "").strip()
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return len(os.sched_getaffinity(0))


def start_served_engine(config: EngineConfig, **engine_args) -> tuple[LLMEngine, int]:
    """Build the engine on this thread with one torch thread (so this thread never starts an
    OpenMP team) and start its loop thread with `engine_threads()`; returns it and that count."""
    threads = engine_threads()
    torch.set_num_threads(1)
    engine = LLMEngine(config, **engine_args)
    engine.start(torch_threads=threads)
    return engine, threads
