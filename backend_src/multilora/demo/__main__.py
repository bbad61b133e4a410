"""python -m multilora.demo OUT_DIR [--preset smollm2|tiny|100m] [--adapters N]"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import PRESETS, make_demo
from .build import build_demo

REAL = "smollm2"


def main() -> None:
    parser = argparse.ArgumentParser(description="Build a demo base model and adapters into OUT_DIR.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=[REAL, *sorted(PRESETS)], default=REAL,
                        help="smollm2 (default): the real model and adapters trained on it; others: random weights")
    parser.add_argument("--adapters", type=int, default=0, help="extra generated rank-16 adapters (random presets)")
    args = parser.parse_args()
    if args.preset != REAL:
        if not (args.out / "READY").exists():
            make_demo(args.out, args.preset, args.adapters)
    elif args.adapters:
        parser.error("--adapters is for the random presets")
    else:
        build_demo(args.out)  # nothing to do when READY names this build
    print(f"demo model and adapters in {args.out}")


if __name__ == "__main__":
    main()
