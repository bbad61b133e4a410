"""Load-test lora_llm with Triton's own `perf_analyzer`, requests spread over many adapters.

    .venv/bin/python -m bench.serving.perf_analyzer             # demo server, 20 adapters, docs updated
    .venv/bin/python -m bench.serving.perf_analyzer --url HOST:8001 --adapter-ids sql,chat --no-docs

Without --url it builds the demo checkpoint with extra generated adapters (cached under
.run/bench/), serves a copy of model_repository/lora_llm on it, and stops the server at the end.
perf_analyzer is the binary the tritonclient==2.51.0 wheel ships; a decoupled model needs gRPC
streaming (`-i grpc --streaming`) and BYTES inputs come from an --input-data JSON, where every
row names its adapter, so consecutive requests hit different adapters. perf_analyzer reports
requests/s and responses/s; its --profile-export-file holds every response's timestamp, from which
time to first token, inter-token latency and tokens/s are computed here (what genai-perf reports).
The numbers go between the perf_analyzer markers of docs/benchmarks.md (bench.common.docs_section).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common.docs_section import replace_section
from bench.common.machine import machine_description
from bench.common.paths import BENCH_DIR, BENCHMARKS_MD, REPO
from bench.common.reports import percentile

SECTION = "perf_analyzer"
PROMPTS = [
    "List the names of all customers in Berlin.",
    "Summarize the following text in one sentence. The quick brown fox jumps over the lazy dog.",
    "Translate to French: good morning, how are you?",
    "def fibonacci(n):",
    "Triton Inference Server speaks KServe v2 over HTTP and gRPC; requests may stream tokens back.",
]


@dataclass(frozen=True)
class LevelResult:
    """One concurrency level: perf_analyzer's throughput plus per-token latencies from its profile."""

    concurrency: int
    requests_per_s: float
    responses_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_mean_ms: float
    latency_p50_ms: float
    latency_p99_ms: float
    requests: int
    adapters_hit: int


# -- finding and running the binary ------------------------------------------------------------
def find_perf_analyzer() -> Path:
    """The venv's perf_analyzer (the wheel's console entry), else one on PATH."""
    for candidate in (Path(sys.executable).with_name("perf_analyzer"), shutil.which("perf_analyzer")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError("perf_analyzer not found: install tritonclient==2.51.0 (its manylinux wheel ships "
                            "bin/perf_analyzer; later wheels do not)")


def missing_libraries(binary: Path) -> list[str]:
    """Shared libraries `ldd` cannot resolve for `binary` as it is (empty: it can run).
    bench/serving/install_perf_analyzer_deps.sh (`make install`) writes libb64's and libcudart's folders
    into the binary's run path, so it needs no LD_LIBRARY_PATH."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout
    return [line.split("=>")[0].strip() for line in out.splitlines() if "not found" in line]


def write_input_data(path: Path, adapter_ids: Sequence[str], max_tokens: int, prompts: Sequence[str] = PROMPTS,
                     rows: int = 0) -> Path:
    """perf_analyzer's --input-data: one row per request, adapters interleaved ('' = base model)."""
    count = max(rows, len(adapter_ids) * 2, len(prompts))
    data = [{"text_input": [prompts[i % len(prompts)]], "adapter_id": [adapter_ids[i % len(adapter_ids)]],
             "max_tokens": [max_tokens], "stream": [True]} for i in range(count)]
    path.write_text(json.dumps({"data": data}, indent=1))
    return path


def run_level(binary: Path, url: str, input_data: Path, concurrency: int, workdir: Path, *,
              measurement_interval_ms: int = 10000, request_count: int = 0, stability_percentage: int = 25,
              max_trials: int = 10, model: str = "lora_llm") -> LevelResult:
    """Run perf_analyzer at one concurrency; `request_count` > 0 measures that many requests instead
    of time windows (a quick pass)."""
    csv_path, profile = workdir / f"c{concurrency}.csv", workdir / f"c{concurrency}_profile.json"
    for stale in (csv_path, profile):  # perf_analyzer refuses an existing --profile-export-file
        stale.unlink(missing_ok=True)
    command = [str(binary), "-m", model, "-u", url, "-i", "grpc", "--streaming", "--input-data", str(input_data),
               "--concurrency-range", str(concurrency), "-f", str(csv_path), "--profile-export-file", str(profile),
               "-s", str(stability_percentage), "-r", str(max_trials)]
    command += (["--request-count", str(request_count)] if request_count
                else ["--measurement-interval", str(measurement_interval_ms)])
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        # The cause comes first; a usage text (thousands of lines) may follow it.
        raise RuntimeError(f"perf_analyzer failed ({result.returncode}): {' '.join(command)}\n"
                           f"{result.stderr[:2000]}\n{result.stdout[:2000]}")
    with open(csv_path) as f:
        row = next(csv.DictReader(f))
    tokens = token_metrics(json.loads(profile.read_text()))
    return LevelResult(concurrency, float(row["Inferences/Second"]), float(row["Response Throughput"]), **tokens)


def token_metrics(profile: dict) -> dict:
    """Per-request numbers from perf_analyzer's profile export: the last response of a request
    carries finish_reason and completion_tokens (earlier ones do not)."""
    requests = [r for e in profile["experiments"] for r in e["requests"] if r.get("response_timestamps")]
    if not requests:
        raise RuntimeError("perf_analyzer's profile export holds no completed request")
    ttft = [(r["response_timestamps"][0] - r["timestamp"]) / 1e6 for r in requests]
    latency = [(r["response_timestamps"][-1] - r["timestamp"]) / 1e6 for r in requests]
    gaps = [(b - a) / 1e6 for r in requests for a, b in zip(r["response_timestamps"], r["response_timestamps"][1:])]
    tokens = sum(max(0, int(r["response_outputs"][-1].get("completion_tokens", 0))) for r in requests)
    span_s = (max(r["response_timestamps"][-1] for r in requests) - min(r["timestamp"] for r in requests)) / 1e9
    adapters = {r.get("request_inputs", {}).get("adapter_id") for r in requests}
    return dict(output_tokens_per_s=tokens / span_s if span_s > 0 else 0.0,
                ttft_p50_ms=percentile(ttft, 50), ttft_p99_ms=percentile(ttft, 99),
                itl_mean_ms=statistics.fmean(gaps) if gaps else 0.0,
                latency_p50_ms=percentile(latency, 50), latency_p99_ms=percentile(latency, 99),
                requests=len(requests), adapters_hit=len(adapters))


# -- the demo server ---------------------------------------------------------------------------
def demo_adapter_ids(extra: int) -> list[str]:
    from multilora.demo import DEMO_ADAPTERS

    return [a[0] for a in DEMO_ADAPTERS] + [f"gen-{i:04d}" for i in range(extra)]


@contextlib.contextmanager
def demo_server(preset: str, extra_adapters: int, params: Mapping[str, str], log: Path) -> Iterator[str]:
    """Serve a copy of model_repository/lora_llm on a cached demo build; yields the gRPC URL."""
    from multilora.demo import make_demo
    from multilora.launcher import TritonServer

    demo = BENCH_DIR / f"demo-{preset}-{extra_adapters}"
    if not (demo / "READY").exists():
        print(f"building the {preset} demo with {extra_adapters} extra adapters in {demo} ...", flush=True)
        make_demo(demo, preset, extra_adapters)
    with tempfile.TemporaryDirectory(prefix="bench-repo-") as tmp:
        model = Path(tmp) / "lora_llm"
        shutil.copytree(REPO / "model_repository" / "lora_llm", model,
                        ignore=shutil.ignore_patterns("demo", "__pycache__"))
        (model / "demo").symlink_to(demo, target_is_directory=True)
        config = model / "config.pbtxt"
        # config.pbtxt names the real demo's base model; this demo is a random one, in demo/base.
        config.write_text(set_parameters(config.read_text(), {"base_model": "demo/base", **params}))
        with TritonServer(tmp, log_path=log, exit_timeout_secs=3, startup_timeout=600) as server:
            yield server.grpc_url


def set_parameters(config: str, params: Mapping[str, str]) -> str:
    """config.pbtxt with `parameters { key: K value: { string_value: V } }` set (replaced or added)."""
    for key, value in params.items():
        line = f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
        pattern = re.compile(rf'^parameters \{{ key: "{re.escape(key)}" .*$', re.MULTILINE)
        config = pattern.sub(line, config) if pattern.search(config) else config.rstrip("\n") + "\n" + line + "\n"
    return config


# -- report ------------------------------------------------------------------------------------
def render_section(results: Sequence[LevelResult], context: Mapping[str, str]) -> str:
    lines = ["## perf_analyzer (gRPC streaming, many adapters)", "",
             "Written by `python -m bench.serving.perf_analyzer`; rerun it to refresh. Requests/s and responses/s are "
             "perf_analyzer's own; TTFT (time to first token), inter-token latency, latency and output tokens/s "
             "come from its `--profile-export-file` timestamps.", ""]
    lines += [f"- **{k}**: {v}" for k, v in context.items()]
    lines += ["", "| concurrency | requests/s | responses/s | output tokens/s | TTFT p50 (ms) | TTFT p99 (ms) "
                  "| inter-token mean (ms) | latency p50 (ms) | latency p99 (ms) | requests | adapters hit |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.concurrency} | {r.requests_per_s:.2f} | {r.responses_per_s:.1f} | "
                     f"{r.output_tokens_per_s:.1f} | {r.ttft_p50_ms:.1f} | {r.ttft_p99_ms:.1f} | {r.itl_mean_ms:.2f} | "
                     f"{r.latency_p50_ms:.1f} | {r.latency_p99_ms:.1f} | {r.requests} | {r.adapters_hit} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="gRPC host:port of a running server (default: start the demo server)")
    p.add_argument("--adapter-ids", help="comma-separated adapters to spread requests over; '' in the list "
                                         "is the base model (default: the demo's)")
    p.add_argument("--preset", default="tiny", help="demo model preset (tiny, 100m) when starting the server")
    p.add_argument("--extra-adapters", type=int, default=16, help="generated adapters on top of the demo's four")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config.pbtxt parameter of the started server, e.g. max_loras=4")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--measurement-interval", type=int, default=10000, help="ms per measurement window")
    p.add_argument("--request-count", type=int, default=0, help="measure N requests instead of time windows")
    p.add_argument("--stability-percentage", type=int, default=25)
    p.add_argument("--docs", type=Path, default=BENCHMARKS_MD)
    p.add_argument("--no-docs", action="store_true", help="print the section instead of writing it")
    args = p.parse_args(argv)

    binary = find_perf_analyzer()
    if missing := missing_libraries(binary):
        sys.exit(f"{binary} cannot run: missing {', '.join(missing)}. Run `make install` "
                 "(bench/serving/install_perf_analyzer_deps.sh unpacks libb64 and sets the binary's run path).")
    params = dict(item.split("=", 1) for item in args.param)
    levels = [int(c) for c in args.concurrency.split(",")]
    adapter_ids = (args.adapter_ids.split(",") if args.adapter_ids is not None
                   else demo_adapter_ids(0 if args.url else args.extra_adapters) + [""])
    work = BENCH_DIR / "perf_analyzer"
    work.mkdir(parents=True, exist_ok=True)
    input_data = write_input_data(work / "input_data.json", adapter_ids, args.max_tokens)

    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(demo_server(args.preset, args.extra_adapters, params,
                                                          work / "tritonserver.log"))
        results = []
        for level in levels:
            print(f"perf_analyzer: concurrency {level} ...", flush=True)
            results.append(run_level(binary, url, input_data, level, work,
                                     measurement_interval_ms=args.measurement_interval,
                                     request_count=args.request_count, stability_percentage=args.stability_percentage))
            print(f"  {results[-1]}", flush=True)
    context = {
        "machine": machine_description(),
        "server": args.url or f"demo `{args.preset}` model started by the script; config overrides: {params or 'none'}",
        "adapters": f"{len(adapter_ids)} ids spread round-robin over the requests ('' = base model)",
        "requests": f"max_tokens={args.max_tokens}, stream=true, {len(PROMPTS)} prompts",
        "measurement": (f"--request-count {args.request_count}" if args.request_count else
                        f"--measurement-interval {args.measurement_interval} ms, -s {args.stability_percentage}"),
        "command": "`" + " ".join([".venv/bin/python -m bench.serving.perf_analyzer",
                                   *(argv if argv is not None else sys.argv[1:])]) + "`",
    }
    section = render_section(results, context)
    if args.no_docs:
        print(section)
    else:
        replace_section(args.docs, SECTION, section)
        print(f"wrote the '{SECTION}' section of {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
