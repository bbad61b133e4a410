"""Iteration-level scheduling: who runs in the next step, and with how many tokens.

Every step: admit waiting sequences while rows, KV blocks and adapter slots allow (admission.py
decides who, and in which order); give each running sequence in decode one token, then spend the
rest of the token budget on prompt chunks (chunked prefill), so a long prompt never stalls the
rows that are decoding. A request with n choices runs as n sequences (engine/sequence.py,
SequenceGroup): its first computes the prompt, the others join the decoding rows once they have
their first token.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..adapters.slots import LoraSlots
from .admission import AdmissionPolicy
from .kv_cache import KVCache
from .sequence import Sequence


@dataclass
class ScheduledStep:
    chunks: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, its tokens to compute this step)
    admitted: list[Sequence] = field(default_factory=list)  # started running this step (every choice)
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)  # ended before starting
    cancelled: list[Sequence] = field(default_factory=list)  # cancelled while waiting


class Scheduler:
    """Owned by the engine thread, like the KV cache and the adapter slots it hands out."""

    def __init__(self, kv_cache: KVCache, slots: LoraSlots, admission: AdmissionPolicy, *,
                 max_num_batched_tokens: int) -> None:
        self.kv = kv_cache
        self.slots = slots
        self.admission = admission
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        admission = self.admission.admit(self.waiting, len(self.running), self._try_start)
        step = ScheduledStep(admitted=[choice for seq in admission.started for choice in seq.group.choices],
                             failed=admission.failed, cancelled=admission.cancelled)
        budget = self.max_num_batched_tokens
        decoding = [s for s in self.running if s.uncomputed == 1]
        prefilling = [s for s in self.running if s.uncomputed > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            n = min(seq.uncomputed, budget)
            step.chunks.append((seq, n))
            budget -= n
        return step

    def _try_start(self, seq: Sequence, wanted: set[str]) -> bool:
        """Admission's `start`: a request whose choices get their blocks and slot runs from this
        moment, so if the step fails after this, `retire` still finds them and gives them back."""
        if not self.admission.reserve(seq, wanted):
            return False
        self.running.extend(seq.group.choices)
        return True

    def retire(self, seq: Sequence) -> None:
        """Give back a finished or cancelled sequence's blocks and adapter slot."""
        if seq in self.running:
            self.running.remove(seq)
            self.kv.free(seq.block_table)
            seq.block_table = []
            if seq.lora_slot >= 0:
                self.slots.release(seq.lora_slot)
                seq.lora_slot = -1
