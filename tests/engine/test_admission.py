"""The admission policy alone: who starts, who waits, who ends unstarted, and why.

No model and no engine: a KV cache of counted blocks, the real adapter slots over a fake layer
table, adapters whose loads are Futures the test completes, and a clock the test moves.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import Future

import pytest
import torch

from multilora.adapters.files import LoraAdapter
from multilora.adapters.slots import LoraSlots
from multilora.engine.admission import LOAD_GRACE_S, AdmissionPolicy
from multilora.engine.sampling_params import SamplingParams
from multilora.engine.sequence import GenerationRequest, Sequence, SequenceGroup
from multilora.errors import AdapterLoadError, RequestTimeoutError

BLOCK = 4  # tokens per KV block


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CountedBlocks:
    """The KV cache's block bookkeeping without the cache."""

    def __init__(self, num_blocks: int) -> None:
        self.free_blocks = list(range(num_blocks))
        self.holders: dict[int, int] = {}

    def choice_blocks(self, prompt_tokens: int, total_tokens: int) -> tuple[int, int]:
        shared = prompt_tokens // BLOCK
        return shared, -(-total_tokens // BLOCK) - shared

    def allocate(self, num_blocks: int) -> list[int] | None:
        if num_blocks > len(self.free_blocks):
            return None
        taken, self.free_blocks = self.free_blocks[:num_blocks], self.free_blocks[num_blocks:]
        self.holders.update((block, 1) for block in taken)
        return taken

    def share(self, blocks: list[int], holders: int) -> None:
        for block in blocks:
            self.holders[block] += holders

    def free(self, blocks: list[int]) -> None:
        for block in blocks:
            self.holders[block] -= 1
            if not self.holders[block]:
                self.free_blocks.append(block)


class LayerTable:
    """Stands for the LoRA layers: remembers which adapter each slot holds."""

    def __init__(self) -> None:
        self.installed: dict[int, str | None] = {}

    def install(self, slot: int, adapter: LoraAdapter | None) -> None:
        self.installed[slot] = adapter.adapter_id if adapter is not None else None


class Admitting:
    """A policy with its queue, blocks, slots and clock, and requests made to measure."""

    def __init__(self, *, num_blocks: int = 64, num_slots: int = 2, max_num_seqs: int = 4,
                 adapter_load_timeout_s: float = 30.0, request_timeout_s: float = 0.0) -> None:
        self.clock = Clock()
        self.kv = CountedBlocks(num_blocks)
        self.layers = LayerTable()
        self.slots = LoraSlots(self.layers, num_slots, torch.device("cpu"))
        self.policy = AdmissionPolicy(self.kv, self.slots, max_num_seqs=max_num_seqs, max_model_len=1024,
                                      adapter_load_timeout_s=adapter_load_timeout_s,
                                      request_timeout_s=request_timeout_s, clock=self.clock)
        self.waiting: deque[Sequence] = deque()
        self._adapters: dict[str, LoraAdapter] = {}

    def adapter(self, adapter_id: str) -> LoraAdapter:
        """One loaded adapter object per id (slots tell loads apart by object)."""
        if adapter_id not in self._adapters:
            weights = {(0, "q_proj"): (torch.zeros(2, 1), torch.zeros(1, 2))}
            self._adapters[adapter_id] = LoraAdapter(adapter_id, weights, frozenset({1}), None)
        return self._adapters[adapter_id]

    def add(self, rid: str, adapter_id: str | None = None, *, loaded: bool = True, prompt_tokens: int = 4,
            max_tokens: int = 4, n: int = 1) -> Sequence:
        """A request arriving now (its first choice); its adapter in host memory (`loaded`) or still loading."""
        request = GenerationRequest(rid, "prompt", SamplingParams(max_tokens=max_tokens, n=n), adapter_id)
        seq = Sequence(request, [1] * prompt_tokens, None, lambda out: None, arrival_time=self.clock.now)
        if self.policy.request_timeout_s:
            seq.deadline = seq.arrival_time + self.policy.request_timeout_s  # as LLMEngine.add_request sets it
        if adapter_id is not None:
            seq.adapter_future = Future()
            if loaded:
                seq.adapter_future.set_result(self.adapter(adapter_id))
        SequenceGroup([seq] + [Sequence(request, seq.prompt_ids, None, seq.on_output, index=i) for i in range(1, n)])
        self.waiting.append(seq)
        return seq

    def admit(self, num_running: int = 0):
        return self.policy.admit(self.waiting, num_running)

    def waiting_ids(self) -> list[str]:
        return ids(self.waiting)


def ids(seqs) -> list[str]:
    return [seq.request.request_id for seq in seqs]


def test_requests_start_in_arrival_order_while_rows_are_free():
    a = Admitting(max_num_seqs=3)
    first, second = a.add("a"), a.add("b")
    a.add("c")
    a.add("d")
    step = a.admit(num_running=1)
    assert ids(step.started) == ["a", "b"] and a.waiting_ids() == ["c", "d"]
    assert (first.block_table, second.block_table) == ([0, 1], [2, 3])  # prompt 4 + max_tokens 4: two blocks each
    assert ids(a.admit(num_running=0).started) == ["c", "d"] and not a.waiting


def test_a_resident_adapters_request_overtakes_one_whose_adapter_is_loading():
    a = Admitting()
    cold = a.add("cold", "chat", loaded=False)
    warm = a.add("warm", "sql")
    step = a.admit()
    assert ids(step.started) == ["warm"] and a.waiting_ids() == ["cold"]
    assert cold.overtaken == 1 and cold.lora_slot == -1 and warm.lora_slot >= 0
    cold.adapter_future.set_result(a.adapter("chat"))
    assert ids(a.admit(num_running=1).started) == ["cold"] and cold.lora_slot not in (-1, warm.lora_slot)


def test_after_max_num_seqs_overtakes_no_later_request_starts_before_the_overtaken_one():
    a = Admitting(num_slots=1, max_num_seqs=2)
    hog_slot = a.slots.acquire(a.adapter("sql"))  # a running request pins the only slot
    cold = a.add("cold", "chat")  # in host memory, but no slot for it
    warm = [a.add(f"warm{i}", "sql") for i in range(4)]  # share the hog's slot
    assert ids(a.admit(num_running=1).started) == ["warm0"] and cold.overtaken == 1
    a.slots.release(warm[0].lora_slot)
    step = a.admit(num_running=0)  # rows for two, but once warm1 starts, cold has been overtaken twice
    assert ids(step.started) == ["warm1"] and cold.overtaken == 2
    a.slots.release(warm[1].lora_slot)
    step = a.admit(num_running=0)  # and so in every later step
    assert step.started == [] and a.waiting_ids() == ["cold", "warm2", "warm3"] and cold.overtaken == 2
    a.slots.release(hog_slot)
    step = a.admit(num_running=0)
    assert ids(step.started) == ["cold"] and cold.lora_slot == hog_slot  # warm2 now waits for the slot
    assert a.waiting_ids() == ["warm2", "warm3"]


def test_a_stalled_load_holds_later_arrivals_for_load_grace_s_at_most():
    a = Admitting(num_slots=4, max_num_seqs=2)
    cold = a.add("cold", "chat", loaded=False)
    a.add("b0")
    a.add("b1")
    assert ids(a.admit().started) == ["b0", "b1"]
    assert cold.overtaken == 2 and cold.starved_at == 100.0
    a.add("b2")
    a.add("b3")
    a.clock.now = 100.0 + LOAD_GRACE_S * 0.9
    assert a.admit().started == [] and a.waiting_ids() == ["cold", "b2", "b3"]
    a.clock.now = 100.0 + LOAD_GRACE_S * 1.1
    step = a.admit()
    assert ids(step.started) == ["b2", "b3"] and step.failed == [] and a.waiting_ids() == ["cold"]


def test_kv_blocks_are_first_come_first_served():
    a = Admitting(num_blocks=5)
    first = a.add("first")  # 2 blocks
    a.add("big", max_tokens=12)  # 4 blocks
    a.add("small")  # 2 blocks: would fit the 3 left, but must not pass "big"
    step = a.admit()
    assert ids(step.started) == ["first"] and a.waiting_ids() == ["big", "small"]
    assert len(a.kv.free_blocks) == 3
    a.kv.free(first.block_table)
    assert ids(a.admit().started) == ["big"] and a.waiting_ids() == ["small"]


def test_a_failed_adapter_load_fails_its_request_alone():
    a = Admitting()
    bad = a.add("bad", "chat", loaded=False)
    error = AdapterLoadError("adapter 'chat': adapter_model.safetensors is truncated")
    bad.adapter_future.set_exception(error)
    a.add("good", "sql")
    step = a.admit()
    assert step.failed == [(bad, error)] and ids(step.started) == ["good"] and not a.waiting


def test_a_load_past_adapter_load_timeout_s_fails_its_request():
    a = Admitting(adapter_load_timeout_s=5.0)
    slow = a.add("slow", "chat", loaded=False)
    a.clock.now = 105.0  # exactly the timeout: still waiting
    assert a.admit().failed == [] and a.waiting_ids() == ["slow"]
    a.clock.now = 105.1
    step = a.admit()
    ((seq, error),) = step.failed
    assert seq is slow and isinstance(error, AdapterLoadError) and not a.waiting
    assert str(error) == "adapter 'chat' did not load within adapter_load_timeout_s (5 s)"


def test_a_request_past_request_timeout_s_fails_while_waiting():
    a = Admitting(num_blocks=0, request_timeout_s=10.0)  # no blocks: nothing can start
    stuck = a.add("stuck")
    a.clock.now = 109.0
    assert a.admit().failed == [] and a.waiting_ids() == ["stuck"]
    a.clock.now = 110.5
    ((seq, error),) = a.admit().failed
    assert seq is stuck and isinstance(error, RequestTimeoutError) and not a.waiting
    assert "waited past request_timeout_s (10 s) without starting" in str(error)


def test_a_request_cancelled_while_waiting_ends_without_taking_anything():
    a = Admitting(request_timeout_s=10.0)
    gone = a.add("gone", "chat")
    gone.cancelled = True
    a.add("stays", "sql")
    a.clock.now = 120.0  # past both deadlines: cancelled is said first
    step = a.admit()
    assert step.cancelled == [gone] and gone.block_table == [] and gone.lora_slot == -1
    assert [seq.request.request_id for seq, _ in step.failed] == ["stays"]
    assert step.started == [] and a.slots.resident() == [] and len(a.kv.free_blocks) == 64


def test_a_recycled_slot_is_one_no_waiting_request_wants():
    a = Admitting(num_slots=2)
    sql_slot, chat_slot = a.slots.acquire(a.adapter("sql")), a.slots.acquire(a.adapter("chat"))
    a.slots.release(sql_slot)
    a.slots.release(chat_slot)  # both idle; sql is the least recently used
    new = a.add("new", "summarize")
    again = a.add("again", "sql")
    step = a.admit()
    assert ids(step.started) == ["new", "again"]
    assert (new.lora_slot, again.lora_slot) == (chat_slot, sql_slot)  # chat went: nobody waiting wants it
    assert a.layers.installed[chat_slot] == "summarize" and sorted(a.slots.resident()) == ["sql", "summarize"]


def test_reserve_holds_nothing_when_every_slot_is_pinned():
    a = Admitting(num_slots=1)
    a.slots.acquire(a.adapter("sql"))
    seq = a.add("chat", "chat")
    assert not a.policy.reserve(seq, {"chat"})
    assert len(a.kv.free_blocks) == 64 and seq.block_table == [] and seq.lora_slot == -1


def test_an_exception_while_starting_loses_no_waiting_request():
    a = Admitting()
    a.add("gone").cancelled = True
    a.add("x")
    a.add("y")

    def broken(seq, wanted):
        raise RuntimeError("slot table exploded")

    with pytest.raises(RuntimeError, match="slot table exploded"):
        a.policy.admit(a.waiting, 0, broken)
    assert a.waiting_ids() == ["x", "y"]  # the cancelled one was decided; the others wait, in order


def test_n_choices_start_together_sharing_the_prompts_full_blocks():
    a = Admitting(num_blocks=16, num_slots=1)
    seq = a.add("n3", "sql", prompt_tokens=6, max_tokens=5, n=3)  # 11 tokens: 3 blocks of 4 per choice
    step = a.admit()
    assert ids(step.started) == ["n3"]
    first, second, third = seq.group.choices
    shared = first.block_table[:1]  # the prompt's one full block; its partial second block is each choice's own
    assert [len(c.block_table) for c in seq.group.choices] == [3, 3, 3]
    assert second.block_table[:1] == third.block_table[:1] == shared and a.kv.holders[shared[0]] == 3
    own = [b for c in seq.group.choices for b in c.block_table[1:]]
    assert len(set(own)) == 6 and not set(own) & set(shared) and len(a.kv.free_blocks) == 16 - 7
    assert {c.lora_slot for c in seq.group.choices} == {first.lora_slot} and first.lora_slot >= 0
    assert a.slots.residency() == [("sql", True)]
    for c in seq.group.choices:  # each choice gives its blocks and its pin back when it ends
        a.kv.free(c.block_table)
        a.slots.release(c.lora_slot)
    assert len(a.kv.free_blocks) == 16 and a.slots.residency() == [("sql", False)]


def test_a_request_whose_choices_need_more_rows_than_are_free_waits_and_holds_the_rows():
    a = Admitting(max_num_seqs=4)
    a.add("n3", n=3)
    a.add("one")  # a row is free for it, but it must not take rows before the earlier request
    assert a.admit(num_running=2).started == [] and a.waiting_ids() == ["n3", "one"]
    assert ids(a.admit(num_running=1).started) == ["n3"] and a.waiting_ids() == ["one"]
    assert ids(a.admit(num_running=0).started) == ["one"]
