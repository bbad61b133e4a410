"""The real demo model in an in-process engine, and its greedy answers to the held-out questions."""
from __future__ import annotations

import pytest

from multilora.config import EngineConfig
from multilora.demo.adapters import ADAPTERS, HELD_OUT
from multilora.demo.build import ADAPTER_DIR
from multilora.demo.smollm2 import MODEL_NAME
from multilora.demo.train import chat_prompt
from multilora.engine.llm_engine import LLMEngine
from multilora.engine.sampling_params import SamplingParams
from multilora.engine.sequence import GenerationRequest


@pytest.fixture(scope="session")
def real_engine(real_demo) -> LLMEngine:
    return LLMEngine(EngineConfig(base_model=str(real_demo / MODEL_NAME), adapter_dir=str(real_demo / ADAPTER_DIR),
                                  kv_cache_memory="128MiB"))


@pytest.fixture(scope="session")
def held_out_answers(real_engine) -> dict[tuple[str | None, str], str]:
    """{(adapter id or None for the base, question): greedy answer}, all asked in one batch."""
    asks = [(adapter_id, question) for adapter_id in [None, *(a.adapter_id for a in ADAPTERS)] for question in HELD_OUT]
    requests = [GenerationRequest(str(i), chat_prompt(real_engine.tokenizer, question), SamplingParams(max_tokens=40),
                                  adapter_id)
                for i, (adapter_id, question) in enumerate(asks)]
    outputs = real_engine.generate(requests)
    return {ask: "".join(out.text for out in outputs[r.request_id]) for ask, r in zip(asks, requests)}
