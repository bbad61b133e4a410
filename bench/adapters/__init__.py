"""Benchmarks of many adapters: memory held at scale, cold loads, latency under adapter churn."""
