"""load_cuda_kernels against a faked CUDA driver: one load per device, one logged error, no leaks.

The fake replaces the cuda.bindings.driver calls CudaKernels makes and counts them, so the
failure paths a real old driver takes (CUDA_ERROR_UNSUPPORTED_PTX_VERSION) run here without a GPU.
"""
from __future__ import annotations

import logging
from collections import Counter

import pytest
import torch
from cuda.bindings import driver

from multilora.cuda import module
from multilora.cuda.driver import CudaError
from multilora.cuda.files import available_ptx
from multilora.errors import ConfigError

OK = driver.CUresult.CUDA_SUCCESS
ATTR = driver.CUdevice_attribute


class FakeDriver:
    """A pretend GPU of compute capability `capability` behind a CUDA 12.4 driver."""

    def __init__(self, capability=(9, 0), load_error=None, init_error=None) -> None:
        self.capability = capability
        self.load_error = load_error
        self.init_error = init_error
        self.calls: Counter[str] = Counter()
        self.retained = 0  # primary context references held
        self.current = driver.CUcontext(0)
        self.images: list[bytes] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in ("cuInit", "cuDriverGetVersion", "cuDeviceGet", "cuDeviceGetAttribute",
                     "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRelease", "cuCtxGetCurrent",
                     "cuCtxSetCurrent", "cuModuleLoadData", "cuGetErrorString"):
            monkeypatch.setattr(driver, name, self._counted(name))

    def _counted(self, name):
        def call(*args):
            self.calls[name] += 1
            return getattr(self, "_" + name)(*args)
        return call

    def _cuInit(self, flags):
        return (self.init_error or OK,)

    def _cuDriverGetVersion(self):
        return OK, 12040

    def _cuDeviceGet(self, index):
        return OK, driver.CUdevice(index)

    def _cuDeviceGetAttribute(self, attr, device):
        values = {ATTR.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: self.capability[0],
                  ATTR.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: self.capability[1],
                  ATTR.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: 132}
        return OK, values[attr]

    def _cuDevicePrimaryCtxRetain(self, device):
        self.retained += 1
        return OK, driver.CUcontext(0x1000)

    def _cuDevicePrimaryCtxRelease(self, device):
        self.retained -= 1
        return (OK,)

    def _cuCtxGetCurrent(self):
        return OK, self.current

    def _cuCtxSetCurrent(self, context):
        self.current = context
        return (OK,)

    def _cuModuleLoadData(self, image):
        self.images.append(image)
        if self.load_error is not None:
            return self.load_error, None
        return OK, driver.CUmodule(0x2000)

    def _cuGetErrorString(self, err):
        texts = {driver.CUresult.CUDA_ERROR_UNSUPPORTED_PTX_VERSION:
                 b"the provided PTX was compiled with an unsupported toolchain.",
                 driver.CUresult.CUDA_ERROR_NO_DEVICE: b"no CUDA-capable device is detected"}
        return OK, texts.get(err, b"")


@pytest.fixture
def fresh_loader(monkeypatch):
    """No device loaded yet in this test, whatever other tests did."""
    monkeypatch.setattr(module, "_loaded", {})


def _fake(monkeypatch, **kwargs) -> FakeDriver:
    fake = FakeDriver(**kwargs)
    fake.install(monkeypatch)
    return fake


GPU0 = torch.device("cuda", 0)
OLD_DRIVER = dict(load_error=driver.CUresult.CUDA_ERROR_UNSUPPORTED_PTX_VERSION)


def test_old_driver_in_auto_logs_one_error_and_falls_back(fresh_loader, monkeypatch, caplog):
    fake = _fake(monkeypatch, **OLD_DRIVER)
    with caplog.at_level(logging.ERROR, logger=module.__name__):
        results = [module.load_cuda_kernels(GPU0, "auto") for _ in range(200)]
    assert results == [None] * 200
    assert fake.calls["cuModuleLoadData"] == 1, "a failed load must not be retried"
    assert fake.calls["cuDevicePrimaryCtxRetain"] == 1 and fake.retained == 0, "the retain leaked"
    assert len(caplog.records) == 1
    assert module.loaded()[0].startswith("failed: LoRA kernels could not be loaded on cuda:0")
    message = caplog.records[0].getMessage()
    for needle in ("cuda:0", "cuModuleLoadData(lora_kernels.sm_90.ptx)", "CUDA_ERROR_UNSUPPORTED_PTX_VERSION",
                   "unsupported toolchain", "The driver supports CUDA 12.4",
                   "ISA 8.5 (a CUDA 12.5+ driver)", "Using the PyTorch path"):
        assert needle in message, f"{needle!r} missing from: {message}"


def test_old_driver_in_on_mode_fails_the_load(fresh_loader, monkeypatch, caplog):
    fake = _fake(monkeypatch, **OLD_DRIVER)
    for _ in range(3):
        with pytest.raises(ConfigError, match=r"CUDA_ERROR_UNSUPPORTED_PTX_VERSION.*CUDA 12\.4.*"
                                              r"cuda_kernels=on requires the kernels"):
            module.load_cuda_kernels(GPU0, "on")
    assert fake.calls["cuModuleLoadData"] == 1 and fake.retained == 0
    assert not caplog.records  # the raised error is the report


def test_no_device_fails_before_any_retain(fresh_loader, monkeypatch):
    fake = _fake(monkeypatch, init_error=driver.CUresult.CUDA_ERROR_NO_DEVICE)
    with pytest.raises(ConfigError, match=r"cuInit failed: CUDA_ERROR_NO_DEVICE"):
        module.load_cuda_kernels(GPU0, "on")
    assert fake.calls["cuDevicePrimaryCtxRetain"] == 0


@pytest.mark.parametrize("capability, target", [((9, 0), 90), ((8, 6), 80), ((10, 0), 90)])
def test_successful_load_happens_once_per_device(fresh_loader, monkeypatch, capability, target):
    fake = _fake(monkeypatch, capability=capability)
    first = module.load_cuda_kernels(GPU0, "auto")
    assert isinstance(first, module.CudaKernels)
    assert module.load_cuda_kernels(GPU0, "on") is first
    assert fake.calls["cuModuleLoadData"] == 1 and fake.retained == 1
    assert first.ptx_source == f"lora_kernels.sm_{target}.ptx" and first.ptx_isa == (8, 5)
    assert fake.images == [available_ptx()[target].read_bytes() + b"\0"]
    assert first.sm_count == 132 and first.capability == capability
    assert int(fake.current) == 0x1000  # made current for the caller's thread
    assert module.loaded() == {0: f"lora_kernels.sm_{target}.ptx"}


def test_off_and_cpu_never_touch_the_driver(fresh_loader, monkeypatch):
    fake = _fake(monkeypatch)
    assert module.load_cuda_kernels(GPU0, "off") is None
    assert module.load_cuda_kernels(torch.device("cpu"), "on") is None
    assert module.load_cuda_kernels(torch.device("cpu"), "auto") is None
    assert sum(fake.calls.values()) == 0


def test_unknown_mode_is_refused(fresh_loader):
    with pytest.raises(ConfigError, match="'cuda_kernels' must be auto, on or off, got 'yes'"):
        module.load_cuda_kernels(GPU0, "yes")


def test_failure_reason_without_a_driver_library(monkeypatch):
    """Without libcuda the reason says so instead of inventing a version."""
    def no_library():
        raise RuntimeError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(driver, "cuDriverGetVersion", no_library)
    reason = module._failure_reason(0, CudaError("cuInit failed: X"))
    assert "The driver supports an unknown CUDA version" in reason
    assert "ISA 8.5" in reason
