"""Shared fixtures: a demo base model and PEFT adapters built once per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from multilora.demo import make_demo

sys.path.insert(0, str(Path(__file__).parent / "support"))  # helper modules shared by test folders


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    make_demo(out)
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA; none is visible to torch on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
