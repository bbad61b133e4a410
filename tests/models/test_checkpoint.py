"""Checkpoint loading: families by model_type, shards straight into the target dtype."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from multilora.errors import ConfigError
from multilora.models.checkpoint import load_config, load_model
from multilora.models.families import SUPPORTED_MODEL_TYPES, family_of


def test_an_unsupported_family_is_refused_naming_the_supported_ones():
    with pytest.raises(ConfigError, match="model_type 'gpt2' is not supported; supported: llama, mistral, qwen2, phi3"):
        family_of(AutoConfig.for_model("gpt2"))
    assert SUPPORTED_MODEL_TYPES == ("llama", "mistral", "qwen2", "phi3")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_checkpoint_loads_into_the_target_dtype(demo_dir, tmp_path, dtype):
    reference = AutoModelForCausalLM.from_pretrained(demo_dir / "base", dtype=torch.float32)
    reference.save_pretrained(tmp_path, max_shard_size="200KB")  # several shards and an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    config = load_config(tmp_path)
    model = load_model(tmp_path, config, dtype, torch.device("cpu"), max_positions=64)
    assert all(p.dtype == dtype for p in model.parameters())
    ours, theirs = model.layers[1], reference.model.layers[1]
    x = torch.randn(3, config.hidden_size)
    expected = torch.cat([theirs.self_attn.q_proj(x), theirs.self_attn.k_proj(x), theirs.self_attn.v_proj(x)], -1)
    tolerance = 1e-5 if dtype == torch.float32 else 0.05  # fp32 weights may be packed for oneDNN: compare outputs
    torch.testing.assert_close(ours.qkv(x.to(dtype)).float(), expected, atol=tolerance, rtol=tolerance)
    expected = torch.cat([theirs.mlp.gate_proj(x), theirs.mlp.up_proj(x)], -1)
    torch.testing.assert_close(ours.gate_up(x.to(dtype)).float(), expected, atol=tolerance, rtol=tolerance)


def test_a_checkpoint_missing_a_tensor_names_it(demo_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    for name in ("config.json",):
        (tmp_path / name).write_bytes((demo_dir / "base" / name).read_bytes())
    tensors = load_file(demo_dir / "base" / "model.safetensors")
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ConfigError, match="no tensor.*model.layers.2.mlp.up_proj.weight.*llama-family"):
        load_model(tmp_path, load_config(tmp_path), torch.float32, torch.device("cpu"), max_positions=64)


@pytest.mark.gpu
def test_loading_bf16_on_cuda_never_holds_an_fp32_copy(demo_dir):
    config = load_config(demo_dir / "base")
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = load_model(demo_dir / "base", config, torch.bfloat16, torch.device("cuda"), max_positions=64)
    held = torch.cuda.memory_allocated() - before
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.cuda.max_memory_allocated() - before <= held * 1.1 + (1 << 20)
