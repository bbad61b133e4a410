"""One user's latency: ms per decoded token of our engine (in-process LLMEngine) against transformers'
`generate` on the same model, one request at a time, interleaved in one process.

    python -m bench.serving.single_stream_latency [--rounds 7] [--tokens 64] [--threads 1]
                                                       [--adapter pirate] [--served] [--write]

Model: the demo (SmolLM2-135M-Instruct, fp32 on CPU, model_repository/lora_llm/demo), greedy,
`--tokens` new tokens (ignore_eos). Decode ms/token is the median gap between consecutive tokens
(ours: the engine's token times; transformers: a streamer's), so the prompt's prefill is left
out. Each round runs ours then transformers; the figure is the median over rounds of the
per-round ratio (ours / transformers): on a shared machine absolute times drift by several x
between minutes, a ratio within one round much less. With `--threads 1` the gaps are also taken
on the thread's CPU clock, which leaves out the time other jobs held the core.

`--served` adds what a user of `make serve` sees: the same request through the OpenAI gateway
(`/v1/completions`, streamed, temperature 0, ignore_eos) in front of a real tritonserver on the
shipped model repository (its config.pbtxt as it is, the engine's threads as model.py sets them);
ms/token is the median gap between consecutive streamed chunks, taken in this process, and the
server runs in the same rounds. The floor of issue 19 is served / transformers <= 0.6.

Op counts per decode token come from torch.profiler: the aten ops in a profile of decode steps
(ours: LLMEngine.step; transformers: generate of `--tokens` tokens minus generate of one, so its
prefill cancels), "top level" counting only ops not called by another aten op (what Python
dispatches), "all" every aten op including the ones inside others.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import socket
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common.cpu import host_facts, quiet_note
from bench.common.docs_section import replace_section
from bench.common.paths import BENCHMARKS_MD, REPO
from multilora.config import EngineConfig
from multilora.engine.llm_engine import LLMEngine
from multilora.engine.sampling_params import SamplingParams
from multilora.engine.sequence import GenerationRequest

DEMO = REPO / "model_repository" / "lora_llm" / "demo"
FLOOR = 0.6  # ms/token through the gateway / transformers', at most
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@dataclass
class Gaps:
    """Median gaps between consecutive decoded tokens: wall seconds and the calling thread's CPU
    seconds (with one torch thread all the work runs there, and CPU time leaves out the time other
    jobs held the core)."""

    wall: float
    cpu: float

    @classmethod
    def of(cls, walls: list[float], cpus: list[float]) -> Gaps:
        return cls(statistics.median(b - a for a, b in zip(walls, walls[1:])),
                   statistics.median(b - a for a, b in zip(cpus, cpus[1:])))


def engine_gaps(engine: LLMEngine, prompt: str, tokens: int, adapter: str | None) -> Gaps:
    """One request alone, stepped here: each step after the first decodes one token."""
    request = GenerationRequest("r", prompt, SamplingParams(max_tokens=tokens, ignore_eos=True), adapter)
    finals = []
    engine.add_request(request, finals.append)
    walls, cpus = [], []
    while engine.has_unfinished():
        engine.step()
        walls.append(time.perf_counter())
        cpus.append(time.thread_time())
    assert finals[-1].error is None and finals[-1].completion_tokens == tokens, finals[-1]
    return Gaps.of(walls[1:], cpus[1:])


class TokenTimes:
    """A transformers streamer that notes when each new token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.walls: list[float] = []
        self.cpus: list[float] = []

    def put(self, value) -> None:
        self.walls.append(time.perf_counter())
        self.cpus.append(time.thread_time())

    def end(self) -> None:
        pass


def hf_generate(model, ids: torch.Tensor, tokens: int, streamer=None) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                              do_sample=False, streamer=streamer, pad_token_id=model.config.eos_token_id)


def hf_gaps(model, ids: torch.Tensor, tokens: int) -> Gaps:
    streamer = TokenTimes()
    hf_generate(model, ids, tokens, streamer)
    return Gaps.of(streamer.walls[2:], streamer.cpus[2:])  # [0] is the prompt, [1] the prefill's token


@contextlib.contextmanager
def served_demo(log_dir: Path) -> Iterator[tuple[str, int]]:
    """tritonserver on the shipped model repository with the gateway in front, as `make serve` runs
    them; yields the gateway's (host, port)."""
    from multilora.launcher import TritonServer, free_port
    from multilora.launcher.gateway import GatewayProcess

    with TritonServer(REPO / "model_repository", log_path=log_dir / "server.log", exit_timeout_secs=3) as server:
        gateway = GatewayProcess(free_port(), "127.0.0.1", server.grpc_url, triton_http=server.url)
        assert gateway.start(), "the gateway is not installed (make install)"
        try:
            deadline = time.monotonic() + 60
            while socket.socket().connect_ex(("127.0.0.1", gateway.port)) != 0:
                assert gateway.process.poll() is None and time.monotonic() < deadline, "the gateway did not start"
                time.sleep(0.1)
            yield "127.0.0.1", gateway.port
        finally:
            gateway.stop()


def gateway_request(address: tuple[str, int], method: str, path: str, body: dict | None = None):
    connection = http.client.HTTPConnection(*address, timeout=120)
    connection.request(method, path, json.dumps(body) if body else None, {"Content-Type": "application/json"})
    return connection, connection.getresponse()


def gateway_gaps(address: tuple[str, int], model: str, prompt: str, tokens: int) -> Gaps:
    """One streamed completion; the gaps between the chunks that carry text, as this process sees them."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}
    connection, response = gateway_request(address, "POST", "/v1/completions", body)
    assert response.status == 200, response.read()
    walls, cpus, pieces = [], [], 0
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        choice = json.loads(line[6:])["choices"][0]
        if choice.get("text"):
            walls.append(time.perf_counter())
            cpus.append(time.thread_time())
            pieces += 1
    connection.close()
    assert pieces >= tokens // 2, f"only {pieces} chunks with text for {tokens} tokens"
    return Gaps.of(walls[1:], cpus[1:])  # [0] is the prefill's token


def aten_counts(prof) -> tuple[int, int]:
    """(top-level aten ops, all aten ops) in a profile."""
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    top = sum(1 for e in events if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    return top, len(events)


def engine_ops_per_token(engine: LLMEngine, prompt: str, tokens: int, adapter: str | None) -> tuple[float, float]:
    request = GenerationRequest("p", prompt, SamplingParams(max_tokens=tokens + 2, ignore_eos=True), adapter)
    engine.add_request(request, lambda out: None)
    engine.step()  # the prompt, and the first token
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(tokens):
            engine.step()
    while engine.has_unfinished():
        engine.step()
    top, total = aten_counts(prof)
    return top / tokens, total / tokens


def hf_ops_per_token(model, ids: torch.Tensor, tokens: int) -> tuple[float, float]:
    counts = []
    for n in (1, tokens + 1):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            hf_generate(model, ids, n)
        counts.append(aten_counts(prof))
    return (counts[1][0] - counts[0][0]) / tokens, (counts[1][1] - counts[0][1]) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO / "SmolLM2-135M-Instruct")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch threads for both (default: torch's)")
    parser.add_argument("--adapter", help="our engine serves the request with this demo adapter (transformers: base)")
    parser.add_argument("--served", action="store_true",
                        help="also through the gateway in front of a tritonserver on the shipped model repository")
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        served = None
        if args.served:
            address = stack.enter_context(served_demo(Path(stack.enter_context(tempfile.TemporaryDirectory()))))
            connection, response = gateway_request(address, "GET", "/v1/models")
            served = address, json.loads(response.read())["data"][0]["id"]  # the base model first
            connection.close()
        run(args, served)


def run(args: argparse.Namespace, served: tuple[tuple[str, int], str] | None) -> None:
    """The interleaved rounds; `served`: the gateway's address and the base model's name there."""
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = LLMEngine(EngineConfig(base_model=str(args.model), adapter_dir=str(DEMO / "adapters"), device="cpu",
                                    max_num_seqs=4, kv_cache_memory="256MiB"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    engine_gaps(engine, PROMPT, 4, args.adapter)  # warm-up: oneDNN primitives, adapter load
    hf_generate(model, ids, 4)
    model_name = (args.adapter or served[1]) if served else None
    if served:
        gateway_gaps(served[0], model_name, PROMPT, 16)  # warm-up
    ours, theirs, gateway = [], [], []
    for _ in range(args.rounds):
        ours.append(engine_gaps(engine, PROMPT, args.tokens, args.adapter))
        theirs.append(hf_gaps(model, ids, args.tokens))
        if served:
            gateway.append(gateway_gaps(served[0], model_name, PROMPT, args.tokens))
        print(f"ms/token ours {1e3 * ours[-1].wall:.1f} (CPU {1e3 * ours[-1].cpu:.1f}), transformers "
              f"{1e3 * theirs[-1].wall:.1f} (CPU {1e3 * theirs[-1].cpu:.1f})"
              + (f", through the gateway {1e3 * gateway[-1].wall:.1f}" if served else ""), flush=True)
    op_tokens = min(args.tokens, 16)
    our_ops = engine_ops_per_token(engine, PROMPT, op_tokens, args.adapter)
    their_ops = hf_ops_per_token(model, ids, op_tokens)
    facts = host_facts(getattr(engine.runner.lora.context.backend, "isa", None) if engine.runner.lora else None)
    one_thread = torch.get_num_threads() == 1
    rows = [("wall", [g.wall for g in ours], [g.wall for g in theirs])]
    if one_thread:
        rows.append(("thread CPU", [g.cpu for g in ours], [g.cpu for g in theirs]))
    lines = [f"Machine: {facts.line()}.", "",
             f"Model: {args.model.name}, fp32, {torch.get_num_threads()} torch threads; one request, "
             f"{len(ids[0])} prompt tokens, {args.tokens} new tokens, greedy"
             f"{f', our engine with adapter {args.adapter}' if args.adapter else ''}; "
             f"{args.rounds} interleaved rounds.", "",
             "| per decoded token | ours | transformers `generate` "
             "| ours / transformers, per round: median (min-max) |",
             "|---|---:|---:|---:|"]
    for name, a, b in rows:
        ratios = [x / y for x, y in zip(a, b)]
        lines.append(f"| ms, {name} (median of rounds) | {1e3 * statistics.median(a):.1f} "
                     f"| {1e3 * statistics.median(b):.1f} "
                     f"| **{statistics.median(ratios):.3f}** ({min(ratios):.3f}-{max(ratios):.3f}) |")
    if served:
        ratios = [x.wall / y.wall for x, y in zip(gateway, theirs)]
        lines.append(f"| ms, wall, through the gateway (tritonserver, streamed) | "
                     f"{1e3 * statistics.median(g.wall for g in gateway):.1f} "
                     f"| {1e3 * statistics.median(g.wall for g in theirs):.1f} "
                     f"| **{statistics.median(ratios):.3f}** ({min(ratios):.3f}-{max(ratios):.3f}; floor <= {FLOOR}: "
                     f"{'met' if statistics.median(ratios) <= FLOOR else 'NOT met'}) |")
    lines += [f"| aten ops, top level | {our_ops[0]:.0f} | {their_ops[0]:.0f} | {our_ops[0] / their_ops[0]:.2f} |",
              f"| aten ops, all | {our_ops[1]:.0f} | {their_ops[1]:.0f} | {our_ops[1] / their_ops[1]:.2f} |"]
    print("\n".join(lines))
    engine.shutdown()
    if args.write:
        replace_section(BENCHMARKS_MD, "single_stream_latency", "\n".join(
            ["## One user's latency: our engine vs transformers, one request", "",
             f"Command: `python -m bench.serving.single_stream_latency{' --served' if served else ''} --write` "
             "(its docstring has the setup). "
             + quiet_note(), "", *lines]))


if __name__ == "__main__":
    main()
