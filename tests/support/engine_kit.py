"""Helpers shared by the engine-level tests (tests/conftest.py puts this folder on sys.path)."""
from __future__ import annotations

from types import SimpleNamespace

from multilora.config import EngineConfig
from multilora.engine.llm_engine import LLMEngine
from multilora.engine.sampling_params import SamplingParams
from multilora.engine.sequence import GenerationRequest


def make_engine(demo_dir, **overrides) -> LLMEngine:
    settings = dict(base_model=str(demo_dir / "base"), adapter_dir=str(demo_dir / "adapters"), kv_cache_memory="16MiB")
    settings.update(overrides)
    return LLMEngine(EngineConfig(**settings))


def req(rid, adapter=None, max_tokens=8, prompt="SELECT name FROM orders", **params):
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, **params), adapter)


class Recorder:
    """Collects outputs and the engine step at which each request got its first token and ended."""

    def __init__(self, engine):
        self.engine, self.step, self.outputs, self.first, self.end = engine, 0, {}, {}, {}

    def add(self, request):
        self.engine.add_request(request, self._on_output)

    def _on_output(self, out):
        self.outputs.setdefault(out.request_id, []).append(out)
        self.first.setdefault(out.request_id, self.step)
        if out.finished:
            self.end[out.request_id] = self.step

    def run(self, until=None):
        while self.engine.has_unfinished() and (until is None or self.step < until):
            self.step += 1
            self.engine.step()


class ReplayingGraphs:
    """engine/cuda_graphs' graph API on a CPU: capture runs the forward (as warm-up and capture
    would), and each replay runs it again, reading the static inputs as a real replay's kernels do."""

    def __init__(self) -> None:
        self.captured, self.replayed = 0, 0

    def pool(self):
        return "pool"

    def capture(self, forward, pool):
        assert pool == "pool"
        self.captured += 1
        forward()
        return SimpleNamespace(replay=lambda: self._replay(forward))

    def _replay(self, forward):
        self.replayed += 1
        forward()
