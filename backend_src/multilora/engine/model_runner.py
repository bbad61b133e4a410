"""Turns a scheduled step into tensors, runs the model once, and returns the logits to sample from.

Rows are ordered by adapter slot before the forward pass, so each adapter's tokens are one
contiguous segment for the LoRA op; the metadata built here is shared by every layer.
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
        order = sorted(range(len(rows)), key=lambda i: rows[i][0].lora_slot)
        ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        token_slots: list[int] = []
        last_token: dict[int, int] = {}  # row index -> its last token in the flat axis
        decode_tokens: list[int] = []
        decode_ctx: list[list[int]] = []
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
            ctx = self.kv.slots(seq.block_table, 0, start + n)
            if n == 1:
                decode_tokens.append(flat)
                decode_ctx.append(ctx)
            else:
                query_pos = torch.arange(start, start + n).unsqueeze(1)
                mask = torch.arange(start + n).unsqueeze(0) <= query_pos  # [n, ctx]
                prefill_rows.append(PrefillRow(flat, flat + n, self._tensor(ctx), mask.to(self.device)))
        meta = AttentionMetadata(
            slot_mapping=self._tensor(slot_mapping),
            decode_tokens=self._tensor(decode_tokens),
            decode_ctx_slots=self._tensor(_pad(decode_ctx)),
            decode_mask=self._decode_mask(decode_ctx),
            prefill_rows=prefill_rows,
        )
        lora = LoraBatch.from_token_slots(token_slots, self.device) if any(s >= 0 for s in token_slots) else None
        hidden = self.model(self._tensor(ids), self._tensor(positions), self.kv.layers, meta, lora)

        sampling = [i for i, (seq, n) in enumerate(rows) if seq.num_computed + n == len(seq.token_ids)]
        logits = self.model.logits(hidden[self._tensor([last_token[i] for i in sampling])])
        return [rows[i][0] for i in sampling], logits

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _decode_mask(self, ctx: list[list[int]]) -> torch.Tensor:
        width = max((len(c) for c in ctx), default=0)
        mask = torch.zeros(len(ctx), 1, 1, width, dtype=torch.bool)
        for row, c in enumerate(ctx):
            mask[row, 0, 0, :len(c)] = True
        return mask.to(self.device)


def _pad(rows: list[list[int]]) -> list[list[int]]:
    width = max((len(r) for r in rows), default=0)
    return [r + [0] * (width - len(r)) for r in rows]
