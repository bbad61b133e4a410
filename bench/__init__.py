"""The project's benchmarks and its GPU check, run from the repository root as modules:

    python -m bench.serving.engine_throughput     # (make bench) in-process tokens/s, K adapters
    python -m bench.gpu_check                     # (make gpu-check) the prepared GPU run

common/ holds what several of them import (benchmark models, reports, docs sections, gRPC
workloads, GPU timing); serving/, adapters/, kernels/ and gpu_check/ hold the entry points.
Figures go into docs/benchmarks.md and docs/gpu.md.
"""
