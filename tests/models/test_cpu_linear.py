"""The oneDNN-packed base projections compute what nn.Linear computes, and replace its weight."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from multilora.config import EngineConfig
from multilora.engine.llm_engine import LLMEngine
from multilora.models.cpu_linear import PackedLinear, can_pack, padded_rows

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
