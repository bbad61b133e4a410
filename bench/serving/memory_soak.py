"""Memory of tritonserver and the lora_llm backend over minutes of many streams with mixed adapters
(a soak: a leak shows as growth that does not level off).

    .venv/bin/python -m bench.serving.memory_soak [--streams 64] [--rounds 4] [--round-seconds 60] [--adapters 40]

Serves the benchmark's tiny model (bench/common/models.py) with more adapters than device slots, so slots
are recycled and the host cache evicts, behind a real tritonserver; `--streams` clients each send
one streamed request after another (a random adapter or the base model, 16-48 new tokens). After
each round it prints the resident memory of tritonserver and of the python backend stub, the
requests finished and any request that failed or never ended. A leak shows as growth that does
not level off from round to round.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common.models import adapter_ids, ensure_bench_model
from bench.common.tritonserver import config_parameters, write_repository
from multilora.config import EngineConfig
from multilora.launcher import TritonServer, processes
from multilora_client import AsyncClient

PROMPTS = ["SELECT name FROM orders WHERE", "Translate to French: good morning", "def fibonacci(n):",
           "Summarize the following text in one sentence."]


@dataclass
class Tally:
    finished: int = 0
    errors: list[str] = field(default_factory=list)
    in_flight: int = 0


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of /proc/PID/status in MiB: VmRSS (all), RssAnon (heap), RssShmem (shared memory)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def client_loop(url: str, ids: list[str | None], tally: Tally, stop: float, seed: int, stream: bool) -> None:
    rng = random.Random(seed)
    async with AsyncClient(url, timeout=120) as client:
        while time.monotonic() < stop:
            tally.in_flight += 1
            try:
                prompt, adapter, sampling = rng.choice(PROMPTS), rng.choice(ids), {
                    "max_tokens": rng.randint(16, 48), "ignore_eos": True}
                if stream:
                    [piece async for piece in client.stream(prompt, adapter_id=adapter, **sampling)]
                else:
                    await client.generate(prompt, adapter_id=adapter, **sampling)
                tally.finished += 1
            except Exception as exc:  # counted and shown: the soak must see every failure
                tally.errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                tally.in_flight -= 1


async def soak(server: TritonServer, args: argparse.Namespace) -> list[tuple[float, float, int]]:
    ids: list[str | None] = [None, *adapter_ids(args.adapters)]
    stub = next(p.pid for p in processes.children(server.process.pid) if p.comm == processes.STUB_COMM)
    samples = [(rss_mib(server.process.pid), rss_mib(stub), 0)]
    print(f"start: tritonserver {samples[0][0]:.0f} MiB, stub {samples[0][1]:.0f} MiB")
    tally = Tally()
    for round_index in range(args.rounds):
        stop = time.monotonic() + args.round_seconds
        await asyncio.gather(*(client_loop(server.grpc_url, ids, tally, stop, round_index * 1000 + i,
                                           not args.no_stream)
                               for i in range(args.streams)))
        samples.append((rss_mib(server.process.pid), rss_mib(stub), tally.finished))
        grown = samples[-1][1] - samples[-2][1]
        print(f"round {round_index + 1}: {tally.finished} requests finished, {len(tally.errors)} failed, "
              f"{tally.in_flight} unfinished; tritonserver {samples[-1][0]:.0f} MiB, stub {samples[-1][1]:.0f} MiB "
              f"({grown:+.1f} MiB this round; heap {rss_mib(stub, 'RssAnon'):.0f} MiB, shared memory "
              f"{rss_mib(stub, 'RssShmem'):.0f} MiB)", flush=True)
    for error in tally.errors[:5]:
        print("  error:", error)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--round-seconds", type=float, default=60)
    parser.add_argument("--adapters", type=int, default=40)
    parser.add_argument("--no-stream", action="store_true", help="one response per request instead of one per piece")
    parser.add_argument("--max-loras", default="8", help="fewer slots than adapters: slots are recycled")
    parser.add_argument("--max-cpu-loras", type=int, default=16, help="fewer than adapters: the host cache evicts")
    args = parser.parse_args()
    root = ensure_bench_model(args.adapters, "tiny")
    config = EngineConfig(base_model=str(root / "base"), adapter_dir=str(root / "adapters"), device="cpu",
                          max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras, max_num_seqs=64,
                          kv_cache_memory="256MiB")
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_repository(Path(tmp) / "repo", config_parameters(config))
        with TritonServer(repo, log_path=Path(tmp) / "tritonserver.log", exit_timeout_secs=3) as server:
            asyncio.run(soak(server, args))


if __name__ == "__main__":
    main()
