"""check_device: an unusable device is one DeviceError before any work."""

from __future__ import annotations

import pytest
import torch

from fxgndi.core.errors import DeviceError
from fxgndi.core.options import RunOptions
from fxgndi.core.runtime import check_device

NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize("name", ["cpu", "cpu:0", torch.device("cpu")])
def test_the_cpu_is_accepted(name):
    assert check_device(name) == torch.device(name)
    assert check_device(None) is None


@pytest.mark.parametrize("name, words", [
    ("garbage", "unknown device 'garbage'"), ("gpu", "unknown device"),
    ("cuda:x", "unknown device"), ("cuda:-1", "unknown device"),
    ("cpu:1", "one CPU device"), ("meta", "holds no data"),
])
def test_unusable_strings_name_the_cause(name, words):
    with pytest.raises(DeviceError, match=words):
        check_device(name)


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_one_clear_error(name):
    with pytest.raises(DeviceError, match="CUDA is not available here") as err:
        check_device(name)
    assert "use cpu instead" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        RunOptions(device=name)  # every verb's device option is checked the same way


def _two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_a_cuda_index_past_the_visible_devices_is_refused(monkeypatch):
    _two_gpus(monkeypatch)
    assert check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(DeviceError, match="'cuda:2' does not exist: 2 visible"):
        check_device("cuda:2")


def test_torchrun_with_more_processes_than_gpus_is_refused_on_every_rank(monkeypatch):
    _two_gpus(monkeypatch)
    assert check_device("cuda", processes_per_node=2) == torch.device("cuda")
    with pytest.raises(DeviceError, match="each of the 3 processes .* at most 2 per node"):
        check_device("cuda", processes_per_node=3)
    assert check_device("cuda:0", processes_per_node=3)  # one named GPU for all: allowed


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_without_mps_is_refused():
    with pytest.raises(DeviceError, match="MPS is not available"):
        check_device("mps")
