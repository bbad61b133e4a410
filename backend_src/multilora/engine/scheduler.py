"""Iteration-level scheduling: who runs in the next step, and with how many tokens.

Every step: admit waiting sequences while rows, KV blocks and adapter slots allow; give each
running sequence in decode one token, then spend the rest of the token budget on prompt chunks
(chunked prefill), so a long prompt never stalls the rows that are decoding.

Admission is adapter-aware. Requests are considered in arrival order; one whose adapter has a
device slot (or can get one) starts, one whose adapter is still loading or finds every slot pinned
waits without holding up the requests behind it. So resident adapters' requests go first, and
churn through cold adapters cannot stall them. No request is passed over for ever: later arrivals
that start while it waits for its adapter (its load or a slot) are counted, and once it has been
overtaken max_num_seqs times, nothing after it starts until it has (a request whose adapter is
still loading holds the others for LOAD_GRACE_S at most: a stalled load must not stall them). KV blocks stay
first come, first served: the earliest request that cannot get its blocks stops admission. When a
slot must be recycled, adapters that no waiting request needs go first.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import AdapterLoadError, RequestTimeoutError
from ..lora.slots import LoraSlots
from .kv_cache import KVCache
from .sequence import Sequence

LOAD_GRACE_S = 1.0  # see _admit: how long an overtaken request's adapter load may hold later arrivals


@dataclass
class ScheduledStep:
    rows: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens this step)
    admitted: list[Sequence] = field(default_factory=list)  # started running this step
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)
    cancelled: list[Sequence] = field(default_factory=list)  # cancelled while waiting


class Scheduler:
    """Owned by the engine thread, like the KV cache and the adapter slots it hands out."""

    def __init__(self, kv_cache: KVCache, slots: LoraSlots, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, adapter_load_timeout_s: float,
                 request_timeout_s: float = 0.0) -> None:
        self.kv = kv_cache
        self.slots = slots
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.adapter_load_timeout_s = adapter_load_timeout_s
        self.request_timeout_s = request_timeout_s
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def reserved_tokens(self, seq: Sequence) -> int:
        return min(len(seq.prompt_ids) + seq.params.max_tokens, self.max_model_len)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep()
        self._admit(step)
        budget = self.max_num_batched_tokens
        decoding = [s for s in self.running if s.uncomputed == 1]
        prefilling = [s for s in self.running if s.uncomputed > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            n = min(seq.uncomputed, budget)
            step.rows.append((seq, n))
            budget -= n
        return step

    def _admit(self, step: ScheduledStep) -> None:
        now = time.monotonic()
        kept: deque[Sequence] = deque()
        blocked = False  # the earliest request that could start found no KV blocks: later ones wait
        starving = False  # a request was overtaken max_num_seqs times: later ones wait for it
        passed_over: list[Sequence] = []  # left waiting for their adapter (a load or a slot) this step
        wanted = {s.request.adapter_id for s in self.waiting if s.request.adapter_id}
        try:
            while self.waiting:
                seq = self.waiting[0]  # popped only once decided: an exception loses nobody
                if seq.cancelled:
                    step.cancelled.append(seq)
                elif now > seq.deadline:
                    step.failed.append((seq, RequestTimeoutError(
                        f"the request waited past request_timeout_s ({self.request_timeout_s:g} s) without starting")))
                elif (future := seq.adapter_future) is not None and not future.done():
                    if now - seq.arrival_time > self.adapter_load_timeout_s:
                        step.failed.append((seq, AdapterLoadError(
                            f"adapter '{seq.request.adapter_id}' did not load within adapter_load_timeout_s "
                            f"({self.adapter_load_timeout_s:g} s)")))
                    else:
                        kept.append(seq)
                        passed_over.append(seq)
                        # Its load holds later arrivals too, but for LOAD_GRACE_S at most: a load
                        # stalled on hung storage must not stall everyone.
                        starving |= seq.overtaken >= self.max_num_seqs and now - seq.starved_at < LOAD_GRACE_S
                elif future is not None and future.exception() is not None:
                    step.failed.append((seq, future.exception()))
                elif blocked or starving or len(self.running) >= self.max_num_seqs:
                    kept.append(seq)
                elif future is not None and not self.slots.has_room_for(future.result()):
                    kept.append(seq)
                    passed_over.append(seq)
                    starving |= seq.overtaken >= self.max_num_seqs
                elif self._try_start(seq, wanted):
                    step.admitted.append(seq)
                    for earlier in passed_over:
                        earlier.overtaken += 1
                        if earlier.overtaken == self.max_num_seqs:
                            earlier.starved_at = now
                            starving = True  # no later arrival starts before it any more
                else:
                    blocked = True
                    kept.append(seq)
                self.waiting.popleft()
        finally:
            kept.extend(self.waiting)
            self.waiting = kept

    def _try_start(self, seq: Sequence, wanted: set[str]) -> bool:
        blocks = self.kv.allocate(self.kv.blocks_for(self.reserved_tokens(seq)))
        if blocks is None:
            return False
        if seq.adapter_future is not None:
            slot = self.slots.acquire(seq.adapter_future.result(), keep=wanted)
            if slot is None:  # every device slot is pinned by running rows
                self.kv.free(blocks)
                return False
            seq.lora_slot = slot
        seq.block_table = blocks
        self.running.append(seq)
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

