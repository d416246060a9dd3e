"""steady_heap: large freed blocks are reused without page faults, and handed back after.

The independent measure is the kernel's count of minor page faults (``getrusage``): a conv
net at batch 16 on 192 px images makes three 75 MiB activations per call, about 129k pages of
4 KiB, which glibc's default allocator maps afresh on every call.
"""

import platform
import resource

import pytest
import torch
import torch.nn as nn

from fxgndi.core.heap import steady_heap
from fxgndi.deploy.latency import Latency

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
FRESH = 50_000  # pages: well under the ~129k a call of _Counted faults in without reuse
REUSED = 1_000  # pages: what a call may fault in once the heap is steady


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class _Counted(nn.Module):
    """A conv net with 75 MiB activations at batch 16, 192 px; records each call's faults."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.faults: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        before = _faults()
        y = self.net(x)
        self.faults.append(_faults() - before)
        return y


@pytest.fixture
def net_and_batch():
    torch.manual_seed(0)
    return _Counted().eval(), torch.randn(16, 3, 192, 192)


def _calls(net: _Counted, x: torch.Tensor, n: int) -> list[int]:
    with torch.inference_mode():
        for _ in range(n):
            net(x)
    return net.faults[-n:]


@glibc
def test_activations_are_reused_inside_and_faulted_in_again_outside(net_and_batch):
    net, x = net_and_batch
    with steady_heap() as steady:
        _calls(net, x, 3)  # the heap grows and settles
        inside = _calls(net, x, 3)
    outside = _calls(net, x, 3)
    assert steady is True
    assert max(inside) < REUSED
    assert min(outside) > FRESH


@glibc
def test_nested_blocks_stay_steady_until_the_outermost_ends(net_and_batch):
    net, x = net_and_batch
    with steady_heap():
        with steady_heap():
            _calls(net, x, 3)
        after_inner = _calls(net, x, 2)
    assert max(after_inner) < REUSED
    assert min(_calls(net, x, 2)) > FRESH


@glibc
def test_the_kept_memory_is_handed_back_on_exit():
    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    with steady_heap():
        blocks = [torch.ones(2 ** 24) for _ in range(4)]  # 256 MiB, from the heap
        del blocks
        held = rss_mib()
    assert rss_mib() < held - 128


def test_disabled_it_does_nothing():
    with steady_heap(enabled=False) as steady:
        assert steady is False


@glibc
def test_latency_times_without_page_faults_unless_asked(net_and_batch):
    net, x = net_and_batch
    Latency(batch_size=16, repeat=4).seconds(net, x[:1])
    steady = net.faults[-4:]  # the timed calls
    Latency(batch_size=16, repeat=4, steady_heap=False).seconds(net, x[:1])
    assert max(steady) < REUSED
    assert min(net.faults[-4:]) > FRESH
