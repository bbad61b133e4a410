"""`multilora.launcher.shm`: the launcher removes its servers' regions, never anyone else's."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from multilora.launcher import shm


def test_prefix_is_ours_unique_and_a_backend_config_flag():
    a, b = shm.new_prefix(), shm.new_prefix()
    assert a != b and re.fullmatch(rf"multilora_{os.getpid()}_[0-9a-f]{{8}}_", a)
    assert shm.backend_config_arg(a) == f"--backend-config=python,shm-region-prefix-name={a}"


def test_remove_regions_takes_only_that_prefix(tmp_path):
    prefix, other = shm.new_prefix(), shm.new_prefix()
    for name in (f"{prefix}uuid-1", f"{prefix}uuid-2", f"{other}uuid-3",
                 "triton_python_backend_shm_region_uuid-4"):
        (tmp_path / name).write_bytes(b"x")
    removed = shm.remove_regions(prefix, tmp_path)
    assert sorted(p.name for p in removed) == [f"{prefix}uuid-1", f"{prefix}uuid-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{other}uuid-3",
                                                                 "triton_python_backend_shm_region_uuid-4"])


def test_orphaned_regions_are_those_of_launchers_that_are_gone(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    names = {
        "dead": f"multilora_{gone}_0123abcd_uuid",          # its launcher exited: removed
        "alive": f"{shm.new_prefix()}uuid",                  # this process: kept
        "init": "multilora_1_0123abcd_uuid",                 # pid 1 runs: kept
        "foreign": "triton_python_backend_shm_region_uuid",  # another server's: kept
        "odd": f"multilora_{gone}_not-hex_uuid",             # not our naming: kept
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in shm.remove_orphaned_regions(tmp_path)] == [names["dead"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in names.items() if k != "dead")
