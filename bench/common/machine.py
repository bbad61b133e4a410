"""One line naming the machine a benchmark ran on, for the sections of docs/benchmarks.md."""
from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path


def machine_description() -> str:
    """Cores, the CPU's model name and the first GPU (or "no GPU")."""
    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0].strip() if names else cpu
    gpu = "no GPU"
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
        gpu = out.splitlines()[0] if out else gpu
    return f"{os.cpu_count()} cores ({cpu}), {gpu}"
