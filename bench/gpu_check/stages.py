"""The GPU check's stages: what each measures, its time limit, and what it needs first.

Each stage runs in its own process under its own limit; the limits add up to the whole run's
(TOTAL_S), so a stage that uses all of its time never takes another's. They are sized for one H200
with a cold start: the environment stage's `import torch` and CUDA initialisation on a fresh
machine, the 4 GB bf16 speed model built on the GPU in seconds (bench/gpu_check/speed_model.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    name: str
    module: str  # bench.gpu_check.<module> holds run_<name>(ctx)
    limit_s: int
    title: str
    measures: str  # what the next run will measure, for docs/gpu.md before a run
    needs: tuple[str, ...] = ("env",)  # see satisfied()
    env: dict[str, str] = field(default_factory=dict)


SANITIZER_BUDGET_S = 60  # per compute-sanitizer run; the four run at once

STAGES = (
    Stage("env", "environment", 75, "environment", needs=(),
          measures="GPU, driver, Python packages (the cuda-bindings version and the driver API names our code "
                   "uses), CUDA tools. With a driver present, CUDA that is not usable fails the run"),
    Stage("kernels", "kernels", 40, "kernel load", env={"CUDA_CACHE_DISABLE": "1"},
          measures="our PTX loaded with the JIT cache off: which PTX, JIT time, every kernel resolved, warnings "
                   "from cuda.bindings; `ptxas -v` registers and spills (a ptxas problem is noted, not fatal)"),
    Stage("correctness", "kernels", 60, "kernel correctness",
          measures="`pytest -m gpu tests/cuda`: the LoRA and paged-attention kernels against a float64 "
                   "reference and the gather + SDPA path"),
    Stage("sanitizers", "sanitizers", SANITIZER_BUDGET_S + 15, "compute-sanitizer",
          measures=f"memcheck and racecheck on the `sanitizer_*` tests of the LoRA and the attention kernels, "
                   f"four runs at once, {SANITIZER_BUDGET_S} s each; kernel errors are counted (not the API errors "
                   "torch and cuda-bindings provoke on purpose), a run out of time is reported as such"),
    Stage("kernel_speed", "kernels", 40, "kernel speed", needs=("env", "kernels"),
          measures="the LoRA kernels on Llama-3-8B decode and prefill shapes in bf16: GB/s against a "
                   "device-to-device copy, time against the PyTorch path"),
    Stage("engine", "engine", 60, "engine on CUDA",
          measures="the engine against transformers + PEFT on the tiny demo: fp32 texts equal, bf16 agreement, "
                   "seeded sampling across batch mixes, the threaded engine"),
    Stage("model", "speed", 45, "8B-shaped model",
          measures="an 8-layer Llama-3-8B-shaped checkpoint (bf16, 4 GB, drawn on the GPU) and 32 rank-16 "
                   "adapters, built once in the work folder"),
    Stage("speed_on", "speed", 55, "engine speed, kernels", needs=("env", "model"),
          measures="tokens/s base-only and with 32 distinct adapters (cuda_kernels=on); one decode step's "
                   "wall vs GPU time"),
    Stage("host", "host", 15, "host time per step",
          measures="host microseconds per decode step of the CUDA path, the driver stubbed "
                   "(bench.kernels.host_overhead: 8 Llama-3-8B-shaped layers, 32 rows, 32 rank-16 adapters): eager "
                   "launches and a CUDA graph replay, next to the GPU-busy time of a decode step"),
    Stage("speed_off", "speed", 35, "engine speed, PyTorch path", needs=("env", "model"),
          measures="tokens/s with 32 distinct adapters on the PyTorch path (cuda_kernels=off)"),
    Stage("attention", "attention", 40, "decode attention", needs=("env", "kernels"),
          measures="decode attention per layer, bf16, Llama-3-8B heads, 32 and 64 rows of 1k-4k tokens: the "
                   "paged kernel against gather + SDPA, GB/s, the largest difference"),
)
TOTAL_S = sum(s.limit_s for s in STAGES)


def satisfied(need: str, results: dict[str, dict], dry: bool) -> str | None:
    """None when `need` is met by the results so far, else why the stage is skipped.

    env: CUDA is usable (a dry run: the stage ran). kernels: the kernels loaded, whatever the ptxas
    report said. Any other stage: it passed."""
    done = results.get(need, {})
    if need == "env":
        if dry:
            return None if done.get("status") == "PASS" else "the environment stage did not pass"
        if done.get("facts", {}).get("cuda_usable"):
            return None
        return "no usable CUDA: " + done.get("summary", "the environment stage did not run")
    if need == "kernels":
        return None if done.get("facts", {}).get("loaded") else "the kernels did not load"
    if done.get("status") == "PASS":
        return None
    return f"needs the {need} stage, which ended {done.get('status', 'unrun')}"
