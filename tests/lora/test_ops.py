"""The CPU LoRA op: the grouped (one matmul per direction) and per-segment paths equal a naive
per-token reference, also as slots change adapters, ranks and targets."""
import torch

from multilora.lora.ops import LoraBatch, LoraWeightTable, apply_lora


def naive(y, x, table, slots):
    out = y.clone()
    for t, slot in enumerate(slots):
        if slot >= 0 and table.a[slot] is not None:
            out[t] += x[t] @ table.a[slot] @ table.b[slot]
    return out


def check(table, slots, h_in=24, h_out=40, seed=0, one_token_rows=0):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(len(slots), h_in, generator=gen), torch.randn(len(slots), h_out, generator=gen)
    expected = naive(y, x, table, slots)
    apply_lora(y, x, table, LoraBatch.from_token_slots(slots, one_token_rows=one_token_rows))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def put(table, slot, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    table.set_slot(slot, torch.randn(table.h_in, rank, generator=gen), torch.randn(rank, table.h_out, generator=gen))


def test_one_token_rows_grid_then_segments():
    table = LoraWeightTable(24, 40, num_slots=6)
    for slot in (0, 2, 3, 5):
        put(table, slot, 8, slot)
    # 6 decode rows (base first, then by slot), then a prefill row of slot 0 and one of slot 5
    slots = [-1, -1, 0, 0, 2, 5, 0, 0, 0, 5, 5]
    batch = LoraBatch.from_token_slots(slots, one_token_rows=6)
    rows = batch.one_token_rows
    # slots 0..5 span 6 <= 2 x 3 adapters: the pool's range is used in place, holes included
    assert (rows.start, rows.end, rows.first, rows.groups, rows.per_group) == (2, 6, 0, 6, 2)
    assert rows.gather is None and rows.index.tolist() == [0, 1, 4, 10]
    assert [(s.start, s.end, s.slot) for s in batch.segments] == [(2, 4, 0), (4, 5, 2), (5, 6, 5), (6, 9, 0), (9, 11, 5)]
    check(table, slots, one_token_rows=6)
    assert table.cpu_pool() is not None, "one rank everywhere: the grid path must be the one taken"

    spread = LoraBatch.from_token_slots([0, 5, 5, 5], one_token_rows=4).one_token_rows
    assert spread.gather.tolist() == [0, 5] and spread.index.tolist() == [0, 3, 4, 5]  # span 6 > 2 x 2
    check(table, [0, 5, 5, 5], one_token_rows=4)

    compact = LoraBatch.from_token_slots([2, 3, 4, 5], one_token_rows=4).one_token_rows
    assert compact.gather is None and compact.index is None and compact.first == 2  # x and y used as they are
    check(table, [2, 3, 4, 5, 5], one_token_rows=4)

    check(table, [0, 2, 2, 5, 2, 2], one_token_rows=4)  # no base-model rows
    check(table, [-1, 5, 5], one_token_rows=3)  # too few rows for the grid: per segment
    assert LoraBatch.from_token_slots([-1, 5, 5], one_token_rows=3).one_token_rows is None


def test_slot_changes_update_the_pool():
    table = LoraWeightTable(24, 40, num_slots=3)
    put(table, 0, 4, 1)
    put(table, 1, 4, 2)
    check(table, [0, 1, 1, 1], one_token_rows=4)
    put(table, 1, 4, 3)  # same rank: updated in place
    check(table, [0, 1, 1, 1], one_token_rows=4)
    table.set_slot(0, None, None)  # an adapter that does not target this projection
    check(table, [0, 0, 1, 1], one_token_rows=4)
    put(table, 2, 16, 4)  # mixed ranks: per-segment path, no padding
    assert table.cpu_pool() is None
    check(table, [-1, 0, 1, 2, 2, 2], one_token_rows=5)


def test_unsorted_tokens_and_column_slices():
    table = LoraWeightTable(24, 40, num_slots=3)
    put(table, 0, 4, 1)
    put(table, 2, 4, 2)
    check(table, [2, -1, 0, 2])  # not sorted by slot: the per-segment path
    wide = torch.randn(4, 100)
    x = torch.randn(4, 24)
    expected = naive(wide[:, 30:70], x, table, [0, 0, 2, 2])
    apply_lora(wide[:, 30:70], x, table, LoraBatch.from_token_slots([0, 0, 2, 2]))
    torch.testing.assert_close(wide[:, 30:70], expected, atol=1e-5, rtol=1e-5)
