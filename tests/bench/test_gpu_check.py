"""python -m bench.gpu_check without a GPU: the no-GPU path exits 0 with its reasons, and the dry run
(make gpu-check-dry) runs every stage's harness on the CPU, so that no harness bug first shows on
the one GPU run. The harness's pieces (guarded results, time limits, sanitizer verdicts, which stage
needs what) are checked on their own below."""
from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.gpu_check import harness, report, sanitizers
from bench.gpu_check import stages as stage_list
from bench.gpu_check.__main__ import is_gpu_run
from bench.gpu_check.stages import STAGES, TOTAL_S

REPO = Path(__file__).resolve().parents[2]
GPU_STAGES = ("kernel load", "kernel correctness", "compute-sanitizer", "kernel speed", "engine on CUDA",
              "8B-shaped model", "engine speed, kernels", "host time per step", "engine speed, PyTorch path",
              "decode attention")


def run_check(tmp_path: Path, *args: str, python_flags: tuple[str, ...] = (),
              timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO / "backend_src")}  # no GPU, even on one
    return subprocess.run([sys.executable, *python_flags, "-m", "bench.gpu_check", "--work", str(tmp_path / "work"),
                           *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def _stage_lines(stdout: str) -> dict[str, str]:
    return {title: next(ln for ln in stdout.splitlines() if ln.startswith(f"| {title} |")) for title in GPU_STAGES}


def test_no_gpu_skips_every_gpu_stage_with_the_reason_and_exits_0(tmp_path):
    proc = run_check(tmp_path, "--out", str(tmp_path / "gpu.md"))
    assert proc.returncode == 0, proc.stderr
    env_line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("| environment |"))
    assert "| SKIP |" in env_line
    for title, line in _stage_lines(proc.stdout).items():
        assert "| SKIP |" in line and "no usable CUDA: " in line, f"{title}: {line}"
    assert proc.stdout.rstrip().endswith(f"No GPU run: {tmp_path / 'gpu.md'} is left as it is.")
    assert not (tmp_path / "gpu.md").exists()


def test_a_python_without_torch_is_reported_not_a_crash(tmp_path):
    proc = run_check(tmp_path, "--out", str(tmp_path / "gpu.md"), python_flags=("-S",))  # as a bare python3
    assert proc.returncode == 0, proc.stderr
    assert "torch is not importable by" in proc.stdout
    assert all("| SKIP |" in line for line in _stage_lines(proc.stdout).values())


def test_a_stage_over_its_limit_is_killed_with_its_children():
    started = time.monotonic()
    code, _ = harness.run_limited(["bash", "-c", "sleep 30 & sleep 30; echo never"], 1)
    assert code is None and time.monotonic() - started < 10


# -- the dry run: every stage on the CPU -------------------------------------------------------------
@pytest.fixture(scope="module")
def dry_run(tmp_path_factory, demo_dir):
    """One dry run for the tests below (about a minute on two quiet cores), the session's demo reused."""
    tmp = tmp_path_factory.mktemp("dry")
    (tmp / "work").mkdir()
    (tmp / "work" / "demo").symlink_to(demo_dir, target_is_directory=True)
    committed = (REPO / "docs" / "gpu.md").read_bytes()
    proc = run_check(tmp, "--dry-run", "--out-dir", str(tmp / "out"), timeout=1800)
    results = {s.name: json.loads((tmp / "out" / f"{s.name}.json").read_text()) for s in STAGES
               if (tmp / "out" / f"{s.name}.json").exists()}
    return proc, tmp / "out", results, committed


def test_dry_run_passes_every_stage_and_never_writes_docs_gpu_md(dry_run):
    proc, out, results, committed = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {name: r["status"] for name, r in results.items()} == {s.name: "PASS" for s in STAGES}
    assert proc.stdout.rstrip().endswith("Dry run: every stage passed.")
    text = (out / "gpu.md").read_text()
    assert text.startswith("# GPU check (dry run)") and "not GPU figures" in text
    assert (REPO / "docs" / "gpu.md").read_bytes() == committed
    for stage in STAGES:  # every stage's log comes back with the report, and the output says where
        assert (out / f"{stage.name}.log").exists()
    assert f"report:             {out / 'gpu.md'}" in proc.stdout and f"{out}/<stage>.json" in proc.stdout


def test_dry_run_engine_checks(dry_run):
    details = dry_run[2]["engine"]["details"]
    for check in ("PASS fp32 greedy texts = PEFT fp32: 4/4 rows identical",
                  "PASS CUDA graphs for the decode steps: none on the CPU, as configured",
                  "PASS seeded sampling across batch mixes", "PASS threaded engine (start, add_request): 4/4 ended",
                  "PASS bf16 greedy agreement with PEFT bf16: "):  # the floor was set from this CPU comparison
        assert check in details, details


def test_dry_run_kernel_stages_use_the_emulation(dry_run):
    results = dry_run[2]
    assert results["kernels"]["facts"]["loaded"] and results["kernels"]["facts"]["ptx"] == "lora_kernels.sm_90.ptx"
    assert "18 kernels resolved" in results["kernels"]["details"]
    assert "| `paged_decode_bf16` |" in results["kernels"]["details"]  # the ptxas report ran
    assert [f["name"] for f in results["kernel_speed"]["floors"]] == [
        "decode kernels: achieved / copy bandwidth (worst shape)",
        "decode op: kernels vs PyTorch path, eager call (worst shape)",
        "prefill op: kernels vs PyTorch path, eager call (worst shape)"]
    assert "kernel vs SDPA outputs: max |diff|" in results["attention"]["details"]
    lines = results["sanitizers"]["details"]
    assert lines.count("without compute-sanitizer (dry run)") == 4 and "selects no test" not in lines


def test_speed_stages_and_report(dry_run):
    results = dry_run[2]
    on, off = results["speed_on"]["facts"], results["speed_off"]["facts"]
    assert on["base_tokens_per_s"] > 0 and on["lora_tokens_per_s"] > 0 and off["lora_tokens_per_s"] > 0
    assert "decode step, 8 rows with adapters:" in results["speed_on"]["details"]
    speed = {"env": {"status": "PASS", "summary": "a pretend GPU", "facts": {"gpu": "pretend", "driver": "x"}},
             **{name: results[name] for name in ("model", "speed_on", "speed_off")}}
    stages = [s for s in STAGES if s.name in speed]
    floors = report.floors(speed)
    assert [f["name"] for f in floors] == ["4 distinct adapters vs base-only tokens/s",
                                           "engine tokens/s, 32 adapters: kernels vs PyTorch path"]
    text = report.markdown(stages, speed, floors, datetime.datetime(2026, 1, 2, 3, 4))
    assert "- Date: 2026-01-02 03:04 UTC" in text and "- GPU: pretend" in text
    assert "| engine speed, kernels |" in text and "## Engine speed, PyTorch path" in text


def test_dry_run_measures_host_time_per_step(dry_run):
    host = dry_run[2]["host"]
    assert host["facts"]["eager_us"] > 0 and host["facts"]["replay_us"] > 0
    assert [f["name"] for f in host["floors"]] == ["host us per decode step, eager (CUDA driver stubbed)",
                                                   "host us per decode step, CUDA graph replay (CUDA driver stubbed)"]
    assert "host us per decode step: eager" in host["details"]


def test_the_host_figures_stand_next_to_the_gpu_busy_time_of_a_decode_step():
    host_floor = {"name": "host us per decode step, eager (CUDA driver stubbed)", "measured": "420 us",
                  "required": "<= 1000 us", "ok": True}
    results = {"host": {"status": "PASS", "floors": [host_floor]},
               "speed_on": {"status": "PASS", "facts": {"decode_gpu_ms": 2.5, "decode_wall_ms": 3.1}}}
    for _ in range(2):  # the report is rendered after every stage: nothing accumulates
        (found,) = report.floors(results)
        assert found["measured"] == "420 us (an engine decode step: 2.50 ms GPU busy, 3.10 ms wall)"
    assert report.floors({"host": results["host"]}) == [host_floor]


def test_the_engine_checks_read_from_its_log_whether_decode_got_cuda_graphs():
    from bench.gpu_check.engine import graphs_check

    with harness.log_messages(harness.GRAPHS_LOGGER) as messages:
        logging.getLogger(harness.GRAPHS_LOGGER).info("CUDA graphs: %d decode graphs captured in %.1f s", 14, 1.5)
        logging.getLogger("multilora.other").info("not this one")
    assert messages == ["CUDA graphs: 14 decode graphs captured in 1.5 s"]
    assert graphs_check(messages, "cuda") == (True, messages[0])
    fell_back = ["CUDA graphs off, decode steps run eagerly (cuda_graphs=auto): capture failed: RuntimeError: x"]
    assert graphs_check(fell_back, "cuda") == (False, fell_back[0])
    assert graphs_check([], "cpu") == (True, "none on the CPU, as configured")


# -- the harness's pieces ---------------------------------------------------------------------------
def test_stage_results_are_written_whole_and_read_back_guarded(tmp_path):
    path = tmp_path / "stage.json"
    harness.write_result(path, {"status": "PASS", "summary": "ok"})
    assert harness.read_result(path) == {"status": "PASS", "summary": "ok"}
    assert [p.name for p in tmp_path.iterdir()] == ["stage.json"]  # no temporary file left behind
    assert harness.read_result(tmp_path / "missing.json")["summary"] == "stage failed: it saved no result"
    path.write_text('{"status": "PA')
    broken = harness.read_result(path)
    assert broken["status"] == "FAIL" and broken["summary"].startswith("stage failed: its result stage.json is "
                                                                       "unreadable (JSONDecodeError")
    path.write_text('["PASS"]')
    assert harness.read_result(path)["summary"] == "stage failed: its result stage.json has no valid status"


def test_a_timed_out_environment_keeps_what_it_learned_and_a_driver_makes_it_a_gpu_run():
    saved = {"status": "FAIL", "partial": True, "summary": "stopped after: nvidia-smi: NVIDIA H200, 580.65",
             "facts": {"cuda_usable": False, "driver_signs": ["device nodes /dev/nvidia0"]}}
    result = harness.outcome(saved, None, 90)
    assert result["status"] == "TIMEOUT" and "partial" not in result
    assert result["summary"] == "over its 90 s limit; last saved: stopped after: nvidia-smi: NVIDIA H200, 580.65"
    assert is_gpu_run({"env": result}, dry=False)  # written down and exit 1, not a silent skip
    assert "no usable CUDA" in stage_list.satisfied("env", {"env": result}, dry=False)
    crashed = harness.outcome(saved, 1, 90)
    assert crashed["status"] == "FAIL" and crashed["summary"].startswith("stage failed: it exited with code 1")
    nothing = harness.outcome(harness.read_result(Path("/nonexistent/env.json")), None, 90)
    assert nothing["summary"] == "over its 90 s limit; nothing saved"
    ended = harness.outcome({"status": "PASS", "summary": "4/4 checks pass"}, None, 60)  # killed after its end
    assert ended == {"status": "PASS", "summary": "4/4 checks pass (its process was killed at the 60 s limit "
                                                  "after saving this)"}


def test_the_kernel_stages_need_loaded_kernels_not_a_clean_ptxas_report():
    kernels = {"status": "FAIL", "summary": "ptxas: 2 kernels spill", "facts": {"loaded": True}}
    assert stage_list.satisfied("kernels", {"kernels": kernels}, dry=False) is None
    assert stage_list.satisfied("kernels", {"kernels": {"status": "FAIL", "facts": {}}}, dry=False) == \
        "the kernels did not load"


MEMCHECK_CLEAN = """========= COMPUTE-SANITIZER
..
3 passed, 31 deselected in 9.12s
========= ERROR SUMMARY: 0 errors
"""
MEMCHECK_ERRORS = """========= Invalid __global__ read of size 2 bytes
=========     at lora_shrink_segment_bf16+0x1a0
1 passed in 3.0s
========= ERROR SUMMARY: 2 errors
"""
RACECHECK_CLEAN = """2 passed in 12.5s
========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)
"""


def test_sanitizer_verdicts_count_kernel_errors_and_tell_a_timeout_from_a_failure():
    run = sanitizers.RUNS[0]
    assert sanitizers.kernel_errors(MEMCHECK_CLEAN) == 0 and sanitizers.kernel_errors(MEMCHECK_ERRORS) == 2
    assert sanitizers.kernel_errors(RACECHECK_CLEAN) == 0 and sanitizers.kernel_errors("1 passed") is None
    assert sanitizers.verdict(run, 0, MEMCHECK_CLEAN, True, 60) == (
        "PASS", "memcheck lora: 0 kernel errors; tests: 3 passed, 31 deselected in 9.12s")
    assert sanitizers.verdict(run, 0, MEMCHECK_ERRORS, True, 60)[0] == "FAIL"
    assert sanitizers.verdict(run, 1, MEMCHECK_CLEAN, True, 60)[0] == "FAIL"  # a test failed under the tool
    status, line = sanitizers.verdict(run, None, "", True, 60)
    assert status == "INCOMPLETE" and "out of its 60 s budget (inconclusive, not a failure)" in line
    assert sanitizers.verdict(run, 0, "1 passed", True, 60) == (
        "FAIL", "memcheck lora: no sanitizer summary (exit 0); 1 passed")
    assert "selects no test" in sanitizers.verdict(run, 5, "no tests ran in 0.1s", True, 60)[1]


def test_the_sanitizer_command_counts_kernel_errors_only():
    command = sanitizers.sanitizer_command("/cuda/bin/compute-sanitizer", sanitizers.RUNS[1], ["python3"])
    assert command[:7] == ["/cuda/bin/compute-sanitizer", "--tool", "racecheck", "--report-api-errors", "no",
                           "--kernel-name", "kns=lora_"]
    assert "--error-exitcode" not in command and command[-2:] == ["-k", "sanitizer and not gate_up"]


def test_stage_limits_add_up_to_the_stated_total_and_the_doc_before_a_run_says_them():
    assert TOTAL_S == sum(s.limit_s for s in STAGES) <= 9 * 60
    text = report.no_run_markdown()
    assert f"at most {report.duration(TOTAL_S)}: each stage" in text and report.duration(540) == "9 minutes"
    for stage in STAGES:
        assert f"| {stage.title} | {stage.limit_s} s | {stage.measures} |" in text


def test_docs_gpu_md_is_the_renderers_text_until_a_gpu_run_replaces_it():
    committed = (REPO / "docs" / "gpu.md").read_text()
    if "**No GPU run has happened yet.**" in committed:
        assert committed == report.no_run_markdown(), "run: python -c 'from bench.gpu_check import report; " \
                                                      "print(report.no_run_markdown(), end=\"\")' > docs/gpu.md"
