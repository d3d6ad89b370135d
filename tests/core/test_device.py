"""Device, dtype and thread policy."""

from __future__ import annotations

import pytest
import torch

from leanfit.core.device import configure_threads, resolve_device, resolve_dtype
from leanfit.core.errors import ConfigError


def test_auto_device_prefers_cuda_then_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if expected == "cpu" and torch.backends.mps.is_available():
        expected = "mps"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_absent_cuda_is_refused_with_fix():
    with pytest.raises(ConfigError, match=r"device='cuda'.*use device=auto or cpu"):
        resolve_device("cuda")


def test_bad_device_name():
    with pytest.raises(ConfigError, match=r"device='gpu0' is invalid"):
        resolve_device("gpu0")


@pytest.mark.parametrize(
    ("name", "dtype"),
    [("fp32", torch.float32), ("bf16", torch.bfloat16), ("float64", torch.float64), ("half", torch.float16)],
    ids=["fp32", "bf16", "float64", "half"],
)
def test_dtype_aliases(name, dtype):
    assert resolve_dtype(name) is dtype


def test_auto_dtype_on_cpu_is_float32_and_bad_names_fail():
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    with pytest.raises(ConfigError, match="dtype='int8'"):
        resolve_dtype("int8")


def test_thread_policy(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("LEANFIT_THREADS", raising=False)
    try:
        assert configure_threads(0, small_workload=True) == 1 == torch.get_num_threads()
        assert configure_threads(2, small_workload=True) == 2 == torch.get_num_threads()
        monkeypatch.setenv("LEANFIT_THREADS", "3")
        assert configure_threads(0, small_workload=False) == 3
        with pytest.raises(ConfigError, match="threads=-1"):
            configure_threads(-1, small_workload=False)
    finally:
        torch.set_num_threads(before)


def test_device_name_and_synchronize_on_cpu():
    from leanfit.core.device import device_name, synchronize

    assert device_name(torch.device("cpu")) == "cpu"
    synchronize(torch.device("cpu"))  # a no-op off CUDA, not an error
    if torch.cuda.is_available():
        assert device_name(torch.device("cuda")) == torch.cuda.get_device_name(0)
