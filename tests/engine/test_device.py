"""pick_device / pick_dtype with torch.cuda faked: the device chosen, the reason logged, and what a
load that asked for CUDA says to install."""
from __future__ import annotations

import logging

import pytest
import torch

from multilora.engine import device
from multilora.errors import ConfigError

TOO_OLD = ("The NVIDIA driver on your system is too old (found version 12040). Please update your GPU "
           "driver by downloading and installing a new version from the URL: http://www.nvidia.com/\n"
           "Alternatively, go to: https://pytorch.org to install a PyTorch version ...")
NO_DRIVER = "Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and installed a driver"


@pytest.fixture(autouse=True)
def pin_device():
    """Overrides tests/conftest.py's pinning: these tests fake torch.cuda themselves."""


def fake_torch(monkeypatch, *, cuda="13.0", available=False, init_error=None, driver=None, gpus=()):
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(device, "driver_version", lambda: driver)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: gpus[index or 0])

    def init():
        if init_error:
            raise RuntimeError(init_error)
    monkeypatch.setattr(torch.cuda, "init", init)


def test_driver_older_than_torch_cuda(monkeypatch, caplog):
    fake_torch(monkeypatch, cuda="13.0", init_error=TOO_OLD, driver=(12, 4))
    with caplog.at_level(logging.INFO, logger=device.__name__):
        assert device.pick_device("auto") == torch.device("cpu")
    (record,) = caplog.records
    assert record.levelno == logging.WARNING  # a GPU machine about to run on the CPU
    assert (f"device: cpu (device=auto, CUDA is not usable: torch {torch.__version__} is built for CUDA 13.0, "
            "the driver supports CUDA 12.4 (The NVIDIA driver on your system is too old (found version 12040)."
            ) in record.getMessage()
    assert "install a torch build for CUDA 12.4 or older" in record.getMessage()
    with pytest.raises(ConfigError) as err:
        device.pick_device("cuda:0")
    assert str(err.value).startswith("parameter 'device' is 'cuda:0' but CUDA is not usable: torch")
    assert ("To run on the GPU, install a torch build for CUDA 12.4 or older (the cuXYZ wheels at "
            "https://download.pytorch.org/whl/), or update the NVIDIA driver to one for CUDA 13.0; "
            "or set device=cpu") in str(err.value)


def test_cpu_only_torch_build(monkeypatch, caplog):
    fake_torch(monkeypatch, cuda=None)
    with caplog.at_level(logging.INFO, logger=device.__name__):
        assert device.pick_device("auto") == torch.device("cpu")
    (record,) = caplog.records
    assert record.levelno == logging.INFO and "is a CPU-only build" in record.getMessage()
    with pytest.raises(ConfigError, match=r"'cuda' but CUDA is not usable: torch .* is a CPU-only build\. "
                                          r"To run on the GPU, install a CUDA build of torch"):
        device.pick_device("cuda")


def test_no_driver_is_a_cpu_machine(monkeypatch, caplog):
    fake_torch(monkeypatch, init_error=NO_DRIVER)
    with caplog.at_level(logging.INFO, logger=device.__name__):
        assert device.pick_device("auto") == torch.device("cpu")
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert "no NVIDIA driver was found (Found no NVIDIA driver" in record.getMessage()
    with pytest.raises(ConfigError, match="To run on the GPU, install the NVIDIA driver"):
        device.pick_device("cuda")


def test_driver_new_enough_but_no_gpu_visible(monkeypatch):
    fake_torch(monkeypatch, cuda="12.6", init_error="No CUDA GPUs are available", driver=(12, 8))
    with pytest.raises(ConfigError, match=r"the driver supports CUDA 12\.8 \(No CUDA GPUs are available\)\. "
                                          r"To run on the GPU, check that a GPU is visible"):
        device.pick_device("cuda")


def test_usable_cuda(monkeypatch, caplog):
    fake_torch(monkeypatch, available=True, gpus=("NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"))
    with caplog.at_level(logging.INFO, logger=device.__name__):
        assert device.pick_device("auto") == torch.device("cuda")
        assert device.pick_device("cuda:1") == torch.device("cuda", 1)
    assert "device: cuda, NVIDIA H100 80GB HBM3 (parameter device=auto" in caplog.records[0].getMessage()
    with pytest.raises(ConfigError, match=r"'cuda:2' but torch sees 2 GPU\(s\) \(cuda:0 to cuda:1\)"):
        device.pick_device("cuda:2")


def test_cpu_never_asks_torch_about_cuda(monkeypatch):
    def boom():
        raise AssertionError("device=cpu must not initialise CUDA")
    monkeypatch.setattr(torch.cuda, "is_available", boom)
    assert device.pick_device("cpu") == torch.device("cpu")


def test_pick_dtype():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert device.pick_dtype("auto", cuda) == torch.bfloat16
    assert device.pick_dtype("auto", cpu) == torch.float32
    assert device.pick_dtype("float16", cpu) == torch.float16
