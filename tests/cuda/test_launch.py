"""Launch planning, argument packing and PTX choice: the pure-Python side of the CUDA path."""
from __future__ import annotations

import ctypes
import math
import re

import pytest
import torch

from multilora.cuda import attention_launch as A
from multilora.cuda import lora_launch as L
from multilora.cuda.driver import CudaError, check
from multilora.cuda.files import available_ptx, choose_ptx, kernel_source
from multilora.cuda.launches import PackedLaunch, pack

KINDS = {"int": "i", "long long": "l", "float": "f"}


def cu_signatures(prefix: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """Kernel families and (name, kind) parameters as written in the .cu's entry point macros,
    for the kernels named `{prefix}{family}_##SUF`."""
    text = kernel_source().replace("\\\n", " ")
    sigs = {}
    for fam, params in re.findall(rf"{prefix}(\w+?)_##SUF\(([^)]*)\)", text):
        parsed = []
        for p in params.split(","):
            decl, name = p.strip().rsplit(" ", 1)
            parsed.append((name, "p" if "*" in decl else KINDS[decl.strip()]))
        sigs[fam] = tuple(parsed)
    return sigs


def test_signatures_match_the_cuda_source():
    assert cu_signatures("lora_") == L.SIGNATURES


def test_constants_match_the_cuda_source():
    text = kernel_source()
    assert re.search(rf"#define LORA_MAX_THREADS {L.MAX_THREADS}\b", text)
    assert re.search(rf"#define LORA_TM {L.TOKENS_PER_TILE}\b", text)


def test_attention_signatures_and_constants_match_the_cuda_source():
    assert {f"paged_{fam}": sig for fam, sig in cu_signatures("paged_").items()} == A.SIGNATURES
    text = kernel_source()
    for name, value in (("PA_THREADS", A.THREADS), ("PA_GROUP", A.GROUP_TILE), ("PA_MAX_D", A.MAX_HEAD_DIM)):
        assert re.search(rf"#define {name} {value}\b", text), name


def pack_args(family: str, **values):
    return pack(family, L.SIGNATURES[family], values)


def test_pack_args_orders_and_types():
    values, types = pack_args("expand_token", num_tokens=3, token_slots=0x3000, num_slots=8, num_targets=3,
                              desc=0x1000, ldy=6144, y=0xABC0, splits=2, lds=16 * 3, ldv=16, v=0x10)
    assert values == (0x10, 16, 48, 2, 0xABC0, 6144, 0x1000, 3, 8, 0x3000, 3)
    assert types == (ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_int, ctypes.c_void_p,
                     ctypes.c_longlong, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int)


def test_pack_refuses_a_float_for_an_int_and_a_nan_float():
    sig = (("n", "i"), ("scale", "f"))
    assert L.pack("k", sig, {"n": 3, "scale": 0.5}) == ((3, 0.5), (ctypes.c_int, ctypes.c_float))
    with pytest.raises(ValueError, match="n=3.5"):
        L.pack("k", sig, {"n": 3.5, "scale": 0.5})
    with pytest.raises(ValueError, match="scale=nan"):
        L.pack("k", sig, {"n": 3, "scale": float("nan")})


def test_pack_args_refuses_missing_and_out_of_range():
    args = dict(v=1, ldv=16, lds=16, splits=1, y=2, ldy=8, desc=3, num_targets=1, num_slots=4, token_slots=5,
                num_tokens=1)
    with pytest.raises(ValueError, match="num_slots"):
        pack_args("expand_token", **{**args, "num_slots": 2**31})
    with pytest.raises(ValueError, match="token_slots"):
        pack_args("expand_token", **{k: v for k, v in args.items() if k != "token_slots"})


SHRINK = dict(x=0x7F0000001000, ldx=2**33, v=0x2000, ldv=64, lds=64 * 7, desc=0x3000, num_targets=3,
              num_slots=16, token_slots=0x5000, num_tokens=7, h_in=14336, k_chunk=-1)


def _read_back(address: int, types: tuple) -> tuple:
    """The argument values cuLaunchKernel would read from a void*[] at `address`."""
    slots = (ctypes.c_void_p * len(types)).from_address(address)
    return tuple(t.from_address(slots[i]).value for i, t in enumerate(types))


def test_packed_params_reach_the_driver_intact():
    from cuda.bindings import driver

    values, types = pack_args("shrink_token", **SHRINK)
    node = driver.CUDA_KERNEL_NODE_PARAMS()
    node.kernelParams = (values, types)
    assert _read_back(node.kernelParams, types) == values


def test_a_launch_packed_once_reads_as_cuda_bindings_packs_it_and_changes_in_place():
    """What the engine hands cuLaunchKernel: the address of the argument pointers, packed once per
    step; a later call's addresses are written in place, the rest stays as planned."""
    values, types = pack_args("shrink_token", **SHRINK)
    packed = PackedLaunch(L.Launch("lora_shrink_token_bf16", (7, 3, 1), (256, 1, 1), (values, types)),
                          L.SIGNATURES["shrink_token"])
    assert _read_back(packed.address, types) == values == packed.params[0]
    packed.set("x", 0x1234560)
    packed.set("desc", 0x9990)
    names = [n for n, _ in L.SIGNATURES["shrink_token"]]
    expected = tuple({"x": 0x1234560, "desc": 0x9990}.get(n, v) for n, v in zip(names, values))
    assert _read_back(packed.address, types) == expected == packed.params[0]


@pytest.mark.parametrize("h_in", [64, 256, 1000, 4096, 14336])
@pytest.mark.parametrize("rows", [1, 7, 64, 4096])
def test_shrink_split_covers_h_in_without_empty_splits(h_in, rows):
    splits, chunk = L.shrink_split(h_in, rows, sm_count=132)
    assert splits * chunk >= h_in > (splits - 1) * chunk
    assert splits == 1 or chunk >= L.MIN_K_PER_BLOCK
    assert rows * splits >= min(4 * 132, rows * (h_in // L.MIN_K_PER_BLOCK)) or splits == 1


def test_shrink_split_examples():
    assert L.shrink_split(4096, 1, 132) == (16, 256)  # decode of one token: split k 16 ways
    assert L.shrink_split(4096, 1024, 132) == (1, 4096)  # enough rows already
    assert L.shrink_split(100, 1, 132) == (1, 100)


@pytest.mark.parametrize("dtype", ["f16", "bf16", "f32"])
@pytest.mark.parametrize("h_out", [1, 67, 1024, 4096, 14336])
@pytest.mark.parametrize("rows", [1, 16, 512])
def test_expand_block_covers_h_out(dtype, h_out, rows):
    vec = L.vector_width(dtype)
    threads, tiles = L.expand_block((h_out,), rows, vec, sm_count=132)
    assert threads in (64, 128, 256)
    assert tiles * threads * vec >= h_out > (tiles - 1) * threads * vec
    if rows * math.ceil(h_out / (64 * vec)) >= 4 * 132:
        assert rows * tiles >= 4 * 132  # the widest block that still fills the GPU


def _problem(**kw) -> L.LoraProblem:
    base = dict(dtype="bf16", num_tokens=37, h_in=4096, h_outs=(1024,), num_slots=8, x=0x100, ldx=4096, y=0x200,
                ldy=6144, v=0x300, ldv=64, desc=0x400, token_slots=0x700, seg_starts=0x800, seg_ends=0x810,
                seg_slots=0x820, num_segments=5, max_segment_len=20)
    return L.LoraProblem(**{**base, **kw})


def test_plan_token_grids():
    shrink, expand = L.plan(_problem(), "token", sm_count=132)
    assert shrink.kernel == "lora_shrink_token_bf16" and expand.kernel == "lora_expand_token_bf16"
    assert shrink.grid == (37, 15, 1) and shrink.block == (256, 1, 1)  # ceil(528/37)=15 splits
    assert shrink.params[0][-1] == math.ceil(4096 / 15)  # k_chunk
    assert expand.grid[0] == 37 and expand.grid[1] * expand.block[0] * 8 >= 1024
    assert expand.params[0][:6] == (0x300, 64, 37 * 64, 15, 0x200, 6144)  # v, ldv, lds, splits, y, ldy
    assert L.v_floats(_problem(), "token", 132) == 15 * 37 * 64  # every split's partial sums


def test_plan_covers_every_target_of_a_projection():
    """q, k and v of Llama-3-8B's fused qkv in one launch pair: the shrink's grid y is target x split,
    the expand's y runs over each target's column tiles in turn."""
    p = _problem(num_tokens=32, h_outs=(4096, 1024, 1024), ldv=3 * 16)
    shrink, expand = L.plan(p, "token", sm_count=132)
    splits = shrink.grid[1] // 3
    assert shrink.grid == (32, 3 * splits, 1) and splits == math.ceil(528 / (32 * 3))
    threads = expand.block[0]
    assert expand.grid == (32, L.column_tiles((4096, 1024, 1024), threads, 8), 1)
    assert dict(zip([n for n, _ in L.SIGNATURES["expand_token"]], expand.params[0]))["num_targets"] == 3


def test_plan_segment_grids():
    shrink, expand = L.plan(_problem(dtype="f32"), "segment", sm_count=132)
    assert shrink.kernel == "lora_shrink_segment_f32"
    assert shrink.grid[0] == 5 and shrink.grid[2] == 3  # ceil(20 / 8) token tiles
    assert expand.grid[0] == 5 and expand.grid[2] == 3
    assert shrink.params[0][8:12] == (0x800, 0x810, 0x820, 5)
    with pytest.raises(ValueError, match="variant"):
        L.plan(_problem(), "bgmv", sm_count=132)


def test_descriptor_layout():
    """Per target and slot A, B and rank as [J][S] arrays, then each target's columns (the .cu's layout)."""
    desc = L.descriptor(a_ptrs=[[1, 2], [3, 4]], b_ptrs=[[5, 6], [7, 8]], ranks=[[16, 0], [8, 4]],
                        columns=[(0, 4096, 0), (4096, 1024, 64)])
    assert desc == [1, 2, 3, 4, 5, 6, 7, 8, 16, 0, 8, 4, 0, 4096, 0, 4096, 1024, 64]
    with pytest.raises(ValueError, match="one entry per target"):
        L.descriptor([[1]], [[2]], [[3]], [])


def test_choose_variant():
    assert L.choose_variant(adapter_tokens=64, num_segments=64) == "token"  # decode, all distinct
    assert L.choose_variant(adapter_tokens=64, num_segments=8) == "segment"
    assert L.choose_variant(adapter_tokens=0, num_segments=0) == "token"


def test_choose_ptx_takes_newest_target_not_above_the_device(tmp_path):
    avail = {80: tmp_path / "a", 90: tmp_path / "b"}
    assert choose_ptx((8, 0), avail) == avail[80]
    assert choose_ptx((8, 9), avail) == avail[80]
    assert choose_ptx((9, 0), avail) == avail[90]
    assert choose_ptx((10, 0), avail) == avail[90]  # PTX JITs forward
    assert choose_ptx((7, 5), avail) is None  # older than every target: NVRTC at load time


def test_committed_ptx_is_found():
    assert sorted(available_ptx()) == [80, 90]


def test_check_names_the_failed_call():
    from cuda.bindings import driver

    assert check((driver.CUresult.CUDA_SUCCESS, 42), "cuThing") == 42
    assert check((driver.CUresult.CUDA_SUCCESS,), "cuThing") is None
    with pytest.raises(CudaError, match=r"cuModuleLoadData\(x.ptx\) failed: CUDA_ERROR_INVALID_PTX"):
        check((driver.CUresult.CUDA_ERROR_INVALID_PTX, None), "cuModuleLoadData(x.ptx)")


def test_loader_imports_without_a_gpu():
    import multilora.cuda.module as module

    assert module.load_cuda_kernels.__doc__ and not module._loaded  # nothing touched the driver


def test_kernels_support_layouts():
    from multilora.lora.backends.cuda import supported_layout

    x = torch.zeros(4, 8, dtype=torch.float16)
    full = torch.zeros(4, 20, dtype=torch.float16)
    assert supported_layout(full[:, 3:9], x)  # column slice: row stride 20, columns contiguous
    assert not supported_layout(full.t()[:8], x[:, :8].t())  # columns strided
    assert not supported_layout(full[:, :6], x.float())  # dtypes differ
    assert not supported_layout(full.double(), x.double())
