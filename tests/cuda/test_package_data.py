"""The installed package carries its kernels: a wheel built from this checkout and installed
outside it finds the CUDA source and both PTX targets, with the checkout off sys.path."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from multilora.cuda.files import SOURCE_NAME, available_ptx, data_dir

REPO = Path(__file__).resolve().parents[2]
KERNEL_FILES = [SOURCE_NAME, "lora_kernels.sm_80.ptx", "lora_kernels.sm_90.ptx"]

# Runs in the installed copy with `python -S` (no site-packages: no editable install of the checkout).
PROBE = """
import hashlib, json
import multilora.cuda.files as files
from multilora.cuda.files import choose_ptx
found = files.available_ptx()
print(json.dumps({
    "module": files.__file__,
    "targets": sorted(found),
    "sha256": {e.name: hashlib.sha256(e.read_bytes()).hexdigest()
               for e in [*found.values(), files.data_dir() / files.SOURCE_NAME]},
    "source_starts": files.kernel_source()[:40],
    "hopper": choose_ptx((9, 0), found).name, "ampere": choose_ptx((8, 6), found).name,
}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built offline from a copy of the checkout (the build leaves nothing in the tree)."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in this venv")
    src = tmp_path_factory.mktemp("src")
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copytree(REPO / "backend_src", src / "backend_src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(src)], check=True, capture_output=True)
    (built,) = out.glob("multilora-*.whl")
    return built


def test_wheel_contains_the_kernel_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in KERNEL_FILES:
        assert f"multilora/cuda/data/{name}" in names, f"{name} is not in {wheel.name}"


def test_installed_package_finds_its_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(target), str(wheel)], check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "-S", "-c", PROBE], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(target)})
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert Path(found["module"]).is_relative_to(target), f"imported {found['module']}, not the install"
    assert found["targets"] == [80, 90]
    assert (found["hopper"], found["ampere"]) == ("lora_kernels.sm_90.ptx", "lora_kernels.sm_80.ptx")
    assert found["source_starts"] == (data_dir() / SOURCE_NAME).read_text()[:40]
    checkout = {e.name: hashlib.sha256(e.read_bytes()).hexdigest()
                for e in [*available_ptx().values(), data_dir() / SOURCE_NAME]}
    assert found["sha256"] == checkout, "the installed kernel files differ from the checkout's"
