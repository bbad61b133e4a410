"""Where the CPU goes on the served path: CPU seconds per thread of each process, per served run.

    .venv/bin/python -m bench.serving.served_cpu_profile                  # 3 runs of served_throughput's (a)
    .venv/bin/python -m bench.serving.served_cpu_profile --py-spy out/    # also py-spy records of the stub

The server and workload are those of bench.serving.served_throughput (a): the shipped lora_llm, 32 requests
on 32 adapters, all in flight over one gRPC stream. Thread CPU times come from /proc, so they count
native threads too (OpenMP workers, the stub's IPC threads, tritonserver's gRPC and backend threads);
the stub's Python threads are named through `py-spy dump` when py-spy is installed
(`pip install py-spy`), its native ones by their OS name. CPU seconds, unlike tokens/s, barely
depend on what else runs on the machine, so before/after comparisons of the served path hold on a
shared machine too.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
from transformers import AutoTokenizer

from bench.common.models import adapter_ids, ensure_bench_model, exact_prompts
from bench.common.tritonserver import stream_all, write_repository
from bench.serving.served_throughput import Setup, served_parameters, server_processes
from multilora.launcher import TritonServer

PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))


def python_thread_names(pid: int) -> dict[int, str]:
    """Native thread id -> Python thread name, from `py-spy dump` (empty without py-spy)."""
    try:
        out = subprocess.run([PY_SPY, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return {}
    # Lines like: Thread 29831 (active): "engine-loop"
    return {int(line.split()[1], 0): line.rsplit(":", 1)[1].strip().strip('"')
            for line in out.splitlines() if line.startswith("Thread ")}


def thread_times(process: psutil.Process, names: dict[int, str]) -> dict[str, float]:
    """CPU seconds per thread: Python threads by name, native ones by OS name and id, and the
    threads that have exited (the process total less the live threads) together."""
    times: dict[str, float] = {}
    for thread in process.threads():
        name = names.get(thread.id)
        if name is None:
            try:
                name = f"{Path(f'/proc/{process.pid}/task/{thread.id}/comm').read_text().strip()} [{thread.id}]"
            except OSError:
                name = f"? [{thread.id}]"
        times[name] = thread.user_time + thread.system_time
    total = process.cpu_times()
    times["(exited threads)"] = total.user + total.system - sum(times.values())
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--py-spy", type=Path, help="record the stub with py-spy (--native) during each run")
    args = parser.parse_args()
    setup = Setup()
    root = ensure_bench_model(setup.adapters, setup.preset)
    parameters, _ = served_parameters(root, setup)
    prompts = exact_prompts(AutoTokenizer.from_pretrained(parameters["base_model"]), setup.requests, setup.prompt_len)
    ids = adapter_ids(setup.adapters)
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_repository(Path(tmp), parameters)
        with TritonServer(repo, log_path=Path(tmp) / "server.log", exit_timeout_secs=3) as server:
            processes = server_processes(server, repo)
            for adapter in ids:
                stream_all(server.grpc_url, prompts[:1], [adapter], 1)
            stream_all(server.grpc_url, prompts, ids, setup.new_tokens)  # warm-up
            names = {name: python_thread_names(p.pid) for name, p in processes.items()}
            for i in range(args.runs):
                recorder = None
                if args.py_spy:
                    args.py_spy.mkdir(parents=True, exist_ok=True)
                    command = [PY_SPY, "record", "--native", "--threads", "--rate", "50", "--format", "raw",
                               "--pid", str(processes["lora_llm stub"].pid),
                               "--output", str(args.py_spy / f"stub-{i}.txt")]
                    recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                before = {name: thread_times(p, names[name]) for name, p in processes.items()}
                run = stream_all(server.grpc_url, prompts, ids, setup.new_tokens)
                after = {name: thread_times(p, names[name]) for name, p in processes.items()}
                if recorder:
                    recorder.send_signal(signal.SIGINT)  # py-spy writes its record on SIGINT
                    recorder.wait(timeout=120)
                print(f"run {i + 1}: {run.tokens_per_s:.1f} tok/s, {run.responses} responses for {run.tokens} tokens")
                for name in processes:
                    used = {t: after[name][t] - before[name].get(t, 0.0) for t in after[name]}
                    shown = ", ".join(f"{t} {s:.2f}" for t, s in sorted(used.items(), key=lambda x: -x[1]) if s >= 0.01)
                    print(f"  {name}: {sum(used.values()):.2f} s = {shown}")


if __name__ == "__main__":
    main()
