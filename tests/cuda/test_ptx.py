"""The committed PTX: built from the current source, loadable by a CUDA 12.6 driver, spill-free.

Freshness is checked two ways: the header's source hash and options (instant, no toolchain) and,
where NVRTC 12.6 is installed, a byte-for-byte rebuild. ptxas 12.6 from the nvidia-cuda-nvcc-cu12
wheel assembles both targets and every kernel must have zero spills and no stack frame.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from multilora.cuda.files import ptx_isa

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("build_ptx", REPO / "kernels" / "build_ptx.py")
build_ptx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_ptx)

FAMILIES = ("lora_shrink_token", "lora_expand_token", "lora_shrink_segment", "lora_expand_segment",
            "paged_decode", "paged_reduce")
KERNELS = {f"{f}_{s}" for f in FAMILIES for s in ("f16", "bf16", "f32")}
TARGETS = list(build_ptx.TARGETS)


@pytest.fixture(scope="module")
def ptx_texts() -> dict[str, str]:
    return {t: build_ptx.ptx_path(t).read_text() for t in TARGETS}


@pytest.fixture(scope="module")
def ptxas_reports(tmp_path_factory) -> dict[str, dict[str, dict[str, int]]]:
    exe = build_ptx.find_ptxas()
    if exe is None:
        pytest.skip("ptxas not installed: pip install 'nvidia-cuda-nvcc-cu12==12.6.*' (see requirements.txt)")
    if build_ptx.ptxas_version(exe) != (12, 6):
        pytest.skip(f"ptxas {build_ptx.ptxas_version(exe)} found; these checks pin ptxas 12.6")
    out = tmp_path_factory.mktemp("cubin")
    return {t: build_ptx.parse_ptxas(build_ptx.run_ptxas(exe, build_ptx.ptx_path(t), t, out))
            for t in TARGETS}


def test_both_targets_are_committed():
    assert TARGETS == ["sm_80", "sm_90"]
    for t in TARGETS:
        assert build_ptx.ptx_path(t).exists(), f"missing {build_ptx.ptx_path(t)}: run kernels/build_ptx.py"


def test_header_records_current_source_and_options(ptx_texts):
    source = build_ptx.SOURCE.read_text()
    for target, text in ptx_texts.items():
        header = build_ptx.read_header(text)
        assert header["source-sha256"] == build_ptx.source_sha256(source), \
            f"{target} PTX is stale: run `python kernels/build_ptx.py`"
        expected = build_ptx.read_header("\n".join(build_ptx.header_lines(source, build_ptx.TARGETS[target])))
        assert header == expected
    assert build_ptx.stale_targets() == []


def test_isa_version_target_and_entries(ptx_texts):
    for target, text in ptx_texts.items():
        assert ptx_isa(text) <= build_ptx.MAX_PTX_ISA, \
            f"{target}: ISA newer than a CUDA 12.6 driver accepts"
        assert re.search(rf"^\.target {target}\s*$", text, re.M)
        assert set(re.findall(r"\.entry (\w+)\(", text)) == KERNELS


def test_rebuild_is_byte_identical(ptx_texts):
    from multilora.cuda.nvrtc import NvrtcError, nvrtc_version

    try:
        version = nvrtc_version()
    except NvrtcError as exc:
        pytest.skip(f"NVRTC not available ({exc})")
    if version != build_ptx.REQUIRED_NVRTC:
        pytest.skip(f"NVRTC {version} loaded; the committed PTX is built with {build_ptx.REQUIRED_NVRTC}")
    source = build_ptx.SOURCE.read_text()
    for target, arch in build_ptx.TARGETS.items():
        assert build_ptx.render_ptx(source, arch) == ptx_texts[target], f"{target} differs from a rebuild"


def test_ptxas_assembles_without_spills(ptxas_reports):
    for target, kernels in ptxas_reports.items():
        assert set(kernels) == KERNELS
        for name, k in kernels.items():
            assert k["spill_stores"] == 0 and k["spill_loads"] == 0, f"{name} on {target} spills: {k}"
            assert k["stack"] == 0, f"{name} on {target} uses {k['stack']} bytes of stack (local memory)"
            assert 0 < k["registers"] <= 255


def test_readme_register_table_is_current(ptxas_reports):
    readme = (REPO / "kernels" / "README.md").read_text()
    assert build_ptx.report_table(ptxas_reports) in readme, \
        "kernels/README.md: paste the output of `python kernels/build_ptx.py --report`"


def test_parse_ptxas_reads_a_report():
    report = """ptxas info    : Compiling entry function 'lora_x' for 'sm_90'
ptxas info    : Function properties for lora_x
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 8192 bytes smem
"""
    assert build_ptx.parse_ptxas(report) == {
        "lora_x": {"stack": 8, "spill_stores": 4, "spill_loads": 12, "registers": 96, "smem": 8192}}


def test_runtime_fallback_compiles_for_older_gpus():
    """GPUs below sm_80 get the source compiled by NVRTC at load time (software bf16 rounding)."""
    from multilora.cuda.nvrtc import NvrtcError, compile_ptx

    try:
        ptx = compile_ptx(build_ptx.SOURCE.read_text(), "compute_75")
    except NvrtcError as exc:
        if "could not be loaded" in str(exc):
            pytest.skip(str(exc))
        raise
    assert re.search(r"^\.target sm_75\s*$", ptx, re.M)
    assert set(re.findall(r"\.entry (\w+)\(", ptx)) == KERNELS
    assert "cvt.rn.bf16.f32" not in ptx  # that instruction needs sm_80
