"""Benchmarks of tokens/s, latency, CPU and memory: in-process, through tritonserver, under load."""
