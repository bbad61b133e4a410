"""Host time per decode step on the CUDA path, with the CUDA driver stubbed: no GPU needed.

    python -m bench.kernels.host_overhead [--shape llama3-8b|tiny] [--steps 300] [--write]

What a GPU step costs the host besides the GPU's work: our code and its driver calls. This runs the
engine's own CUDA code on CPU tensors standing in for device memory, with every cuda.bindings.driver
call CudaKernels makes answered at once (cuLaunchKernel only counts the launch):

- eager: one decode step's LoRA and attention launches, as the layers make them: the step's LoRA
  plan (CudaBackend.plan_step of its LoraBatch), the paged decode plan, then per layer the four
  projections' LoRA calls (one shrink and one expand each) and the attention kernel;
- graph replay: what the model runner does per decode step with CUDA graphs
  (engine/cuda_graphs.DecodeGraphs.run): the static inputs filled and copied in, the graph replayed
  (a stub: torch's graph.replay, i.e. cudaGraphLaunch, is not in the figure).

Neither figure has the model runner's per-step arrays (the same for both) nor PyTorch's own ops of
an eager step (norms, matmuls, rotary: on a GPU each is host work too, which a replay skips), nor
the driver's own cost per launch. `make gpu-check` runs this on the GPU machine and reports it next
to the GPU-busy time of a decode step. The last line is

    host us per decode step: eager X, graph replay Y

(medians over --steps steps); the floors are X <= 1000 and Y <= 100 (issue 20).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.common.paths import BENCHMARKS_MD
from bench.common.reports import percentile

LAST_LINE = re.compile(r"^host us per decode step: eager (\d+), graph replay (\d+)$")
EAGER_FLOOR_US, REPLAY_FLOOR_US = 1000, 100


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rows: int  # decode rows of the step
    adapters: int  # distinct, one per row in turn
    rank: int
    context: int  # tokens in each row's context
    max_model_len: int
    block_size: int = 16

    def projections(self) -> list[tuple[str, int, tuple[int, ...]]]:
        """(name, h_in, target widths) of a Llama layer's four LoRA projections."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return [("qkv", self.hidden, (q, kv, kv)), ("o_proj", q, (self.hidden,)),
                ("gate_up", self.hidden, (self.intermediate, self.intermediate)),
                ("down_proj", self.intermediate, (self.hidden,))]


SHAPES = {
    # the GPU check's speed model: 8 layers of Llama-3-8B, 32 rank-16 adapters, a 32-row decode step
    "llama3-8b": Shape(layers=8, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, rows=32,
                       adapters=32, rank=16, context=192, max_model_len=4096),
    "tiny": Shape(layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64, intermediate=512, rows=4, adapters=4,
                  rank=8, context=40, max_model_len=256),
}


class StubDriver:
    """The cuda.bindings.driver calls CudaKernels makes, answered at once for a pretend 132-SM,
    sm_90 device; cuLaunchKernel counts the launch and returns."""

    CALLS = ("cuInit", "cuDeviceGet", "cuDeviceGetAttribute", "cuDevicePrimaryCtxRetain",
             "cuDevicePrimaryCtxRelease", "cuCtxGetCurrent", "cuCtxSetCurrent", "cuModuleLoadData",
             "cuModuleGetFunction", "cuLaunchKernel")

    def __init__(self) -> None:
        from cuda.bindings import driver

        self.driver, self.ok, self.launches = driver, driver.CUresult.CUDA_SUCCESS, 0
        attr = driver.CUdevice_attribute
        self.attributes = {attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: 9,
                           attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: 0,
                           attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: 132}
        self.context = driver.CUcontext(0x1000)

    @contextmanager
    def installed(self):
        saved = {name: getattr(self.driver, name) for name in self.CALLS}
        try:
            for name in self.CALLS:
                setattr(self.driver, name, getattr(self, name))
            yield self
        finally:
            for name, call in saved.items():
                setattr(self.driver, name, call)

    def cuInit(self, flags):
        return (self.ok,)

    def cuDeviceGet(self, index):
        return self.ok, self.driver.CUdevice(index)

    def cuDeviceGetAttribute(self, attribute, device):
        return self.ok, self.attributes[attribute]

    def cuDevicePrimaryCtxRetain(self, device):
        return self.ok, self.context

    def cuDevicePrimaryCtxRelease(self, device):
        return (self.ok,)

    def cuCtxGetCurrent(self):
        return self.ok, self.context

    def cuCtxSetCurrent(self, context):
        return (self.ok,)

    def cuModuleLoadData(self, image):
        return self.ok, self.driver.CUmodule(0x2000)

    def cuModuleGetFunction(self, module, name):
        return self.ok, self.driver.CUfunction(0x3000 + len(name))

    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        self.launches += 1
        return (self.ok,)


class DecodeStep:
    """One decode step's tensors on the CPU (standing in for device memory) and the engine's CUDA
    objects that launch for it: the LoRA backend, its layers' targets, the paged decode inputs."""

    def __init__(self, shape: Shape, kernels, dtype: torch.dtype = torch.bfloat16) -> None:
        from multilora.lora.backends.cuda import CudaBackend
        from multilora.lora.layers import LoraContext
        from multilora.lora.weights import LoraTarget, LoraTargets, LoraWeightTable

        self.shape, self.kernels = shape, kernels
        self.context = LoraContext(CudaBackend(kernels, max_rank=shape.rank))
        # One weight pair per shape for every slot: the launches only read addresses.
        weights: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.layers: list[dict] = []
        for _ in range(shape.layers):
            layer = {}
            for name, h_in, widths in shape.projections():
                targets, start = [], 0
                for width in widths:
                    a, b = weights.setdefault((h_in, width), (torch.zeros(h_in, shape.rank, dtype=dtype),
                                                              torch.zeros(shape.rank, width, dtype=dtype)))
                    table = LoraWeightTable(h_in, width, shape.adapters)
                    for slot in range(shape.adapters):
                        table.set_slot(slot, a, b)
                    targets.append(LoraTarget(name, start, start + width, table))
                    start += width
                layer[name] = LoraTargets(targets)
            self.layers.append(layer)
        rows = shape.rows
        self.x = {name: torch.zeros(rows, h_in, dtype=dtype) for name, h_in, _ in shape.projections()}
        self.y = {name: torch.zeros(rows, sum(widths), dtype=dtype) for name, _, widths in shape.projections()}
        self.q = torch.zeros(rows, shape.heads, shape.head_dim, dtype=dtype)
        self.out = torch.zeros_like(self.q)
        blocks = -(-shape.context // shape.block_size)
        cache = (rows * blocks * shape.block_size, shape.kv_heads, shape.head_dim)
        self.k_cache, self.v_cache = torch.zeros(cache, dtype=dtype), torch.zeros(cache, dtype=dtype)
        self.max_blocks = -(-shape.max_model_len // shape.block_size)
        self.tables = torch.arange(rows * blocks).view(rows, blocks)
        self.ctx_lens = torch.full((rows,), shape.context, dtype=torch.int64)
        self.slots = np.arange(rows, dtype=np.int64) % shape.adapters

    def eager(self) -> None:
        """The step's LoRA and attention launches, as LoraLinear and paged_attention make them."""
        from multilora.cuda.paged_decode import PagedDecode
        from multilora.lora.plan import LoraBatch

        shape, context = self.shape, self.context
        batch = LoraBatch.from_token_slots(self.slots, "cpu", num_decode_tokens=shape.rows)
        with context.step(batch):
            backend, plan = context.backend, context.plan
            attention = PagedDecode.build(self.kernels, self.tables, self.ctx_lens, shape.context, shape.block_size)
            for layer in self.layers:
                backend.apply(self.y["qkv"], self.x["qkv"], layer["qkv"], plan)
                if attention.supports(self.q, self.k_cache, self.v_cache):
                    attention.run(self.q, self.k_cache, self.v_cache, self.out, shape.head_dim ** -0.5, None)
                for name in ("o_proj", "gate_up", "down_proj"):
                    backend.apply(self.y[name], self.x[name], layer[name], plan)

    def graphs(self):
        """The engine's DecodeGraphs for this step's rows, captured with a stub graph API and a model
        that returns zeros (a capture only records; a replay here does what the runner does)."""
        from multilora.engine.cuda_graphs import DecodeGraphs
        from multilora.lora.layers import LoraLayers

        shape = self.shape

        def model(ids, positions, kv_layers, meta):
            return torch.zeros(len(ids), shape.hidden, dtype=torch.bfloat16)

        graphs = DecodeGraphs(model, [], LoraLayers(self.context, []), self.kernels, max_rows=shape.rows,
                              max_blocks=self.max_blocks, block_size=shape.block_size, hidden_size=shape.hidden,
                              dtype=torch.bfloat16, trash_slot=0, device=torch.device("cpu"), api=StubGraphs())
        graphs.capture()
        return graphs

    def replay_inputs(self) -> tuple[np.ndarray, ...]:
        """What the model runner hands DecodeGraphs.run for this step (ids, positions, cache entries,
        block tables, context lengths, slots)."""
        rows, shape = self.shape.rows, self.shape
        positions = np.full(rows, shape.context - 1, dtype=np.int64)
        tables = self.tables.numpy()
        block = shape.block_size
        cache_index = tables[np.arange(rows), positions // block] * block + positions % block
        return (np.arange(rows, dtype=np.int64), positions, cache_index, tables, positions + 1, self.slots)


class StubGraphs:
    """The graph API with nothing under it: capture runs the forward once; replay does nothing."""

    class Graph:
        replays = 0

        def replay(self) -> None:
            self.replays += 1

    def pool(self):
        return None

    def capture(self, forward, pool):
        forward()
        return self.Graph()


def timed_us(fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        started = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - started) / 1e3)
    return times


def measure(shape: Shape, steps: int, warmup: int = 20) -> dict:
    """Both figures for `shape`, with the driver stubbed while they run."""
    from multilora.cuda.module import CudaKernels

    stub = StubDriver()
    with stub.installed():
        kernels = CudaKernels(0)
        step = DecodeStep(shape, kernels)
        stub.launches = 0
        step.eager()
        launches = stub.launches
        eager = timed_us(step.eager, steps, warmup)
        graphs = step.graphs()
        inputs = step.replay_inputs()
        replay = timed_us(lambda: graphs.run(*inputs), steps, warmup)
    return dict(launches=launches, eager=eager, replay=replay, buckets=graphs.sizes)


def cpu_name() -> str:
    info = Path("/proc/cpuinfo")
    names = re.findall(r"model name\s*:\s*(.+)", info.read_text()) if info.exists() else []
    return f"{names[0].strip()} ({len(names)} logical CPUs)" if names else "unknown CPU"


def report(shape_name: str, shape: Shape, result: dict) -> list[str]:
    eager, replay = percentile(result["eager"], 50), percentile(result["replay"], 50)
    return [
        f"{shape.layers} layers of {shape_name} shapes (hidden {shape.hidden}, GQA {shape.heads}:{shape.kv_heads}, "
        f"intermediate {shape.intermediate}), {shape.rows} decode rows over {shape.adapters} rank-{shape.rank} "
        f"adapters, bf16, contexts of {shape.context} tokens; the CUDA driver stubbed (launches counted, not run); "
        f"{cpu_name()}",
        f"eager: {result['launches']} launches per step; host us per step: median {eager:.0f}, "
        f"p90 {percentile(result['eager'], 90):.0f}, min {min(result['eager']):.0f}",
        f"graph replay: bucket {shape.rows} of {result['buckets']}; host us per step: median {replay:.0f}, "
        f"p90 {percentile(result['replay'], 90):.0f}, min {min(result['replay']):.0f}",
        f"host us per decode step: eager {eager:.0f}, graph replay {replay:.0f}",
    ]


def write_section(lines: list[str], steps: int, path: Path = BENCHMARKS_MD) -> None:
    from bench.common.docs_section import replace_section

    *details, last = lines
    eager, replay = (int(v) for v in LAST_LINE.match(last).groups())
    body = "\n".join([
        "## Host time per GPU decode step (CUDA driver stubbed)", "",
        "Command: `make gpu-host-bench` (= `python -m bench.kernels.host_overhead --write`). The engine's CUDA "
        "code for one decode step on CPU tensors, with every CUDA driver call answered at once: *eager* is the "
        "step's LoRA plan and every layer's LoRA and attention launches (one shrink and one expand per projection, "
        "arguments packed once per step layout, kept across steps); *graph replay* is what the model runner does "
        "per decode step with CUDA graphs (static inputs filled and copied in, the graph replayed; the replay "
        "itself is a stub). Neither has the driver's own cost per call nor, for eager, PyTorch's own ops. Medians of "
        f"{steps} steps. Measured on a machine shared with other jobs (timings vary from run to run).", "",
        "| what | host us per decode step | floor (issue 20) |", "|---|---|---|",
        f"| eager | {eager} | <= {EAGER_FLOOR_US} |",
        f"| graph replay | {replay} | <= {REPLAY_FLOOR_US} |", "",
        "```", *details, "```",
    ])
    replace_section(path, "gpu_host", body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--write", action="store_true", help="write the figures into docs/benchmarks.md")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    lines = report(args.shape, shape, measure(shape, args.steps))
    if args.write:
        write_section(lines, args.steps)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
