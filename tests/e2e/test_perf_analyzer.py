"""perf_analyzer runs as users call it (docs/benchmarking.md's lines, no LD_LIBRARY_PATH), and a
short pass against the session server: the benchmark tooling really runs."""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def load_bench_module():
    return importlib.import_module("bench.serving.perf_analyzer")


@pytest.fixture(scope="module")
def bench():
    module = load_bench_module()
    try:
        binary = module.find_perf_analyzer()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    missing = module.missing_libraries(binary)
    if missing and not Path("/etc/debian_version").exists():
        pytest.skip(f"{binary} cannot run here: missing shared libraries {', '.join(missing)} "
                    "(bench/serving/install_perf_analyzer_deps.sh finds libb64 on Debian/Ubuntu only)")
    assert not missing, f"{binary} cannot find {missing}: make install sets its run path"
    return module, binary


def documented_perf_analyzer_lines() -> list[str]:
    return re.findall(r"^(\.venv/bin/perf_analyzer\b.*?)\s*(?:#.*)?$", (REPO / "docs" / "benchmarking.md").read_text(),
                      re.M)


def test_documented_perf_analyzer_lines_run_without_library_path(server, bench, tmp_path):
    """docs/benchmarking.md's `.venv/bin/perf_analyzer ...` lines as a user types them, in a shell
    with no LD_LIBRARY_PATH; only the server's address and the input file are this test's own."""
    module, _ = bench
    lines = documented_perf_analyzer_lines()
    assert ".venv/bin/perf_analyzer --version" in lines and len(lines) >= 2
    data = module.write_input_data(tmp_path / "input_data.json", ["sql", ""], max_tokens=4)
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    for line in lines:
        line = line.replace("localhost:8001", server.grpc_url).replace(".run/bench/perf_analyzer/input_data.json",
                                                                      str(data))
        if "-u " in line:
            line += " --request-count 4"  # a quick pass instead of measurement windows
        out = subprocess.run(line, shell=True, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{line}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
        said = out.stdout + out.stderr
        assert "Perf Analyzer Version 2.51.0" in said or "Throughput:" in said, said[-2000:]
    # 2.51 has no --help: it names the option and prints its usage (exit 99), and it does run.
    out = subprocess.run([".venv/bin/perf_analyzer", "--help"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=60)
    assert "Usage:" in out.stdout + out.stderr and "shared object" not in out.stderr, out.stderr[:500]


def test_short_perf_analyzer_pass_reports_throughput(server, bench, tmp_path):
    module, binary = bench
    adapters = ["sql", "chat", "summarize", "acme/translate", ""]
    data = module.write_input_data(tmp_path / "input.json", adapters, max_tokens=8)
    rows = json.loads(data.read_text())["data"]
    assert {row["adapter_id"][0] for row in rows} == set(adapters)
    result = module.run_level(binary, server.grpc_url, data, concurrency=2, workdir=tmp_path, request_count=12)
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
