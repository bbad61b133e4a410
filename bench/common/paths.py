"""Where the benchmarks read and write: the repository, its docs/, and .run/bench (the cache of
generated models and adapters, never committed)."""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
BENCHMARKS_MD = DOCS / "benchmarks.md"
BENCH_DIR = REPO / ".run" / "bench"
