"""A compact Llama-family decoder (Llama 2/3, Mistral) that runs a flat, mixed-adapter batch.

Base projections are fused (q|k|v and gate|up) for fewer, larger matmuls; each of the seven
projections PEFT can target keeps its own LoRA table, applied to its slice of the fused output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from ..lora.ops import LoraBatch, LoraWeightTable, apply_lora
from .attention import AttentionMetadata, paged_attention

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUPPORTED_MODEL_TYPES = ("llama", "mistral")


def projection_shapes(config: PretrainedConfig) -> dict[str, tuple[int, int]]:
    """(h_in, h_out) of each LoRA-targetable projection: what an adapter must match."""
    h, inter = config.hidden_size, config.intermediate_size
    d = head_dim(config)
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same order of operations as transformers' LlamaRMSNorm, so fp32 results match bit for bit.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Rotary(nn.Module):
    """cos/sin tables by position; frequencies come from transformers (default, llama3, yarn, linear)."""

    def __init__(self, config: PretrainedConfig, max_positions: int) -> None:
        super().__init__()
        reference = LlamaRotaryEmbedding(config)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * reference.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, d]
        self.register_buffer("cos", emb.cos() * reference.attention_scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * reference.attention_scaling, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of a step's positions, [T, 1, d]: looked up once per step, used by every layer."""
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin[positions].to(dtype).unsqueeze(1)


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    # x: [T, heads, d]; rotate-half layout, as in Hugging Face checkpoints.
    cos, sin = rope
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, lora: dict[str, LoraWeightTable]) -> None:
        super().__init__()
        shapes = projection_shapes(config)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim(config)
        self.q_size, self.kv_size = shapes["q_proj"][1], shapes["k_proj"][1]
        self.inter = config.intermediate_size
        h = config.hidden_size
        attn_bias, mlp_bias = getattr(config, "attention_bias", False), getattr(config, "mlp_bias", False)
        self.qkv = nn.Linear(h, self.q_size + 2 * self.kv_size, bias=attn_bias)
        self.o_proj = nn.Linear(self.q_size, h, bias=attn_bias)
        self.gate_up = nn.Linear(h, 2 * self.inter, bias=mlp_bias)
        self.down_proj = nn.Linear(self.inter, h, bias=mlp_bias)
        self.input_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, config.rms_norm_eps)
        self.lora = lora
        self.scale = self.head_dim ** -0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata,
                lora: LoraBatch | None) -> torch.Tensor:
        # x: [T, h]
        hidden = self.input_layernorm(x)
        qkv = self.qkv(hidden)  # [T, q + 2kv]
        q_end, k_end = self.q_size, self.q_size + self.kv_size
        if lora is not None:
            apply_lora(qkv[:, :q_end], hidden, self.lora["q_proj"], lora)
            apply_lora(qkv[:, q_end:k_end], hidden, self.lora["k_proj"], lora)
            apply_lora(qkv[:, k_end:], hidden, self.lora["v_proj"], lora)
        t = x.shape[0]
        q = rotate(qkv[:, :q_end].view(t, self.num_heads, self.head_dim), rope)
        k = rotate(qkv[:, q_end:k_end].view(t, self.num_kv_heads, self.head_dim), rope)
        v = qkv[:, k_end:].reshape(t, self.num_kv_heads, self.head_dim)
        attn = paged_attention(q, k, v, kv[0], kv[1], meta, self.scale).reshape(t, self.q_size)
        out = self.o_proj(attn)
        if lora is not None:
            apply_lora(out, attn, self.lora["o_proj"], lora)
        x = x + out

        hidden = self.post_attention_layernorm(x)
        gate_up = self.gate_up(hidden)  # [T, 2 * inter]
        if lora is not None:
            apply_lora(gate_up[:, :self.inter], hidden, self.lora["gate_proj"], lora)
            apply_lora(gate_up[:, self.inter:], hidden, self.lora["up_proj"], lora)
        act = F.silu(gate_up[:, :self.inter]) * gate_up[:, self.inter:]
        down = self.down_proj(act)
        if lora is not None:
            apply_lora(down, act, self.lora["down_proj"], lora)
        return x + down


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, max_positions: int, num_lora_slots: int) -> None:
        super().__init__()
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {config.model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (Llama family uses silu)")
        self.config = config
        shapes = projection_shapes(config)
        self.lora_tables = [
            {name: LoraWeightTable(h_in, h_out, num_lora_slots) for name, (h_in, h_out) in shapes.items()}
            for _ in range(config.num_hidden_layers)
        ]
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, tables) for tables in self.lora_tables)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.rotary = Rotary(config, max_positions)
        self.requires_grad_(False)

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the checkpoint says so (and after any
        re-materialisation, which unties them)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                lora: LoraBatch | None) -> torch.Tensor:
        """Hidden states [T, h] of a flat step; `lora` None when no token uses an adapter."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, rope, kv, meta, lora)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
