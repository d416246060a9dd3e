"""round_to="auto" against a deterministic stand-in kernel clock: it keeps multiples of the
base (8) everywhere, picks the larger multiple the clock makes fastest per kept channel, rounds
nothing more than the base that the clock does not reward, caches its timings once per machine,
and leaves explicit integers and None as they were."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import fxgndi
from fxgndi.deploy.latency import Latency
from fxgndi.pruning.rounding import AutoRound


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 40, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(40, 48, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(48, 4)).eval()


DATA = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,)))]


class StandInClock:
    """Seconds of a kernel = its weights x ``slow`` for every channel count of 8 or more that is
    not a multiple of ``fast_multiple`` (deterministic; counts its calls)."""

    def __init__(self, fast_multiple: int, slow: float = 2.0) -> None:
        self.fast_multiple, self.slow, self.calls = fast_multiple, slow, 0
        self.kernels: list[tuple[nn.Module, tuple[int, ...]]] = []  # each timed, with its input

    def __call__(self, latency: Latency, kernel: nn.Module, example) -> float:
        self.calls += 1
        self.kernels.append((kernel, tuple(example.shape)))
        dims = (kernel.in_channels, kernel.out_channels) if isinstance(kernel, nn.Conv2d) \
            else (kernel.in_features, kernel.out_features)
        odd = sum(d >= 8 and d % self.fast_multiple != 0 for d in dims)
        return kernel.weight.numel() * self.slow ** odd * 1e-9


@pytest.fixture
def clock(monkeypatch):
    def install(fast_multiple: int, slow: float = 2.0) -> StandInClock:
        stand_in = StandInClock(fast_multiple, slow)
        monkeypatch.setattr(Latency, "seconds", lambda self, m, x: stand_in(self, m, x))
        return stand_in
    return install


def _prune(round_to, **kwargs):
    # Channel ratio 0.35: torch-pruning keeps int(40 * 0.65) = 26 of conv 0's channels and
    # int(48 * 0.65) = 31 of conv 2's (the linear head is kept). Nearest multiples: 26 -> 24
    # (of 8) or 32 (of 16 or 32); 31 -> 32 (of 8, 16 and 32).
    return fxgndi.prune(_net(), DATA, sparsity=0.35, target="channels", importance="l1",
                        repair=False, round_to=round_to, **kwargs)


def _widths(result) -> tuple[int, int]:
    return result.model[0].out_channels, result.model[2].out_channels


def test_auto_picks_the_multiple_the_clock_makes_fastest(clock, tmp_path):
    clock(16)
    r = _prune(AutoRound(min_macs=0, cache=tmp_path / "k.json"))
    # conv 0's group (conv 0 out, conv 2 in), 26 kept: the base's grid around it (24, 32) is
    # slow at 24 (2x per channel), 16's (16, 32) fast throughout; 16 gives 32. conv 2's group,
    # 31 kept: every multiple gives 32 here, but the base's grid is slow at 24, which a later
    # ratio would reach: it is rounded to 16 too.
    assert _widths(r) == (32, 32)
    assert r.settings["round_to"] == "auto" and r.settings["rounded"] == {"0": 16, "2": 16}
    assert r.model(DATA[0][0]).shape == (4, 4)


def test_auto_prefers_the_smallest_multiple_that_is_fast(clock, tmp_path):
    clock(8)  # 24 (the base's) is as fast per channel as 32: 26 goes to 24
    assert _widths(_prune(AutoRound(min_macs=0, cache=tmp_path / "k.json"))) == (24, 32)


@pytest.mark.parametrize("slow", [1.0, 1.02])  # no gain / a gain within the 3% noise margin
def test_auto_rounds_nothing_the_clock_does_not_reward(clock, tmp_path, slow):
    stand_in = clock(16, slow=slow)
    r = _prune(AutoRound(min_macs=0, base=None, cache=tmp_path / "k.json"))
    assert _widths(r) == (26, 31) and r.settings["rounded"] == {}
    assert stand_in.calls > 0


@pytest.mark.parametrize("slow", [1.0, 1.02])
def test_auto_keeps_multiples_of_the_base_that_the_clock_does_not_reward(clock, tmp_path, slow):
    """26 -> 24 and 31 -> 32 although the clock makes them no faster: the base is kept for the
    runtimes that were not timed; 16 (32 channels) is not taken without a gain."""
    clock(16, slow=slow)
    r = _prune(AutoRound(min_macs=0, cache=tmp_path / "k.json"))
    assert _widths(r) == (24, 32) and r.settings["rounded"] == {"0": 8, "2": 8}


def test_timings_are_cached_once_and_reused(clock, tmp_path):
    path = tmp_path / "k.json"
    stand_in = clock(16)
    first = _prune(AutoRound(min_macs=0, cache=path))
    measured, text = stand_in.calls, path.read_text()
    assert measured > 0 and len(json.loads(text)) == measured  # one entry per timed kernel
    again = _prune(AutoRound(min_macs=0, cache=path))
    assert stand_in.calls == measured and path.read_text() == text  # nothing timed or written
    assert _widths(again) == _widths(first)
    _prune(AutoRound(min_macs=0, cache=path, latency=Latency(batch_size=8)))
    assert stand_in.calls > measured  # another batch size is another measurement


def test_the_default_cache_lives_under_fxgndi_cache(clock, tmp_path, monkeypatch):
    monkeypatch.setenv("FXGNDI_CACHE", str(tmp_path))
    clock(16)
    _prune(AutoRound(min_macs=0))
    assert (tmp_path / "kernel_seconds.json").exists()


def test_groups_under_min_macs_are_not_timed_only_rounded_to_the_base(clock, tmp_path):
    """Each group's layers do ~1.2M MACs per sample (conv 2: 40 x 48 x 9 x 64 positions)."""
    stand_in = clock(16)
    assert _widths(_prune(AutoRound(min_macs=2 * 10 ** 6, cache=tmp_path / "k.json"))) \
        == (24, 32) and stand_in.calls == 0
    assert _widths(_prune(AutoRound(min_macs=2 * 10 ** 6, base=None,
                                    cache=tmp_path / "k.json"))) == (26, 31)


@pytest.mark.parametrize("round_to, widths", [(8, (24, 24)), (None, (26, 31))])  # tp rounds down
def test_an_explicit_multiple_or_none_is_as_before(clock, round_to, widths):
    stand_in = clock(16)
    r = _prune(round_to)
    assert _widths(r) == widths and r.settings["round_to"] == round_to
    assert stand_in.calls == 0  # nothing is timed


def _macs(c0: int, c2: int) -> int:
    return 64 * (3 * c0 * 9 + c0 * c2 * 9) + c2 * 4  # 8 x 8 positions per conv, and the head


def test_a_mac_target_is_met_with_auto_rounding(clock, tmp_path):
    clock(4)  # fine steps: rounding to 4 keeps the target reachable
    r = fxgndi.prune(_net(), DATA, sparsity=0.5, target="macs", importance="l1", repair=False,
                     allocate="uniform",
                     round_to=AutoRound(multiples=(4,), base=4, min_macs=0,
                                        cache=tmp_path / "k.json"))
    a, b = _widths(r)
    assert abs(1 - _macs(a, b) / _macs(40, 48) - 0.5) <= 0.02
    assert r.settings["rounded"] and a % 4 == 0 and b % 4 == 0
    assert "rounding_dropped" not in r.settings


def test_a_group_that_steps_past_the_target_is_left_unrounded(clock, tmp_path):
    """Conv 0's group rounded to 16 steps by 16 channels where the search brackets
    0.5 of the MACs (unreachable within 0.02): it is left unrounded, conv 2's keeps its 16."""
    clock(16)
    r = fxgndi.prune(_net(), DATA, sparsity=0.5, target="macs", importance="l1", repair=False,
                     allocate="uniform",
                     round_to=AutoRound(min_macs=0, cache=tmp_path / "k.json"))
    a, b = _widths(r)
    assert abs(1 - _macs(a, b) / _macs(40, 48) - 0.5) <= 0.02
    assert r.settings["rounded"] == {"2": 16} and b % 16 == 0
    assert "rounding_dropped" not in r.settings


def test_depthwise_convs_are_timed_at_the_width_on_both_sides(clock, tmp_path):
    """A depthwise conv in the group changes its groups, inputs and outputs together."""
    stand_in = clock(16)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 40, 1), nn.Conv2d(40, 40, 3, padding=1, groups=40),
                        nn.Conv2d(40, 8, 1), nn.Flatten(), nn.Linear(8 * 64, 4)).eval()
    r = fxgndi.prune(net, DATA, sparsity=0.35, target="channels", importance="l1",
                     repair=False, round_to=AutoRound(min_macs=0, cache=tmp_path / "k.json"))
    seen = {(k.groups, k.in_channels, k.out_channels, shape[1]) for k, shape in stand_in.kernels
            if k.groups > 1}
    # 26 wanted: the base's grid around it (24, 32) and 16's (16, 32)
    assert sorted(seen) == [(w, w, w, w) for w in (16, 24, 32)]
    assert r.model[1].groups == r.model[1].out_channels == 32


def test_bad_round_to_is_refused():
    with pytest.raises(ValueError, match="round_to must be 'auto', an integer"):
        _prune("fast")
    with pytest.raises(ValueError, match="multiples must be integers >= 2"):
        AutoRound(multiples=(1, 8))
    with pytest.raises(ValueError, match="base must be None or an integer >= 2 that divides"):
        AutoRound(multiples=(4, 8))


def test_groups_that_step_together_are_split_across_the_bracket(clock, tmp_path):
    """Six groups of 64 channels, all rounded to multiples of 8, step together at every ratio
    (48 -> 40 near the target): a uniform ratio removes 0.44 or 0.61 of the MACs, never 0.5
    within 0.02. The first groups take the bracket's upper ratio and the rest its lower one
    (three at 40: 0.52 removed, by hand); every width stays a multiple of 8."""
    clock(16, slow=1.0)  # the timing rewards nothing: only the base rounds
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 64, 1)] + [nn.Conv2d(64, 64, 1) for _ in range(5)]
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 4)).eval()
    r = fxgndi.prune(net, DATA, sparsity=0.5, target="macs", importance="l1", repair=False,
                     allocate="uniform",
                     round_to=AutoRound(min_macs=0, cache=tmp_path / "k.json"))
    widths = [r.model[i].out_channels for i in range(6)]
    positions = 64
    macs = lambda w: positions * (3 * w[0] + sum(a * b for a, b in zip(w, w[1:])) + sum(w)) \
        + w[-1] * 4 + 4  # noqa: E731  (weights and biases)
    assert abs(1 - macs(widths) / macs([64] * 6) - 0.5) <= 0.02
    assert all(w % 8 == 0 for w in widths) and set(widths) == {40, 48}, widths
    assert r.settings["layer_ratios"] and "rounding_dropped" not in r.settings
    assert r.model(DATA[0][0]).shape == (4, 4)
