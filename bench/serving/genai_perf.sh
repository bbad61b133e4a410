#!/usr/bin/env bash
# genai-perf profile of a running lora_llm server, one run per adapter, summary into
# docs/benchmarks.md (section "genai-perf").
#
#   make serve &                          # or any server; gRPC on URL
#   bash bench/serving/genai_perf.sh [URL] [TOKENIZER_DIR] [ADAPTER ...]
#   bash bench/serving/genai_perf.sh localhost:8001 model_repository/lora_llm/demo/SmolLM2-135M-Instruct pirate json base
#
# Why a separate virtualenv (.run/genai-perf-venv): genai-perf pulls numpy 2, pandas, plotly...
# while the Triton python backend stub in .venv needs numpy 1.x. It drives the same perf_analyzer
# binary (.venv/bin/perf_analyzer, from tritonclient 2.51.0) that bench/serving/perf_analyzer.py uses.
# Why one run per adapter: genai-perf sends the same extra inputs with every request
# (--extra-inputs adapter_id:X), so it cannot mix adapters within a run; bench/serving/perf_analyzer.py
# does that through its --input-data rows. Works offline: the tokenizer is a local folder
# (the demo's), and the prompts are synthetic.
set -euo pipefail
cd "$(dirname "$0")/../.."
URL=${1:-localhost:8001}
TOKENIZER=${2:-model_repository/lora_llm/demo/SmolLM2-135M-Instruct}
shift $(( $# > 2 ? 2 : $# ))
ADAPTERS=("$@")
[ ${#ADAPTERS[@]} -gt 0 ] || ADAPTERS=(pirate json base)
CONCURRENCY=${CONCURRENCY:-4}
REQUESTS=${REQUESTS:-100}
GENAI_VENV=${GENAI_VENV:-.run/genai-perf-venv}
OUT=.run/bench/genai-perf

if [ ! -x "$GENAI_VENV/bin/genai-perf" ]; then
    python3 -m venv "$GENAI_VENV"
    "$GENAI_VENV/bin/pip" install -q --disable-pip-version-check genai-perf==0.0.16
fi
[ -f "$TOKENIZER/tokenizer.json" ] || { echo "no tokenizer in $TOKENIZER (run 'make demo', or pass a model folder)" >&2; exit 2; }
# .venv/bin/perf_analyzer finds its libraries through its run path (make install).
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1

rm -rf "$OUT" && mkdir -p "$OUT"
for adapter in "${ADAPTERS[@]}"; do
    extra=()
    [ "$adapter" = base ] || extra=(--extra-inputs "adapter_id:$adapter")
    echo "genai-perf: adapter $adapter, concurrency $CONCURRENCY, $REQUESTS requests"
    "$GENAI_VENV/bin/genai-perf" profile -m lora_llm --endpoint-type kserve --backend vllm --streaming \
        -u "$URL" --tokenizer "$TOKENIZER" "${extra[@]}" \
        --synthetic-input-tokens-mean 32 --synthetic-input-tokens-stddev 0 \
        --output-tokens-mean 32 --concurrency "$CONCURRENCY" --request-count "$REQUESTS" \
        --warmup-request-count 4 --artifact-dir "$OUT/${adapter//\//_}" > "$OUT/${adapter//\//_}.log" 2>&1 \
        || { tail -20 "$OUT/${adapter//\//_}.log" >&2; exit 1; }
done

.venv/bin/python - "$OUT" "$URL" "$TOKENIZER" "$CONCURRENCY" "$REQUESTS" "${ADAPTERS[@]}" <<'EOF' | .venv/bin/python -m bench.common.docs_section docs/benchmarks.md genai-perf
import glob, json, os, sys
out, url, tokenizer, concurrency, requests, adapters = *sys.argv[1:6], sys.argv[6:]
print("## genai-perf (one adapter per run)\n")
print(f"Written by `bash bench/serving/genai_perf.sh`: genai-perf 0.0.16 (its own venv) against {url} "
      f"(tokenizer {tokenizer}), "
      f"gRPC streaming, concurrency {concurrency}, {requests} requests of 32 synthetic input tokens "
      "asking for about 32 output tokens; the machine: "
      f"{os.cpu_count()} cores. genai-perf counts tokens by re-tokenizing the text.\n")
print("| adapter | requests/s | output tokens/s | TTFT avg (ms) | TTFT p99 (ms) | inter-token avg (ms) "
      "| latency avg (ms) | latency p99 (ms) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for adapter in adapters:
    (path,) = glob.glob(f"{out}/{adapter.replace('/', '_')}/*/profile_export_genai_perf.json")
    m = json.load(open(path))
    print(f"| {adapter} | {m['request_throughput']['avg']:.2f} | {m['output_token_throughput']['avg']:.1f} | "
          f"{m['time_to_first_token']['avg']:.1f} | {m['time_to_first_token']['p99']:.1f} | "
          f"{m['inter_token_latency']['avg']:.2f} | {m['request_latency']['avg']:.1f} | "
          f"{m['request_latency']['p99']:.1f} |")
EOF
echo "wrote the 'genai-perf' section of docs/benchmarks.md (artifacts in $OUT)"
