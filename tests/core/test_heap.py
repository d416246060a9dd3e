"""steady_heap: large freed blocks are reused without page faults, and handed back after.

The independent measure is the kernel's count of minor page faults (``getrusage``): a conv
net at batch 16 on 192 px images makes three 75 MiB activations per call, about 129k pages of
4 KiB, which glibc's default allocator maps afresh on every call. What glibc does outside the
block depends on what the process allocated before, so each comparison runs in a fresh
interpreter.
"""

import json
import platform
import resource
import subprocess
import sys
import textwrap

import pytest
import torch

from fxgndi.core.heap import steady_heap

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
FRESH = 50_000  # pages: well under the ~129k a call faults in without reuse
REUSED = 1_000  # pages: what a call may fault in once the heap is steady

PRELUDE = """
import json, resource, torch, torch.nn as nn
from fxgndi.core.heap import steady_heap
from fxgndi.deploy.latency import Latency
torch.set_num_threads(1)

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

class Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.faults = []

    def forward(self, x):
        before = faults()
        y = self.net(x)
        self.faults.append(faults() - before)
        return y

net, x = Counted().eval(), torch.randn(16, 3, 192, 192)

def calls(n):
    with torch.inference_mode():
        for _ in range(n):
            net(x)
    return net.faults[-n:]
"""


def _fresh(body: str) -> dict:
    """Run ``PRELUDE + body`` in a fresh interpreter; ``body`` prints one JSON line."""
    code = PRELUDE + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc
def test_activations_are_reused_inside_nested_blocks_and_faulted_in_before():
    seen = _fresh("""
        before = calls(3)
        with steady_heap() as steady:
            with steady_heap():
                calls(3)  # the heap grows and settles
                inner = calls(2)
            after_inner = calls(2)  # the outer block still holds
        print(json.dumps({"before": before, "steady": steady, "inner": inner,
                          "after_inner": after_inner}))
    """)
    assert min(seen["before"]) > FRESH
    assert seen["steady"] is True
    assert max(seen["inner"] + seen["after_inner"]) < REUSED


@glibc
def test_latency_times_without_page_faults_unless_asked():
    seen = _fresh("""
        Latency(batch_size=16, repeat=4, steady_heap=False).seconds(net, x[:1])
        system = net.faults[-4:]  # the timed calls
        Latency(batch_size=16, repeat=4).seconds(net, x[:1])
        print(json.dumps({"system": system, "steady": net.faults[-4:]}))
    """)
    assert min(seen["system"]) > FRESH
    assert max(seen["steady"]) < REUSED


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


class _RecordingMallopt:
    """Stands in for glibc's mallopt: records (parameter, value) calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, parameter: int, value: int) -> int:
        self.calls.append((parameter, value))
        return 1


@pytest.mark.parametrize("environment, mmap_after", [
    ({}, 32 << 20),  # glibc's dynamic threshold's maximum
    ({"MALLOC_MMAP_THRESHOLD_": "1073741824"}, 1 << 30),  # the deployment recipe survives
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=5:glibc.malloc.mmap_threshold=7"}, 7),
])
def test_on_exit_the_processs_own_thresholds_come_back(monkeypatch, environment, mmap_after):
    from fxgndi.core import heap

    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    fake = _RecordingMallopt()
    monkeypatch.setattr(heap, "_libc_function", lambda name: fake if name == "mallopt" else None)
    with steady_heap() as steady:
        with steady_heap():
            pass
        entered = list(fake.calls)  # nothing restored while the outer block holds
    m_mmap_threshold = -3
    assert steady is True
    assert dict(entered) == {-1: 1 << 30, -2: 1 << 30, m_mmap_threshold: 1 << 30}
    assert dict(fake.calls[len(entered):])[m_mmap_threshold] == mmap_after
