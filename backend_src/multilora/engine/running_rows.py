"""Per-row state of the running sequences, in fixed arrays indexed by each sequence's row.

Written once when a sequence is admitted (its block table is final then: blocks are reserved for
prompt + max_tokens at admission) and read by index every step, so building a step is array
indexing, not Python work per token. The repetition penalty's token sets live on the device and
grow by one scatter per step, so no token history is uploaded.
"""
from __future__ import annotations

import numpy as np
import torch

from .sequence import Sequence


class RunningRows:
    def __init__(self, *, max_rows: int, max_blocks: int, vocab_size: int, device: torch.device) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self.block_tables = np.zeros((max_rows, max_blocks), dtype=np.int64)
        self.temperature = np.zeros(max_rows, dtype=np.float32)
        self.top_p = np.ones(max_rows, dtype=np.float32)
        self.top_k = np.zeros(max_rows, dtype=np.int64)
        self.penalty = np.ones(max_rows, dtype=np.float32)
        self.seen: torch.Tensor | None = None  # [max_rows, V] bool, made when a row first needs it
        self._free = list(range(max_rows - 1, -1, -1))

    def add(self, seq: Sequence) -> None:
        row = seq.row = self._free.pop()
        self.block_tables[row, :len(seq.block_table)] = seq.block_table
        self.block_tables[row, len(seq.block_table):] = 0  # never read: past the row's context
        params = seq.params
        self.temperature[row] = params.temperature
        self.top_p[row] = params.top_p
        self.top_k[row] = params.top_k
        self.penalty[row] = params.repetition_penalty
        if params.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(len(self.penalty), self.vocab_size, dtype=torch.bool, device=self.device)
            self.seen[row].zero_()
            ids = torch.tensor(seq.token_ids, dtype=torch.long).to(self.device, non_blocking=True)
            self.seen[row].index_fill_(0, ids, True)

    def remove(self, seq: Sequence) -> None:
        if seq.row >= 0:
            self._free.append(seq.row)
            seq.row = -1

    def record(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """The step's sampled tokens, [n] on the device, join their rows' penalty sets."""
        if self.seen is not None:
            self.seen[rows, tokens.clamp(min=0)] = True
