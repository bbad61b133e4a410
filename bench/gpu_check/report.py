"""The GPU check's report: progress lines, the floors, the summary table, docs/gpu.md after a run,
and docs/gpu.md before any run (what the next run will measure, and how long each stage may take)."""
from __future__ import annotations

import datetime
import subprocess

from bench.common.paths import REPO
from bench.gpu_check.harness import FAILED
from bench.gpu_check.stages import STAGES, TOTAL_S, Stage

NOT_GPU = "not judged: a dry run's figures are not GPU figures"
# The floors the stages check, for the text before a run (each stage states its own in its result).
PLANNED_FLOORS = [
    ("decode kernels: achieved GB/s / device-to-device copy GB/s (measured in the same run)", ">= 60%"),
    ("32 distinct adapters vs base-only tokens/s (8-layer Llama-3-8B-shaped bf16 model)", ">= 0.8x"),
    ("our kernels vs the PyTorch path (op, eager; engine tokens/s with `cuda_kernels=on` vs `off`)", "faster"),
    ("decode attention per layer: the paged kernel vs gather + SDPA (32 and 64 rows, 1k-4k tokens, bf16)", "faster"),
    ("host us per decode step, eager (CUDA driver stubbed; 8 Llama-3-8B-shaped layers, 32 rows, 32 adapters)",
     "<= 1000 us"),
    ("host us per decode step, CUDA graph replay (CUDA driver stubbed)", "<= 100 us"),
    ("bf16 greedy texts vs transformers + PEFT bf16: mean common prefix (16 rows of 16 tokens)", ">= 55%"),
]


def duration(seconds: int) -> str:
    """'9 minutes', '8 minutes 30 s'."""
    minutes, rest = divmod(seconds, 60)
    return f"{minutes} minutes" + (f" {rest} s" if rest else "")


def progress_line(stage: Stage, result: dict, elapsed_s: float) -> str:
    return f"[{elapsed_s:4.0f} s] {stage.title:<28} {result['status']:<10} {result.get('summary', '')}"


def floors(results: dict[str, dict]) -> list[dict]:
    """Every floor the stages checked, plus the one that needs two stages: the engine with our
    kernels against the engine on the PyTorch path, 32 distinct adapters each."""
    step = results.get("speed_on", {}).get("facts", {})
    found = []
    for name, result in results.items():
        for f in result.get("floors", []):
            if name == "host" and step.get("decode_gpu_ms"):  # next to the GPU's work per decode step
                f = {**f, "measured": f"{f['measured']} (an engine decode step: {step['decode_gpu_ms']:.2f} ms "
                                      f"GPU busy, {step['decode_wall_ms']:.2f} ms wall)"}
            found.append(f)
    on = step.get("lora_tokens_per_s")
    off = results.get("speed_off", {}).get("facts", {}).get("lora_tokens_per_s")
    if on and off:
        found.append({"name": "engine tokens/s, 32 adapters: kernels vs PyTorch path",
                      "measured": f"{on:.0f} vs {off:.0f} ({on / off:.2f}x)", "required": "> 1.00x",
                      "ok": on > off})
    return found


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|").replace("\n", " ") for cell in row) + " |"
              for row in rows]
    return "\n".join(lines)


def stage_table(stages: list[Stage], results: dict[str, dict]) -> str:
    rows = []
    for s in stages:
        r = results.get(s.name, {"status": "not run yet", "summary": ""})
        rows.append([s.title, r["status"], f"{r.get('seconds', 0):.0f} s of {r.get('limit_s', s.limit_s)} s",
                     r.get("summary", "")])
    return _table(["stage", "status", "time", "result"], rows)


def floor_table(found: list[dict], dry: bool = False) -> str:
    if not found:
        return "No floor was measured."
    return _table(["floor", "measured", "required", "met"],
                  [[f["name"], f["measured"], f["required"], NOT_GPU if dry else "yes" if f["ok"] else "NO"]
                   for f in found])


def summary(stages: list[Stage], results: dict[str, dict], found: list[dict], dry: bool = False) -> str:
    return f"\n{stage_table(stages, results)}\n\n{floor_table(found, dry)}"


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return (sha or "unknown") + (" with local changes" if dirty else "")


def markdown(stages: list[Stage], results: dict[str, dict], found: list[dict], when: datetime.datetime,
             dry: bool = False, running: str | None = None) -> str:
    """docs/gpu.md after a run: when, where, the summary, the floors, what failed, and each stage's
    details. `running`: the stage being run when this was written (the run has not ended)."""
    env = results.get("env", {}).get("facts", {})
    failures = [f"- **{s.title}**: {results[s.name]['status']}, {results[s.name].get('summary', '')}"
                for s in stages if results.get(s.name, {}).get("status") in FAILED]
    if not dry:
        failures += [f"- floor **{f['name']}**: {f['measured']}, required {f['required']}"
                     for f in found if not f["ok"]]
    parts = ["# GPU check (dry run)" if dry else "# GPU check", ""]
    if dry:
        parts += ["**A dry run on the CPU, not a GPU run:** tiny shapes, the kernels on their CPU emulation, "
                  "host timings. It proves the harness, not the GPU path; its figures are not GPU figures.", ""]
    if running:
        parts += [f"**This run has not ended:** written while the stage \"{running}\" ran; a later write "
                  "replaces it.", ""]
    command = "make gpu-check-dry` (`python -m bench.gpu_check --dry-run" if dry else \
        "make gpu-check` (`python -m bench.gpu_check"
    parts += [
        f"Results of the latest `{command}` writes this file; [gpu-check.md](gpu-check.md) says how to run it).",
        "",
        f"- Date: {when:%Y-%m-%d %H:%M} UTC",
        f"- GPU: {env.get('gpu', env.get('gpu_name', '?'))}",
        f"- Driver: {env.get('driver', '?')}",
        f"- Software: {env.get('software', '?')}; cuda-bindings as imported: {env.get('cuda_bindings', '?')}",
        f"- Commit: {_commit()}",
        "",
        "## Summary",
        "",
        stage_table(stages, results),
        "",
        "## Floors",
        "",
        floor_table(found, dry),
        "",
        "## Failures found",
        "",
        "\n".join(failures) if failures else "None.",
    ]
    for s in stages:
        details = results.get(s.name, {}).get("details", "").strip()
        if details:
            parts += ["", f"## {s.title[0].upper()}{s.title[1:]}", "", details]
    return "\n".join(parts) + "\n"


def no_run_markdown() -> str:
    """docs/gpu.md before any GPU run: that none has happened, what the next one will measure, how
    long each stage may take, and the floors it checks."""
    stages = _table(["stage", "limit", "what it measures"], [[s.title, f"{s.limit_s} s", s.measures] for s in STAGES])
    floors_md = _table(["floor", "required"], [[name, required] for name, required in PLANNED_FLOORS])
    return "\n".join([
        "# GPU check",
        "",
        "**No GPU run has happened yet.** This project has been developed on machines without an NVIDIA GPU: "
        "the CUDA kernels, their loader and the engine's CUDA path have been compiled, checked (`ptxas`, PTX "
        "freshness) and run on a CPU emulation of the kernels, but never on a GPU. `make gpu-check-dry` runs "
        "every stage's harness on the CPU so that the GPU run does not fail on the harness itself.",
        "",
        "`make gpu-check` (`python -m bench.gpu_check`, [gpu-check.md](gpu-check.md)) is the prepared run that proves "
        f"the GPU path in at most {duration(TOTAL_S)}: each stage runs in its own process "
        "under its own limit (the limits add up to that total), and a stage that fails, crashes or runs out "
        "of time is reported and the next one runs. On a GPU machine it replaces this file with its "
        "results: date, GPU, driver and software versions, a summary table, the floors below, every failure "
        "it found, and each stage's measurements. `make gpu-check GPU_CHECK_OUT=DIR` also puts this file, "
        "every stage's log and JSON result in DIR (one copy brings them all back; the 8B-shaped model stays "
        "in the work folder). With a driver present, CUDA that is not usable is a failure written here; on "
        "a machine without a driver the GPU stages are skipped, this file is left alone and the exit code "
        "is 0.",
        "",
        "## What the next run will measure",
        "",
        stages,
        "",
        "## Floors it checks",
        "",
        floors_md,
    ]) + "\n"
