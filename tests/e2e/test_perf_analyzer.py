"""A short perf_analyzer pass against the session server: the benchmark tooling really runs."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench_module():
    spec = importlib.util.spec_from_file_location("bench_perf_analyzer", BENCH / "perf_analyzer.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    module = load_bench_module()
    try:
        binary = module.find_perf_analyzer()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    env = module.perf_analyzer_env()
    missing = module.missing_libraries(binary, env)
    if missing:
        pytest.skip(f"{binary} cannot run here: missing shared libraries {', '.join(missing)} "
                    "(make install runs bench/install_perf_analyzer_deps.sh for libb64)")
    return module, binary, env


def test_short_perf_analyzer_pass_reports_throughput(server, bench, tmp_path):
    module, binary, env = bench
    adapters = ["sql", "chat", "summarize", "acme/translate", ""]
    data = module.write_input_data(tmp_path / "input.json", adapters, max_tokens=8)
    rows = json.loads(data.read_text())["data"]
    assert {row["adapter_id"][0] for row in rows} == set(adapters)
    result = module.run_level(binary, server.grpc_url, data, concurrency=2, workdir=tmp_path, request_count=12,
                              env=env)
    assert result.requests_per_s > 0 and result.responses_per_s > 0 and result.output_tokens_per_s > 0
    assert result.requests >= 12 and result.adapters_hit == len(adapters)
    assert 0 < result.ttft_p50_ms <= result.latency_p99_ms
    section = module.render_section([result], {"machine": "test"})
    assert "| 2 |" in section


def test_docs_section_is_replaced_without_touching_the_rest(tmp_path):
    module = load_bench_module()
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nhand-written intro\n\n<!-- other:begin -->\nkeep me\n<!-- other:end -->\n")
    module.replace_section(doc, "perf_analyzer", "first")
    module.replace_section(doc, "perf_analyzer", "second")
    text = doc.read_text()
    assert "hand-written intro" in text and "keep me" in text
    assert "second" in text and "first" not in text and text.count("<!-- perf_analyzer:begin -->") == 1
    fresh = tmp_path / "new" / "benchmarks.md"
    module.replace_section(fresh, "perf_analyzer", "x")
    assert fresh.read_text().startswith("# Benchmarks")


def test_set_parameters_replaces_or_adds():
    module = load_bench_module()
    config = 'name: "m"\nparameters { key: "max_loras" value: { string_value: "8" } }\n'
    out = module.set_parameters(config, {"max_loras": "2", "device": "cpu"})
    assert 'key: "max_loras" value: { string_value: "2" }' in out and '"8"' not in out
    assert 'key: "device" value: { string_value: "cpu" }' in out
