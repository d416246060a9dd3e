"""Bad input: each case a documented exception (API) or one clear line and exit code 1 (CLI),
with nothing half-written. Cases already tested elsewhere are not repeated here: the README's
"bad input -> error -> test" table names the test of every case."""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fxgndi
from fxgndi.gndi.checkpoint import save_state
from fxgndi.app.cli import main
from fxgndi.core.errors import DataError, NonFiniteError

from tests.helpers import make_tiny

QUIET = ["--quiet", "--sites", "layer4.*"]


def _one_line_error(capsys, argv, *expected):
    """Run the CLI and check: exit code 1, one stderr line that names each expected part."""
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("fxgndi: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for part in expected:
        assert part in err, (part, err)
    return err


def _image_folder(root, corrupt: bool):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    if corrupt:
        (root / "dog" / "broken.png").write_bytes(b"not a png \x00\x01" * 8)
    return root


# --- input shape ---------------------------------------------------------------------------

def test_input_shape_the_model_rejects_is_a_data_error_naming_the_shape(tiny):
    bad = [torch.randn(2, 3, 6, 6)]  # TinyNet takes 2 channels
    with pytest.raises(DataError, match=r"rejects inputs of shape \(2, 3, 6, 6\).*2 channels"):
        fxgndi.score(tiny, bad, progress=False)
    with pytest.raises(DataError, match=r"rejects inputs of shape \(2, 3, 6, 6\)"):
        fxgndi.ablate(tiny, bad, metric="logit_l2", progress=False)
    with pytest.raises(DataError, match=r"rejects inputs of shape \(2, 3, 6, 6\)"):
        fxgndi.validate(tiny, bad, importances=["gndi"], truth="logit_l2", progress=False)


# --- classes -------------------------------------------------------------------------------

def test_model_with_fewer_outputs_than_the_data_has_classes(tiny):
    data = [(torch.randn(4, 2, 6, 6), torch.tensor([0, 1, 2, 7]))]  # TinyNet has 3 outputs
    with pytest.raises(DataError, match="labels up to 7, but the model has 3 outputs.*"
                                        "num_classes=8"):
        fxgndi.score(tiny, data, readout="loss", progress=False)
    with pytest.raises(DataError, match="labels up to 7, but the model has 3 outputs"):
        fxgndi.ablate(tiny, data, metric="accuracy", progress=False)


def test_cli_num_classes_that_differs_from_the_data(capsys):
    from fxgndi.app.data import load_data
    hi = int(next(iter(load_data("digits", limit=4, batch_size=4)))[1].max())
    assert hi >= 5
    _one_line_error(capsys, ["score", "--model", "resnet18", "--data", "digits", "--limit", "4",
                             "--batch-size", "4", "--num-classes", "5", *QUIET],
                    f"labels up to {hi}, but the model has 5 outputs", "--num-classes")


# --- data paths and files ------------------------------------------------------------------

def test_cli_missing_data_path(capsys, tmp_path):
    _one_line_error(capsys, ["score", "--model", "resnet18", "--data",
                             f"imagefolder:{tmp_path / 'nowhere'}", *QUIET],
                    "nowhere", "does not exist")


def test_cli_skips_a_corrupt_image_with_a_count_and_strict_makes_it_an_error(capsys, tmp_path):
    root = _image_folder(tmp_path / "pets", corrupt=True)
    argv = ["score", "--model", "resnet18", "--data", f"imagefolder:{root}", "--image-size",
            "32", "--batch-size", "8", "--json", *QUIET]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the per-file warning
        assert main(argv) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["n_samples"] == 4  # the 4 readable images, not 5
    assert "skipped 1 unreadable image(s)" in err and "broken.png" in err
    _one_line_error(capsys, [*argv, "--strict"], "broken.png", "strict")


# --- non-finite values ---------------------------------------------------------------------

def test_inf_in_ablation_effects_is_reported():
    model = make_tiny()
    with torch.no_grad():
        model.fc.bias[0] = float("inf")  # every output is Inf: every effect is NaN
    data = [(torch.randn(2, 2, 6, 6), torch.tensor([0, 1]))]
    with pytest.raises(NonFiniteError, match="NaN or Inf in ablation effects at conv1"):
        fxgndi.ablate(model, data, metric="logit_l2", progress=False)


@pytest.mark.parametrize("metric", ["accuracy", "logit_l2", "kl", "loss"])
def test_nan_weights_are_reported_by_every_ablation_metric(metric):
    model = make_tiny()
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")  # NaN from conv2 on: every output
    data = [(torch.randn(2, 2, 6, 6), torch.tensor([0, 1]))]
    with torch.no_grad():
        assert torch.isnan(model(data[0][0])).all()  # plain PyTorch: the model emits NaN
    # accuracy used to compare argmaxes of NaN rows (index 0 each time) and report 0 effects
    with pytest.raises(NonFiniteError, match="NaN or Inf in ablation effects"):
        fxgndi.ablate(model, data, metric=metric, progress=False)


# --- empty data ----------------------------------------------------------------------------

def test_empty_dataloader_is_a_data_error(tiny):
    empty = DataLoader(TensorDataset(torch.zeros(0, 2, 6, 6)), batch_size=4)
    with pytest.raises(DataError, match="no batches"):
        fxgndi.ablate(tiny, empty, metric="logit_l2", progress=False)


@pytest.mark.parametrize("verb", ["score", "prune"])
def test_one_tensor_as_data_is_a_data_error(tiny, verb):
    x = torch.randn(4, 2, 6, 6)
    call = {"score": lambda: fxgndi.score(tiny, x, progress=False),
            "prune": lambda: fxgndi.prune(tiny, x, importance="l1", progress=False)}[verb]
    with pytest.raises(DataError, match=r"one Tensor, not an iterable of batches.*\[\(x, y\)\]"):
        call()


# --- outputs -------------------------------------------------------------------------------

def test_cli_unwritable_output_fails_before_any_work(capsys, tmp_path):
    plot = tmp_path / "missing-folder" / "scores.png"
    _one_line_error(capsys, ["ablate", "--model", "resnet18", "--data", "digits", "--metric",
                             "logit_l2", "--plot", str(plot), *QUIET],
                    "cannot write --plot", "missing-folder")
    state = tmp_path / "nope" / "run.pt"
    _one_line_error(capsys, ["score", "--model", "resnet18", "--data", "digits",
                             "--run-state", str(state), *QUIET], "cannot write --run-state")
    assert not plot.parent.exists() and not state.parent.exists()


def test_a_failed_state_save_keeps_the_previous_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "run.pt"
    save_state(path, settings={"p": 2}, batches=1, sums={"count": torch.tensor(4.0)})
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"half")  # a partial write, then the failure
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_state(path, settings={"p": 2}, batches=2, sums={"count": torch.tensor(8.0)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["run.pt"]


def test_resume_without_a_state_path(capsys, tiny):
    with pytest.raises(ValueError, match="resume=True needs run_state=PATH"):
        fxgndi.score(tiny, [torch.randn(2, 2, 6, 6)], resume=True, progress=False)
    _one_line_error(capsys, ["score", "--model", "resnet18", "--data", "digits", "--resume",
                             *QUIET], "--resume needs --run-state")


# --- pruning and export arguments -----------------------------------------------------------

@pytest.fixture
def no_loading(monkeypatch):
    """The CLI fails the test if it loads a model or data (refusals come before any work)."""
    def refuse(args):
        raise AssertionError("the model and data were loaded before the refusal")
    monkeypatch.setattr("fxgndi.app.cli._load", refuse)


@pytest.mark.parametrize("out, extra", [("d.pth", []), ("d.bin", ["--format", "pth"])])
def test_cli_prune_depth_refuses_a_pth_out_before_any_work(capsys, tmp_path, no_loading, out,
                                                           extra):
    _one_line_error(capsys, ["prune-depth", "--model", "resnet18", "--blocks", "1", "--out",
                             str(tmp_path / out), *extra, "--quiet"],
                    "GraphModule", "use .pt2, .onnx or .ts")
    assert os.listdir(tmp_path) == []


def test_cli_unknown_export_suffix_names_the_cli_flag_before_any_work(capsys, tmp_path,
                                                                      no_loading):
    for command in (["prune"], ["prune-depth", "--blocks", "1"], ["export"]):
        _one_line_error(capsys, [*command, "--model", "resnet18", "--out",
                                 str(tmp_path / "m.bin"), "--quiet"],
                        "suffix '.bin'", "--format")


def test_round_to_below_one_is_refused(capsys, tiny):
    data = [(torch.randn(4, 2, 6, 6), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(ValueError, match="round_to must be None or an integer >= 1.*not 0"):
        fxgndi.prune(tiny, data, sparsity=0.5, round_to=0)
    _one_line_error(capsys, ["prune", "--model", "resnet18", "--limit", "4", "--importance",
                             "l1", "--round-to", "0", "--quiet"], "round_to", "not 0")


def test_validate_n_channels_below_two_is_one_line(capsys):
    _one_line_error(capsys, ["validate", "--model", "resnet18", "--limit", "4",
                             "--granularity", "channel", "--n-channels", "0", *QUIET],
                    "n_channels must be an integer >= 2", "not 0")


def test_one_sample_validate_warns(tiny):
    data = [(torch.randn(1, 2, 6, 6), torch.tensor([1]))]
    with pytest.warns(RuntimeWarning, match="truth on 1 sample.*standard errors are undefined"):
        fxgndi.validate(tiny, data, importances=["gndi"], truth="logit_l2", progress=False)


def test_bad_memory_budgets(tiny):
    x = [torch.randn(2, 2, 6, 6)]
    with pytest.raises(ValueError, match="cannot read the memory size '4 parsecs'"):
        fxgndi.score(tiny, x, max_memory="4 parsecs", progress=False)
    with pytest.raises(ValueError, match="max_memory=0 MiB is below the .* one sample needs"):
        fxgndi.score(tiny, x, max_memory=100, progress=False)
