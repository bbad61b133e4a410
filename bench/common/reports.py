"""The sections that bench.serving.engine_throughput and bench.adapters.memory_at_scale write into
docs/benchmarks.md (tables, and the throughput plot next to it), and the percentile every
benchmark reports."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.common.docs_section import replace_section
from bench.common.paths import BENCHMARKS_MD, DOCS


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank q-th percentile (the value below which q% of `values` lie); NaN if empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


def write_report(setup, results: dict, bandwidth: float, server: dict | None, machine: str) -> None:
    """`machine`: bench.common.cpu's line (CPU model, the LoRA op's ISA level, copy GB/s, GEMM
    GFLOP/s, load average), measured in the same run."""
    DOCS.mkdir(exist_ok=True)
    name = "lora_throughput"
    lines = ["## Mixed-adapter throughput vs the base model and PEFT", "",
             "Command: `make bench` (= `.venv/bin/python -m bench.serving.engine_throughput`). "
             f"Model: generated Llama `{setup.preset}`, fp32 on CPU; rank-16 adapters on all seven projections. "
             f"{setup.requests} requests, {setup.prompt_len} prompt tokens, {setup.new_tokens} new tokens, adapters "
             f"drawn uniformly from K. (3) runs {setup.peft_sequential_requests} of the requests (one at a time, "
             "so its tokens/s does not depend on how many). Best of "
             f"{setup.repeats} interleaved runs for (1) and (2).", "", f"Machine: {machine}.", "",
             "| K | distinct in batch | (1) base tok/s | (2) ours tok/s | (2)/(1) | (3) peft one-by-one | (2)/(3) "
             "| (4) peft mixed batch | (2)/(4) | TTFT p50 / p99 s | ITL p50 / p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in results.items():
        lines.append(f"| {k} | {r['distinct']} | {r['base']:.1f} | {r['lora']:.1f} | {r['lora'] / r['base']:.3f} | "
                     f"{r['peft_seq']:.1f} | {r['lora'] / r['peft_seq']:.1f} | {r['peft_mixed']:.1f} | "
                     f"{r['lora'] / r['peft_mixed']:.1f} | "
                     f"{percentile(r['ttft'], 50):.2f} / {percentile(r['ttft'], 99):.2f} | "
                     f"{1000 * percentile(r['itl'], 50):.0f} / {1000 * percentile(r['itl'], 99):.0f} |")
    lines += ["", "LoRA step (time inside the LoRA op during one more run of (2), metered apart so counting bytes "
              "does not slow the runs above; bytes it must read: the distinct adapters' "
              "weights of each step plus activations), against this machine's copy bandwidth "
              f"({bandwidth:.1f} GB/s); the last column is the best (2)/(1) possible if those bytes were read at "
              "that bandwidth and nothing else cost anything:", "",
              "| K | LoRA share of (2)'s time | bytes read per run | achieved GB/s | of bandwidth | (2)/(1) bound |",
              "|---|---|---|---|---|---|"]
    for k, r in results.items():
        gbs = r["lora_bytes"] / r["lora_seconds"] / 1e9 if r["lora_seconds"] else 0.0
        base_time = setup.requests * setup.new_tokens / r["base"]
        bound = base_time / (base_time + r["lora_bytes"] / (bandwidth * 1e9))
        lines.append(f"| {k} | {r['lora_share']:.1%} | {r['lora_bytes'] / 1e9:.2f} GB | {gbs:.1f} | "
                     f"{gbs / bandwidth:.2f} | {bound:.3f} |")
    if server:
        lines += ["", f"Through a real tritonserver (gRPC streaming, all requests in flight, K = {server['k']}): "
                  f"{server['served']:.1f} tok/s vs {server['in_process']:.1f} in-process: "
                  f"**{server['served'] / server['in_process']:.3f}**."]
    lines += ["", f"![throughput]({name}.png)"]
    _plot(results, DOCS / f"{name}.png")
    replace_section(BENCHMARKS_MD, name, "\n".join(lines))


def write_scale_report(r: dict, config) -> None:
    cold, hot = r["ttft_cold"], r["ttft_resident"]
    loads = r["cold_load_s"]
    growth = r["growth_ratio_max"]
    lines = ["## Adapters at scale: one server, many adapters, bounded memory", "",
             "Command: `.venv/bin/python -m bench.adapters.memory_at_scale`. One tritonserver "
             f"(the `tiny` generated Llama), {r['adapters']} generated adapters in adapter_dir (ranks 8, 16, 32, 64 on "
             f"all seven projections), max_loras {config.max_loras}, max_cpu_loras {config.max_cpu_loras}; "
             f"{r['requests']} requests uniform over every adapter (each at least once), then {r['requests']} "
             "Zipf(1.1)-skewed; 16 in flight over one gRPC stream, 4 new tokens each.", "",
             f"Machine: {r['machine']}.", "",
             "| what | result |", "|---|---|",
             f"| responses without error | uniform {r['uniform_ok']}/{r['requests']}, "
             f"zipf {r['zipf_ok']}/{r['requests']} |",
             f"| equal to PEFT (greedy text), one adapter per rank | "
             f"{sum(r['peft_equal'].values())}/{len(r['peft_equal'])} |",
             f"| cold load through adapter_command, disk -> host, client round trip (p50 / p99) | "
             f"{1000 * percentile(loads, 50):.1f} / {1000 * percentile(loads, 99):.1f} ms |",
             f"| time to first token, cold adapter (p50 / p99) | "
             f"{1000 * percentile(cold, 50):.1f} / {1000 * percentile(cold, 99):.1f} ms |",
             f"| time to first token, resident adapter (p50 / p99) | "
             f"{1000 * percentile(hot, 50):.1f} / {1000 * percentile(hot, 99):.1f} ms |",
             f"| wall time, uniform / zipf | {r['uniform_s']:.1f} s / {r['zipf_s']:.1f} s |",
             f"| process memory growth / bytes of adapters held (max over the run; floor <= 1.2) | **{growth:.2f}** |",
             f"| spread of memory growth once the host cache is full (flat = small) | "
             f"{r['flat_spread_mb']:.1f} MB |"
             if r["flat_spread_mb"] is not None else "| host cache never filled | - |",
             "", "Memory samples (every 5% of each stream): resident-set growth of the lora_llm process over its "
             "baseline vs the bytes of the adapters in its host cache:", "",
             "| sample | RSS growth MB | adapters held | held MB | ratio |", "|---|---|---|---|---|"]
    for i, growth_bytes, held, held_bytes in r["memory"]:
        ratio = f"{growth_bytes / held_bytes:.2f}" if held_bytes else "-"
        lines.append(f"| {i} | {growth_bytes / 1e6:.1f} | {held} | {held_bytes / 1e6:.1f} | {ratio} |")
    replace_section(BENCHMARKS_MD, "adapter_scale", "\n".join(lines))


def _plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(results)
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in [("base", "(1) ours, base model"), ("lora", "(2) ours, K adapters"),
                       ("peft_mixed", "(4) peft mixed batch"), ("peft_seq", "(3) peft one by one")]:
        ax.plot(ks, [results[k][key] for k in ks], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (adapters the requests are drawn from)")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
