"""The kernels' per-step plan (issue 11 item 5, issue 20 item 7): a step makes the context current
once, uploads its arrays once, allocates its scratch once and plans and packs each projection shape
once, for all of its targets; every layer's call only writes its own addresses into the packed
arguments and launches one shrink and one expand. Run on the CPU emulation through the real LoRA
layers."""
from __future__ import annotations

import torch

from multilora.lora.backends import cuda
from multilora.lora.backends.cuda import CudaBackend
from multilora.lora.layers import LoraContext, LoraLinear
from multilora.lora.plan import LoraBatch
from multilora.lora.weights import LoraTarget, LoraTargets


def test_a_step_plans_once_and_every_layer_only_swaps_addresses(kernels, lora_ref, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    planned = []
    real_plan = cuda.plan
    monkeypatch.setattr(cuda, "plan", lambda problem, variant, sm: planned.append(problem) or
                        real_plan(problem, variant, sm))
    context = LoraContext(CudaBackend(kernels, max_rank=16))
    layers = []
    for _ in range(3):  # three decoder layers of a fused qkv: q (96 wide), k and v (32 wide each)
        tables = [lora_ref.random_table(gen, 64, width, [8, None, 16]) for width in (96, 32, 32)]
        base = torch.nn.Linear(64, 160, bias=False)
        targets, start = [], 0
        for table in tables:
            targets.append(LoraTarget("t", start, start + table.h_out, table))
            start += table.h_out
        layers.append(LoraLinear(base, LoraTargets(targets), context))
    slots = [0, 2, -1, 0, 0, 0, 2, 2]  # two decode rows with adapters, one without, then segments
    batch = LoraBatch.from_token_slots(slots, "cpu", num_decode_tokens=3)
    x = torch.randn(len(slots), 64, generator=gen)
    with context.step(batch):
        step = context.plan
        assert kernels.current == 1
        outputs = [layer(x) for layer in layers]
    assert kernels.current == 1, "the context is made current once per step, not per call"
    assert len(step.scratch) == 1 and step.v.numel() >= len(slots) * 3 * 16, "the scratch is allocated once per step"
    assert len(planned) == 1, "one plan for the projection's shape (q 96, k and v 32 wide), shared by every layer"
    assert len(kernels.launches) == 3 * 2  # one shrink and one expand per layer, for all three targets
    assert len({id(launch) for launch in kernels.launches}) == 2, "packed once per step, aimed at each layer"
    for layer, y in zip(layers, outputs):
        base = layer.base(x)
        for target in layer.targets.targets:
            expected = lora_ref.naive(base[:, target.start:target.end], x, target.table, slots)
            torch.testing.assert_close(y[:, target.start:target.end].double(), expected, atol=1e-4, rtol=1e-4)
    # A later step of the same layout reuses the packed launches, aimed at its own arrays and scratch;
    # another layout gets its own.
    again = [0, 2, -1, 2, 2, 2, 0, 0]  # the same layout (3 decode rows, 2 segments of 3 and 2 tokens)
    with context.step(LoraBatch.from_token_slots(again, "cpu", num_decode_tokens=3)):
        second = context.plan
        outputs = [layer(x) for layer in layers]
    assert len(planned) == 1, "the same step layout: packed once, across steps"
    shrink = kernels.launches[-2]
    assert shrink.kernel == "lora_shrink_token_f32"  # 7 tokens over 4 segments
    args = dict(zip([name for name, _ in cuda.SIGNATURES["shrink_token"]], shrink.params[0]))
    assert (args["token_slots"], args["v"]) == (second.token_slots.data_ptr(), second.v.data_ptr())
    assert second.token_slots.data_ptr() != step.token_slots.data_ptr()
    for layer, y in zip(layers, outputs):
        base = layer.base(x)
        for target in layer.targets.targets:
            expected = lora_ref.naive(base[:, target.start:target.end], x, target.table, again)
            torch.testing.assert_close(y[:, target.start:target.end].double(), expected, atol=1e-4, rtol=1e-4)
    with context.step(LoraBatch.from_token_slots(slots[:5], "cpu", num_decode_tokens=3)):
        layers[0](x[:5])
    assert len(planned) == 2, "another layout (5 tokens): planned anew"
