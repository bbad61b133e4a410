"""Our CUDA kernels, the one home of GPU code: the kernel files (data/), NVRTC, the driver-API
module load, the driver helpers (errors, the step's context and stream, the dtype table), launch
planning for LoRA and for paged decode attention (pure Python), and the paged decode step.

No module here touches the driver at import time: the engine imports them on CPU machines.
"""
