"""GPU kernels: NVRTC build helper, launch planning (pure Python) and the driver-API loader.

Submodules are imported where used so that importing the engine never touches CUDA.
"""
