"""The oneDNN-packed base projections compute what nn.Linear computes, and replace its weight; the
native few-row kernel reads the packed weight where its layout is known, on every ISA level."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from multilora.config import EngineConfig
from multilora.engine.llm_engine import LLMEngine
from multilora.lora import native
from multilora.models.cpu_linear import FEW_ROWS, PackedLinear, can_pack, packed_blocks, padded_rows, use_few_rows

pytestmark = pytest.mark.skipif(not can_pack(torch.float32, torch.device("cpu")),
                                reason="this torch build has no oneDNN linear ops")


@pytest.mark.parametrize("rows", [1, 7, 64, 65, 1100])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear(rows, bias):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 40, bias=bias)
    x = torch.randn(rows, 2, 96)[:, 0]  # not contiguous, like a column slice
    expected = linear(x)
    packed = PackedLinear(linear)
    assert packed.weight.is_mkldnn and packed(x).shape == (rows, 40)
    torch.testing.assert_close(packed(x), expected, atol=1e-5, rtol=1e-5)
    shared = PackedLinear(linear, reorder=False)
    assert shared.weight is linear.weight
    torch.testing.assert_close(shared(x), expected, atol=1e-5, rtol=1e-5)


def test_engine_packs_fp32_cpu_projections(demo_dir):
    engine = LLMEngine(EngineConfig(base_model=str(demo_dir / "base"), adapter_dir=str(demo_dir / "adapters"),
                                    kv_cache_memory="8MiB"))
    layer = engine.model.layers[0]
    assert all(isinstance(getattr(layer, n).base, PackedLinear) for n in ("qkv", "o_proj", "gate_up", "down_proj"))
    head = engine.model.lm_head
    assert isinstance(head, PackedLinear)
    shares = head.weight is engine.model.embed_tokens.weight
    assert shares == engine.model.config.tie_word_embeddings, "a tied head reads the embedding, never a copy"


def test_every_row_count_runs_as_one_of_a_few_padded_sizes():
    """oneDNN keeps a primitive per row count it sees: a server must see few (padded_rows)."""
    sizes = {padded_rows(rows) for rows in range(1, 4097)}
    assert len(sizes) == 4 + 4 + 8 + 6
    assert all(padded_rows(rows) >= rows for rows in range(1, 4097))
    assert padded_rows(1) == 1 and padded_rows(3) == 4 and padded_rows(9) == 16, "one user's decode is not padded"
    assert padded_rows(32) == 32 and padded_rows(33) == 48 and padded_rows(65) == 128 and padded_rows(1025) == 1536


@pytest.fixture(params=list(native.ISA_LEVELS))
def few_rows(request):
    """The native op's few-row kernel on one ISA level (skipped where this CPU lacks it)."""
    op = native.load()
    assert op is not None, "the native CPU op is not built: run `make install`"
    if request.param not in op.isa_levels():
        pytest.skip(f"this CPU does not run ISA level {request.param}")
    return functools.partial(op.few_rows, isa=request.param)


@pytest.mark.parametrize(("out", "inputs"), [(960, 576), (100, 70), (17, 5), (1000, 333), (64, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_few_row_kernel_equals_linear_on_the_packed_weight(few_rows, out, inputs, bias):
    """Every row count it takes, shapes that leave a last partial block and padded inputs, rows of
    a strided x (a column slice): the same values as nn.Linear."""
    torch.manual_seed(out + inputs)
    linear = nn.Linear(inputs, out, bias=bias)
    packed = PackedLinear(linear)
    if packed.blocks is None:
        pytest.skip(f"oneDNN packs a [{out}, {inputs}] weight in a layout the kernel does not read")
    ob, ip = packed.blocks
    assert ip >= inputs and (ob, ip) == packed_blocks(linear.weight.detach(), packed.weight)
    packed.few_rows = few_rows
    for rows in range(1, FEW_ROWS + 1):
        x = torch.randn(rows, 2, inputs)[:, 0]
        y = packed(x)
        assert y.shape == (rows, out)
        torch.testing.assert_close(y, linear(x), atol=1e-5, rtol=1e-5)


def test_more_rows_than_few_go_to_onednn_and_bad_calls_are_refused():
    linear = nn.Linear(64, 128)
    packed = PackedLinear(linear)
    assert packed.blocks is not None

    def refuse(*args):
        raise AssertionError("a step of more than FEW_ROWS rows reached the few-row kernel")

    packed.few_rows = refuse
    x = torch.randn(FEW_ROWS + 1, 64)
    torch.testing.assert_close(packed(x), linear(x), atol=1e-5, rtol=1e-5)
    op = native.load()
    with pytest.raises(RuntimeError, match="y .* for x .* and 128 outputs"):
        op.few_rows(torch.empty(2, 127), torch.randn(2, 64), packed.address, 128, *packed.blocks, None, "baseline")
    with pytest.raises(RuntimeError, match="bias must be contiguous float32 \\[128\\]"):
        op.few_rows(torch.empty(2, 128), torch.randn(2, 64), packed.address, 128, *packed.blocks, torch.ones(3),
                    "baseline")


def test_a_layout_that_is_not_the_weights_is_not_read():
    """packed_blocks checks the values: a packed tensor of another weight (same shape) is no match."""
    linear, other = nn.Linear(70, 100), nn.Linear(70, 100)
    packed = PackedLinear(other)
    assert packed.blocks is not None
    assert packed_blocks(linear.weight.detach(), packed.weight) is None


def test_engine_gives_the_packed_layers_the_few_row_kernel(demo_dir):
    engine = LLMEngine(EngineConfig(base_model=str(demo_dir / "base"), adapter_dir=str(demo_dir / "adapters"),
                                    kv_cache_memory="8MiB"))
    layers = [m for m in engine.model.modules() if isinstance(m, PackedLinear)]
    with_kernel = [m for m in layers if m.few_rows is not None]
    assert with_kernel and all(m.blocks is not None for m in with_kernel)
    assert use_few_rows(engine.model, with_kernel[0].few_rows) == len(with_kernel)
    assert with_kernel[0].few_rows.keywords["isa"] == engine.runner.lora.context.backend.isa
