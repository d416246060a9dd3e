"""Resumable runs: interrupted after k batches, resumed, equal to the uninterrupted run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import fxgndi
import fxgndi.gndi.checkpoint
import fxgndi.gndi.estimate
from fxgndi.gndi.checkpoint import RunStateError
from fxgndi.app.cli import main

from tests.helpers import make_tiny


class Preempted(RuntimeError):
    pass


class FlakyBatches:
    """A list of batches whose iteration raises once, when batch ``fail_at`` is asked for;
    at that moment it records how many batches the saved run state held."""

    def __init__(self, batches, fail_at: int | None = None, state_path=None) -> None:
        self.batches, self.fail_at, self.state_path = batches, fail_at, state_path
        self.saved_when_failing = None

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if i == self.fail_at:
                self.fail_at = None
                if self.state_path is not None and self.state_path.exists():
                    state = torch.load(self.state_path, weights_only=True)
                    self.saved_when_failing = state["batches"]
                raise Preempted(f"preempted before batch {i}")
            yield batch


def _batches(n: int = 7):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(3, 2, 6, 6, generator=g), torch.randint(0, 3, (3,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("kwargs", [
    dict(granularity="channel", sites=["conv", "bn"], readout="loss"),
    dict(mode="probe", probes=6),  # random signs: drawn per batch, so resuming changes nothing
])
def test_score_interrupted_and_resumed_equals_the_uninterrupted_run(tmp_path, kwargs):
    model, path = make_tiny(), tmp_path / "run.pt"
    full = fxgndi.score(model, _batches(), progress=False, **kwargs)
    flaky = FlakyBatches(_batches(), fail_at=5, state_path=path)
    with pytest.raises(Preempted):
        fxgndi.score(model, flaky, run_state=path, save_every=2, progress=False, **kwargs)
    assert flaky.saved_when_failing == 4  # the periodic save, every 2 batches
    assert torch.load(path, weights_only=True)["batches"] == 5  # saved on the way out
    scored = []
    original = fxgndi.gndi.estimate.unit_norms
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fxgndi.gndi.estimate, "unit_norms", lambda *a: scored.append(1) or original(*a))
        resumed = fxgndi.score(model, flaky, run_state=path, resume=True, save_every=2,
                               progress=False, **kwargs)
    assert len(scored) == 2  # batches 5 and 6 only
    assert resumed.n_samples == full.n_samples == 21
    np.testing.assert_allclose(resumed.values, full.values, rtol=1e-10)
    np.testing.assert_allclose(resumed.stderr, full.stderr, rtol=1e-8)


class CountingDataset(Dataset):
    """Samples that count their loads and can fail at one index (a broken reader)."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(3)
        self.x = torch.randn(n, 2, 6, 6, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.fail_at, self.loads = fail_at, []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if i == self.fail_at:
            self.fail_at = None
            raise Preempted(f"preempted at sample {i}")
        self.loads.append(i)
        return self.x[i], self.y[i]


def test_ablation_resumed_from_a_dataloader_loads_only_the_rest(tmp_path):
    model, path = make_tiny(), tmp_path / "ablate.pt"
    full = fxgndi.ablate(model, DataLoader(CountingDataset(12), batch_size=3),
                         metric="accuracy", progress=False)
    data = CountingDataset(12, fail_at=7)  # inside the third batch (samples 6-8)
    loader = DataLoader(data, batch_size=3)
    with pytest.raises(Preempted):
        fxgndi.ablate(model, loader, metric="accuracy", run_state=path, save_every=1,
                      progress=False)
    data.loads.clear()
    resumed = fxgndi.ablate(model, loader, metric="accuracy", run_state=path, resume=True,
                            progress=False)
    # shapes (first batch) are read again; of the scoring pass only batches 2 and 3
    assert sorted(set(data.loads) - {0, 1, 2}) == list(range(6, 12))
    assert resumed.n_samples == 12
    np.testing.assert_allclose(resumed.values, full.values, rtol=1e-12)


def test_resuming_a_finished_run_reads_no_batch_and_returns_it(tmp_path):
    model, path = make_tiny(), tmp_path / "done.pt"
    first = fxgndi.score(model, _batches(3), run_state=path, progress=False)
    calls = []
    original = fxgndi.gndi.estimate.unit_norms
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fxgndi.gndi.estimate, "unit_norms", lambda *a: calls.append(1) or original(*a))
        again = fxgndi.score(model, _batches(3), run_state=path, resume=True, progress=False)
    assert calls == [] and again.n_samples == 9
    np.testing.assert_allclose(again.values, first.values, rtol=0)


def test_resume_with_other_settings_is_refused_naming_them(tmp_path):
    model, path = make_tiny(), tmp_path / "run.pt"
    fxgndi.score(model, _batches(2), run_state=path, progress=False)
    with pytest.raises(RunStateError, match=r"p: saved 2 != now 1"):
        fxgndi.score(model, _batches(2), p=1, run_state=path, resume=True, progress=False)
    with pytest.raises(RunStateError, match="units"):
        fxgndi.score(model, _batches(2), sites="bn", run_state=path, resume=True,
                     progress=False)
    path.write_bytes(b"garbage")
    with pytest.raises(RunStateError, match="cannot read the run state"):
        fxgndi.score(model, _batches(2), run_state=path, resume=True, progress=False)


def test_resume_with_another_number_of_processes_is_refused(tmp_path):
    model, path = make_tiny(), tmp_path / "run.pt"
    (tmp_path / "run.pt.rank0-of-2").write_bytes(b"")  # as saved by two torchrun processes
    with pytest.raises(RunStateError, match="saved by 2 process.*this run has 1"):
        fxgndi.score(model, _batches(2), run_state=path, resume=True, progress=False)


def test_resume_without_a_saved_state_starts_from_the_first_batch(tmp_path):
    model, path = make_tiny(), tmp_path / "new.pt"
    with pytest.warns(RuntimeWarning, match="no saved run state"):
        s = fxgndi.score(model, _batches(2), run_state=path, resume=True, progress=False)
    assert s.n_samples == 6 and path.exists()


def test_cli_interrupt_names_the_state_and_resume_finishes_the_run(tmp_path, capsys,
                                                                   monkeypatch):
    argv = ["score", "--model", "resnet18", "--data", "digits", "--limit", "12",
            "--batch-size", "4", "--sites", "layer4.*", "--quiet", "--json"]
    assert main(argv) == 0
    full = json.loads(capsys.readouterr().out)
    state = tmp_path / "run.pt"
    original, calls = fxgndi.gndi.estimate.unit_norms, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(fxgndi.gndi.estimate, "unit_norms", interrupted)
    assert main([*argv, "--run-state", str(state), "--save-every", "5"]) == 1
    err = capsys.readouterr().err
    assert f"the partial sums are in {state}" in err and "--resume" in err
    assert main([*argv, "--run-state", str(state), "--resume"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert len(calls) == 4  # 2 before the interrupt, then batches 1 and 2: batch 0 not again
    assert resumed["n_samples"] == full["n_samples"] == 12
    np.testing.assert_allclose([u["value"] for u in resumed["units"]],
                               [u["value"] for u in full["units"]], rtol=1e-6)
