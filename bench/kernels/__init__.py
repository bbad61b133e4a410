"""GPU microbenchmarks of our CUDA kernels (LoRA shrink/expand, paged decode attention)."""
