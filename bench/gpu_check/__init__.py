"""`make gpu-check`: the prepared run that proves the GPU path (python -m bench.gpu_check)."""
