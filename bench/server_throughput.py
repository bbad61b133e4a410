"""The same workload sent through a real tritonserver over gRPC streaming (benchmarks only)."""
from __future__ import annotations

import dataclasses
import queue
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from multilora.config import EngineConfig
from multilora.launcher import TritonServer

REPO = Path(__file__).resolve().parents[1]


def write_repository(dest: Path, config: EngineConfig) -> Path:
    """The repository's lora_llm with every engine parameter taken from `config`."""
    model = dest / "lora_llm"
    shutil.copytree(REPO / "model_repository" / "lora_llm", model, ignore=shutil.ignore_patterns("demo", "__pycache__"))
    text = re.sub(r'(?m)^parameters \{.*\}\n', "", (model / "config.pbtxt").read_text())
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value != f.default or f.name == "base_model":
            text += f'parameters {{ key: "{f.name}" value: {{ string_value: "{str(value).lower() if isinstance(value, bool) else value}" }} }}\n'
    (model / "config.pbtxt").write_text(text)
    return dest


def _input(name: str, value, dtype: str) -> grpcclient.InferInput:
    """A [1, 1] input tensor of lora_llm (shared by the benchmarks that talk gRPC)."""
    tensor = grpcclient.InferInput(name, [1, 1], dtype)
    array = np.array([[value]], dtype=np.object_ if dtype == "BYTES" else {"INT64": np.int64, "BOOL": bool}[dtype])
    tensor.set_data_from_numpy(array)
    return tensor


def stream_all(url: str, prompts: list[str], adapters: list[str | None], new_tokens: int) -> float:
    """All requests in flight at once on one stream; output tokens/s over the whole run."""
    client = grpcclient.InferenceServerClient(url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    started = time.perf_counter()
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        inputs = [_input("text_input", prompt.encode(), "BYTES"), _input("max_tokens", new_tokens, "INT64"),
                  _input("ignore_eos", True, "BOOL"), _input("stream", True, "BOOL")]
        if adapter:
            inputs.append(_input("adapter_id", adapter.encode(), "BYTES"))
        client.async_stream_infer("lora_llm", inputs, request_id=str(i))
    tokens = finished = 0
    while finished < len(prompts):
        result, error = results.get(timeout=600)
        if error is not None:
            raise RuntimeError(f"server error: {error}")
        completion = result.as_numpy("completion_tokens")
        if completion is not None:
            tokens += int(completion.reshape(-1)[0])
            finished += 1
    elapsed = time.perf_counter() - started
    client.stop_stream()
    client.close()
    return tokens / elapsed


def serve_and_measure(root: Path, config: EngineConfig, prompts: list[str], adapters: list[str | None],
                      new_tokens: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_repository(Path(tmp), config)
        with TritonServer(repo, log_path=Path(tmp) / "server.log", exit_timeout_secs=3) as server:
            for adapter in set(a for a in adapters if a):  # warm the host cache, as in-process
                stream_all(server.grpc_url, prompts[:1], [adapter], 1)
            stream_all(server.grpc_url, prompts, adapters, new_tokens)  # warm-up run
            return max(stream_all(server.grpc_url, prompts, adapters, new_tokens) for _ in range(2))
