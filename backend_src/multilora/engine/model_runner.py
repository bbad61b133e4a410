"""Turns a scheduled step into tensors, runs the model once, and returns the logits to sample from.

Rows are ordered before the forward pass: one-token rows (decode) first, then longer rows, each
group by adapter slot. So each adapter's tokens are contiguous segments, and the decode rows with
an adapter are one contiguous range the LoRA op handles with one gathered matmul pair. The
metadata built here is shared by every layer.
"""
from __future__ import annotations

import torch

from ..lora.ops import LoraBatch
from ..models.attention import AttentionMetadata, PrefillRow
from ..models.llama import LlamaModel
from .kv_cache import KVCache
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv = kv_cache
        self.device = device

    @torch.inference_mode()
    def execute(self, rows: list[tuple[Sequence, int]]) -> tuple[list[Sequence], torch.Tensor]:
        """Compute the rows' new tokens; return the sequences whose prompt and output are now fully
        computed (they sample next), in row order, with their fp32 logits [n, vocab]."""
        # One-token rows first, then by adapter slot: see the module docstring.
        order = sorted(range(len(rows)), key=lambda i: (rows[i][1] != 1, rows[i][0].lora_slot))
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        token_slots: list[int] = []
        last_token: dict[int, int] = {}  # row index -> its last token in the flat axis
        decode_tokens: list[int] = []
        decode_ctx: list[tuple[list[int], int]] = []  # (blocks, context length) of each decode row
        prefill_rows: list[PrefillRow] = []
        for i in order:
            seq, n = rows[i]
            start = seq.num_computed
            flat = len(ids)
            ids += seq.token_ids[start:start + n]
            positions += range(start, start + n)
            slot_mapping += self.kv.slots(seq.block_table, start, start + n)
            token_slots += [seq.lora_slot] * n
            last_token[i] = flat + n - 1
            if n == 1:
                decode_tokens.append(flat)
                decode_ctx.append((seq.block_table[:self.kv.blocks_for(start + 1)], start + 1))
            else:
                ctx = self.kv.slots(seq.block_table, 0, start + n)
                query_pos = torch.arange(start, start + n).unsqueeze(1)
                mask = torch.arange(start + n).unsqueeze(0) <= query_pos  # [n, ctx]
                prefill_rows.append(PrefillRow(flat, flat + n, self._tensor(ctx), mask.to(self.device)))
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slot_mapping),
            decode_tokens=self._tensor(decode_tokens),
            decode_blocks=self._tensor([b for blocks in _pad([c[0] for c in decode_ctx]) for b in blocks]),
            decode_mask=self._decode_mask([c[1] for c in decode_ctx]),
            block_size=self.kv.block_size,
            prefill_rows=prefill_rows,
        )
        one_token_rows = sum(1 for _, n in rows if n == 1)
        lora = LoraBatch.from_token_slots(token_slots, self.device, one_token_rows) \
            if any(s >= 0 for s in token_slots) else None
        hidden = self.model(self._tensor(ids), self._tensor(positions), self.kv.layers, meta, lora)

        sampling = [i for i, (seq, n) in enumerate(rows) if seq.num_computed + n == len(seq.token_ids)]
        logits = self.model.logits(hidden[self._tensor([last_token[i] for i in sampling])])
        return [rows[i][0] for i in sampling], logits

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _decode_mask(self, lengths: list[int]) -> torch.Tensor:
        """[Bd, 1, 1, Nmax * block_size]: True on each row's first `length` context positions."""
        width = self.kv.blocks_for(max(lengths, default=0)) * self.kv.block_size
        mask = torch.arange(width).unsqueeze(0) < torch.tensor(lengths, dtype=torch.long).unsqueeze(1)
        return mask.view(len(lengths), 1, 1, width).to(self.device)


def _pad(rows: list[list[int]]) -> list[list[int]]:
    width = max((len(r) for r in rows), default=0)
    return [r + [0] * (width - len(r)) for r in rows]
