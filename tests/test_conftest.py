"""The suite's own rule: tests not marked gpu run on the CPU, even where torch sees a GPU."""
import pytest
import torch

from multilora.engine.device import pick_device
from multilora.errors import ConfigError


def test_auto_is_the_cpu_in_tests_not_marked_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"tests not marked gpu run on the CPU.*mark the test @pytest.mark.gpu"):
        pick_device("cuda")
