"""bench.kernels.host_overhead (make gpu-host-bench) on its tiny shape: the engine's CUDA step with the
CUDA driver stubbed runs on the CPU and ends with the line the GPU check and the docs read."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.kernels.host_overhead import LAST_LINE, write_section

REPO = Path(__file__).resolve().parents[2]


def test_the_stubbed_step_reports_host_us_per_decode_step(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "backend_src"), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "bench.kernels.host_overhead", "--shape", "tiny", "--steps", "5"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    found = LAST_LINE.match(lines[-1])
    assert found, lines[-1]
    eager, replay = (int(v) for v in found.groups())
    assert eager > 0 and replay > 0
    # 2 layers: 4 projections x (shrink, expand) and one attention kernel (one split) each
    assert "eager: 18 launches per step;" in proc.stdout
    assert "graph replay: bucket 4 of [1, 2, 4];" in proc.stdout
    md = tmp_path / "benchmarks.md"
    write_section(lines, 5, md)
    text = md.read_text()
    assert f"| eager | {eager} | <= 1000 |" in text and f"| graph replay | {replay} | <= 100 |" in text
    assert "<!-- gpu_host:begin -->" in text and lines[0] in text
