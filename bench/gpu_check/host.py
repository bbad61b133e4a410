"""GPU check stage: host time per decode step on the CUDA path (bench.kernels.host_overhead, the CUDA
driver stubbed), measured on the GPU machine's CPU so that it stands next to the GPU-busy time of
a decode step the engine speed stage measures (report.floors puts them side by side).

It runs in a process of its own: the stub replaces cuda.bindings.driver calls, which no other
measurement may see. A dry run measures the tiny shape, briefly.
"""
from __future__ import annotations

from bench.gpu_check.harness import Context, floors_status, run_limited, tail
from bench.kernels.host_overhead import EAGER_FLOOR_US, LAST_LINE, REPLAY_FLOOR_US


def run_host(ctx: Context) -> dict:
    args = ["--shape", "tiny", "--steps", "20"] if ctx.dry else []
    code, out = run_limited([*ctx.python, "-m", "bench.kernels.host_overhead", *args], ctx.left_s() - 2,
                            log=ctx.out / "host-overhead.log")
    lines = out.strip().splitlines()
    found = LAST_LINE.match(lines[-1]) if code == 0 and lines else None
    if found is None:
        return {"status": "FAIL", "summary": f"bench.kernels.host_overhead failed (exit code {code})",
                "details": f"```\n{tail(out)}\n```"}
    eager, replay = (int(v) for v in found.groups())
    floors = [{"name": "host us per decode step, eager (CUDA driver stubbed)", "measured": f"{eager} us",
               "required": f"<= {EAGER_FLOOR_US} us", "ok": eager <= EAGER_FLOOR_US},
              {"name": "host us per decode step, CUDA graph replay (CUDA driver stubbed)", "measured": f"{replay} us",
               "required": f"<= {REPLAY_FLOOR_US} us", "ok": replay <= REPLAY_FLOOR_US}]
    return {"status": floors_status(floors, ctx), "floors": floors, "facts": {"eager_us": eager, "replay_us": replay},
            "summary": f"eager {eager} us, graph replay {replay} us per decode step",
            "details": "\n".join(["```", *lines, "```"])}
