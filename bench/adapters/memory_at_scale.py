"""Memory, cold loads and first-token latency with 1,000 adapters behind one tritonserver
(max_loras 8, max_cpu_loras 128).

    python -m bench.adapters.memory_at_scale            # full run, writes its section of docs/benchmarks.md
    python -m bench.adapters.memory_at_scale --quick    # 60 adapters, short streams: checks it works (prints only)

Reports: every response succeeded and a sample equals PEFT; cold-load time p50/p99; time to first
token for a resident vs a cold adapter; the lora_llm process's resident memory growth against the
bytes of the adapters it holds (floor: <= 1.2x), and that it stays flat once the caches are full.
"""
from __future__ import annotations

import argparse
import json
import queue
import random
import tempfile
import time
from pathlib import Path

import tritonclient.grpc as grpcclient

from bench.common.cpu import host_facts, quiet_note
from bench.common.models import SCALE_RANKS, ensure_scale_adapters, scale_adapter_ids
from bench.common.reports import write_scale_report
from bench.common.tritonserver import config_parameters, input_tensor, write_repository
from multilora.config import EngineConfig
from multilora.launcher import TritonServer
from multilora.lora import native

PROMPT = "SELECT name FROM orders WHERE"


class Stream:
    """One gRPC stream; `run` keeps `window` requests in flight and records per-request timings."""

    def __init__(self, url: str) -> None:
        self.client = grpcclient.InferenceServerClient(url)
        self.events: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.events.put((time.perf_counter(), result, error)))

    def run(self, adapters: list[str], max_tokens: int, window: int, on_done=None) -> list[dict]:
        sent: dict[str, dict] = {}
        pending = list(enumerate(adapters))
        done: list[dict] = []
        errors: list[str] = []

        def send():
            i, adapter = pending.pop(0)
            sent[str(i)] = {"adapter": adapter, "start": time.perf_counter(), "text": ""}
            self.client.async_stream_infer("lora_llm", [
                input_tensor("text_input", PROMPT.encode(), "BYTES"),
                input_tensor("adapter_id", adapter.encode(), "BYTES"), input_tensor("max_tokens", max_tokens, "INT64"),
                input_tensor("stream", True, "BOOL"), input_tensor("ignore_eos", True, "BOOL")],
                request_id=str(i), enable_empty_final_response=False)

        for _ in range(min(window, len(pending))):
            send()
        while len(done) + len(errors) < len(adapters):
            now, result, error = self.events.get(timeout=300)
            if error is not None:
                errors.append(str(error))
                if not pending or "stream" in str(error).lower():
                    raise RuntimeError(f"stream failed after {len(done)} responses: {error}")
            else:
                rid = result.get_response().id
                record = sent[rid]
                record.setdefault("first", now)
                record["text"] += result.as_numpy("text_output").reshape(-1)[0].decode()
                if result.as_numpy("finish_reason") is None:
                    continue
                record["end"] = now
                done.append(record)
                if on_done:
                    on_done(len(done))
            if pending:
                send()
        if errors:
            raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
        return done

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def command(url: str, name: str, adapter: str | None = None) -> dict:
    client = grpcclient.InferenceServerClient(url)
    inputs = [input_tensor("adapter_command", name.encode(), "BYTES")]
    if adapter:
        inputs.append(input_tensor("adapter_id", adapter.encode(), "BYTES"))
    box: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: box.put((result, error)))
    client.async_stream_infer("lora_llm", inputs)
    result, error = box.get(timeout=120)
    client.stop_stream()
    client.close()
    if error:
        raise RuntimeError(str(error))
    return json.loads(result.as_numpy("text_output").reshape(-1)[0])


def stub_rss(repo: Path) -> int:
    """Resident bytes of the lora_llm Python backend process of this server."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if "triton_python_backend_stub" in cmdline and str(repo) in cmdline:
                for line in (proc / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            continue
    raise RuntimeError("lora_llm stub process not found")


def held_bytes(url: str, root: Path) -> tuple[int, int]:
    host = command(url, "list")["host"]
    return len(host), sum((root / "adapters" / a / "adapter_model.safetensors").stat().st_size for a in host)


def peft_text(root: Path, adapter: str, max_tokens: int) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root / "base")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / "adapters" / adapter)
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def timed_load(url: str, adapter_id: str) -> float:
    """Seconds for an `adapter_command` load of an adapter not in memory, seen from the client
    (disk -> host tier, plus one round trip)."""
    started = time.perf_counter()
    answer = command(url, "load", adapter_id)
    assert answer["loaded"], answer
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    count, requests, cold_samples = (60, 120, 5) if args.quick else (1000, 1000, 20)
    root = ensure_scale_adapters(count)
    ids = scale_adapter_ids(count)
    config = EngineConfig(base_model=str(root / "base"), adapter_dir=str(root / "adapters"), max_loras=8,
                          max_cpu_loras=128, kv_cache_memory="256MiB", max_num_seqs=32,
                          management="on")  # it unloads an adapter before its memory baseline
    report: dict = {"adapters": count, "requests": requests}
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_repository(Path(tmp), config_parameters(config))
        log = root / "server.log"  # kept after the run, for a look when something fails
        with TritonServer(repo, log_path=log, exit_timeout_secs=3) as server:
            url = server.grpc_url
            stream = Stream(url)
            stream.run([ids[0]] * 4, 4, 4)  # warm the engine before the memory baseline
            command(url, "unload", ids[0])
            time.sleep(0.5)
            baseline = stub_rss(repo)
            # Correctness: one adapter of each rank against PEFT.
            sample = ids[:len(SCALE_RANKS)]
            got = {r["adapter"]: r["text"] for r in stream.run(sample, 8, len(sample))}
            report["peft_equal"] = {a: got[a] == peft_text(root, a, 8) for a in sample}
            # Cold loads and first-token latency, resident vs cold.
            cold = ids[len(SCALE_RANKS):len(SCALE_RANKS) + cold_samples]
            report["cold_load_s"] = [timed_load(url, a) for a in cold]
            for a in cold:
                command(url, "unload", a)
            ttft_cold = [r["first"] - r["start"] for a in cold for r in stream.run([a], 2, 1)]
            ttft_resident = [r["first"] - r["start"] for a in cold for r in stream.run([a], 2, 1)]
            report["ttft_cold"], report["ttft_resident"] = ttft_cold, ttft_resident
            # Request streams touching every adapter: uniform, then Zipf-skewed.
            rng = random.Random(0)
            memory: list[tuple[int, int, int, int]] = []  # (done, rss growth, held adapters, held bytes)

            def sample_memory(done):
                if done % max(1, requests // 20) == 0:
                    n, held = held_bytes(url, root)
                    memory.append((len(memory), stub_rss(repo) - baseline, n, held))

            uniform = rng.sample(ids, len(ids)) + rng.choices(ids, k=max(0, requests - len(ids)))
            weights = [1 / (i + 1) ** 1.1 for i in range(count)]
            zipf = rng.choices(ids, weights=weights, k=requests)
            for name, order in (("uniform", uniform), ("zipf", zipf)):
                started = time.perf_counter()
                done = stream.run(order, 4, 16, on_done=sample_memory)
                report[f"{name}_s"] = time.perf_counter() - started
                report[f"{name}_ok"] = len(done)
            report["memory"] = memory
            stream.close()
    full = [m for m in memory if m[2] >= config.max_cpu_loras]
    report["growth_ratio_max"] = max(m[1] / m[3] for m in memory if m[3])
    report["flat_spread_mb"] = (max(m[1] for m in full) - min(m[1] for m in full)) / 1e6 if full else None
    print(json.dumps({k: v for k, v in report.items() if k != "memory"}, default=str, indent=1))
    op = native.load()  # the level the server's engine chose ($MULTILORA_CPU_ISA, else the best)
    report["machine"] = f"{host_facts(native.choose_isa(op) if op else None).line()}. {quiet_note()}"
    if not (args.no_write or args.quick):
        write_scale_report(report, config)


if __name__ == "__main__":
    main()
