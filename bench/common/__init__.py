"""Helpers shared by the benchmarks: models, reports, docs sections, server workloads, GPU timing."""
