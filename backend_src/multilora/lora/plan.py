"""The step's LoRA plan: which adapter slot each token of one step uses, as contiguous segments.

The model runner builds one LoraBatch per step; the engine's backend plans its own per-step work
from it once (LoraBackend.plan_step), and every LoRA layer reads that plan. A step's tokens are laid
out so that each adapter's tokens form contiguous segments (the runner sorts rows by adapter slot);
decode rows come first, one token each.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Segment:
    """Tokens [start, end) of the step all use adapter slot `slot` (>= 0)."""

    start: int
    end: int
    slot: int


@dataclass
class LoraBatch:
    """Which adapter each token of one step uses."""

    segments: list[Segment]
    token_slots: torch.Tensor  # [T] int32, -1 = no adapter; on the model's device
    num_tokens: int

    @classmethod
    def from_token_slots(cls, slots: Sequence[int] | np.ndarray, device: torch.device | str = "cpu",
                         num_decode_tokens: int = 0) -> LoraBatch:
        """Build from per-token slots; equal neighbours are merged into segments.

        The first `num_decode_tokens` tokens are the decode rows' (one token each); no segment
        crosses that boundary.
        """
        slots = np.asarray(slots, dtype=np.int64)
        cuts = np.flatnonzero(np.diff(slots)) + 1
        if 0 < num_decode_tokens < len(slots):
            cuts = np.union1d(cuts, [num_decode_tokens])
        bounds = np.concatenate(([0], cuts, [len(slots)])).tolist()
        segments = [Segment(a, b, int(slots[a])) for a, b in zip(bounds[:-1], bounds[1:]) if a < b and slots[a] >= 0]
        token_slots = torch.from_numpy(slots.astype(np.int32)).to(device, non_blocking=True)
        return cls(segments=segments, token_slots=token_slots, num_tokens=len(slots))
