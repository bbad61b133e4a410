"""The engine: one base model, many adapters, a loop that steps a continuously changing batch.

Callers (the Triton glue, tests, benchmarks) add requests from any thread and receive
SequenceOutputs through a callback; the loop runs in its own thread and never waits on I/O.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig

from ..config import EngineConfig, kv_cache_budget, parse_size
from ..errors import InvalidParameterError, RequestTooLongError
from ..events import EngineEvents
from ..lora.adapter_manager import AdapterManager, AdapterPolicy
from ..models.checkpoint import load_config, load_model, resolve_model_dir
from ..models.llama import head_dim, projection_shapes
from .detokenizer import TextStream
from .device import pick_device, pick_dtype
from .kv_cache import KVCache
from .model_runner import ModelRunner
from .sampler import sample_row
from .scheduler import Scheduler
from .sequence import FinishReason, GenerationRequest, Sequence, SequenceOutput

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, events: EngineEvents | None = None) -> None:
        self.config = config
        self.events = events or EngineEvents()
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        model_dir = resolve_model_dir(config.base_model, config.allow_hub_download)
        hf_config = load_config(model_dir)
        self.max_model_len = min(config.max_model_len or min(hf_config.max_position_embeddings, 8192),
                                 hf_config.max_position_embeddings)
        if getattr(hf_config, "sliding_window", None):  # Mistral: exact only within the window
            self.max_model_len = min(self.max_model_len, hf_config.sliding_window)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.eos_ids = _eos_ids(model_dir, hf_config, self.tokenizer)
        self.model = load_model(model_dir, hf_config, self.dtype, self.device, self.max_model_len, config.max_loras)
        kv_heads = hf_config.num_key_value_heads
        per_block = KVCache.bytes_per_block(hf_config.num_hidden_layers, config.kv_block_size, kv_heads,
                                            head_dim(hf_config), self.dtype)
        num_blocks = kv_cache_budget(config.kv_cache_memory, _device_memory(self.device)) // per_block
        self.kv_cache = KVCache(hf_config.num_hidden_layers, num_blocks, config.kv_block_size, kv_heads,
                                head_dim(hf_config), self.dtype, self.device)
        policy = AdapterPolicy(config.max_lora_rank, parse_size(config.max_adapter_bytes, "max_adapter_bytes"),
                               config.allowed_adapters, getattr(hf_config, "_name_or_path", None) or config.base_model,
                               config.allow_hub_download)
        self.adapters = AdapterManager(config.adapter_dir, self.model.lora_tables, projection_shapes(hf_config),
                                       policy, self.dtype, self.device, config.max_loras, config.max_cpu_loras,
                                       self.events)
        self.scheduler = Scheduler(self.kv_cache, self.adapters, config.max_num_seqs,
                                   config.max_num_batched_tokens, self.max_model_len, config.adapter_load_timeout_s)
        self.runner = ModelRunner(self.model, self.kv_cache, self.device)
        self._inbox: list[Sequence] = []
        self._by_id: dict[str, Sequence] = {}
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._last_state: tuple[int, int, int] | None = None
        log.info("engine ready: %s on %s (%s), KV cache %d blocks of %d tokens", model_dir, self.device,
                 self.dtype, num_blocks, config.kv_block_size)

    # ---- requests (any thread) ----
    def add_request(self, request: GenerationRequest, on_output) -> None:
        """Queue a request; raises a UserError (unknown adapter, too long, ...) before queueing."""
        prompt_ids = self.tokenizer.encode(request.prompt)
        if not prompt_ids:
            raise InvalidParameterError("text_input", "the prompt is empty")
        needed = len(prompt_ids) + request.params.max_tokens
        if needed > self.max_model_len:
            raise RequestTooLongError(
                f"the prompt has {len(prompt_ids)} tokens and max_tokens is {request.params.max_tokens}; "
                f"together they must be at most max_model_len ({self.max_model_len})")
        if self.kv_cache.blocks_for(needed) > self.kv_cache.num_blocks:
            raise RequestTooLongError(
                f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({request.params.max_tokens}) can never "
                f"fit the KV cache budget ({self.kv_cache.num_blocks * self.kv_cache.block_size} tokens)")
        future = self.adapters.request(request.adapter_id) if request.adapter_id else None
        seq = Sequence(request, prompt_ids, TextStream(self.tokenizer, prompt_ids, request.params.stop),
                       on_output, adapter_future=future)
        with self._wake:
            self._inbox.append(seq)
            self._wake.notify()

    def cancel(self, request_id: str) -> None:
        """Ask for a request to stop; it ends within one step with finish_reason 'cancelled'."""
        with self._wake:
            seq = self._by_id.get(request_id) or next(
                (s for s in self._inbox if s.request.request_id == request_id), None)
            if seq is not None:
                seq.cancelled = True

    def manage(self, command: str, adapter_id: str | None) -> dict:
        """The adapter management API: list the tiers, load (prefetch) or unload an adapter."""
        if command == "list":
            return self.adapters.listing()
        if command == "load":
            started = time.monotonic()
            adapter = self.adapters.load(adapter_id, timeout=self.config.adapter_load_timeout_s)
            return {"adapter_id": adapter_id, "loaded": True, "bytes": adapter.nbytes, "ranks": sorted(adapter.ranks),
                    "seconds": round(time.monotonic() - started, 4)}
        return {"adapter_id": adapter_id, "unloaded": self.adapters.unload(adapter_id)}

    # ---- the loop ----
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread:
            self._thread.join(timeout=30)
        self.adapters.shutdown()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._inbox and not self.scheduler.has_work:
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # a bug must not leave clients hanging: end every request
                log.exception("engine step failed")
                with self._wake:
                    unfinished = list(self._by_id.values())
                for seq in unfinished:
                    self._finish(seq, FinishReason.ERROR, error=exc)
                self.scheduler.waiting.clear()
            if not self.scheduler.running and self.scheduler.waiting:
                time.sleep(0.002)  # only requests waiting for adapter loads: do not spin

    def generate(self, requests: list[GenerationRequest]) -> dict[str, list[SequenceOutput]]:
        """Run requests to completion in the calling thread (tests, benchmarks; not with start())."""
        outputs: dict[str, list[SequenceOutput]] = {r.request_id: [] for r in requests}
        for request in requests:
            self.add_request(request, lambda out: outputs[out.request_id].append(out))
        while self.has_unfinished():
            self.step()
        return outputs

    def has_unfinished(self) -> bool:
        with self._wake:
            return bool(self._inbox) or self.scheduler.has_work

    def step(self) -> None:
        with self._wake:
            for seq in self._inbox:
                self._by_id[seq.request.request_id] = seq
                self.scheduler.add(seq)
            self._inbox.clear()
        self.adapters.apply_unloads()
        for seq in [s for s in self.scheduler.running if s.cancelled]:
            self._finish(seq, FinishReason.CANCELLED)
        scheduled = self.scheduler.schedule()
        for seq in scheduled.cancelled:
            self._finish(seq, FinishReason.CANCELLED)
        for seq, error in scheduled.failed:
            self._finish(seq, FinishReason.ERROR, error=error)
        if not scheduled.rows:
            self._report_state()
            return
        ready, logits = self.runner.execute(scheduled.rows)
        for seq, n in scheduled.rows:
            seq.num_computed += n
        for seq, row_logits in zip(ready, logits):
            seen = torch.tensor(seq.token_ids, device=row_logits.device) if seq.params.repetition_penalty != 1.0 else None
            token = sample_row(row_logits, seq.params, seen, seq.generator)
            self._append_token(seq, token)
        self._report_state()

    def _report_state(self) -> None:
        state = (len(self.scheduler.running), len(self.scheduler.waiting), self.kv_cache.num_free)
        if state != self._last_state:  # metrics cost an IPC call each: only on change
            self._last_state = state
            self.events.scheduler_state(state[0], state[1], self.kv_cache.num_blocks - state[2],
                                        self.kv_cache.num_blocks)

    def _append_token(self, seq: Sequence, token: int) -> None:
        seq.token_times.append(time.monotonic())
        seq.token_ids.append(token)
        if token in self.eos_ids and not seq.params.ignore_eos:
            self._finish(seq, FinishReason.EOS)
            return
        piece = seq.text_stream.push(token)
        if seq.text_stream.stopped:
            self._finish(seq, FinishReason.STOP, piece)
        elif seq.num_generated >= seq.params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            self._finish(seq, FinishReason.LENGTH, piece)
        elif piece and seq.request.stream:
            seq.on_output(SequenceOutput(seq.request.request_id, piece, False))

    def _finish(self, seq: Sequence, reason: FinishReason, piece: str = "", error: Exception | None = None) -> None:
        self.scheduler.retire(seq)
        with self._wake:
            self._by_id.pop(seq.request.request_id, None)
        if error is None:
            piece += seq.text_stream.finish()
        text = piece if seq.request.stream else seq.text_stream.text
        if not seq.request.exclude_input_in_output and not seq.request.stream:
            text = seq.request.prompt + text
        seq.on_output(SequenceOutput(seq.request.request_id, text, True, reason, len(seq.prompt_ids),
                                     seq.num_generated, error, seq.token_times, seq.arrival_time))


def _device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _eos_ids(model_dir: Path, hf_config, tokenizer) -> set[int]:
    ids: set[int] = set()
    sources = [getattr(hf_config, "eos_token_id", None), tokenizer.eos_token_id]
    try:
        sources.append(GenerationConfig.from_pretrained(model_dir).eos_token_id)
    except OSError:
        pass  # no generation_config.json
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids
