"""A compact decoder-only transformer for the Llama, Mistral, Qwen2 and Phi-3 families.

It runs a flat step that mixes rows of many requests (attention metadata from the model runner).
The base projections are fused (q|k|v and gate|up) for fewer, larger matmuls. The model knows
nothing of LoRA: lora/layers.py wraps the projections after loading.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

from .attention import AttentionMetadata, paged_attention
from .families import Family, family_of, head_dim, input_size, output_sizes, sliding_window
from .rotary import Rotary, rotate


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same order of operations as transformers' RMSNorm, so fp32 results match bit for bit (in
        # fp32 its casts are no-ops: skipped, two dispatches fewer per norm).
        dtype = x.dtype
        if dtype != torch.float32:
            x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (x if dtype == torch.float32 else x.to(dtype))


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, family: Family, layer: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim(config)
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.inter = config.intermediate_size
        self.window = sliding_window(config, layer)
        for projection in family.projections:
            setattr(self, projection.name, nn.Linear(input_size(config, projection),
                                                     sum(output_sizes(config, projection)),
                                                     bias=family.bias(config, projection.name)))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        # x: [T, h]
        t = x.shape[0]
        qkv = self.qkv(self.input_layernorm(x))  # [T, q + 2kv]
        k_end = self.q_size + self.kv_size
        # q and k are side by side in qkv: one rotation for both heads' sets.
        qk = rotate(qkv[:, :k_end].view(t, self.num_heads + self.num_kv_heads, self.head_dim), rope)
        q, k = qk[:, :self.num_heads], qk[:, self.num_heads:]
        v = qkv[:, k_end:].view(t, self.num_kv_heads, self.head_dim)
        attn = paged_attention(q, k, v, kv[0], kv[1], meta, self.scale, self.window).reshape(t, self.q_size)
        x = x + self.o_proj(attn)

        gate_up = self.gate_up(self.post_attention_layernorm(x))  # [T, 2 * inter]
        act = F.silu(gate_up[:, :self.inter]) * gate_up[:, self.inter:]
        return x + self.down_proj(act)


class DecoderModel(nn.Module):
    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__()
        self.config = config
        self.family = family_of(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, self.family, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.rotary = Rotary(config, max_positions)
        self.requires_grad_(False)

    @property
    def windows(self) -> set[int | None]:
        """The distinct attention windows of the layers: the masks a step must provide."""
        return {layer.window for layer in self.layers}

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the checkpoint says so (and after any
        re-materialisation, which unties them)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, h] of a flat step."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, rope, kv, meta)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
