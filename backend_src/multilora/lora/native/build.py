"""Build the fused CPU LoRA op: `python -m multilora.lora.native.build` (run by `make install`).

A failed build is reported and is not an error: the engine then runs LoRA on the PyTorch path.
Libraries of earlier sources are removed, so build/ holds one.
"""
from __future__ import annotations

import sys
import time

from multilora.lora.native import BUILD_DIR, CFLAGS, LDFLAGS, SOURCE, module_name


def build(verbose: bool = False) -> bool:
    from torch.utils.cpp_extension import load

    name = module_name()
    BUILD_DIR.mkdir(exist_ok=True)
    for old in BUILD_DIR.glob("lora_cpu_*.so"):
        if old.stem != name:
            old.unlink()
    started = time.monotonic()
    try:
        load(name=name, sources=[str(SOURCE)], build_directory=str(BUILD_DIR), extra_cflags=list(CFLAGS),
             extra_ldflags=list(LDFLAGS), verbose=verbose)
    except Exception as exc:  # no compiler, no ninja, a compile error: the fallback serves
        print(f"fused CPU LoRA op: build failed ({exc}); LoRA will run on the PyTorch path", file=sys.stderr)
        return False
    print(f"fused CPU LoRA op: built {BUILD_DIR / name}.so in {time.monotonic() - started:.0f} s")
    return True


if __name__ == "__main__":
    build(verbose="-v" in sys.argv)
