"""The decode CUDA graphs' host side on the CPU (engine/cuda_graphs.py): buckets, padding, the static
inputs' copy-in and the output's copy-out, what is captured, the auto / on / off decision, and the
model runner's choice of steps. torch.cuda's graph API is replaced by one that runs the captured
forward again at each replay; tests/cuda/test_emulated_graphs.py runs a whole engine that way, on
the emulated kernels."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from engine_kit import Recorder, ReplayingGraphs, make_engine, req
from multilora.engine import cuda_graphs as G
from multilora.engine.kv_cache import KVCache
from multilora.errors import ConfigError
from multilora.lora.backends.cuda import CudaBackend
from multilora.lora.layers import LoraContext, LoraLayers

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # only its type is read: nothing here touches CUDA


class FakeKernels:
    sm_count = 4

    def make_current(self) -> None:
        pass


@pytest.mark.parametrize("max_rows, expected", [(1, [1]), (5, [1, 2, 4, 5]), (8, [1, 2, 4, 8]),
                                                (32, [1, 2, 4, 8, 16, 24, 32]), (20, [1, 2, 4, 8, 16, 20])])
def test_buckets(max_rows, expected):
    assert G.buckets(max_rows) == expected


def test_a_step_takes_the_smallest_bucket_that_holds_it():
    sizes = G.buckets(32)
    assert [G.bucket_for(n, sizes) for n in (1, 2, 3, 5, 8, 9, 17, 24, 25, 32)] == [1, 2, 4, 8, 8, 16, 24, 24, 32, 32]
    assert G.bucket_for(33, sizes) is None and G.bucket_for(0, sizes) is None


def _inputs(rows: int, base: int = 0) -> dict[str, np.ndarray]:
    return {name: np.arange(rows, dtype=np.int64) + 100 * (i + 1) + base for i, name in enumerate(G.INPUTS)}


def test_static_inputs_pad_the_step_to_its_bucket_in_one_copy():
    static = G.StaticInputs(max_rows=8, max_blocks=5, trash_slot=77, device=CPU)
    static.pad(8)
    assert static.views["cache_index"].tolist() == [77] * 8 and static.views["slots"].tolist() == [-1] * 8
    assert static.views["ctx_lens"].tolist() == [0] * 8 and static.tables.abs().sum() == 0
    static.fill(8, _inputs(6, base=1000), np.full((6, 5), 9))  # a step of 6 rows with wide contexts
    static.fill(4, _inputs(3), np.arange(6).reshape(3, 2) + 1)  # then 3 rows, padded to 4, two blocks each
    for i, name in enumerate(G.INPUTS):
        pad = {"cache_index": 77, "slots": -1}.get(name, 0)
        assert static.views[name][:4].tolist() == [100 * (i + 1), 100 * (i + 1) + 1, 100 * (i + 1) + 2, pad], name
    assert static.tables[:3, :2].tolist() == [[1, 2], [3, 4], [5, 6]]
    # columns past the rows' contexts keep what they held: the kernel never reads them
    assert static.tables[:3, 2:].tolist() == [[9, 9, 9]] * 3
    assert static.views["ids"][4:6].tolist() == [1000 + 104, 1000 + 105]  # past the bucket: not the graph's


def _graphs(lora: LoraLayers | None, forward, max_rows: int = 4) -> G.DecodeGraphs:
    return G.DecodeGraphs(forward, ["kv"], lora, FakeKernels(), max_rows=max_rows, max_blocks=3, block_size=2,
                          hidden_size=2, dtype=torch.float32, trash_slot=10, device=CPU, api=ReplayingGraphs())


class RecordingForward:
    """The model as the graphs call it: hidden = (id, position) per row; records what each run saw."""

    def __init__(self, context: LoraContext | None = None) -> None:
        self.context, self.runs = context, []

    def __call__(self, ids, positions, kv_layers, meta):
        plan = self.context.plan if self.context is not None else None
        attention = meta.paged_decode
        self.runs.append(dict(rows=len(ids), cache_index=meta.cache_index.tolist(), ctx=attention.ctx_lens.tolist(),
                              tables=attention.block_tables.shape, max_context=attention.max_context,
                              slots=None if plan is None else plan.token_slots.tolist(), graph=plan and plan.graph))
        return torch.stack([ids, positions], dim=1).float()


def test_capture_records_every_bucket_with_and_without_lora_on_padded_rows():
    context = LoraContext(CudaBackend(None, max_rank=8, sm_count=4))
    forward = RecordingForward(context)
    graphs = _graphs(LoraLayers(context, []), forward)
    graphs.capture()
    assert sorted(graphs.graphs) == [(b, lora) for b in (1, 2, 4) for lora in (False, True)]
    assert graphs.api.captured == 6
    first = forward.runs[0]  # the largest bucket first, with LoRA: every row padded
    assert first == dict(rows=4, cache_index=[10] * 4, ctx=[0] * 4, tables=(4, 3), max_context=6, slots=[-1] * 4,
                         graph=True)
    assert forward.runs[1]["slots"] is None  # the same bucket without the LoRA launches
    assert context.plan is None, "the LoRA context is left as it was"


def test_replay_fills_the_inputs_picks_the_graph_and_returns_the_rows():
    context = LoraContext(CudaBackend(None, max_rank=8, sm_count=4))
    lora = LoraLayers(context, [])
    forward = RecordingForward(context)
    graphs = _graphs(lora, forward)
    graphs.capture()
    refreshed = []
    context.backend.refresh = lambda: refreshed.append(lora.version)
    tables = np.array([[4, 0], [5, 6], [7, 0]])
    hidden = graphs.run(np.array([11, 12, 13]), np.array([1, 2, 0]), np.array([9, 12, 14]), tables,
                        np.array([2, 3, 1]), np.array([0, -1, 2]))
    assert hidden.tolist() == [[11, 1], [12, 2], [13, 0]] and hidden.data_ptr() == graphs.output.data_ptr()
    run = forward.runs[-1]
    assert run["rows"] == 4 and run["cache_index"] == [9, 12, 14, 10] and run["ctx"] == [2, 3, 1, 0]
    assert run["slots"] == [0, -1, 2, -1] and graphs.api.replayed == 1
    assert refreshed == [0], "the descriptors are brought up to date before the first replay with LoRA"
    graphs.run(np.array([1]), np.array([5]), np.array([3]), tables[:1], np.array([6]), np.array([-1]))
    assert forward.runs[-1]["rows"] == 1 and forward.runs[-1]["slots"] is None  # no adapter: the graph without LoRA
    graphs.run(np.array([1]), np.array([5]), np.array([3]), tables[:1], np.array([6]), np.array([1]))
    assert refreshed == [0], "nothing changed: no refresh"
    lora.install(3, None)
    graphs.run(np.array([1]), np.array([5]), np.array([3]), tables[:1], np.array([6]), np.array([1]))
    assert refreshed == [0, 1], "a slot changed: refreshed before the replay"


def test_only_steps_of_decode_rows_within_the_largest_bucket_replay():
    graphs = _graphs(None, RecordingForward(), max_rows=4)
    assert graphs.takes(3, 3) and graphs.takes(4, 4)
    assert not graphs.takes(2, 3), "a prefill row in the step"
    assert not graphs.takes(5, 5), "more rows than max_num_seqs"


class Built:
    """What `build` returns in the decision tests: a capture that works or raises."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.graphs, self.sizes, self.trash = error, {}, [1], None

    def capture(self) -> float:
        if self.error is not None:
            raise self.error
        self.graphs[(1, False)] = "graph"
        return 0.5


def _kv() -> KVCache:
    return KVCache(num_layers=1, num_blocks=4, block_size=2, kv_heads=1, head_dim=2, dtype=torch.float32, device=CPU)


def _decide(mode, device, kernels, built):
    kv = _kv()

    def build(trash_slot):
        built.trash = trash_slot
        return built

    return G.decode_graphs(mode, device, kernels, kv, build), kv


def test_off_and_the_cpu_build_nothing():
    for mode, device in (("off", CUDA), ("on", CPU), ("auto", CPU)):
        built = Built()
        graphs, kv = _decide(mode, device, FakeKernels(), built)
        assert graphs is None and built.trash is None and kv.num_free == 4


def test_graphs_are_captured_with_a_kv_block_held_for_the_padded_rows(caplog):
    built = Built()
    with caplog.at_level(logging.INFO, logger=G.__name__):
        graphs, kv = _decide("auto", CUDA, FakeKernels(), built)
    assert graphs is built and kv.num_free == 3 and kv.num_blocks == 3 and built.trash % 2 == 0
    assert kv.holders(built.trash // 2) == 1, "the padded rows' block is held, never handed to a request"
    assert "1 decode graphs captured in 0.5 s" in caplog.text


def test_without_our_kernels_auto_says_so_once_and_on_refuses(caplog):
    with caplog.at_level(logging.WARNING, logger=G.__name__):
        graphs, kv = _decide("auto", CUDA, None, Built())
    assert graphs is None and kv.num_free == 4
    (record,) = caplog.records
    assert "CUDA graphs off, decode steps run eagerly (cuda_graphs=auto): they need our CUDA kernels" in record.message
    with pytest.raises(ConfigError, match="cuda_graphs=on, but CUDA graphs cannot be used: they need our CUDA kernels"):
        _decide("on", CUDA, None, Built())


def test_a_failed_capture_falls_back_in_auto_and_fails_the_load_in_on(caplog):
    with caplog.at_level(logging.WARNING, logger=G.__name__):
        graphs, kv = _decide("auto", CUDA, FakeKernels(), Built(RuntimeError("operation not permitted")))
    assert graphs is None and kv.num_free == kv.num_blocks == 4, "the held block is given back"
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.message.endswith("capture failed: RuntimeError: operation not permitted")
    with pytest.raises(ConfigError, match="capture failed: RuntimeError: boom. Set it to auto"):
        _decide("on", CUDA, FakeKernels(), Built(RuntimeError("boom")))


def test_a_graph_plan_needs_the_backends_max_rank():
    with pytest.raises(ValueError, match="max_rank"):
        CudaBackend(None, sm_count=4).plan_graph(torch.zeros(2, dtype=torch.int32))


class SpyGraphs:
    """Stands in for the runner's graphs: records each replay's arrays, returns zero hidden states."""

    def __init__(self, hidden_size: int, max_rows: int) -> None:
        self.hidden_size, self.max_rows, self.runs = hidden_size, max_rows, []

    def takes(self, decode_rows: int, rows: int) -> bool:
        return decode_rows == rows <= self.max_rows

    def run(self, ids, positions, cache_index, tables, ctx_lens, slots):
        self.runs.append(dict(ids=ids, positions=positions, cache_index=cache_index, tables=tables, ctx=ctx_lens,
                              slots=slots))
        return torch.zeros(len(ids), self.hidden_size)


def test_the_runner_replays_only_decode_steps_with_their_arrays(demo_dir):
    engine = make_engine(demo_dir, device="cpu", kv_block_size=4, max_num_seqs=3)
    spy = engine.runner.graphs = SpyGraphs(engine.model.config.hidden_size, 3)
    engine.manage("load", "sql")  # loaded first: the steps do not depend on load timing
    rec = Recorder(engine)
    rec.add(req("a", max_tokens=3, ignore_eos=True, prompt="SELECT name"))
    rec.add(req("b", "sql", max_tokens=3, ignore_eos=True, prompt="a b c d e f"))
    rec.run()
    assert len(spy.runs) == 2, "the first step prefills; the two after it decode both rows"
    for run in spy.runs:
        assert len(run["ids"]) == 2 and sorted(run["slots"].tolist())[0] == -1  # "a" has no adapter
        assert (run["ctx"] == run["positions"] + 1).all()
        blocks = run["tables"][np.arange(2), run["positions"] // 4]
        assert (run["cache_index"] == blocks * 4 + run["positions"] % 4).all()
        assert run["tables"].shape[1] == -(-int(run["ctx"].max()) // 4)
    assert all(len(outs) and outs[-1].finished for outs in rec.outputs.values())
