"""Tests of fxgndi.app.models (loading, checkpoints, zero heads) and fxgndi.pruning.finetune."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
from torch import nn

from fxgndi.app import zoo as train_mod
from fxgndi.app.data import load_data
from fxgndi.app.models import load_checkpoint, load_model, reinit_zero_heads
from fxgndi.app.zoo import default_cache_dir, digits_resnet18
from fxgndi.pruning.finetune import evaluate, train_classifier


# --------------------------------------------------------------------------- models

def test_unknown_model_suggests_close_match():
    with pytest.raises(ValueError, match="resnet18"):
        load_model("resnet81")
    with pytest.raises(ValueError, match="not an image classifier"):
        load_model("fasterrcnn_resnet50_fpn")


def test_load_model_builds_eval_mode_classifier():
    model = load_model("ResNet18", num_classes=7)
    assert not model.training
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 7)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = load_model("resnet18", num_classes=10)
    path = tmp_path / "r18.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model("resnet18", num_classes=10, checkpoint=path)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), loaded(x))
    # wrapped forms: {"state_dict": ...} and DistributedDataParallel's "module." prefix
    wrapped = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    torch.save(wrapped, tmp_path / "ddp.pt")
    assert torch.equal(model(x), load_model("resnet18", num_classes=10,
                                            checkpoint=tmp_path / "ddp.pt")(x))


def test_checkpoint_with_other_num_classes_suggests_flag(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(load_model("resnet18", num_classes=10).state_dict(), path)
    with pytest.raises(ValueError, match=r"fc\.weight.*--num-classes 10"):
        load_model("resnet18", checkpoint=path)
    with pytest.raises(ValueError, match="missing keys"):
        load_checkpoint(torchvision.models.resnet34(num_classes=10), path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_model("resnet18", checkpoint=tmp_path / "nothing.pt")


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="not a state dict"):
        load_model("resnet18", checkpoint=path)


def test_weights_errors_without_download(monkeypatch):
    with pytest.raises(ValueError, match="1000 classes"):
        load_model("resnet18", weights="DEFAULT", num_classes=10)
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        load_model("resnet18", weights="NOPE")
    with pytest.raises(ValueError, match="not both"):
        load_model("resnet18", weights="DEFAULT", checkpoint="x.pt")

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline,
                        raising=False)
    with pytest.raises(RuntimeError, match="resnet18-.*\\.pth"):
        load_model("resnet18", weights="IMAGENET1K_V1")


def test_reinit_zero_heads_on_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    tiny = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2,
                             hidden_dim=16, mlp_dim=32, num_classes=10)
    assert not tiny.heads.head.weight.any()  # torchvision's zero init: the reason for the fix
    assert reinit_zero_heads(tiny) == ["heads.head"] and tiny.heads.head.weight.any()
    model = load_model("vit_b_16", image_size=32, num_classes=10)
    head = model.heads.head.weight
    assert head.any() and 0.005 < head.std().item() < 0.02
    assert reinit_zero_heads(model) == []  # nothing left to fix; trained heads are untouched


def test_reinit_zero_heads_is_seeded():
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    for layer in (a, b):
        nn.init.zeros_(layer.weight)
    assert reinit_zero_heads(a, seed=1) == [""] and reinit_zero_heads(b, seed=1) == [""]
    assert torch.equal(a.weight, b.weight)


# --------------------------------------------------------------------------- train

def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 64), nn.ReLU(), nn.Dropout(0.1),
                         nn.Linear(64, 10))


def _small_loader(**kwargs):
    # 8x8 digits (their native size) keep the training tests to a second or two
    return load_data("digits", split="train", image_size=8, **kwargs)


def test_train_classifier_reduces_loss():
    loader = _small_loader(batch_size=32, limit=256)
    model = _small_model().train()
    before = evaluate(model, loader)
    assert model.training  # evaluate restored the flag
    trained = train_classifier(model, loader, epochs=3, lr=1e-2, progress=False)
    after = evaluate(trained, loader)
    assert trained is model and not model.training
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > 0.8 > before["accuracy"] and after["n"] == 256


def test_train_classifier_is_deterministic():
    # the data order is the loader's: a fresh loader with the same seed reproduces a run
    runs = [train_classifier(_small_model(), _small_loader(batch_size=64, limit=128),
                             epochs=2, progress=False, seed=5) for _ in range(2)]
    for p, q in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(p, q)


def test_train_and_evaluate_reject_bad_input():
    with pytest.raises(ValueError, match="epochs"):
        train_classifier(_small_model(), [], epochs=0)
    with pytest.raises(ValueError, match="empty"):
        train_classifier(_small_model(), [], epochs=1)
    with pytest.raises(ValueError, match="len"):
        train_classifier(_small_model(), (b for b in []), epochs=1)
    with pytest.raises(ValueError, match="no samples"):
        evaluate(_small_model(), [])


def test_default_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FXGNDI_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FXGNDI_CACHE")
    assert default_cache_dir() == default_cache_dir().home() / ".cache" / "fxgndi"


def test_digits_resnet18_caches(tmp_path, monkeypatch):
    real_train = train_mod.train_classifier
    calls = []

    def quick_train(model, loader, **kwargs):
        calls.append(kwargs)
        small = load_data("digits", split="train", batch_size=16, limit=16)
        return real_train(model, small, epochs=1, progress=False)

    monkeypatch.setattr(train_mod, "train_classifier", quick_train)
    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: {"accuracy": 0.0, "loss": 0.0})
    first = digits_resnet18(cache_dir=tmp_path, progress=False)
    path = tmp_path / "digits_resnet18.pt"
    assert path.is_file() and len(calls) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["digits_resnet18.pt"]  # no temp left
    assert calls[0]["epochs"] == train_mod.DIGITS_RECIPE["epochs"]

    def no_training(*args, **kwargs):
        raise AssertionError("the cached model should have been loaded, not retrained")

    monkeypatch.setattr(train_mod, "train_classifier", no_training)
    second = digits_resnet18(cache_dir=tmp_path, progress=False)
    assert isinstance(second, torchvision.models.ResNet) and not second.training
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(first(x), second(x))
    with pytest.raises(AssertionError, match="cached"):
        digits_resnet18(cache_dir=tmp_path, progress=False, retrain=True)


def test_digits_resnet18_retrains_over_corrupt_cache(tmp_path, monkeypatch):
    (tmp_path / "digits_resnet18.pt").write_bytes(b"garbage")
    monkeypatch.setattr(train_mod, "train_classifier", lambda model, loader, **k: model.eval())
    monkeypatch.setattr(train_mod, "evaluate", lambda *a, **k: {"accuracy": 0.0, "loss": 0.0})
    with pytest.warns(RuntimeWarning, match="retraining"):
        digits_resnet18(cache_dir=tmp_path, progress=False)
    assert os.path.getsize(tmp_path / "digits_resnet18.pt") > 1000
