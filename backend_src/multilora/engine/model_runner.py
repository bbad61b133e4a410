"""Turns a scheduled step into tensors, runs the model once, and samples every row in one call.

A step is one chunk of new tokens per running sequence (its row). Rows are ordered before the
forward pass: one-token rows (decode) first, then longer rows, each group by adapter slot, so each
adapter's tokens are contiguous segments and the decode rows with an adapter are one contiguous
range. Everything the layers need is built here once per step, from arrays (the rows' persistent
state in RunningRows): token ids, positions, each new token's KV cache entry and the block lists
for attention, the token -> adapter slot map and its segments for LoRA (the step's LoraBatch,
given to the model's LoRA layers through their shared context). The integer metadata
goes to the device in one copy, and the sampled tokens come back in one; a step of decode rows
only replays a captured CUDA graph when the engine has them (engine/cuda_graphs.py). Rows that asked
for logprobs get them from the same logits (engine/logprobs.py); others cost nothing more. The token
masks of rows under a grammar (engine/grammar.py) are filled by a worker thread while the forward
pass runs, and applied by the sampler.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..cuda.paged_decode import PagedDecode
from ..lora.layers import LoraLayers
from ..lora.plan import LoraBatch
from ..models.attention import AttentionMetadata, PrefillRow, visible
from ..models.decoder import DecoderModel
from .cuda_graphs import DecodeGraphs
from .grammar import StepMasks
from .kv_cache import KVCache
from .logprobs import TokenLogprob, prompt_token_logprobs, token_logprobs
from .running_rows import RunningRows
from .sampler import GREEDY_BELOW, Sampled, SamplingBatch, sample, uniform
from .sequence import Sequence

if TYPE_CHECKING:
    from ..cuda.module import CudaKernels


@dataclass
class StepLayout:
    """Host-side layout of one step: rows in execution order and where their tokens go."""

    seqs: list[Sequence]
    counts: np.ndarray  # [R] new tokens per row
    starts: np.ndarray  # [R] tokens already computed per row
    rows: np.ndarray  # [R] each sequence's row in RunningRows
    num_decode: int  # the first rows have one token each
    # Found by the forward pass for rows that asked for prompt logprobs: those of the prompt tokens
    # this step's chunk predicts.
    prompt_logprobs: list[tuple[Sequence, list[TokenLogprob]]] = field(default_factory=list)


@dataclass
class StepOutput:
    ready: list[Sequence]  # the sequences that sampled a token, in execution order
    sampled: Sampled | None  # their tokens (None when no row sampled)
    logprobs: list[TokenLogprob | None]  # per ready sequence: its token's logprobs, None unless it asked
    prompt_logprobs: list[tuple[Sequence, list[TokenLogprob]]]  # see StepLayout


class ModelRunner:
    def __init__(self, model: DecoderModel, kv_cache: KVCache, rows: RunningRows, *, device: torch.device,
                 lora: LoraLayers | None = None, kernels: CudaKernels | None = None) -> None:
        self.model = model
        self.kv = kv_cache
        self.rows = rows
        self.device = device
        self.lora = lora
        self.kernels = kernels  # for the paged decode kernel; LoRA has the backend in self.lora
        self.windows = model.windows
        self.masks = StepMasks(rows.vocab_size)
        self.graphs: DecodeGraphs | None = None  # decode steps' CUDA graphs (engine/cuda_graphs.py), set at start

    @torch.inference_mode()
    def execute(self, chunks: list[tuple[Sequence, int]]) -> StepOutput:
        """Compute the chunks (sequence, its tokens to compute this step) and sample the rows whose
        prompt and output are now fully computed."""
        masks = self.masks.start(_will_sample(chunks))
        layout, last_tokens, logits = self.forward(chunks)
        if logits is None:
            return StepOutput([], None, [], layout.prompt_logprobs)
        ready, logits = self._fork([layout.seqs[i] for i in last_tokens], logits)
        rows = np.array([seq.row for seq in ready], dtype=np.int64)
        batch = self._sampling_batch(ready, rows)
        if masks is not None:
            batch.masked, batch.allowed = masks.collect(ready, self.device)
        sampled = sample(logits, batch)
        if self.rows.seen is not None:
            self.rows.record(torch.from_numpy(rows).to(self.device), sampled.tokens)
        return StepOutput(ready, sampled, self._logprobs(ready, logits, sampled), layout.prompt_logprobs)

    def forward(self, chunks: list[tuple[Sequence, int]]) -> tuple[StepLayout, list[int], torch.Tensor | None]:
        """The model on one step's chunks: the layout, the rows that sample (indices into it) and
        their fp32 logits [n, vocab] (None when no row samples)."""
        layout = self._layout(chunks)
        counts, starts = layout.counts, layout.starts
        offsets = np.cumsum(counts) - counts
        total = int(counts.sum())
        token_row = np.repeat(np.arange(len(counts)), counts)
        positions = np.arange(total) - offsets[token_row] + starts[token_row]
        tables = self.rows.block_tables[layout.rows]  # [R, max_blocks]
        bs = self.kv.block_size
        cache_index = tables[token_row, positions // bs] * bs + positions % bs
        d = layout.num_decode
        ctx_len = starts[:d] + 1
        width = self.kv.blocks_for(int(ctx_len.max(initial=0)))
        sampling = [i for i, seq in enumerate(layout.seqs) if starts[i] + counts[i] == len(seq.token_ids)]
        last_tokens = offsets[sampling] + counts[sampling] - 1
        ids = np.fromiter((t for seq, s, n in zip(layout.seqs, starts, counts) for t in seq.token_ids[s:s + n]),
                          dtype=np.int64, count=total)
        token_slots = np.repeat(np.array([s.lora_slot for s in layout.seqs], dtype=np.int64), counts)
        if self.graphs is not None and self.graphs.takes(d, len(counts)):  # decode rows only: a graph replay
            hidden = self.graphs.run(ids, positions, cache_index, tables[:, :width], ctx_len, token_slots)
            layout.prompt_logprobs = self._prompt_logprobs(layout, offsets, hidden)
            return layout, sampling, self._logits(hidden, last_tokens) if sampling else None
        prefill = [(i, int(starts[i]), int(counts[i])) for i in range(d, len(counts))]
        ctx_index = [self._context_cache_index(tables[i], past + n) for i, past, n in prefill if past]
        up = self._upload([ids, positions, cache_index, tables[:d, :width].reshape(-1), ctx_len,
                           last_tokens, *ctx_index])
        ids_t, positions_t, cache_index_t, decode_blocks, ctx_len_t, last_t, *ctx_index_t = up
        meta = AttentionMetadata(
            cache_index=cache_index_t,
            decode_tokens=torch.arange(d, device=self.device),
            decode_blocks=decode_blocks,
            decode_masks=self._decode_masks(ctx_len_t, width * bs),
            block_size=bs,
            prefill_rows=self._prefill_rows(prefill, offsets, iter(ctx_index_t)),
            paged_decode=PagedDecode.build(self.kernels, decode_blocks.view(d, width), ctx_len_t,
                                           int(ctx_len.max()), bs) if self.kernels is not None and d else None,
        )
        batch = None
        if self.lora is not None and (token_slots >= 0).any():
            batch = LoraBatch.from_token_slots(token_slots, self.device, num_decode_tokens=d)
        if self.lora is not None:
            with self.lora.context.step(batch):
                hidden = self.model(ids_t, positions_t, self.kv.layers, meta)
        else:
            hidden = self.model(ids_t, positions_t, self.kv.layers, meta)
        logits = self.model.logits(hidden[last_t]) if sampling else None
        layout.prompt_logprobs = self._prompt_logprobs(layout, offsets, hidden)
        return layout, sampling, logits

    def _logits(self, hidden: torch.Tensor, last_tokens: np.ndarray) -> torch.Tensor:
        """fp32 logits of the sampling rows (a graph's decode rows: usually every row)."""
        if len(last_tokens) < hidden.shape[0]:
            hidden = hidden[torch.from_numpy(last_tokens).to(self.device)]
        return self.model.logits(hidden)

    def _fork(self, ready: list[Sequence], logits: torch.Tensor) -> tuple[list[Sequence], torch.Tensor]:
        """The choices of a request whose prompt this step finished: each samples its first token
        from the prompt's last logits row, after the prompt's last partial block is copied into
        its own (engine/sequence.py, SequenceGroup). Returns the sampling rows and their logits."""
        forked = [(i, seq.group.forks) for i, seq in enumerate(ready) if seq.index == 0 and seq.num_generated == 0]
        forked = [(i, forks) for i, forks in forked if forks]
        if not forked:
            return ready, logits
        pick = list(range(len(ready)))
        copies = []
        for i, forks in forked:
            head = ready[i]
            partial = len(head.prompt_ids) // self.kv.block_size  # index of the last, partly filled block
            for seq in forks:
                if len(head.prompt_ids) % self.kv.block_size:
                    copies.append((head.block_table[partial], seq.block_table[partial]))
                ready.append(seq)
                pick.append(i)
        self.kv.copy_blocks(copies)
        return ready, logits[torch.tensor(pick, device=logits.device)]

    def _logprobs(self, ready: list[Sequence], logits: torch.Tensor, sampled: Sampled) -> list[TokenLogprob | None]:
        """The sampled tokens' logprobs, for the rows that asked (from the logits before any sampling
        parameter touched them)."""
        found: list[TokenLogprob | None] = [None] * len(ready)
        asking = [i for i, seq in enumerate(ready) if seq.params.logprobs is not None]
        if asking:
            pick = torch.tensor(asking, device=self.device)
            ks = [ready[i].params.logprobs for i in asking]
            for i, logprobs in zip(asking, token_logprobs(logits[pick], sampled.tokens[pick], ks)):
                found[i] = logprobs
        return found

    def _prompt_logprobs(self, layout: StepLayout, offsets: np.ndarray,
                         hidden: torch.Tensor) -> list[tuple[Sequence, list[TokenLogprob]]]:
        """For rows that asked: the logprobs of the prompt tokens their chunk predicts. Position p's
        logits give token p + 1's, so a chunk of positions [s, s + n) reports tokens s + 1 ... up to
        the prompt's last (its last position's logits are the sampling row's, not a prompt token's)."""
        found = []
        for i, seq in enumerate(layout.seqs):
            k = seq.params.prompt_logprobs
            if k is None:
                continue
            start = int(layout.starts[i])
            count = min(int(layout.counts[i]), len(seq.prompt_ids) - 1 - start)
            if count <= 0:
                continue
            targets = torch.tensor(seq.prompt_ids[start + 1:start + 1 + count], device=self.device)
            first = int(offsets[i])
            found.append((seq, prompt_token_logprobs(self.model.logits, hidden[first:first + count], targets, k,
                                                     self.rows.vocab_size)))
        return found

    def _layout(self, chunks: list[tuple[Sequence, int]]) -> StepLayout:
        # One-token rows first, then by adapter slot: see the module docstring.
        ordered = sorted(chunks, key=lambda chunk: (chunk[1] != 1, chunk[0].lora_slot))
        seqs = [seq for seq, _ in ordered]
        counts = np.array([n for _, n in ordered], dtype=np.int64)
        return StepLayout(seqs, counts, np.array([s.num_computed for s in seqs], dtype=np.int64),
                          np.array([s.row for s in seqs], dtype=np.int64), int((counts == 1).sum()))

    def _context_cache_index(self, table: np.ndarray, length: int) -> np.ndarray:
        """The cache entries of a row's first `length` tokens."""
        positions = np.arange(length)
        return table[positions // self.kv.block_size] * self.kv.block_size + positions % self.kv.block_size

    def _decode_masks(self, ctx_len: torch.Tensor, width: int) -> dict:
        """[Bd, 1, 1, width] per window: visible keys of each decode row's one query, as the additive
        mask (0 / -inf, in the model's dtype) SDPA would otherwise make of a bool one in every layer."""
        keys = torch.arange(width, device=self.device)[None, :]
        query = (ctx_len - 1)[:, None]
        dtype = self.model.embed_tokens.weight.dtype
        return {w: torch.zeros((), dtype=dtype, device=self.device).masked_fill(~visible(query, keys, w), float("-inf"))
                [:, None, None, :] for w in self.windows}

    def _prefill_rows(self, prefill: list[tuple[int, int, int]], offsets: np.ndarray, ctx_index) -> list[PrefillRow]:
        rows = []
        for i, past, n in prefill:
            queries = torch.arange(past, past + n, device=self.device)[:, None]
            keys = torch.arange(past + n, device=self.device)[None, :]
            # A fresh prompt inside every window needs no mask: plain causal attention (fused kernels).
            masks = {w: None if past == 0 and (w is None or n <= w) else visible(queries, keys, w)
                     for w in self.windows}
            rows.append(PrefillRow(int(offsets[i]), int(offsets[i]) + n, past,
                                   next(ctx_index) if past else None, masks))
        return rows

    def _upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Int64 arrays to the device in one (pinned, non-blocking) copy; views of it, in order."""
        flat = np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays])
        host = torch.from_numpy(flat)
        if self.device.type == "cuda":
            host = host.pin_memory().to(self.device, non_blocking=True)
        return list(torch.split(host, [int(np.asarray(a).size) for a in arrays]))

    def _sampling_batch(self, ready: list[Sequence], rows: np.ndarray) -> SamplingBatch:
        r = self.rows
        temperature, top_p, top_k, penalty = r.temperature[rows], r.top_p[rows], r.top_k[rows], r.penalty[rows]
        draws = np.array([uniform(seq.seed, seq.num_generated) for seq in ready], dtype=np.float32)
        floats = torch.from_numpy(np.stack([temperature, top_p, penalty, draws]))
        ints = torch.from_numpy(top_k)
        if self.device.type == "cuda":
            floats = floats.pin_memory().to(self.device, non_blocking=True)
            ints = ints.pin_memory().to(self.device, non_blocking=True)
        any_penalty = bool((penalty != 1.0).any())
        seen = r.seen[torch.from_numpy(rows).to(self.device)] if any_penalty and r.seen is not None else None
        return SamplingBatch(temperature=floats[0], top_p=floats[1], top_k=ints, penalty=floats[2], uniform=floats[3],
                             seen=seen, all_greedy=bool((temperature < GREEDY_BELOW).all()),
                             any_top_k=bool((top_k > 0).any()), any_top_p=bool((top_p < 1.0).any()),
                             any_penalty=any_penalty)


def _will_sample(chunks: list[tuple[Sequence, int]]) -> list[Sequence]:
    """The sequences a step samples for, known before its forward pass: those its chunks complete,
    and the choices that fork from a prompt it completes (see _fork)."""
    done = [seq for seq, n in chunks if seq.num_computed + n == len(seq.token_ids)]
    return done + [fork for seq in done if seq.index == 0 and seq.num_generated == 0 for fork in seq.group.forks]
