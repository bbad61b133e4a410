"""A whole engine on the CPU through the decode graphs' path (engine/cuda_graphs.py) with our
kernels on their emulation: the same logits, step by step, and the same texts as the eager path.

The graph API is replaced by one whose replay runs the captured forward again on the static inputs
(engine_kit.ReplayingGraphs), so what is checked is everything around the graph: the buckets and
padding (padded rows write only the held-back KV slot), the static inputs filled per step, the
LoRA plan of the token variant reading the static slots, the paged decode kernel planned for the
longest context, and the descriptors refreshed for adapters loaded after the capture."""
from __future__ import annotations

import pytest
import torch

from engine_kit import Recorder, ReplayingGraphs, make_engine, req
from multilora.demo import ALL_LINEAR, make_adapter, make_base_model
from multilora.engine.cuda_graphs import DecodeGraphs
from multilora.lora.backends.cuda import CudaBackend

MAX_RANK = 8


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """Two layers, GQA 4:2, head_dim 16; one adapter on all seven projections, one on three."""
    out = tmp_path_factory.mktemp("graphs")
    base = make_base_model(out / "base", "tiny", seed=5, num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=96)
    make_adapter(base, out / "adapters" / "one", 8, 16, False, ALL_LINEAR, seed=1)
    make_adapter(base, out / "adapters" / "two", 4, 8, False, ["q_proj", "v_proj", "down_proj"], seed=2)
    return out


def _run(tiny_dir, kernels, graphs: bool):
    engine = make_engine(tiny_dir, device="cpu", kv_block_size=4, max_num_seqs=3, max_lora_rank=MAX_RANK)
    runner = engine.runner
    runner.kernels = kernels
    runner.lora.context.backend = CudaBackend(kernels, max_rank=MAX_RANK)
    if graphs:
        (trash,) = runner.kv.hold_back(1)
        # buckets 1, 2 and 4: a step of 3 decode rows is padded with one row
        runner.graphs = DecodeGraphs(runner.model, runner.kv.layers, runner.lora, kernels, max_rows=4,
                                     max_blocks=runner.rows.block_tables.shape[1], block_size=4, hidden_size=64,
                                     dtype=torch.float32, trash_slot=trash * 4, device=torch.device("cpu"),
                                     api=ReplayingGraphs())
        runner.graphs.capture()  # before any adapter is loaded: the descriptors are refreshed later
    steps, logits_of = [], {}  # (rows, decode rows) per step; each request's logits, token by token
    forward = runner.forward

    def recording(chunks):
        layout, sampling, logits = forward(chunks)
        steps.append((len(chunks), layout.num_decode))
        for i, row in zip(sampling, logits if logits is not None else []):
            logits_of.setdefault(layout.seqs[i].request.request_id, []).append(row.clone())
        return layout, sampling, logits

    runner.forward = recording
    for adapter in ("one", "two"):  # loaded first (host tier): the steps do not depend on load timing
        engine.manage("load", adapter)
    rec = Recorder(engine)
    rec.add(req("r0", "one", max_tokens=9, ignore_eos=True, prompt="SELECT name FROM orders"))
    rec.add(req("r1", None, max_tokens=6, ignore_eos=True, prompt="a b"))
    rec.run(until=2)
    rec.add(req("late", "two", max_tokens=4, ignore_eos=True, prompt="Translate: the cat"))
    rec.run()
    texts = {rid: "".join(o.text for o in outs) for rid, outs in rec.outputs.items()}
    return steps, logits_of, texts, runner.graphs


def test_decode_graphs_give_the_eager_paths_logits(tiny_dir, kernels):
    """Each request's logits, token by token (the late request may join a step earlier or later in
    one run than in the other: its prompt is prepared off the engine thread)."""
    _, eager_logits, eager_texts, _ = _run(tiny_dir, kernels, graphs=False)
    graph_steps, graph_logits, graph_texts, graphs = _run(tiny_dir, kernels, graphs=True)
    assert sorted(graph_logits) == sorted(eager_logits) == ["late", "r0", "r1"]
    for rid, expected in eager_logits.items():
        assert len(graph_logits[rid]) == len(expected)
        for i, (got, want) in enumerate(zip(graph_logits[rid], expected)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{rid}, token {i}")
    assert graph_texts == eager_texts
    decode_only = sum(rows == decode for rows, decode in graph_steps)
    # the steps of decode rows only: 2 and 3 rows (3 padded to 4), then 2 and 1 as requests end
    assert {rows for rows, decode in graph_steps if rows == decode} == {1, 2, 3}
    assert sorted(bucket for bucket, _ in graphs.graphs) == [1, 1, 2, 2, 4, 4]
    assert graphs.api.captured == 6 and graphs.api.replayed == decode_only >= 5
