"""Shared fixtures: the tiny random demo (built once per checkout, copied per session), the real
demo, and the device every test runs on; which tests share an xdist worker (`make test` runs
the suite with pytest-xdist)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

# Before torch loads OpenMP, for this process and every server and subprocess the tests start: the
# suite runs more processes than there are cores (xdist workers, tritonservers), and OpenMP threads
# spinning at their barriers then starve the ones with work. On 2 busy cores, 4 x 200 tokens on the
# tiny demo took 19-60 s with spinning threads, 1-6 s without (the Makefile's demo target: the same).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

from multilora.demo import make_demo
from multilora.demo.build import is_built
from multilora.engine import device

CPU_ONLY = device.CudaStatus(False, "tests not marked gpu run on the CPU (tests/conftest.py)",
                             "mark the test @pytest.mark.gpu")

sys.path.insert(0, str(Path(__file__).parent / "support"))  # helper modules shared by test folders
from build_cache import cached_build, code_fingerprint, file_lock  # noqa: E402  (found through the line above)
from worker_groups import longest_first, mark_groups, warn_if_ignored  # noqa: E402

# The real demo where `make serve` serves it; `make test` builds it first (`make demo`).
REAL_DEMO = Path(__file__).resolve().parents[1] / "model_repository" / "lora_llm" / "demo"
# What the tiny demo's files depend on besides the code of make_demo's package.
TINY_DEMO_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "peft")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama and four adapters: fast, for everything but the demo's own answers.
    Each session (each xdist worker) gets its own copy of the cached build, which its tests may change."""
    built = cached_build("tiny-demo", code_fingerprint(make_demo, TINY_DEMO_PACKAGES), make_demo)
    out = tmp_path_factory.mktemp("demo")
    shutil.copytree(built, out, dirs_exist_ok=True)
    return out


@pytest.fixture(autouse=True)
def pin_device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """`device=auto` is the CPU in every test not marked gpu: their expectations are fp32-on-CPU
    ones (PEFT at 1e-4, exact token ids). Tests marked gpu see the real CUDA and compare at GPU
    tolerances; a test module that fakes torch.cuda overrides this fixture."""
    if "gpu" not in request.keywords:
        monkeypatch.setattr(device, "cuda_status", lambda: CPU_ONLY)


@pytest.fixture(scope="session")
def real_demo() -> Path:
    """SmolLM2 and its trained adapters, built as `make demo` builds them when pytest runs alone."""
    with file_lock("real-demo"):  # xdist workers: one builds, the others wait for it
        if not is_built(REAL_DEMO):
            subprocess.run([sys.executable, "-m", "multilora.demo", str(REAL_DEMO)], check=True,
                           env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})  # why: see the Makefile's demo target
    return REAL_DEMO


@pytest.hookimpl(tryfirst=True)  # the groups must be marked before xdist reads them
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA; none is visible to torch on this machine")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    if hasattr(config, "workerinput"):  # an xdist worker (tests/support/worker_groups.py)
        here = Path(__file__).parent.relative_to(config.rootpath).as_posix()  # this file's fixtures' node id
        mark_groups(items, everywhere={"", here})
        longest_first(items)


def pytest_collection_finish(session: pytest.Session) -> None:
    if getattr(session.config.option, "loadgroup", False):  # an xdist worker's, after the hook above
        warn_if_ignored(session.items)
