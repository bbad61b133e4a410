"""The composition root: every part of an engine, built from its EngineConfig in one place.

LLMEngine runs the loop; this module decides what it runs on. The order matters where one part
sizes another: the model is loaded and the KV cache allocated before the adapter slots are
counted (`max_loras=auto` takes half of what is left on a GPU), the running rows' block
tables are as wide as the longest context needs, and the decode CUDA graphs are captured once
the model, its LoRA layers and the KV cache exist, and before any request (the graphs hold
back one KV block).
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from ..adapters.slots import LoraSlots, slot_count
from ..adapters.store import AdapterPolicy, AdapterStore
from ..config import EngineConfig, kv_cache_budget, parse_size
from ..cuda.module import load_cuda_kernels
from ..events import EngineEvents
from ..lora.backends import select_backend
from ..lora.backends.cpu import CpuBackend
from ..lora.layers import add_lora_layers
from ..models.checkpoint import load_config, load_model, resolve_model_dir
from ..models.cpu_linear import FEW_ROWS, use_few_rows
from ..models.decoder import DecoderModel
from ..models.families import head_dim, lora_target_shapes
from .admission import AdmissionPolicy
from .chat_template import ChatTemplates
from .commands import AdapterCommands
from .cuda_graphs import DecodeGraphs, decode_graphs
from .device import pick_device, pick_dtype
from .grammar import Grammars
from .kv_cache import KVCache
from .model_runner import ModelRunner
from .prompts import Prompts, eos_ids
from .running_rows import RunningRows
from .scheduler import Scheduler
from .vocabulary import Vocabulary

log = logging.getLogger(__name__)

DEFAULT_MAX_MODEL_LEN = 8192  # max_model_len=0 takes the model's own limit, capped here


@dataclass
class EngineParts:
    """What an engine is made of; each part is owned by the engine thread unless its module says otherwise."""

    device: torch.device
    dtype: torch.dtype
    model_dir: Path
    max_model_len: int  # longest prompt + completion
    tokenizer: PreTrainedTokenizerBase
    vocabulary: Vocabulary  # token ids as text and bytes, for logprobs (read by Triton's sender thread)
    eos_ids: set[int]
    chat_templates: ChatTemplates
    grammars: Grammars  # response formats compiled for this tokenizer (used from the callers' threads)
    model: DecoderModel
    kv_cache: KVCache
    slots: LoraSlots  # the device tier
    adapters: AdapterStore  # the host tier and the loads in flight
    prompts: Prompts
    commands: AdapterCommands
    scheduler: Scheduler
    runner: ModelRunner


def assemble(config: EngineConfig, events: EngineEvents, on_adapter_loaded: Callable[[], None]) -> EngineParts:
    """Load the model and build every part around it; `on_adapter_loaded` is called from a load
    thread when an adapter load ends (it wakes the engine loop)."""
    device = pick_device(config.device)
    dtype = pick_dtype(config.dtype, device)
    model_dir = resolve_model_dir(config.base_model, config.allow_hub_download)
    hf_config = load_config(model_dir)
    max_model_len = min(config.max_model_len or min(hf_config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN),
                        hf_config.max_position_embeddings)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eos = eos_ids(model_dir, hf_config, tokenizer)
    chat_templates = ChatTemplates(tokenizer, config.adapter_dir, read_timeout_s=config.adapter_load_timeout_s)
    model = load_model(model_dir, hf_config, dtype, device, max_model_len)
    kv_cache = _kv_cache(config, hf_config, dtype, device)
    targets = lora_target_shapes(hf_config)
    num_layers = hf_config.num_hidden_layers
    num_slots = slot_count(config, device, targets, num_layers, dtype)  # after the KV cache: see the docstring
    kernels = load_cuda_kernels(device, config.cuda_kernels)  # the LoRA and the paged decode kernels
    backend = select_backend(device, dtype, kernels, config.max_lora_rank)
    lora = add_lora_layers(model, num_slots, backend)
    if isinstance(backend, CpuBackend):  # the native library's few-row matmul reads the packed base weights
        count = use_few_rows(model, functools.partial(backend.op.few_rows, isa=backend.isa))
        log.info("base projections: steps of up to %d rows through the native few-row kernel in %d of them", FEW_ROWS,
                 count)
    rows = RunningRows(max_rows=config.max_num_seqs, max_blocks=kv_cache.blocks_for(max_model_len),
                       vocab_size=hf_config.vocab_size, device=device)
    runner = ModelRunner(model, kv_cache, rows, device=device, lora=lora, kernels=kernels)
    runner.graphs = decode_graphs(config.cuda_graphs, device, kernels, kv_cache, lambda trash_slot: DecodeGraphs(
        model, kv_cache.layers, lora, kernels, max_rows=config.max_num_seqs, max_blocks=rows.block_tables.shape[1],
        block_size=kv_cache.block_size, hidden_size=hf_config.hidden_size, dtype=dtype, trash_slot=trash_slot,
        device=device))
    slots = LoraSlots(lora, num_slots, device, events)
    adapters = AdapterStore(config.adapter_dir, targets=targets, num_layers=num_layers,
                            policy=_adapter_policy(config, hf_config), dtype=dtype,
                            host_capacity=config.max_cpu_loras, load_timeout_s=config.adapter_load_timeout_s,
                            max_loads=config.max_adapter_loads, loads_per_s=config.adapter_loads_per_s,
                            stall_s=config.adapter_load_stall_s, max_stalled=config.max_stalled_adapter_loads,
                            check_interval_s=config.adapter_check_interval_s, on_load_done=on_adapter_loaded,
                            events=events)
    grammars = Grammars(tokenizer, hf_config.vocab_size)
    prompts = Prompts(tokenizer, chat_templates, max_model_len=max_model_len, kv_cache=kv_cache,
                      max_num_seqs=config.max_num_seqs, check_adapter=adapters.check_known, grammars=grammars)
    admission = AdmissionPolicy(kv_cache, slots, max_num_seqs=config.max_num_seqs, max_model_len=max_model_len,
                                adapter_load_timeout_s=config.adapter_load_timeout_s,
                                request_timeout_s=config.request_timeout_s)
    return EngineParts(
        device=device, dtype=dtype, model_dir=model_dir, max_model_len=max_model_len, tokenizer=tokenizer,
        vocabulary=Vocabulary(tokenizer), eos_ids=eos, chat_templates=chat_templates,
        grammars=grammars, model=model,
        kv_cache=kv_cache, slots=slots, adapters=adapters, prompts=prompts,
        commands=AdapterCommands(adapters, slots, chat_templates),
        scheduler=Scheduler(kv_cache, slots, admission, max_num_batched_tokens=config.max_num_batched_tokens),
        runner=runner)


def _kv_cache(config: EngineConfig, hf_config: PretrainedConfig, dtype: torch.dtype, device: torch.device) -> KVCache:
    """As many blocks as the kv_cache_memory budget holds."""
    shape = dict(num_layers=hf_config.num_hidden_layers, block_size=config.kv_block_size,
                 kv_heads=hf_config.num_key_value_heads, head_dim=head_dim(hf_config), dtype=dtype)
    num_blocks = kv_cache_budget(config.kv_cache_memory, _device_memory(device)) // KVCache.bytes_per_block(**shape)
    return KVCache(num_blocks=num_blocks, device=device, **shape)


def _adapter_policy(config: EngineConfig, hf_config: PretrainedConfig) -> AdapterPolicy:
    """Which adapters this server accepts."""
    return AdapterPolicy(max_rank=config.max_lora_rank,
                         max_bytes=parse_size(config.max_adapter_bytes, "max_adapter_bytes"),
                         allowed=config.allowed_adapters,
                         base_model_name=getattr(hf_config, "_name_or_path", None) or config.base_model,
                         allow_hub_download=config.allow_hub_download)


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
