"""GPU check stage: decode attention per layer, our paged kernel against the gather + SDPA path
(bench.kernels.decode_attention's cases, Llama-3-8B heads, bf16). A dry run takes tiny heads and
contexts on the kernels' CPU emulation. compute-sanitizer on its tests is the sanitizers stage's.
"""
from __future__ import annotations

from bench.gpu_check.harness import Context, floors_status
from bench.gpu_check.kernels import copy_bandwidth, load_kernels

CASES = [(32, 1024), (32, 2048), (32, 4096), (64, 1024), (64, 2048), (64, 4096)]  # rows, context
DRY_CASES = [(3, 40)]
AGREEMENT = 3e-2  # bf16: the kernel and SDPA differ by roundings only


def run_attention(ctx: Context) -> dict:
    import torch

    import bench.kernels.decode_attention as bench

    kernels = load_kernels(ctx)
    copy = copy_bandwidth(ctx)
    shape, cases, device, rounds = ((bench.Heads(4, 2, 32, 16), DRY_CASES, "cpu", 1) if ctx.dry
                                    else (bench.LLAMA3_8B, CASES, "cuda", bench.ROUNDS))
    text = [f"Per layer, {shape}, bf16; {'host' if ctx.dry else 'device-to-device'} copy {copy:.0f} GB/s in "
            "this run.", "", "```", bench.HEADER]
    found = []
    for rows, context in cases:
        found.append(bench.measure(kernels, rows, context, torch.bfloat16, copy, shape, device, rounds))
        text.append(bench.row_text(found[-1]))
        ctx.report({"status": "FAIL", "partial": True, "summary": "measuring", "details": "\n".join(text + ["```"])})
        if device == "cuda":
            torch.cuda.empty_cache()
    text.append("```")
    slowest = min(found, key=lambda r: r["speedup"])
    worst_diff = max(r["max_diff"] for r in found)
    floors = [{"name": "decode attention per layer: paged kernel vs gather + SDPA (slowest case)",
               "measured": f"{slowest['kernel_us']:.0f} us vs {slowest['sdpa_us']:.0f} us ({slowest['rows']} rows, "
                           f"{slowest['context']} keys)", "required": "kernel faster", "ok": slowest["speedup"] > 1}]
    agrees = worst_diff <= AGREEMENT  # a correctness check: judged in a dry run too
    text.append(f"- kernel vs SDPA outputs: max |diff| {worst_diff:.2e} (allowed {AGREEMENT:g})")
    best = max(found, key=lambda r: r["copy_fraction"])
    status = floors_status(floors, ctx) if agrees else "FAIL"
    return {"status": status, "floors": floors, "details": "\n".join(text),
            "summary": f"kernel {slowest['speedup']:.2f}x the SDPA path at worst; up to "
                       f"{100 * best['copy_fraction']:.0f}% of copy bandwidth; max |diff| {worst_diff:.1e}"}
