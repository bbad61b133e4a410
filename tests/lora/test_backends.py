"""The LoRA backends on CPU: the fused native op (the cpu backend, on each ISA level this CPU runs)
and the PyTorch path (the torch backend, its fallback) both equal a float64 per-token reference,
for random slot layouts, mixed ranks, decode rows and prefill segments, and fused targets (q/k/v
slices of one output) applied in one call."""
import logging

import pytest
import torch

from lora_kit import apply_lora, whole_table
from multilora.errors import ConfigError
from multilora.lora import native
from multilora.lora.backends import select_backend
from multilora.lora.backends.cpu import MAX_ITEM_TOKENS, CpuBackend, CpuStep
from multilora.lora.plan import LoraBatch
from multilora.lora.weights import LoraTarget, LoraTargets, LoraWeightTable


def reference(y, x, targets, slots):
    """y + every target's delta, token by token in float64: the definition."""
    out = y.double().clone()
    for t, slot in enumerate(slots):
        for target in targets.targets:
            a, b = (target.table.a[slot], target.table.b[slot]) if slot >= 0 else (None, None)
            if a is not None:
                out[t, target.start:target.end] += x[t].double() @ a.double() @ b.double()
    return out


def random_targets(gen, h_in, sizes, ranks, gap=0):
    """Targets side by side in one output (with `gap` untargeted columns between them); `ranks[s]`
    per slot (None: empty), and each target leaves some slots out (an adapter may skip k_proj)."""
    targets, start = [], gap
    for i, size in enumerate(sizes):
        table = LoraWeightTable(h_in, size, len(ranks))
        for slot, r in enumerate(ranks):
            if r is not None and (i == 0 or torch.rand(1, generator=gen) > 0.2):
                table.set_slot(slot, torch.randn(h_in, r, generator=gen) / h_in**0.5,
                               torch.randn(r, size, generator=gen))
        targets.append(LoraTarget(f"t{i}", start, start + size, table))
        start += size + gap
    return LoraTargets(targets), start


def step_slots(gen, num_slots, decode, prefill_lens, shuffle=False):
    """A step as the runner lays it out: one-token rows by slot (base rows first), then prefill
    rows by slot; shuffled, any layout at all."""
    decode_slots = sorted(torch.randint(-1, num_slots, (decode,), generator=gen).tolist())
    prefill = sorted((int(torch.randint(0, num_slots, (1,), generator=gen)), n) for n in prefill_lens)
    slots = decode_slots + [s for s, n in prefill for _ in range(n)]
    if shuffle:
        slots = [slots[i] for i in torch.randperm(len(slots), generator=gen).tolist()]
    return slots


def run(targets, slots, h_in, width, gen, num_decode_tokens=0, backend=None):
    x = torch.randn(len(slots), h_in, generator=gen)
    y = torch.randn(len(slots), width, generator=gen)
    expected = reference(y, x, targets, slots)
    batch = LoraBatch.from_token_slots(slots, num_decode_tokens=num_decode_tokens)
    backend = apply_lora(y, x, targets, batch, backend)
    return y, expected, backend


@pytest.fixture(params=["native", "pytorch"])
def path(request, monkeypatch):
    if request.param == "pytorch":
        monkeypatch.setattr(native, "load", lambda: None)  # as when the op could not be built
    return request.param


def test_native_op_is_built():
    """`make install` builds the op; a clone where it silently failed to build fails here."""
    assert native.load() is not None, "the fused CPU LoRA op is not built: run `make install`"


@pytest.mark.parametrize("seed", range(8))
def test_random_layouts_match_the_reference(path, seed):
    gen = torch.Generator().manual_seed(seed)
    h_in = int(torch.randint(8, 200, (1,), generator=gen))
    sizes = torch.randint(1, 150, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
    num_slots = int(torch.randint(1, 9, (1,), generator=gen))
    ranks = [None if torch.rand(1, generator=gen) < 0.2 else int(r)
             for r in torch.tensor([1, 4, 8, 16, 17, 24, 64, 128])[torch.randint(0, 8, (num_slots,), generator=gen)]]
    targets, width = random_targets(gen, h_in, sizes, ranks, gap=int(seed % 2) * 3)
    decode = int(torch.randint(0, 40, (1,), generator=gen))
    prefill = torch.randint(1, 40, (int(torch.randint(0, 4, (1,), generator=gen)),), generator=gen).tolist()
    slots = step_slots(gen, num_slots, decode, prefill, shuffle=seed >= 6) or [0]
    y, expected, backend = run(targets, slots, h_in, width, gen, num_decode_tokens=0 if seed >= 6 else decode)
    assert (backend.name == "cpu") == (path == "native")
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_fused_qkv_in_one_call_leaves_other_columns_alone(path):
    gen = torch.Generator().manual_seed(1)
    targets, width = random_targets(gen, 96, [64, 32, 32], [16, 8, None, 16, 64], gap=5)
    targets.targets[1].table.set_slot(3, None, None)  # the adapter in slot 3 has no k_proj
    slots = [-1, 0, 0, 1, 3, 3, 4] + [4] * 21 + [1] * 3
    x, y = torch.randn(len(slots), 96, generator=gen), torch.randn(len(slots), width, generator=gen)
    before = y.clone()
    expected = reference(y, x, targets, slots)
    apply_lora(y, x, targets, LoraBatch.from_token_slots(slots, num_decode_tokens=7))
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    targeted = torch.zeros(width, dtype=torch.bool)
    for target in targets.targets:
        targeted[target.start:target.end] = True
        for t, slot in enumerate(slots):  # no adapter, or its adapter skips this target
            if slot < 0 or target.table.a[slot] is None:
                assert torch.equal(y[t, target.start:target.end], before[t, target.start:target.end])
    assert torch.equal(y[:, ~targeted], before[:, ~targeted])


def test_native_equals_the_pytorch_path_and_is_thread_independent(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    targets, width = random_targets(gen, 256, [256, 64, 64], [16] * 12)
    slots = step_slots(gen, 12, 32, [100, 7])
    x, y = torch.randn(len(slots), 256, generator=gen), torch.randn(len(slots), width, generator=gen)
    results, threads = {}, torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results[n] = y.clone()
            apply_lora(results[n], x, targets, LoraBatch.from_token_slots(slots, num_decode_tokens=32))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[1], results[2]), "each token is computed by one thread in a fixed order"
    monkeypatch.setattr(native, "load", lambda: None)
    fallback = y.clone()
    apply_lora(fallback, x, targets, LoraBatch.from_token_slots(slots, num_decode_tokens=32))
    torch.testing.assert_close(results[2], fallback, rtol=1e-5, atol=1e-4)


def test_plan_groups_each_slot_once_and_cuts_long_groups():
    # decode rows of slots 2, 0, 2; then prefill rows: 40 of slot 0, 3 of slot 2; base rows skipped
    slots = [-1, 0, 2, 2] + [0] * 40 + [2] * 3 + [-1]
    step = CpuStep.build(LoraBatch.from_token_slots(slots))
    rows, items = step.rows.tolist(), step.items.tolist()
    assert rows == [1] + list(range(4, 44)) + [2, 3, 44, 45, 46]  # slot 0's tokens, then slot 2's
    assert items == [[0, 0, 16], [0, 16, 16], [0, 32, 9], [2, 41, 5]]  # largest first
    assert MAX_ITEM_TOKENS == 16


def test_slot_changes_are_seen_and_weights_are_read_in_place():
    gen = torch.Generator().manual_seed(3)
    targets, width = random_targets(gen, 24, [40], [4, 4, None])
    table = targets.targets[0].table
    slots = [0, 1, 1, 2]
    y, expected, backend = run(targets, slots, 24, width, gen)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    first = backend.native_weights(targets)
    assert first.weights[0, :, 0].tolist() == [table.a[0].data_ptr(), table.a[1].data_ptr(), 0]
    assert first.keep == [], "contiguous weights are read where they are, never copied"
    # rank 32, A not contiguous
    table.set_slot(2, torch.randn(32, 24, generator=gen).t(), torch.randn(32, 40, generator=gen))
    table.set_slot(0, None, None)  # the adapter in slot 0 left
    y, expected, _ = run(targets, slots, 24, width, gen, backend=backend)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    second = backend.native_weights(targets)
    assert second is not first and second.weights[0, :, 2].tolist() == [0, 4, 32]
    assert len(second.keep) == 1 and second.keep[0].is_contiguous()  # the copy of slot 2's A
    assert backend.native_weights(targets) is second, "rebuilt only after a change"


def test_op_refuses_inputs_that_do_not_fit_its_plan():
    gen = torch.Generator().manual_seed(4)
    targets, width = random_targets(gen, 24, [40], [4])
    batch = LoraBatch.from_token_slots([0, 0, 0])
    with pytest.raises(RuntimeError, match="target 0 does not fit"):
        apply_lora(torch.zeros(3, width), torch.zeros(3, 25), targets, batch)  # x is not h_in wide
    with pytest.raises(RuntimeError, match="outside x's 2 rows"):
        apply_lora(torch.zeros(2, width), torch.zeros(2, 24), targets, batch)  # fewer tokens than planned


def test_other_dtypes_take_the_pytorch_path():
    gen = torch.Generator().manual_seed(5)
    table = LoraWeightTable(16, 8, 1)
    table.set_slot(0, torch.randn(16, 4, generator=gen, dtype=torch.float64),
                   torch.randn(4, 8, generator=gen, dtype=torch.float64))
    x, y = torch.randn(3, 16, generator=gen, dtype=torch.float64), torch.zeros(3, 8, dtype=torch.float64)
    apply_lora(y, x, whole_table(table), LoraBatch.from_token_slots([0, -1, 0]))
    torch.testing.assert_close(y, reference(torch.zeros(3, 8), x, whole_table(table), [0, -1, 0]))


def test_loader_says_once_why_the_op_is_missing(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(native, "BUILD_DIR", tmp_path)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.load.__wrapped__() is None
        (tmp_path / f"{native.module_name()}.so").write_bytes(b"not a library")
        assert native.load.__wrapped__() is None
    missing, broken = [r.getMessage() for r in caplog.records]
    assert "not built" in missing and "make install" in missing and "PyTorch path" in missing
    assert "does not load" in broken and "PyTorch path" in broken


@pytest.fixture(params=list(native.ISA_LEVELS))
def isa_backend(request):
    """The cpu backend on one ISA level (skipped where this CPU lacks it)."""
    op = native.load()
    assert op is not None, "the fused CPU LoRA op is not built: run `make install`"
    if request.param not in op.isa_levels():
        pytest.skip(f"this CPU does not run ISA level {request.param}")
    return CpuBackend(op, request.param)


@pytest.mark.parametrize("seed", range(4))
def test_every_isa_level_matches_the_reference(isa_backend, seed):
    """Each level's tiles (rows per tile, vectors per row, the narrower tails) on random shapes:
    ranks and widths that are no multiple of any vector, prefill items that end in every row count."""
    gen = torch.Generator().manual_seed(100 + seed)
    h_in = int(torch.randint(1, 300, (1,), generator=gen))
    ranks = [1, 3, 16, 17, 40, None, 64, 8][seed:seed + 5]
    targets, width = random_targets(gen, h_in, [int(torch.randint(1, 200, (1,), generator=gen)), 96, 5], ranks, gap=1)
    decode = int(torch.randint(1, 20, (1,), generator=gen))
    slots = step_slots(gen, len(ranks), decode, [1, 2, 3, 5, 7, 9, 16, 23])
    y, expected, backend = run(targets, slots, h_in, width, gen, num_decode_tokens=decode, backend=isa_backend)
    assert backend.isa == isa_backend.isa
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_isa_level_comes_from_the_environment_and_is_checked(monkeypatch):
    op = native.load()
    levels = op.isa_levels()
    assert levels[-1] == "baseline" and set(levels) <= set(native.ISA_LEVELS)
    monkeypatch.delenv(native.ISA_ENV, raising=False)
    assert select_backend(torch.device("cpu"), torch.float32, None).isa == levels[0], "the best level by default"
    monkeypatch.setenv(native.ISA_ENV, "baseline")
    assert select_backend(torch.device("cpu"), torch.float32, None).isa == "baseline"
    monkeypatch.setenv(native.ISA_ENV, "avx9")
    with pytest.raises(ConfigError, match="not an ISA level.*v4 .*v3 .*baseline"):
        select_backend(torch.device("cpu"), torch.float32, None)


def test_a_level_the_cpu_lacks_is_refused():
    class OpOnAnAvx2Cpu:
        @staticmethod
        def isa_levels():
            return ["v3", "baseline"]

    with pytest.raises(ConfigError, match="v4 asks for the AVX-512F \\+ FMA path.*lacks; it runs v3, baseline"):
        native.choose_isa(OpOnAnAvx2Cpu(), "v4")
    assert native.choose_isa(OpOnAnAvx2Cpu(), "auto") == "v3"
    gen = torch.Generator().manual_seed(6)
    targets, width = random_targets(gen, 24, [40], [4])
    step = CpuStep.build(LoraBatch.from_token_slots([0]))
    weights = CpuBackend(native.load()).native_weights(targets)
    with pytest.raises(RuntimeError, match="ISA level 'v9' is not one this CPU runs"):  # the op checks too
        native.load().apply(torch.zeros(1, width), torch.zeros(1, 24), weights.columns, weights.weights,
                            step.rows, step.items, "v9")
