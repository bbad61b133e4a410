"""Admission: each step, which waiting sequences start, which keep waiting, and which end unstarted.

Admission is adapter-aware. Requests are considered in arrival order; one whose adapter has a
device slot (or can get one) starts, one whose adapter is still loading or finds every slot pinned
waits without holding up the requests behind it. So resident adapters' requests go first, and
churn through cold adapters cannot stall them. No request is passed over for ever: later arrivals
that start while it waits for its adapter (its load or a slot) are counted, and once it has been
overtaken max_num_seqs times, nothing after it starts until it has (a request whose adapter is
still loading holds the others for LOAD_GRACE_S at most: a stalled load must not stall them). KV
blocks stay first come, first served: the earliest request that cannot get its blocks stops
admission. When a slot must be recycled, adapters that no waiting request needs go first.

A request with n choices (SamplingParams.n) starts all of them at once: n rows, its blocks
(the prompt's full blocks once, shared, and each choice's own: KVCache.choice_blocks) and n pins
of its adapter's slot; rows are first come, first served like blocks, so it cannot be starved by
smaller requests behind it. What could never fit is refused before it waits (engine/prompts.py).

A waiting request also ends here without starting: cancelled, past request_timeout_s, or its
adapter failed to load or did not load within adapter_load_timeout_s.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ..errors import AdapterLoadError, RequestTimeoutError
from .sequence import Sequence

if TYPE_CHECKING:
    from ..adapters.files import LoraAdapter

LOAD_GRACE_S = 1.0  # how long an overtaken request's adapter load may hold later arrivals

Start = Callable[[Sequence, set[str]], bool]  # reserve what a sequence needs to run; False if taken


class KVBlocks(Protocol):
    """What admission needs of the KV cache (kv_cache.KVCache)."""

    def choice_blocks(self, prompt_tokens: int, total_tokens: int) -> tuple[int, int]: ...

    def allocate(self, num_blocks: int) -> list[int] | None: ...

    def share(self, blocks: list[int], holders: int) -> None: ...

    def free(self, blocks: list[int]) -> None: ...


class AdapterSlots(Protocol):
    """What admission needs of the adapters' device slots (adapters.slots.LoraSlots)."""

    def has_room_for(self, adapter: LoraAdapter) -> bool: ...

    def acquire(self, adapter: LoraAdapter, keep: set[str] = ...) -> int | None: ...


@dataclass
class Admission:
    """One step's decisions. The sequences kept waiting stay in the waiting queue, in order."""

    started: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, Exception]] = field(default_factory=list)
    cancelled: list[Sequence] = field(default_factory=list)


class AdmissionPolicy:
    """Owned by the engine thread, like the KV cache and the adapter slots it reserves."""

    def __init__(self, kv: KVBlocks, slots: AdapterSlots, *, max_num_seqs: int, max_model_len: int,
                 adapter_load_timeout_s: float, request_timeout_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kv = kv
        self.slots = slots
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.adapter_load_timeout_s = adapter_load_timeout_s
        self.request_timeout_s = request_timeout_s  # only named in errors: each sequence carries its deadline
        self.clock = clock

    def admit(self, waiting: deque[Sequence], num_running: int, start: Start | None = None) -> Admission:
        """Decide for every waiting sequence, in arrival order, with `num_running` sequences running
        (rows in use: each choice of a request is one; a waiting request is its first choice).

        `start` reserves what a sequence needs to run (by default `reserve`; the scheduler's also
        makes it a running sequence at once). A sequence leaves `waiting` only once decided, so an
        exception loses nobody; those kept stay in `waiting`, in arrival order.
        """
        start = start or self.reserve
        now = self.clock()
        admission = Admission()
        kept: deque[Sequence] = deque()
        blocked = False  # the earliest request that could start found no KV blocks: later ones wait
        starving = False  # a request was overtaken max_num_seqs times: later ones wait for it
        passed_over: list[Sequence] = []  # left waiting for their adapter (a load or a slot) this step
        rows = num_running
        wanted = {s.request.adapter_id for s in waiting if s.request.adapter_id}
        try:
            while waiting:
                seq = waiting[0]  # popped only once decided
                if seq.cancelled:
                    admission.cancelled.append(seq)
                elif now > seq.deadline:
                    admission.failed.append((seq, RequestTimeoutError(
                        f"the request waited past request_timeout_s ({self.request_timeout_s:g} s) without starting")))
                elif (future := seq.adapter_future) is not None and not future.done():
                    if now - seq.arrival_time > self.adapter_load_timeout_s:
                        admission.failed.append((seq, AdapterLoadError(
                            f"adapter '{seq.request.adapter_id}' did not load within adapter_load_timeout_s "
                            f"({self.adapter_load_timeout_s:g} s)")))
                    else:
                        kept.append(seq)
                        passed_over.append(seq)
                        # Its load holds later arrivals too, but for LOAD_GRACE_S at most: a load
                        # stalled on hung storage must not stall everyone.
                        starving |= seq.overtaken >= self.max_num_seqs and now - seq.starved_at < LOAD_GRACE_S
                elif future is not None and future.exception() is not None:
                    admission.failed.append((seq, future.exception()))
                elif blocked or starving:
                    kept.append(seq)
                elif rows + seq.params.n > self.max_num_seqs:
                    blocked = True  # its rows come first, as its blocks would
                    kept.append(seq)
                elif future is not None and not self.slots.has_room_for(future.result()):
                    kept.append(seq)
                    passed_over.append(seq)
                    starving |= seq.overtaken >= self.max_num_seqs
                elif start(seq, wanted):
                    admission.started.append(seq)
                    rows += seq.params.n
                    for earlier in passed_over:
                        earlier.overtaken += 1
                        if earlier.overtaken == self.max_num_seqs:
                            earlier.starved_at = now
                            starving = True  # no later arrival starts before it any more
                else:
                    blocked = True
                    kept.append(seq)
                waiting.popleft()
        finally:
            kept.extend(waiting)
            waiting.clear()
            waiting.extend(kept)
        return admission

    def reserved_tokens(self, seq: Sequence) -> int:
        """What each choice of a request has in the KV cache when it starts: room for its whole output."""
        return min(len(seq.prompt_ids) + seq.params.max_tokens, self.max_model_len)

    def reserve(self, seq: Sequence, wanted: set[str]) -> bool:
        """The KV blocks of every choice of `seq`'s request, then its adapter's slot (recycling
        first one whose adapter is not in `wanted`), pinned once per choice; False, holding
        nothing, when either is taken."""
        choices = seq.group.choices
        shared, own = self.kv.choice_blocks(len(seq.prompt_ids), self.reserved_tokens(seq))
        blocks = self.kv.allocate(shared + len(choices) * own)
        if blocks is None:
            return False
        slot = -1
        if seq.adapter_future is not None:
            adapter = seq.adapter_future.result()
            slot = self.slots.acquire(adapter, keep=wanted)
            if slot is None:  # every device slot is pinned by running rows
                self.kv.free(blocks)
                return False
            for _ in choices[1:]:
                self.slots.acquire(adapter)  # resident now: one more pin of the same slot
        self.kv.share(blocks[:shared], len(choices) - 1)
        for i, choice in enumerate(choices):
            choice.block_table = blocks[:shared] + blocks[shared + i * own:shared + (i + 1) * own]
            choice.lora_slot = slot
        return True
