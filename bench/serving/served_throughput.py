"""Tokens/s and CPU per token of the shipped lora_llm behind a real tritonserver, against the same
engine in-process and a naive transformers + PEFT model, side by side in one run.

    .venv/bin/python -m bench.serving.served_throughput           # about 8 min on 2 quiet cores; prints the table
    .venv/bin/python -m bench.serving.served_throughput --write   # (make bench-served) also updates docs/benchmarks.md
    .venv/bin/python -m bench.serving.served_throughput --quick   # tiny model, few requests: checks it works

One tritonserver serves two models from a temporary repository: the shipped
model_repository/lora_llm (its config.pbtxt as it is, pointed at the benchmark checkpoint, plus only
the overrides 32 adapters need to run at once, printed) and bench/serving/naive_peft, the transformers + PEFT
model a user would otherwise write. Workload: 32 requests of 128 prompt + 64 new tokens (ignore_eos,
greedy), request i on adapter i (32 distinct rank-16 adapters on all seven projections of the ~108M
Llama of bench/common/models.py, whose tokenizer is extended so that every token is text: one
streamed response per token, as with a real model), all in flight over one gRPC stream.

(a) served, 32 adapters   (b) served, the same requests on the base model
(c) in-process: the same workload on the engine the server runs (the same parameters, threads as
    model.py sets them, requests streamed from the engine's own loop thread), in a process and
    session of its own; no server, no client. (a)/(c) is what the served path itself costs.
(d) naive_peft, requests one at a time (tokens/s does not depend on how many are run)
(e) in-process as bench.serving.engine_throughput runs it: LLMEngine.generate on the main thread that
    built the model, nothing else in the process. The floor "served >= 0.85x in-process" is (a)/(e).

Each in-process engine has its own session, as tritonserver has: with the kernel's autogroup
scheduling every session gets its fair share of the CPU.

(a), (b), (c) and (e) are interleaved round by round, so drift and neighbours hit all alike; the best
round of each is compared. CPU seconds per 1000 tokens come from /proc for each process; 'others'
is what the rest of the machine used meanwhile (neighbours). On a shared machine CPU seconds per
token are the steadier figure: tokens/s there depends on the share of the CPU a run gets.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import tritonclient.grpc as grpcclient

from bench.common.cpu import host_facts, quiet_note
from bench.common.docs_section import replace_section
from bench.common.models import adapter_ids, ensure_bench_model, exact_prompts, full_vocab_base
from bench.common.paths import BENCHMARKS_MD
from bench.common.tritonserver import request_inputs, shipped_parameters, stream_all, write_repository
from multilora.launcher import TritonServer
from multilora.lora import native

NAIVE_MODEL = Path(__file__).resolve().parent / "naive_peft"
# (a)/(d): issue 19 retired issue 14's 10x (the base alone is ~10.5x the naive model, so 10x measured the base).
FLOORS = {"(a)/(b)": 0.85, "(a)/(d)": 9.0, "(a)/(e)": 0.85}


@dataclass
class Setup:
    preset: str = "100m"
    adapters: int = 32
    requests: int = 32
    prompt_len: int = 128
    new_tokens: int = 64
    naive_requests: int = 4
    rounds: int = 3


@dataclass
class Runs:
    """Every round's tokens/s of one system, and CPU seconds per 1000 tokens per process (best round)."""

    label: str
    tokens_per_s: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    responses_per_request: float = 0.0

    @property
    def best(self) -> float:
        return max(self.tokens_per_s)

    def add(self, tokens_per_s: float, cpu: dict[str, float], responses_per_request: float = 0.0) -> None:
        if not self.tokens_per_s or tokens_per_s > self.best:
            self.cpu, self.responses_per_request = cpu, responses_per_request
        self.tokens_per_s.append(tokens_per_s)


def served_parameters(root: Path, setup: Setup) -> tuple[dict[str, str], dict[str, str]]:
    """The shipped parameters on the benchmark checkpoint, and the overrides 32 adapters need."""
    shipped = shipped_parameters()
    overrides: dict[str, str] = {}
    if shipped.get("max_loras", "auto") != "auto" and int(shipped["max_loras"]) < setup.adapters:
        overrides["max_loras"] = str(setup.adapters)  # until the shipped config sizes itself (max_loras=auto)
    if int(shipped.get("max_cpu_loras", "0")) < setup.adapters:
        overrides["max_cpu_loras"] = str(setup.adapters)
    if int(shipped.get("max_num_seqs", "0")) < setup.requests:
        overrides["max_num_seqs"] = str(setup.requests)
    paths = {"base_model": str(full_vocab_base(root)), "adapter_dir": str(root / "adapters")}
    return shipped | paths | overrides, overrides


class CpuMeter:
    """CPU seconds (user + system, all threads) of named processes and of the whole machine."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self.processes = processes
        self._before: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        times = {name: sum(p.cpu_times()[:2]) for name, p in self.processes.items()}
        machine = psutil.cpu_times()
        times["others"] = machine.user + machine.system + machine.nice
        return times

    def start(self) -> None:
        self._before = self._read()

    def per_1k_tokens(self, tokens: int) -> dict[str, float]:
        after = self._read()
        used = {name: (after[name] - self._before[name]) * 1000 / tokens for name in after}
        used["others"] -= sum(v for k, v in used.items() if k != "others")
        return used


def server_processes(server: TritonServer, repo: Path) -> dict[str, psutil.Process]:
    """The lora_llm stub (the engine, model.py), tritonserver and this process (the gRPC client)."""
    parent = psutil.Process(server.process.pid)
    stub = next(p for p in parent.children(recursive=True) if str(repo / "lora_llm") in " ".join(p.cmdline()))
    return {"lora_llm stub": stub, "tritonserver": parent, "client (this process)": psutil.Process()}


def measure_served(runs: Runs, meter: CpuMeter, url: str, prompts: list[str], adapters: list[str | None],
                   new_tokens: int) -> None:
    meter.start()
    run = stream_all(url, prompts, adapters, new_tokens)
    cpu = meter.per_1k_tokens(run.tokens)
    if run.tokens != len(prompts) * new_tokens:
        raise RuntimeError(f"{runs.label}: the server counted {run.tokens} tokens, not {len(prompts) * new_tokens}")
    runs.add(run.tokens_per_s, cpu, run.responses / len(prompts))


def in_process_worker(connection, parameters: dict[str, str], adapters: list[str], as_served: bool) -> None:
    """An engine in a process (and session) of its own, running the workloads `connection` sends.

    as_served: started as model.py starts it (start_served_engine), requests added to the engine's
    loop thread, streamed (c). Otherwise torch's default threads and `LLMEngine.generate` on this
    main thread, as bench.serving.engine_throughput runs it."""
    os.setsid()
    from multilora.config import EngineConfig
    from multilora.engine.llm_engine import LLMEngine
    from multilora.engine.sampling_params import SamplingParams
    from multilora.engine.sequence import GenerationRequest
    from multilora.triton.cpu_threads import start_served_engine

    config = EngineConfig.from_parameters(parameters)
    engine = start_served_engine(config)[0] if as_served else LLMEngine(config)
    for adapter in adapters:  # in host memory, as on the server
        engine.manage("load", adapter)
    connection.send(None)  # ready
    while (job := connection.recv()) is not None:
        prompts, adapters, new_tokens = job
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
        requests = [GenerationRequest(str(i), p, params, a, stream=as_served)
                    for i, (p, a) in enumerate(zip(prompts, adapters))]
        started = time.perf_counter()
        if as_served:
            finished: queue.Queue = queue.Queue()
            for request in requests:
                # done=finished: the callback keeps this job's queue (the engine calls it from its own thread).
                engine.add_request(request, lambda out, done=finished: out.finished and done.put(out))
            tokens = sum(finished.get(timeout=600).completion_tokens for _ in requests)
        else:
            tokens = sum(outputs[-1].completion_tokens for outputs in engine.generate(requests).values())
        connection.send((tokens, time.perf_counter() - started))
    if as_served:
        engine.shutdown()


class InProcess:
    """The parent's handle on an in-process worker."""

    def __init__(self, parameters: dict[str, str], adapters: list[str], as_served: bool) -> None:
        context = multiprocessing.get_context("spawn")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=in_process_worker, args=(child, parameters, adapters, as_served),
                                       daemon=True)
        self.process.start()
        self.connection.recv()
        self.meter = CpuMeter({"engine process": psutil.Process(self.process.pid)})

    def measure(self, runs: Runs, prompts: list[str], adapters: list[str | None], new_tokens: int) -> None:
        self.meter.start()
        self.connection.send((prompts, adapters, new_tokens))
        tokens, seconds = self.connection.recv()
        cpu = self.meter.per_1k_tokens(tokens)
        if tokens != len(prompts) * new_tokens:
            raise RuntimeError(f"{runs.label}: {tokens} tokens, not {len(prompts) * new_tokens}")
        runs.add(tokens / seconds, cpu)

    def close(self) -> None:
        self.connection.send(None)
        self.process.join(timeout=60)


def measure_naive(url: str, prompts: list[str], adapters: list[str], new_tokens: int) -> float:
    """naive_peft, one request at a time (a blocking call each), tokens/s over all of them."""
    client = grpcclient.InferenceServerClient(url)
    client.infer("naive_peft", request_inputs(prompts[0], adapters[0], 2, False))  # warm-up
    tokens, started = 0, time.perf_counter()
    for prompt, adapter in zip(prompts, adapters):
        result = client.infer("naive_peft", request_inputs(prompt, adapter, new_tokens, False))
        tokens += int(result.as_numpy("completion_tokens").reshape(-1)[0])
    elapsed = time.perf_counter() - started
    client.close()
    return tokens / elapsed


def run(setup: Setup) -> tuple[list[Runs], float, dict[str, str]]:
    from transformers import AutoTokenizer

    root = ensure_bench_model(setup.adapters, setup.preset)
    parameters, overrides = served_parameters(root, setup)
    print(f"lora_llm: shipped config.pbtxt; overrides: {overrides or 'none'}", flush=True)
    prompts = exact_prompts(AutoTokenizer.from_pretrained(parameters["base_model"]), setup.requests, setup.prompt_len)
    ids = adapter_ids(setup.adapters)
    lora = [ids[i % len(ids)] for i in range(setup.requests)]
    base: list[str | None] = [None] * setup.requests
    a, b = Runs(f"(a) served, {setup.adapters} adapters"), Runs("(b) served, base model")
    c, c_base = Runs(f"(c) in-process, {setup.adapters} adapters"), Runs("in-process, base model")
    e = Runs(f"(e) in-process, {setup.adapters} adapters, LLMEngine.generate on the main thread")
    in_process, generate = InProcess(parameters, ids, as_served=True), InProcess(parameters, ids, as_served=False)
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_repository(Path(tmp), parameters, (NAIVE_MODEL,))
        # naive_peft loads its 32 adapters one PeftModel.load_adapter at a time: minutes, not seconds
        with TritonServer(repo, log_path=Path(tmp) / "server.log", exit_timeout_secs=3, startup_timeout=900) as server:
            meter = CpuMeter(server_processes(server, repo))
            for adapter in ids:  # in host memory, as in-process
                stream_all(server.grpc_url, prompts[:1], [adapter], 1)
            stream_all(server.grpc_url, prompts, lora, setup.new_tokens)  # warm-up
            in_process.measure(Runs("warm-up"), prompts, lora, setup.new_tokens)
            generate.measure(Runs("warm-up"), prompts, lora, 4)
            for r in range(setup.rounds):
                measure_served(a, meter, server.grpc_url, prompts, lora, setup.new_tokens)
                measure_served(b, meter, server.grpc_url, prompts, base, setup.new_tokens)
                in_process.measure(c, prompts, lora, setup.new_tokens)
                in_process.measure(c_base, prompts, base, setup.new_tokens)
                generate.measure(e, prompts, lora, setup.new_tokens)
                print(f"round {r + 1} tok/s: " + ", ".join(f"{x.label.split(',')[0]} {x.tokens_per_s[-1]:.1f}"
                                                           for x in (a, b, c, c_base, e)), flush=True)
            in_process.close()
            generate.close()
            n = setup.naive_requests
            naive = measure_naive(server.grpc_url, prompts[:n], lora[:n], setup.new_tokens)
    return [a, b, c, c_base, e], naive, overrides


def report(setup: Setup, runs: list[Runs], naive: float, overrides: dict[str, str]) -> str:
    a, b, c, c_base, e = runs
    processes = list(dict.fromkeys(name for r in runs for name in r.cpu))
    lines = ["| system | tok/s (best) | every round | responses per request | "
             + " | ".join(f"CPU s / 1k tokens: {p}" for p in processes) + " |",
             "|---|---:|---|---:|" + "---:|" * len(processes)]
    for r in runs:
        cpu = " | ".join(f"{r.cpu[p]:.2f}" if p in r.cpu else "" for p in processes)
        responses = f"{r.responses_per_request:.1f}" if r.responses_per_request else ""
        lines.append(f"| {r.label} | {r.best:.1f} | {', '.join(f'{t:.1f}' for t in r.tokens_per_s)} | "
                     f"{responses} | {cpu} |")
    lines.append(f"| (d) naive Triton + PEFT, {setup.naive_requests} requests one at a time | {naive:.1f} | | 1.0 |"
                 + " |" * len(processes))
    ratios = {"(a)/(b)": a.best / b.best, "(a)/(d)": a.best / naive, "(a)/(e)": a.best / e.best}
    lines += ["", "| ratio | measured | floor | |", "|---|---:|---:|---|"]
    lines += [f"| {name} | {value:.3f} | >= {FLOORS[name]:g} | {'holds' if value >= FLOORS[name] else 'MISSED'} |"
              for name, value in ratios.items()]
    served_cpu, in_process_cpu = a.cpu, c.cpu
    lines += ["", f"Served vs in-process on the base model alone: {b.best / c_base.best:.3f}; (a)/(c), the "
              f"served path against the same engine threads in-process: {a.best / c.best:.3f}. CPU seconds per "
              f"1000 tokens, {setup.adapters} adapters: served "
              f"{sum(v for k, v in served_cpu.items() if k != 'others'):.2f} (stub, tritonserver, client), "
              f"in-process {in_process_cpu.get('engine process', 0):.2f}.",
              f"Overrides of the shipped config.pbtxt: {overrides or 'none'}; model `{setup.preset}`, "
              f"{setup.requests} requests of {setup.prompt_len} + {setup.new_tokens} tokens, best of "
              f"{setup.rounds} interleaved rounds."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and workload: a smoke run (never writes)")
    parser.add_argument("--write", action="store_true", help="also update the served section of docs/benchmarks.md")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    setup = (Setup(preset="tiny", adapters=4, requests=4, prompt_len=16, new_tokens=4, naive_requests=1, rounds=1)
             if args.quick else Setup(rounds=args.rounds))
    runs, naive, overrides = run(setup)
    table = report(setup, runs, naive, overrides)
    op = native.load()  # the level every engine of this run chose ($MULTILORA_CPU_ISA, else the best)
    machine = host_facts(native.choose_isa(op) if op else None).line()
    print(table)
    print(machine)
    forced = os.environ.get(native.ISA_ENV, "auto").strip().lower() or "auto"
    if args.write and not args.quick:
        # A run with the op forced to a level (MULTILORA_CPU_ISA=v3 on an AVX-512 CPU) has a section of its own.
        name, title, command = (("served_throughput", "", "`make bench-served` (= `.venv/bin/python -m "
                                 "bench.serving.served_throughput --write`; its docstring has the setup).")
                                if forced == "auto" else
                                (f"served_throughput_{forced}", f", the LoRA op forced to ISA level {forced}",
                                 f"`{native.ISA_ENV}={forced} .venv/bin/python -m bench.serving.served_throughput "
                                 "--write` (its docstring has the setup)."))
        replace_section(BENCHMARKS_MD, name, "\n".join([
            f"## Through the server: 32 adapters, the base model, in-process and naive PEFT{title}", "",
            f"Command: {command}",
            f"Machine: {machine}. {quiet_note()}", "", table]))


if __name__ == "__main__":
    main()
