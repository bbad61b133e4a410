"""The GPU check's report: progress lines, the floors, the summary table and docs/gpu.md."""
from __future__ import annotations

import datetime
import subprocess

from bench.common.paths import REPO


def progress_line(stage, result: dict, elapsed_s: float) -> str:
    return f"[{elapsed_s:4.0f} s] {stage.title:<28} {result['status']:<7} {result.get('summary', '')}"


def floors(results: dict[str, dict]) -> list[dict]:
    """Every floor the stages checked, plus the one that needs two stages: the engine with our
    kernels against the engine on the PyTorch path, 32 distinct adapters each."""
    found = [f for r in results.values() for f in r.get("floors", [])]
    on = results.get("speed_on", {}).get("facts", {}).get("lora_tokens_per_s")
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


def stage_table(stages, results: dict[str, dict]) -> str:
    return _table(["stage", "status", "time", "result"],
                  [[s.title, results[s.name]["status"], f"{results[s.name].get('seconds', 0):.0f} s",
                    results[s.name].get("summary", "")] for s in stages])


def floor_table(found: list[dict]) -> str:
    if not found:
        return "No floor was measured."
    return _table(["floor", "measured", "required", "met"],
                  [[f["name"], f["measured"], f["required"], "yes" if f["ok"] else "NO"] for f in found])


def summary(stages, results: dict[str, dict], found: list[dict]) -> str:
    return f"\n{stage_table(stages, results)}\n\n{floor_table(found)}"


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return (sha or "unknown") + (" with local changes" if dirty else "")


def markdown(stages, results: dict[str, dict], found: list[dict], when: datetime.datetime) -> str:
    """docs/gpu.md: when, where, the summary, the floors, what failed, and each stage's details."""
    env = results["env"].get("facts", {})
    failures = [f"- **{s.title}**: {results[s.name]['status']}, {results[s.name].get('summary', '')}"
                for s in stages if results[s.name]["status"] in ("FAIL", "TIMEOUT")]
    failures += [f"- floor **{f['name']}**: {f['measured']}, required {f['required']}"
                 for f in found if not f["ok"]]
    parts = [
        "# GPU check",
        "",
        "Results of the latest `make gpu-check` on a GPU (`python -m bench.gpu_check` writes this file; "
        "README.md, \"GPU check\", says how to run it).",
        "",
        f"- Date: {when:%Y-%m-%d %H:%M} UTC",
        f"- GPU: {env.get('gpu', '?')}",
        f"- Driver: {env.get('driver', '?')}",
        f"- Software: {env.get('software', '?')}",
        f"- Commit: {_commit()}",
        "",
        "## Summary",
        "",
        stage_table(stages, results),
        "",
        "## Floors",
        "",
        floor_table(found),
        "",
        "## Failures found",
        "",
        "\n".join(failures) if failures else "None.",
    ]
    for s in stages:
        details = results[s.name].get("details", "").strip()
        if details:
            parts += ["", f"## {s.title[0].upper()}{s.title[1:]}", "", details]
    return "\n".join(parts) + "\n"
