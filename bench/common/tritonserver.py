"""A model repository for a benchmark's tritonserver (the shipped lora_llm with given parameters),
and workloads sent to it over gRPC streaming."""
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

from bench.common.paths import REPO
from multilora.config import EngineConfig
from multilora.launcher import TritonServer

SHIPPED_MODEL = REPO / "model_repository" / "lora_llm"
PARAMETER = re.compile(r'(?m)^parameters \{ key: "([^"]+)" value: \{ string_value: "([^"]*)" \} \}\n')


def shipped_parameters() -> dict[str, str]:
    """The parameters of the shipped model_repository/lora_llm/config.pbtxt."""
    return dict(PARAMETER.findall((SHIPPED_MODEL / "config.pbtxt").read_text()))


def config_parameters(config: EngineConfig) -> dict[str, str]:
    """`config` as config.pbtxt parameters: base_model and every field that is not its default."""
    return {f.name: str(value).lower() if isinstance(value, bool) else str(value)
            for f in dataclasses.fields(config)
            if (value := getattr(config, f.name)) != f.default or f.name == "base_model"}


def write_repository(dest: Path, parameters: dict[str, str], extra_models: tuple[Path, ...] = ()) -> Path:
    """A model repository in `dest`: the shipped lora_llm with exactly `parameters`, plus copies of
    `extra_models` (model folders; those get the same base_model and adapter_dir)."""
    model = dest / "lora_llm"
    shutil.copytree(SHIPPED_MODEL, model, ignore=shutil.ignore_patterns("demo", "__pycache__"))
    text = PARAMETER.sub("", (model / "config.pbtxt").read_text())
    (model / "config.pbtxt").write_text(text + _parameter_lines(parameters))
    for source in extra_models:
        copy = dest / source.name
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
        paths = {k: v for k, v in parameters.items() if k in ("base_model", "adapter_dir")}
        with (copy / "config.pbtxt").open("a") as config:
            config.write(_parameter_lines(paths))
    return dest


def _parameter_lines(parameters: dict[str, str]) -> str:
    return "".join(f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in parameters.items())


def input_tensor(name: str, value, dtype: str) -> grpcclient.InferInput:
    """A [1, 1] input tensor of lora_llm (shared by the benchmarks that talk gRPC)."""
    tensor = grpcclient.InferInput(name, [1, 1], dtype)
    array = np.array([[value]], dtype=np.object_ if dtype == "BYTES" else {"INT64": np.int64, "BOOL": bool}[dtype])
    tensor.set_data_from_numpy(array)
    return tensor


def request_inputs(prompt: str, adapter: str | None, new_tokens: int, stream: bool) -> list[grpcclient.InferInput]:
    inputs = [input_tensor("text_input", prompt.encode(), "BYTES"),
              input_tensor("max_tokens", new_tokens, "INT64"), input_tensor("ignore_eos", True, "BOOL")]
    if stream:
        inputs.append(input_tensor("stream", True, "BOOL"))
    if adapter:
        inputs.append(input_tensor("adapter_id", adapter.encode(), "BYTES"))
    return inputs


@dataclasses.dataclass
class StreamRun:
    """One run of a workload over one gRPC stream: tokens the server counted, responses received."""

    tokens: int
    seconds: float
    responses: int
    texts: list[str]

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def stream_all(url: str, prompts: list[str], adapters: list[str | None], new_tokens: int) -> StreamRun:
    """All requests in flight at once on one stream, each streaming its text back."""
    client = grpcclient.InferenceServerClient(url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    pieces: list[list[str]] = [[] for _ in prompts]
    started = time.perf_counter()
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters)):
        client.async_stream_infer("lora_llm", request_inputs(prompt, adapter, new_tokens, True), request_id=str(i))
    tokens = finished = responses = 0
    while finished < len(prompts):
        result, error = results.get(timeout=600)
        if error is not None:
            raise RuntimeError(f"server error: {error}")
        responses += 1
        pieces[int(result.get_response().id)].append(result.as_numpy("text_output").reshape(-1)[0].decode())
        completion = result.as_numpy("completion_tokens")
        if completion is not None:
            tokens += int(completion.reshape(-1)[0])
            finished += 1
    elapsed = time.perf_counter() - started
    client.stop_stream()
    client.close()
    return StreamRun(tokens, elapsed, responses, ["".join(p) for p in pieces])


def serve_and_measure(root: Path, config: EngineConfig, prompts: list[str], adapters: list[str | None],
                      new_tokens: int) -> float:
    """Best tokens/s of two runs (after a warm-up) of `stream_all` against a server on `config`."""
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_repository(Path(tmp), config_parameters(config))
        with TritonServer(repo, log_path=Path(tmp) / "server.log", exit_timeout_secs=3) as server:
            for adapter in set(a for a in adapters if a):  # warm the host cache, as in-process
                stream_all(server.grpc_url, prompts[:1], [adapter], 1)
            stream_all(server.grpc_url, prompts, adapters, new_tokens)  # warm-up run
            return max(stream_all(server.grpc_url, prompts, adapters, new_tokens).tokens_per_s for _ in range(2))
